"""The training engine: runs, checkpoints, resume, accumulation, safety, across processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ditx import checkpoint as ckpt
from ditx.build import build_components
from ditx.data import Dataset
from ditx.files import OutputExistsError
from ditx.registry import datasets, objectives
from ditx.train import DataBudgetError, NonFiniteGradientError, NonFiniteLossError, train


def final_weights(run: Path, name="model") -> dict[str, torch.Tensor]:
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    return load_file(str(last / "ema" / "model.safetensors" if name == "ema" else last / f"{name}.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_cosine_lr_schedule_reaches_zero_at_the_last_step(tiny_recipe, tmp_path):
    run = train(tiny_recipe(train={"lr_schedule": "cosine", "warmup_steps": 2}), run_dir=tmp_path / "run")
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the rate after steps 1..6: warmup 2 steps, then 1e-3 * (1 + cos(pi k / 4)) / 2 for k = 0..4
    expected = [1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx(expected, abs=1e-12)


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
    assert {"model.safetensors", "ema", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "scaler.json", "rng_0.safetensors", "rng_0.json", "trainer_state.json", "manifest.json"} <= names
    # the EMA is a model directory of its own: loadable without the run's config
    ema = ckpt.load_model(last / "ema")
    assert_same_weights(ema.state_dict(), final_weights(run, "ema"))
    parts = build_components(tiny_recipe(train={"steps": 2}))  # what the checkpoint must say it generates
    assert ckpt.read_model_config(last / "ema")["metadata"] == {
        "data_shape": list(parts.data_shape), "latent_shape": list(parts.latent_shape), "num_classes": 10}  # fmt: skip
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_step"] == 2
    opt = load_file(str(last / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg") for k in opt)


def test_gradient_accumulation_matches_the_full_batch(tiny_recipe, tmp_path):
    a = train(tiny_recipe(train={"steps": 3}), run_dir=tmp_path / "a")
    b = train(tiny_recipe(train={"steps": 3, "grad_accum": 2}), run_dir=tmp_path / "b")
    assert_same_weights(final_weights(a), final_weights(b), atol=1e-6)


def _linear_output_dtypes(recipe, run_dir) -> set[torch.dtype]:
    """The dtypes every nn.Linear of the training produced (a global forward hook), then the run."""
    seen: set[torch.dtype] = set()

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        train(recipe, run_dir=run_dir)
    finally:
        handle.remove()
        from accelerate.state import AcceleratorState  # the next run may choose another precision

        AcceleratorState._reset_state(reset_partial_state=True)
    return seen


def test_bf16_mixed_precision_runs_the_matmuls_in_bf16_on_cpu(tiny_recipe, tmp_path):
    bf16 = _linear_output_dtypes(tiny_recipe(train={"steps": 2, "mixed_precision": "bf16"}), tmp_path / "bf16")
    assert bf16 == {torch.bfloat16}  # autocast really on: every training matmul in bf16
    fp32 = _linear_output_dtypes(tiny_recipe(train={"steps": 2, "mixed_precision": "no"}), tmp_path / "fp32")
    assert fp32 == {torch.float32}  # and the hook sees the difference
    run = tmp_path / "bf16"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < x < 10 for x in losses)
    assert all(v.dtype == torch.float32 for v in final_weights(run).values())  # master weights stay fp32


@pytest.mark.parametrize("bf16_gflops, expected", [(0.3, torch.float32), (500.0, torch.bfloat16)])
def test_auto_mixed_precision_takes_bf16_only_where_its_matmuls_are_fast(tiny_recipe, tmp_path, monkeypatch,
                                                                         bf16_gflops, expected):  # fmt: skip
    from ditx import precision

    # an AVX2-only CPU (bf16 emulated: 0.3 GFLOP/s, measured on one) and an AMX one
    monkeypatch.setattr(precision, "cpu_matmul_speeds", lambda: {"fp32": 150.0, "bf16": bf16_gflops})
    seen = _linear_output_dtypes(tiny_recipe(train={"steps": 2, "mixed_precision": "auto"}), tmp_path / "auto")
    assert seen == {expected}


def test_resolve_precision_measures_and_warns_about_slow_bf16(monkeypatch, caplog):
    from ditx import precision

    speeds = precision.cpu_matmul_speeds()  # the real measurement: both types ran
    assert speeds["fp32"] > 0 and speeds["bf16"] > 0
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if speeds["bf16"] >= speeds["fp32"] else "no")
    monkeypatch.setattr(precision, "cpu_matmul_speeds", lambda: {"fp32": 150.0, "bf16": 0.3})
    with caplog.at_level("WARNING", logger="ditx.precision"):
        assert precision.resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: kept, with a warning
    assert "0.30 GFLOP/s against fp32's 150.0" in caplog.text and "auto picks fp32" in caplog.text
    assert precision.resolve_precision("no", "cpu") == "no"
    with pytest.raises(ValueError, match=r"train.mixed_precision must be one of no, bf16, fp16, auto, got 'fp8'"):
        precision.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("setting, problem, compiled", [
    ("auto", None, True), ("auto", "torch.compile does not run on cpu here (no compiler)", False),
    (True, None, True), (False, None, False),
])  # fmt: skip
def test_model_compile_auto_compiles_where_torch_compile_runs(tiny_recipe, tmp_path, monkeypatch, caplog,
                                                             setting, problem, compiled):  # fmt: skip
    from ditx import train as train_job
    from ditx.dit import DiT

    calls = []
    monkeypatch.setattr(DiT, "compile_blocks", lambda self, **kw: calls.append(self) or self)
    monkeypatch.setattr(train_job, "compile_problem", lambda device_type: problem)
    with caplog.at_level("WARNING", logger="ditx.train"):
        train(tiny_recipe(model={"compile": setting}, train={"steps": 1}), run_dir=tmp_path / "run")
    assert len(calls) == int(compiled)
    assert ("training without torch.compile: torch.compile does not run on cpu here (no compiler)" in caplog.text) == (
        problem is not None
    )


def test_model_compile_true_where_torch_compile_cannot_run_is_an_error(tiny_recipe, tmp_path, monkeypatch):
    from ditx import train as train_job

    monkeypatch.setattr(train_job, "compile_problem", lambda device_type: "torch.compile does not run on cpu here (X)")
    with pytest.raises(RuntimeError, match=r"model.compile=true, but torch.compile does not run on cpu here \(X\); "
                                           r"set model.compile: auto"):  # fmt: skip
        train(tiny_recipe(model={"compile": True}, train={"steps": 1}), run_dir=tmp_path / "run")


def test_compile_problem_names_a_missing_cxx_compiler(tmp_path):
    """The real probe: a C++ compiler that is not there (and an empty kernel cache, so nothing
    compiled earlier is reused) is reported; the machine's own compiler passes."""
    probe = "from ditx.dit import compile_problem; print(compile_problem('cpu'))"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "kernels")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "torch.compile does not run on cpu here (InductorError: InvalidCxxCompiler" in out, out
    from ditx.dit import compile_problem

    assert compile_problem("cpu") is None


