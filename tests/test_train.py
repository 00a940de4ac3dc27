"""End-to-end training on a tiny generated dataset: learning, exact resume, atomic checkpoints, eval."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli
from fasttrain.metrics import read_jsonl

COMMON = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "3", "-p", "2",
          "--lr", "0.05", "--warmup-epochs", "0.5"]


def train(data, out, *extra):
    code = cli.main(["train", str(data), *COMMON, "--output-dir", str(out), *extra])
    assert code == 0
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def weights(out, name=ckpt_io.LATEST):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def test_learns_and_writes_outputs(tiny_data, tmp_path):
    rows = train(tiny_data, tmp_path / "r", "--epochs", "8", "--lr-schedule", "cosine")
    assert [r["epoch"] for r in rows] == list(range(8))
    for key in ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_samples",
                "train_images_per_sec", "data_time_fraction"):
        assert key in rows[-1]
    assert all(r["val_samples"] == 36 for r in rows)  # every val image scored exactly once
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert max(r["val_top1"] for r in rows) > 50.0  # 4 classes: chance is 25%
    ck = weights(tmp_path / "r")
    assert {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "scheduler", "scaler", "rng", "classes",
            "config"} <= set(ck)
    assert ck["epoch"] == 8 and ck["arch"] == "resnet18" and len(ck["classes"]) == 4
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["state_dict"])
    import torchvision
    torchvision.models.resnet18(num_classes=4).load_state_dict(ck["state_dict"])  # loads as-is
    assert os.path.exists(tmp_path / "r" / ckpt_io.BEST)


def test_resume_equals_straight_run(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "straight", "--epochs", "2")
    train(tiny_data, tmp_path / "split", "--epochs", "1")
    rows = train(tiny_data, tmp_path / "split", "--epochs", "2", "--resume", "auto")
    assert [r["epoch"] for r in rows] == [0, 1]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def dropout_model(cfg, num_classes):
    """Uses the RNG in every step: a resume that lost the RNG state would end with other weights."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(8, num_classes))


