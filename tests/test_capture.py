"""--compile-step: the optimizer step compiled as one function (capture.py) trains as the op-by-op step does,
skips on the device what --on-nan skip and fp16's GradScaler skip, resumes exactly, and its checkpoints load
in a run without it (and back). Most tests trace it with dynamo's eager backend (the graphs dynamo makes,
run without inductor's code generation, which takes minutes on 2 cores); one runs inductor (slow)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import fasttrain.train
from fasttrain import capture
from fasttrain import checkpoint as ckpt_io
from fasttrain import cli
from fasttrain.metrics import read_jsonl
from fasttrain.train import build_trainer

from .conftest import eager_backend

ARGS = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "4", "-p", "2", "--epochs", "2",
        "--warmup-epochs", "0.5", "--lr-schedule", "cosine"]


def small_model(cfg, num_classes):
    """Dropout uses the RNG every step; BatchNorm has running statistics; fast enough to train many times."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(8, num_classes))


class NanAt:
    """The criterion, with its loss times `factor` (NaN, or a huge number that overflows fp16's gradients) at
    its `at`-th call (1-based; validation comes after the 6 steps of an epoch, so a small `at` is a train step)."""

    def __init__(self, criterion, at: int, factor: float = float("nan")):
        self.criterion, self.at, self.factor, self.calls = criterion, at, factor, 0

    def __call__(self, logits, labels):
        self.calls += 1
        loss = self.criterion(logits, labels)
        return loss * self.factor if self.calls == self.at else loss


@pytest.fixture()
def traced(monkeypatch):
    """The small model, and --compile-step traced by dynamo but run without inductor."""
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    monkeypatch.setattr(capture, "compile_fn", eager_backend)


def nan_at(monkeypatch, at: int, factor: float = float("nan")) -> None:
    """Every trainer built from now on gets NanAt(criterion, at, factor) (at 0: none)."""
    def build(*a, **k):
        tr = build_trainer(*a, **k)
        tr.criterion = NanAt(tr.criterion, at, factor)
        return tr
    monkeypatch.setattr(fasttrain.train, "build_trainer", build)


def train(data, out, *extra, code=0):
    assert cli.main(["train", str(data), *ARGS, "--output-dir", str(out), *extra]) == code
    return read_jsonl(os.path.join(out, "metrics.jsonl")) if code == 0 else None


def load(out):
    return ckpt_io.load(os.path.join(out, ckpt_io.LATEST))


def assert_same_run(a_out, b_out, a_rows, b_rows, exact: bool):
    a, b = load(a_out), load(b_out)
    for key in ("state_dict", "ema"):
        for k, v in (a[key] or {}).items():
            if exact:
                assert torch.equal(v, b[key][k]), (key, k)
            else:
                torch.testing.assert_close(v, b[key][k], rtol=1e-5, atol=1e-6, msg=f"{key} {k}")
    keys = ("train_samples", "skipped_steps", "val_samples")
    assert [[r[k] for k in keys] for r in a_rows] == [[r[k] for k in keys] for r in b_rows]
    for ra, rb in zip(a_rows, b_rows):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-6)