def test_adamw_runs_fused_on_cpu_and_takes_adamws_steps():
    """The training jobs' optimizer (fused kernel on CPU) against AdamW written out: decoupled decay,
    bias-corrected moments."""
    from ditx.build import adamw

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    optimizer = adamw([p], torch.device("cpu"), lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps)
    assert optimizer.defaults["fused"] is True
    ref, m, v = p.detach().clone(), torch.zeros(5, 3), torch.zeros(5, 3)
    for k, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        optimizer.step()
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        ref = ref * (1 - lr * wd) - lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-6)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_rerun_into_a_run_folder_is_refused_before_writing_anything(tiny_recipe, tmp_path, capsys):
    run = train(tiny_recipe(train={"steps": 4}), run_dir=tmp_path / "run")
    before = _tree(run)
    with pytest.raises(OutputExistsError) as info:
        train(tiny_recipe(), run_dir=run)
    message = str(info.value)
    assert "checkpoints up to step_00000004" in message and "--resume" in message and "--overwrite" in message
    assert _tree(run) == before  # not one file written, touched or deleted
    # --overwrite says what it deletes, then keeps nothing of the old run
    train(tiny_recipe(train={"steps": 2}), run_dir=run, overwrite=True)
    assert "--overwrite: deleting a training run (checkpoints up to step_00000004)" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(ValueError, match="pass one of them"):
        train(tiny_recipe(), run_dir=run, resume=True, overwrite=True)


