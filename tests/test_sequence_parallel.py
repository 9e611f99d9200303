"""Sequence parallelism (ditx.parallel): 2 processes on CPU (gloo) against 1.

The worker (tests/sequence_parallel_worker.py) runs each DiT case once whole and once with
its tokens split over the processes; outputs must agree and the gradients, summed over the
group, must equal the whole run's, for joint and spatial-temporal layouts, sin-cos and
rotary positions, frame masks, text cross-attention, tubelets over time and images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sequence_parallel_worker.py")


def _torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "results.json"
    proc = _torchrun(2, WORKER, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


CASES = ("joint-rope-qknorm-frames", "spatial-temporal-sincos-text", "spatial-temporal-rope-tubelets", "image-joint")
# all-to-all calls per forward of the 3-block models: 2 per block attending across frames;
# spatial-temporal's blocks 0 and 2 attend within a frame and exchange nothing
EXCHANGES = {"joint-rope-qknorm-frames": 6, "spatial-temporal-sincos-text": 2,
             "spatial-temporal-rope-tubelets": 2, "image-joint": 6}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(two_process_results, case):
    assert two_process_results["size"] == 2
    r = two_process_results["cases"][case]
    assert r["missing_grads"] == []  # every parameter gets a gradient in both runs
    assert r["output_scale"] > 0.1 and r["grad_scale"] > 0.1  # the comparison is not between zeros
    assert r["output"] <= 1e-10 * r["output_scale"]
    assert r["grad"] <= 1e-10 * r["grad_scale"]
    assert r["exchanges"] == EXCHANGES[case]


def test_indivisible_grid_is_refused_with_its_numbers(two_process_results):
    message = two_process_results["cases"]["indivisible"]
    assert message is not None and "(7, 4)" in message and "divisible by 2" in message


def test_without_torch_distributed_it_says_how_to_launch():
    from ditx.parallel import SequenceParallel, sequence_parallel_groups

    assert sequence_parallel_groups(1) == (None, 0, 1)
    with pytest.raises(ValueError, match="accelerate launch --num_processes 2"):
        sequence_parallel_groups(2)
    with pytest.raises(ValueError, match="positive integer"):
        sequence_parallel_groups(0)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        SequenceParallel()


def test_training_split_over_two_processes_equals_one_and_resumes_without_it(tiny_recipe_file, tmp_path):
    """`train.sequence_parallel: 2` on 2 processes (one data-parallel group: each process holds
    half of every image's tokens) trains the weights of 1 process without it; its checkpoint
    then continues on 1 process without parallelism like the 1-process run does."""
    import json

    from test_train import _accelerate, _ditx, assert_same_weights, final_weights

    recipe = tiny_recipe_file(train={"steps": 4, "checkpoint_every": 2})
    split = _accelerate(2, "train", recipe, "train.sequence_parallel=2", "--run-dir", tmp_path / "split")
    assert split.returncode == 0, split.stderr[-3000:]
    state = json.loads((tmp_path / "split/checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["sequence_parallel"] == 2 and state["world_size"] == 1  # 1 data-parallel group
    one = _ditx("train", recipe, "--run-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "one"), atol=1e-5)
    split_loss = [json.loads(x)["loss"] for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    one_loss = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert split_loss == pytest.approx(one_loss, rel=1e-5)
    more = _ditx("train", recipe, "train.steps=6", "--run-dir", tmp_path / "split", "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    _ditx("train", recipe, "train.steps=6", "--run-dir", tmp_path / "one", "--resume")
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "one"), atol=1e-5)


def test_sequence_parallel_must_divide_the_processes(tiny_recipe_file, tmp_path):
    from test_train import _accelerate

    recipe = tiny_recipe_file(train={"steps": 1})
    bad = _accelerate(2, "train", recipe, "train.sequence_parallel=3", "--run-dir", tmp_path / "bad")
    assert bad.returncode != 0
    assert "train.sequence_parallel=3 must divide the number of processes (2)" in bad.stderr