CASES = {
    # SGD, a NaN loss at step 3 skipped (parameters, momentum, EMA and meters), clipping
    "sgd-nan-skip-ema-clip": (["--on-nan", "skip", "--ema", "0.9", "--clip-grad", "0.5"], (3, float("nan"))),
    # LAMB (its step count a tensor) under fp16's dynamic GradScaler, which skips step 2: its gradients overflow
    "lamb-fp16": (["--opt", "lamb", "--lr", "0.01", "--amp", "fp16"], (2, 1e30)),
    # AdamW (state made at its first step) with a static loss scale, the first step's NaN skipped
    "adamw-static-scale-nan-skip": (["--opt", "adamw", "--lr", "0.001", "--amp", "fp16", "--loss-scale", "1024",
                                     "--on-nan", "skip"], (1, float("nan"))),
    "lars": (["--opt", "lars", "--lr", "0.5"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_trains_as_the_op_by_op_step(case, traced, tiny_data, tmp_path, monkeypatch):
    extra, bad = CASES[case]
    if bad:
        nan_at(monkeypatch, *bad)
    op_by_op = train(tiny_data, tmp_path / "eager", *extra)
    compiled = train(tiny_data, tmp_path / "compiled", *extra, "--compile-step")
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", op_by_op, compiled, exact=False)
    ck = load(tmp_path / "compiled")
    if "--on-nan" in extra:
        assert compiled[0]["skipped_steps"] == 1 and compiled[0]["train_samples"] == 80  # 6 steps of 16, one skipped
    if case == "lamb-fp16":  # the GradScaler skipped one step and halved its scale, in both runs
        assert ck["scaler"]["scale"] == load(tmp_path / "eager")["scaler"]["scale"] == 2.0 ** 15
    assert all(isinstance(g["lr"], torch.Tensor) for g in ck["optimizer"]["param_groups"])
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_compiled_step_stops_and_resumes_exactly_and_loads_either_way(traced, tiny_data, tmp_path, monkeypatch):
    """Stopped at step 4 of 6 (what SIGTERM does) and resumed, with a NaN step skipped on each side of the stop:
    the same weights, EMA, meters and skip count as the straight run. Its checkpoint resumes without
    --compile-step too (a float LR again), and a checkpoint without it resumes with it."""
    extra = ["--compile-step", "--on-nan", "skip", "--ema", "0.9"]
    nan_at(monkeypatch, 3)
    straight = train(tiny_data, tmp_path / "straight", *extra)
    out = tmp_path / "stopped"
    calls = iter([0, signal.SIGTERM])  # at_sync runs at steps 2, 4, ...: stop at step 4
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    train(tiny_data, out, *extra, code=143)
    assert (load(out)["epoch"], load(out)["step"], load(out)["skipped_steps"]) == (0, 4, 1)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    nan_at(monkeypatch, 0)  # no NaN after the resume: the straight run's step 3 NaN is the stopped run's too
    resumed = train(tiny_data, out, *extra, "--resume", "auto")
    assert_same_run(tmp_path / "straight", out, straight, resumed, exact=True)

    # The same checkpoint resumed op by op, and an op-by-op checkpoint resumed compiled: the LR comes back in
    # the form each run uses, and both end where the straight run did.
    ck = load(out)
    ck["epoch"], ck["step"], ck["meters"] = 1, 0, None  # as at the end of epoch 0
    torch.save(ck, tmp_path / "mid.pth.tar")
    for flags in ([], ["--compile-step"]):
        rows = train(tiny_data, tmp_path / f"from-mid{len(flags)}", "--on-nan", "skip", "--ema", "0.9", "--epochs", "3",
                     "--resume", str(tmp_path / "mid.pth.tar"), *flags)
        assert [(r["epoch"], r["train_samples"]) for r in rows] == [(1, 96), (2, 96)]
    a, b = load(tmp_path / "from-mid0"), load(tmp_path / "from-mid1")
    assert isinstance(a["optimizer"]["param_groups"][0]["lr"], float)
    assert isinstance(b["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=1e-5, atol=1e-6)


def test_compile_step_flags_and_settings_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    for argv, needle in ((["--loss-scale", "1024"], "--loss-scale is fp16's static loss scale"),
                         (["--amp", "fp16", "--loss-scale", "-1"], "--loss-scale is fp16's static loss scale"),
                         (["--compile-mode", "fastest"], "(choose from 'default', 'reduce-overhead', "
                                                         "'max-autotune-no-cudagraphs', 'max-autotune')")):
        assert cli.main(["train", str(tiny_data), *ARGS, "--output-dir", str(tmp_path / "x"), *argv]) == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setattr(capture, "compile_fn", eager_backend)
    train(tiny_data, tmp_path / "r", "--compile-step", "--amp", "fp16", "--loss-scale", "256", "--steps-per-epoch", "2",
          "--epochs", "1", "--opt", "adamw", "--optim-impl", "fused", "--lr", "0.001")
    out = capsys.readouterr().out
    assert "amp fp16 (static loss scale 256)" in out and "compiled optimizer step (default)" in out
    assert "optim    adamw (fused) lr 0.001" in out
    assert load(tmp_path / "r")["scaler"] == {"static_scale": 256.0}


@pytest.mark.slow
def test_compiled_step_with_inductor(tiny_data, tmp_path, monkeypatch):
    """What a run uses: inductor's generated code for the step (SGD with the NaN skip, EMA, clipping), against
    the op-by-op step: the same run, to float32 rounding."""
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    extra, bad = CASES["sgd-nan-skip-ema-clip"]
    nan_at(monkeypatch, *bad)
    op_by_op = train(tiny_data, tmp_path / "eager", *extra)
    compiled = train(tiny_data, tmp_path / "compiled", *extra, "--compile-step")
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", op_by_op, compiled, exact=False)


def test_the_compiled_step_keeps_reading_one_lr_tensor(monkeypatch):
    """The schedule's new LR lands in the tensor the compiled step was traced with, also from a scheduler that
    would put a float there (so no LR change recompiles), and a checkpoint's LR too."""
    from fasttrain.config import OptimConfig
    from fasttrain.engine import Trainer
    from fasttrain.optim import build_optimizer
    from fasttrain.schedules import build_scheduler
    monkeypatch.setattr(capture, "compile_fn", lambda fn, mode: fn)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1, warmup_epochs=1), torch.device("cpu"))
    sched = build_scheduler(opt, OptimConfig(lr=0.1, warmup_epochs=1), 4)
    capture.tensor_lr(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    tr = Trainer(model, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(),
                 None, None)
    update = capture.CompiledUpdate(tr)
    with pytest.warns(UserWarning, match="before `optimizer.step"):  # no step here (the engine drops this one)
        sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)  # torch fills it in place
    opt.param_groups[0]["lr"] = 0.075  # what a scheduler assigning floats would leave
    update.after_schedule()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.075)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.025
    tr.load_state_dict({"state_dict": model.state_dict(), "optimizer": state, "scheduler": sched.state_dict()},
                       global_step=1)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.025)


class Overwriting(torch.nn.Module):
    """A forward whose next call overwrites the logits it returned before, as a CUDA-graphed forward
    (--compile-mode reduce-overhead) reuses its output memory at its next replay."""

    def __init__(self, model):
        super().__init__()
        self.model, self.last = model, None

    def forward(self, x):
        y = self.model(x)
        if self.last is not None and self.last.shape == y.shape:
            self.last.data.copy_(y.detach())
        self.last = y
        return y


def test_meters_take_a_batch_before_the_next_forward_can_overwrite_its_logits():
    """With --grad-accum-steps 2 a window's first logits would be read after the second forward: a CUDA-graphed
    forward has overwritten them by then. The step keeps each batch's three meter numbers instead."""
    from fasttrain.engine import Trainer
    from fasttrain.metrics import DeviceMeter
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(2)]
    sums = []
    for wrap in (lambda m: m, Overwriting):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = Trainer(model, wrap(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                     torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), None, None,
                     accum_steps=2)
        meter = DeviceMeter(torch.device("cpu"))
        assert [tr.train_step(x, y, meter) for x, y in batches] == [False, True]
        sums.append(meter.sums)
    assert torch.equal(sums[0], sums[1])