def test_the_command_line_refusal_is_one_line_naming_the_newest_checkpoint(tiny_recipe_file, tmp_path):
    recipe = tiny_recipe_file(train={"steps": 2})
    assert _ditx("train", recipe, "--run-dir", tmp_path / "run").returncode == 0
    again = _ditx("train", recipe, "--run-dir", tmp_path / "run")
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "step_00000002" in again.stderr and "--resume" in again.stderr


def _corrupt(kind: str, checkpoint: Path) -> None:
    if kind == "flipped byte":  # same size: only the SHA-256 can tell
        f = checkpoint / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif kind == "truncated":
        f = checkpoint / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "no manifest":
        (checkpoint / "manifest.json").unlink()
    elif kind == "missing file":
        (checkpoint / "optimizer.safetensors").unlink()


PROBLEMS = {"flipped byte": "model.safetensors does not match its SHA-256",
            "truncated": r"model.safetensors has \d+ bytes, the manifest says \d+ \(truncated",
            "no manifest": "no manifest.json", "missing file": "optimizer.safetensors is missing"}  # fmt: skip


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_resume_falls_back_over_every_kind_of_corruption(tiny_recipe, tmp_path, kind):
    full = train(tiny_recipe(), run_dir=tmp_path / "full")
    part = train(tiny_recipe(train={"steps": 4}), run_dir=tmp_path / "part")
    _corrupt(kind, part / "checkpoints" / "step_00000004")
    with pytest.warns(UserWarning, match=rf"step_00000004: .*{PROBLEMS[kind]}"):
        train(tiny_recipe(), run_dir=part, resume=True)
    assert_same_weights(final_weights(part), final_weights(full))
    assert_same_weights(final_weights(part, "ema"), final_weights(full, "ema"))


def test_all_checkpoints_corrupt_is_an_error_naming_each_and_deleting_nothing(tiny_recipe, tmp_path):
    part = train(tiny_recipe(train={"steps": 4}), run_dir=tmp_path / "part")
    kept = ckpt.list_checkpoints(part / "checkpoints")
    for kind, checkpoint in zip(["flipped byte", "no manifest"], kept):
        _corrupt(kind, checkpoint)
    before = _tree(part)
    with pytest.raises(ckpt.CheckpointError) as info, pytest.warns(UserWarning):
        train(tiny_recipe(), run_dir=part, resume=True)
    message = str(info.value)
    assert "step_00000002: does not match its SHA-256" in message.replace("model.safetensors ", "")
    assert "step_00000004: no manifest.json" in message
    assert _tree(part) == before


class _Flaky(Dataset):
    """Digits whose items misbehave: NaN images from some epoch on, or unreadable files."""

    def __init__(self, nan_from_epoch=None, broken=(), size=8, seed=0, split="train", augment=True):
        from ditx.modalities.image.data import DigitsDataset

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


class _Poisoned:
    """A test objective: DDPM whose loss (``what="loss"``) or only its gradients (``what="grad"``)
    turn NaN at the ``at``-th call, i.e. at that training step with one micro-batch per step."""

    def __init__(self, at: int, what: str = "loss", **kwargs):
        self.inner = objectives.build("ddpm", **kwargs)
        self.at, self.what, self.calls = at, what, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, *args, **kwargs):
        self.calls += 1
        terms = self.inner.loss(*args, **kwargs)
        if self.calls == self.at:
            if self.what == "loss":
                terms["loss"] = terms["loss"] * float("nan")
            else:
                terms["loss"] = _NanGradient.apply(terms["loss"])
        return terms


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def poisoned_objective():
    objectives.register("test-poisoned", _Poisoned, replace=True)
    yield "test-poisoned"
    objectives.unregister("test-poisoned")


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nan_on_a_checkpoint_step_stops_naming_it_and_no_checkpoint_holds_nan(
    tiny_recipe, tmp_path, poisoned_objective, what
):
    recipe = tiny_recipe(objective={"name": poisoned_objective, "at": 8, "what": what},
                         train={"steps": 12, "checkpoint_every": 4})  # fmt: skip
    error = NonFiniteLossError if what == "loss" else NonFiniteGradientError
    message = r"loss is nan at step 8 " if what == "loss" else r"gradient norm is nan at step 8 with a finite loss"
    with pytest.raises(error, match=message + r".*last good checkpoint is .*step_00000004"):
        train(recipe, run_dir=tmp_path / "run")
    kept = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004"]
    for name in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run", name).values())