@pytest.mark.parametrize("model", ["resnet18", "dropout"])
def test_stop_mid_epoch_then_resume_equals_straight_run(model, tiny_data, tmp_path, monkeypatch):
    """A stop request (what SIGTERM sets) at step 4 of 6 saves a mid-epoch checkpoint and exits 143; the
    resumed run continues with the same next batch and ends with the same weights as an unstopped run."""
    if model == "dropout":
        monkeypatch.setattr("fasttrain.train.build_model", dropout_model)
    straight = train(tiny_data, tmp_path / "straight", "--epochs", "2")
    out = tmp_path / "stopped"
    calls = iter([0, signal.SIGTERM])  # at_sync runs at steps 2, 4, ...: stop at step 4
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    code = cli.main(["train", str(tiny_data), *COMMON, "--output-dir", str(out), "--epochs", "2"])
    assert code == 143
    mid = weights(out)
    assert (mid["epoch"], mid["step"]) == (0, 4)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    rows = train(tiny_data, out, "--epochs", "2", "--resume", "auto")
    assert [r["epoch"] for r in rows] == [0, 1]
    # the resumed epoch's metrics cover all of it (its first 4 steps came back from the checkpoint's meter)
    keys = ("train_loss", "train_top1", "train_top5", "train_samples", "val_loss", "val_top1")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in straight]
    a, b = weights(tmp_path / "straight"), weights(out)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_atomic_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / ckpt_io.LATEST)
    ckpt_io.atomic_save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_io.atomic_save({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    ck = ckpt_io.load(path)
    assert ck["epoch"] == 1 and torch.equal(ck["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == [ckpt_io.LATEST]  # no temporary file left behind


def test_eval_reproduces_recorded_accuracy(tiny_data, tmp_path, capsys):
    rows = train(tiny_data, tmp_path / "r", "--epochs", "2")
    capsys.readouterr()
    assert cli.main(["eval", str(tiny_data), "--checkpoint", str(tmp_path / "r" / ckpt_io.LATEST),
                     "--device", "cpu", "-j", "0", "-b", "7"]) == 0
    out = capsys.readouterr().out  # the run's story is on stdout
    assert f"Acc@1 {rows[-1]['val_top1']:.3f}" in out and "on 36 images" in out
    assert "resumed from" not in out and "evaluating " in out  # an evaluation resumes nothing


def test_resume_other_arch_or_classes_is_error(tiny_data, tmp_path, capsys):
    train(tiny_data, tmp_path / "r", "--epochs", "1")
    ck = str(tmp_path / "r" / ckpt_io.LATEST)
    assert cli.main(["train", str(tiny_data), *COMMON, "-a", "resnet34", "--resume", ck,
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert "is for arch resnet18" in capsys.readouterr().err
    from .conftest import make_tree
    other = make_tree(tmp_path / "other", n_train=8, n_val=2, classes=("dots_cool", "dots_warm", "rings_cool"))
    assert cli.main(["train", other, *COMMON, "--resume", ck, "--output-dir", str(tmp_path / "o2")]) == 2
    assert "trained on other classes than DATA has (4 against 3" in capsys.readouterr().err


def test_train_crop_box_is_torchvisions_random_resized_crop():
    """TrainTransform draws its box with Python's random, by torchvision's algorithm: same distribution of
    area and aspect ratio as RandomResizedCrop.get_params, and the same fallback for extreme shapes."""
    import math
    import random

    import numpy as np
    import torchvision.transforms as T

    from fasttrain.data.torchvision_backend import TrainTransform
    tf = TrainTransform(224)

    def stats(boxes, h, w):
        area = [bh * bw / (h * w) for _, _, bh, bw in boxes]
        aspect = [math.log(bw / bh) for _, _, bh, bw in boxes]
        inside = all(0 <= t and 0 <= left and t + bh <= h and left + bw <= w for t, left, bh, bw in boxes)
        return np.mean(area), np.std(area), np.mean(aspect), np.std(aspect), inside
    torch.manual_seed(0)
    ours = stats([tf.box(375, 500, random.Random(i)) for i in range(20000)], 375, 500)
    ref = stats([T.RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3])
                 for _ in range(20000)], 375, 500)
    assert ours[4] and ref[4]
    assert np.allclose(ours[:4], ref[:4], atol=0.01), (ours, ref)
    for h, w in ((10, 1000), (1000, 10)):  # no try fits: the whole image cut to the nearest allowed ratio
        assert tf.box(h, w, random.Random(0)) == T.RandomResizedCrop.get_params(
            torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])


def _sgd_run(fused: bool, inf_steps: set[int], steps: int = 5):
    """Parameters and momentum buffers after `steps` fp16-style steps (GradScaler on) of a small model,
    with the loss made infinite at `inf_steps` (what the scaler meets on the first steps of an fp16 run)."""
    from fasttrain.config import OptimConfig
    from fasttrain.optim import build_optimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1, optim_impl="fused" if fused else "foreach"),
                          torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step in inf_steps:
            loss = loss * float("inf")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], [opt.state[p]["momentum_buffer"] for p in model.parameters()]


@pytest.mark.parametrize("inf_steps", [{0}, {0, 1}, {2}, set()])
def test_fused_sgd_matches_foreach_when_the_grad_scaler_skips_steps(inf_steps):
    """fused SGD (fasttrain's CUDA default; the same kernel logic runs on the CPU) left garbage momentum buffers
    when the GradScaler skipped the first step: params then diverged from foreach's (measured: buffers ~1e36)."""
    p_fused, b_fused = _sgd_run(True, inf_steps)
    p_ref, b_ref = _sgd_run(False, inf_steps)
    for a, b in zip(p_fused + b_fused, p_ref + b_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_channels_last_reaches_validation_too(loader, tiny_data):
    """--channels-last: the val batches come channels_last like the train ones (both loaders), and --val-tta
    flip's mirror keeps the layout, so validation runs the channels_last model on what it wants (issue 22)."""
    from fasttrain.config import DataConfig
    from fasttrain.data import build_loaders, dali_backend
    from fasttrain.data.base import Layout
    from fasttrain.dist import DistInfo
    if loader == "dali" and not dali_backend.available():
        pytest.skip("nvidia.dali does not import")
    cfg = DataConfig(data=tiny_data, loader=loader, workers=1, batch_size=8, image_size=32)
    loaders = build_loaders(cfg, DistInfo(device=torch.device("cpu")), Layout(torch.device("cpu"), True), seed=0)
    try:
        for batches in (loaders.train, loaders.val):
            batches.set_epoch(0)
            images, _ = next(iter(batches))
            assert images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
            assert images.flip(3).is_contiguous(memory_format=torch.channels_last)
    finally:
        loaders.train.close()
        loaders.val.close()


def test_run_leaves_the_callers_config_and_process_as_it_found_them(tiny_data, tmp_path):
    """train.run, eval and the --multiprocessing-distributed parent run in-process (the bench, tests, notebooks):
    afterwards the caller's Config is unchanged (no resolved toggles, LR, demo folder or checkpoint settings
    written into it), and so are cuDNN's autotuner flag, torch's threads, the warning filters and the signal
    handlers."""
    import copy
    import warnings

    from fasttrain.launch import launch

    def mine(signum, frame):  # a caller's own handlers
        pass
    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        torch.backends.cudnn.benchmark = False
        threads = torch.get_num_threads()
        common = [a if a != "--lr" else "--lr-per-256" for a in COMMON]  # resolved into --lr by the run
        argv = ["train", str(tiny_data), *common, "--epochs", "1", "--steps-per-epoch", "2", "--val-steps", "1",
                "--cudnn-benchmark"]
        runs = [(cli.parse_config(cli.build_parser().parse_args([*argv, "--output-dir", str(tmp_path / "a")])), None),
                (cli.parse_config(cli.build_parser().parse_args(["eval", str(tiny_data), "--device", "cpu", "-j", "0",
                                                                 "--val-steps", "1", "-b", "8",
                                                                 "--checkpoint", "x"])),
                 str(tmp_path / "a" / ckpt_io.LATEST)),
                (cli.parse_config(cli.build_parser().parse_args(
                    [*argv, "--output-dir", str(tmp_path / "b"), "--multiprocessing-distributed", "--nproc-per-node",
                     "2", "-b", "8"])), None)]
        for i, (cfg, checkpoint) in enumerate([runs[0], *runs]):
            kept = copy.deepcopy(cfg)
            assert launch(cfg, eval_checkpoint=checkpoint) == 0
            assert cfg == kept
            assert torch.backends.cudnn.benchmark is False and torch.get_num_threads() == threads
            if i == 0:  # the first run imports the dependencies, some of which add filters of their own
                filters = list(warnings.filters)
            assert warnings.filters == filters
            assert all(signal.getsignal(s) is mine for s in (signal.SIGINT, signal.SIGTERM))
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_checkpoint_is_written_while_training_goes_on(tiny_data, tmp_path, monkeypatch):
    """--checkpoint-interval 2: here the write of step 2's checkpoint cannot finish before step 3 has trained
    (it waits for it), which only a write beside training allows; the file holds step 2's state, not the
    weights training has moved on to by the time it is written; the run ends with it on disk."""
    import threading

    from fasttrain import checkpointer
    from fasttrain.engine import Trainer
    steps, step3 = [0], threading.Event()
    original_step, original_save, original_snapshot = Trainer.train_step, ckpt_io.atomic_save, checkpointer.Checkpointer.save
    seen = {}

    def train_step(self, *a):
        out = original_step(self, *a)
        steps[0] += 1
        if steps[0] == 3:
            step3.set()
        return out

    def save(self, epoch, step, *a, **kw):  # the weights the checkpoint of step 2 must hold
        if step == 2:
            seen["model"], seen["at_save"] = self.tr.model, {k: v.clone() for k, v in self.tr.model.state_dict().items()}
        return original_snapshot(self, epoch, step, *a, **kw)

    def atomic_save(obj, path):
        if obj["step"] == 2:
            seen["waited"] = step3.wait(timeout=20)  # a guard: a write on the training thread never sees step 3
            seen["now"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
            seen["written"] = obj["state_dict"]
        return original_save(obj, path)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(checkpointer.Checkpointer, "save", save)
    monkeypatch.setattr(ckpt_io, "atomic_save", atomic_save)
    train(tiny_data, tmp_path / "r", "--epochs", "1", "--checkpoint-interval", "2", "-p", "4")
    assert seen["waited"], "the checkpoint was written on the training thread"
    assert all(torch.equal(seen["written"][k], seen["at_save"][k]) for k in seen["at_save"])
    assert any(not torch.equal(seen["now"][k], seen["at_save"][k]) for k in seen["at_save"])  # training went on
    assert weights(tmp_path / "r")["epoch"] == 1  # the last one, whole, when the run returned
