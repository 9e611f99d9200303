"""The training engine: runs, checkpoints, resume, accumulation, safety, across processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditx import checkpoint as ckpt
from ditx.registry import datasets
from ditx.train import DataBudgetError, NonFiniteLossError, train


def final_weights(run: Path, name="model") -> dict[str, torch.Tensor]:
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    return load_file(str(last / f"{name}.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_a_run_writes_config_checkpoints_logs_and_previews(tiny_recipe, tmp_path):
    run = train(tiny_recipe(), run_dir=tmp_path / "run")
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000006"]  # fmt: skip
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.list_checkpoints(run / "checkpoints"))
    assert list((run / "logs").rglob("events.out.tfevents*")), "no tensorboard events"
    assert (run / "samples" / "step_00000006" / "grid.png").is_file()
    # EMA is float32 and lies between the initial and the final weights (decay 0.9)
    ema, model = final_weights(run, "ema"), final_weights(run)
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert any(not torch.equal(ema[k], model[k]) for k in ema)


def test_checkpoint_holds_everything_to_resume(tiny_recipe, tmp_path):
    run = train(tiny_recipe(train={"steps": 2}), run_dir=tmp_path / "run")
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    names = {p.name for p in last.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "scaler.json", "rng_0.safetensors", "rng_0.json", "trainer_state.json", "manifest.json"} <= names
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_step"] == 2
    opt = load_file(str(last / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg") for k in opt)


def test_resume_reaches_the_same_weights_and_skips_a_corrupt_checkpoint(tiny_recipe, tmp_path):
    full = train(tiny_recipe(), run_dir=tmp_path / "full")
    part = train(tiny_recipe(train={"steps": 4}), run_dir=tmp_path / "part")
    # break the newest checkpoint (step 4): resume must fall back to step 2, with a warning
    model_file = part / "checkpoints" / "step_00000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=r"step_00000004: model.safetensors has \d+ bytes.*truncated"):
        train(tiny_recipe(), run_dir=part, resume=True)
    assert_same_weights(final_weights(part), final_weights(full))
    assert_same_weights(final_weights(part, "ema"), final_weights(full, "ema"))


def test_gradient_accumulation_matches_the_full_batch(tiny_recipe, tmp_path):
    a = train(tiny_recipe(train={"steps": 3}), run_dir=tmp_path / "a")
    b = train(tiny_recipe(train={"steps": 3, "grad_accum": 2}), run_dir=tmp_path / "b")
    assert_same_weights(final_weights(a), final_weights(b), atol=1e-6)


def test_bf16_mixed_precision_trains_on_cpu(tiny_recipe, tmp_path):
    run = train(tiny_recipe(train={"steps": 2, "mixed_precision": "bf16"}), run_dir=tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < x < 10 for x in losses)
    assert all(v.dtype == torch.float32 for v in final_weights(run).values())  # master weights stay fp32


class _Flaky(torch.utils.data.Dataset):
    """Digits whose items misbehave: NaN images from some epoch on, or unreadable files."""

    def __init__(self, nan_from_epoch=None, broken=(), size=8, seed=0):
        from modalities.image.data import DigitsDataset

        self.base = DigitsDataset(size=size)
        self.data_shape, self.num_classes = self.base.data_shape, 10
        self.nan_from_epoch, self.broken, self.epoch = nan_from_epoch, set(broken), 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i in self.broken:
            raise OSError(f"cannot decode /data/digits/{i:04d}.png")
        item = self.base[i]
        if self.nan_from_epoch is not None and self.epoch >= self.nan_from_epoch:
            item["x"] = torch.full_like(item["x"], float("nan"))
        return item


@pytest.fixture
def flaky_dataset():
    datasets.register("test-flaky", _Flaky, replace=True)
    yield "test-flaky"
    datasets.unregister("test-flaky")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path, flaky_dataset):
    # 64 items, batch 16: 4 steps per epoch; epoch 1 (step 5) is NaN
    recipe = tiny_recipe(data={"name": flaky_dataset, "nan_from_epoch": 1}, train={"steps": 8, "checkpoint_every": 4})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*last good checkpoint is .*step_00000004"):
        train(recipe, run_dir=tmp_path / "run")
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004"] and ckpt.verify_checkpoint(kept[0]) is None
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values())


def test_unreadable_samples_are_logged_skipped_then_fail_loudly(tiny_recipe, tmp_path, flaky_dataset, caplog):
    recipe = tiny_recipe(data={"name": flaky_dataset, "broken": [3, 40]}, train={"steps": 4, "max_bad_samples": 2})
    with caplog.at_level("WARNING", logger="ditx"):
        train(recipe, run_dir=tmp_path / "ok")  # one epoch: both broken items seen once
    assert "cannot decode /data/digits/0003.png" in caplog.text
    assert "cannot decode /data/digits/0040.png" in caplog.text
    recipe = tiny_recipe(data={"name": flaky_dataset, "broken": [3, 40]}, train={"steps": 8, "max_bad_samples": 3})
    with pytest.raises(DataBudgetError, match=r"4 unreadable samples exceed train.max_bad_samples=3"):
        train(recipe, run_dir=tmp_path / "too-many")


# --- across processes ------------------------------------------------------------------------


def _ditx(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "ditx.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)


def _accelerate(nproc, *args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "ditx.cli", *map(str, args)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_equal_one_process_with_twice_the_batch_and_resume_on_one(tiny_recipe_file, tmp_path):
    recipe = tiny_recipe_file(train={"steps": 4, "checkpoint_every": 2})
    two = _accelerate(2, "train", recipe, "--run-dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((tmp_path / "two/checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["world_size"] == 2
    one = _ditx("train", recipe, "--run-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5)
    # the 2-process checkpoint continues on 1 process, like the 1-process run would
    more = _ditx("train", recipe, "train.steps=6", "--run-dir", tmp_path / "two", "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    _ditx("train", recipe, "train.steps=6", "--run-dir", tmp_path / "one", "--resume")
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5)


def test_sigkill_between_checkpoints_then_resume_matches_an_uninterrupted_run(tiny_recipe_file, tmp_path):
    recipe = tiny_recipe_file(train={"steps": 40, "checkpoint_every": 10})
    ref = _ditx("train", recipe, "--run-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ditx.cli", "train", str(recipe), "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once past the first checkpoint, mid-way to the next
        lines = log.read_text().splitlines() if log.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 13:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(log.read_text().splitlines()[-1])["step"]
    assert killed_at < 40, "the run finished before it could be killed"
    resumed = _ditx("train", recipe, "--run-dir", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(run), final_weights(tmp_path / "ref"))
    assert_same_weights(final_weights(run, "ema"), final_weights(tmp_path / "ref", "ema"))
    shutil.rmtree(tmp_path / "ref")


def test_ema_update_follows_its_closed_form():
    from ditx.train import EMA

    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    plain, warm = EMA(lin, 0.99, warmup=False), EMA(lin, 0.99, warmup=True)
    with torch.no_grad():
        lin.weight.fill_(4.0)
    plain.update(lin, step=1)
    warm.update(lin, step=1)
    assert plain.model.weight.item() == pytest.approx(0.99 * 2 + 0.01 * 4)
    assert warm.model.weight.item() == pytest.approx(0.1 * 2 + 0.9 * 4)  # decay (1 + 0) / (10 + 0)
    assert warm.decay_at(10_000) == 0.99 and plain.model.weight.dtype == torch.float32