def test_a_checkpoint_with_nan_weights_is_never_written(tiny_recipe, tmp_path, monkeypatch):
    """The last line of defence: weights turned NaN by the optimizer step of a checkpoint step
    (finite loss and gradients, so the checks before the step cannot see it) are not saved."""
    recipe = tiny_recipe(train={"steps": 4, "checkpoint_every": 2})
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if next(iter(self.state.values()))["step"] >= 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to write checkpoint step 4: the model weights"):
        train(recipe, run_dir=tmp_path / "run")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]


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


# 355 test digits, global batch 32: 11 steps an epoch, so epoch 1 starts at step 12; checkpoints
# every 10 steps. A kill at step 15 comes after an epoch boundary that the checkpoint (step 10)
# had not crossed, and a kill inside the write of step 20 must fall back to step 10.
KILL_RECIPE = {"data": {"split": "test"}, "train": {"steps": 30, "checkpoint_every": 10, "batch_size": 32}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the kill recipe run start to end in one process."""
    from conftest import tiny_recipe_dict

    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = root / "kill.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(root, **KILL_RECIPE)))
    done = _ditx("train", recipe, "--run-dir", root / "ref")
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((root / "ref/checkpoints/step_00000010/trainer_state.json").read_text())
    assert state["batches_per_epoch"] == 11  # the epoch arithmetic above
    return recipe, root / "ref"


def _kill_at(recipe: Path, run: Path, point: str) -> None:
    """Start ``ditx train``, wait until it pauses at ``point`` (a test hook), then SIGKILL it."""
    marker = run.parent / f"{run.name}.paused"
    env = dict(os.environ, DITX_TEST_PAUSE=point, DITX_TEST_PAUSE_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-m", "ditx.cli", "train", str(recipe), "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before pausing at {point}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no pause at {point} within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_and_check(recipe: Path, run: Path, ref: Path, from_step: int) -> None:
    before = (run / "metrics.jsonl").read_text().splitlines()
    resumed = _ditx("train", recipe, "--run-dir", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed process starts at the checkpoint: the records of steps up to it are the killed
    # process's, untouched (their timings would differ if they were redone); each later step is
    # logged once (the killed process's records after the checkpoint are dropped)
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:from_step] == before[:from_step]
    assert _logged_steps(run) == list(range(1, 31))
    assert f"resumed from {run / 'checkpoints' / f'step_{from_step:08d}'} at step {from_step}" in (
        (run / "train.log").read_text())  # fmt: skip
    assert_same_weights(final_weights(run), final_weights(ref))  # bit-exact
    assert_same_weights(final_weights(run, "ema"), final_weights(ref, "ema"))


def test_sigkill_after_an_epoch_boundary_resumes_from_the_checkpoint_bit_exact(uninterrupted, tmp_path):
    recipe, ref = uninterrupted
    run = tmp_path / "killed"
    _kill_at(recipe, run, "step:15")
    assert _logged_steps(run) == list(range(1, 16))
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000010"]
    _resume_and_check(recipe, run, ref, from_step=10)


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_one_before(uninterrupted, tmp_path):
    recipe, ref = uninterrupted
    run = tmp_path / "killed"
    _kill_at(recipe, run, "checkpoint:20")
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert "step_00000010" in leftovers and "step_00000020" not in leftovers
    assert any(".step_00000020." in name for name in leftovers)  # the half-written temporary
    _resume_and_check(recipe, run, ref, from_step=10)
    assert not any(name.startswith(".") for name in os.listdir(run / "checkpoints"))  # cleaned up on resume


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
