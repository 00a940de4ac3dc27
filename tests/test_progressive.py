"""Progressive resizing, EMA and flip TTA in real (short) runs on generated data: sizes ramp in metrics.jsonl,
torch.compile compiles once per distinct size, a stop mid-ramp resumes exactly (EMA included), the EMA is
the average a reference computation gives, and DALI changes size inside its one pipeline."""

from __future__ import annotations

import functools
import os
import signal

import pytest
import torch

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli
from fasttrain.metrics import read_jsonl

# 16 px in epoch 0, 32 px from epoch 2 on, in between the line rounded to 8 px: 24 px in epoch 1
RAMP = ["--min-res", "16", "--max-res", "32", "--start-ramp", "0", "--end-ramp", "2", "--res-step", "8",
        "--val-res", "24"]
SIZES = [16, 24, 32]
COMMON = ["--device", "cpu", "-j", "0", "-b", "16", "--seed", "3", "-p", "2", "--lr", "0.05", "--epochs", "3",
          "--steps-per-epoch", "4"]


def small_model(cfg, num_classes):
    """Small and fast, with BatchNorm (its running statistics are averaged by the EMA too)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr("fasttrain.train.build_model", small_model)


def train(data, out, *extra):
    assert cli.main(["train", str(data), *COMMON, *RAMP, "--output-dir", str(out), *extra]) == 0
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def load(out):
    return torch.load(os.path.join(out, ckpt_io.LATEST), map_location="cpu", weights_only=False)


def test_sizes_ramp_and_compile_once_per_size(tiny_data, tmp_path, small, monkeypatch):
    """metrics.jsonl shows the train size of each epoch; torch.compile (a counting backend in place of
    inductor, so it takes seconds on a CPU: dynamo's capture and guards are what decide recompiles) compiles
    the train forward exactly once per distinct size, and each val forward once per val batch shape."""
    graphs: list[list[tuple]] = []  # per torch.compile call: the input shape of each graph compiled
    real = torch.compile

    def counting(model, **kw):
        shapes = []
        graphs.append(shapes)

        def backend(gm, example_inputs):
            images = [x for x in example_inputs if torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == 3]
            shapes.append(tuple(max(images, key=lambda x: x.shape[-1]).shape))  # not a 3x3 conv weight
            return gm.forward
        return real(model, backend=backend, **kw)
    monkeypatch.setattr(torch, "compile", counting)
    rows = train(tiny_data, tmp_path / "r", "--compile", "--ema", "0.9")
    assert [r["image_size"] for r in rows] == SIZES and {r["val_image_size"] for r in rows} == {24}
    assert all(r["epoch_seconds"] > 0 for r in rows)
    assert [r["wall_seconds"] for r in rows] == sorted(r["wall_seconds"] for r in rows)
    train_graphs, val_graphs, ema_graphs = graphs
    assert train_graphs == [(16, 3, s, s) for s in SIZES]  # once per size, in the order they came
    assert sorted(val_graphs) == sorted(ema_graphs) == [(4, 3, 24, 24), (16, 3, 24, 24)]  # 36 = 16 + 16 + 4


def test_stop_mid_ramp_resumes_exactly_with_its_ema(tiny_data, tmp_path, small, monkeypatch):
    """A stop at step 2 of epoch 1 (the 24 px epoch, between the 16 and 32 px ones) saves a mid-epoch
    checkpoint; resumed, the run ends with the same weights, the same EMA and the same metrics rows as
    a run never stopped; wall_seconds carries on from the checkpoint."""
    straight = train(tiny_data, tmp_path / "straight", "--ema", "0.8")
    out = tmp_path / "stopped"
    calls = iter([0, 0, signal.SIGTERM])  # at_sync at steps 2, 4 of epoch 0, then 2 of epoch 1: stop there
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    assert cli.main(["train", str(tiny_data), *COMMON, *RAMP, "--output-dir", str(out), "--ema", "0.8"]) == 143
    mid = load(out)
    assert (mid["epoch"], mid["step"]) == (1, 2) and mid["ema"] is not None and mid["wall_seconds"] > 0
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    rows = train(tiny_data, out, "--ema", "0.8", "--resume", "auto")
    keys = ("epoch", "image_size", "train_loss", "train_top1", "val_loss", "val_top1", "val_top1_ema", "lr")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in straight]
    assert rows[1]["wall_seconds"] > mid["wall_seconds"]
    a, b = load(tmp_path / "straight"), load(out)
    for key in ("state_dict", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


def test_ema_is_the_reference_average_and_eval_scores_it(tiny_data, tmp_path, small, monkeypatch, capsys):
    """After every step ema = d * ema + (1 - d) * weights (BatchNorm statistics too; its step count copied):
    the checkpoint's EMA equals that computed from a snapshot of the model after each step. `fasttrain eval
    --eval-weights ema` scores it as val_top1_ema said; plain eval scores the weights as val_top1 said."""
    from fasttrain.engine import Trainer
    snapshots, real_step, initial = [], Trainer.train_step, {}

    def recorded_model(cfg, num_classes):
        model = small_model(cfg, num_classes)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr("fasttrain.train.build_model", recorded_model)

    def step(self, images, labels, meter):
        real_step(self, images, labels, meter)
        snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
    monkeypatch.setattr(Trainer, "train_step", step)
    decay = 0.7
    rows = train(tiny_data, tmp_path / "r", "--ema", str(decay), "--val-tta", "flip", "--epochs", "1")
    monkeypatch.setattr(Trainer, "train_step", real_step)
    ck = load(tmp_path / "r")
    assert len(snapshots) == 4
    ref = dict(initial)  # the average starts from the initial weights
    for snap in snapshots:
        for k, v in snap.items():
            ref[k] = decay * ref[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    for k, v in ref.items():
        torch.testing.assert_close(ck["ema"][k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ck["ema"]["0.weight"], ck["state_dict"]["0.weight"])
    capsys.readouterr()
    for extra, key in (([], "val_top1"), (["--eval-weights", "ema"], "val_top1_ema")):
        assert cli.main(["eval", str(tiny_data), "--checkpoint", str(tmp_path / "r" / ckpt_io.LATEST),
                         "--device", "cpu", "-j", "0", "-b", "7", *extra]) == 0
        out = capsys.readouterr().out
        assert f"Acc@1 {rows[-1][key]:.3f}" in out and "on 36 images" in out, (key, out)


def test_eval_weights_ema_needs_an_ema(tiny_data, tmp_path, small, capsys):
    """(The run trains with LARS and a linear schedule: both through the command line once.)"""
    rows = train(tiny_data, tmp_path / "r", "--epochs", "1", "--steps-per-epoch", "2", "--opt", "lars",
                 "--lr-schedule", "linear")
    # linear over 2 steps: factors 1 and 1/2 (then 0, after the run's last step)
    assert rows[0]["train_samples"] == 32 and rows[0]["lr_last"] == pytest.approx(rows[0]["lr"] / 2)
    capsys.readouterr()
    assert cli.main(["eval", str(tiny_data), "--checkpoint", str(tmp_path / "r" / ckpt_io.LATEST), "--device", "cpu",
                     "-j", "0", "-b", "16", "--eval-weights", "ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fasttrain: error:") and "no EMA weights" in err[-1]


def test_flip_tta_averages_the_mirrored_logits():
    """What flip TTA is for, as properties rather than its formula again: a prediction that does not change
    when the image is mirrored left-right (but does up-down), and for a model that is already mirror-invariant
    the model's own logits (a mean: FFCV's sum would double them, and the val loss with them)."""
    from fasttrain.model import FlipTTA
    torch.manual_seed(0)
    model = small_model(None, 5).eval()
    x = torch.randn(3, 3, 16, 16)
    tta = FlipTTA(model)
    assert not torch.allclose(model(x), model(x.flip(3)), atol=1e-4)  # the model itself is not invariant
    torch.testing.assert_close(tta(x.flip(3)), tta(x))
    assert not torch.allclose(tta(x.flip(2)), tta(x), atol=1e-4)
    pooled = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    torch.testing.assert_close(FlipTTA(pooled)(x), pooled(x))


def test_dali_changes_size_in_its_one_pipeline_and_resumes_mid_ramp(tiny_data, monkeypatch):
    """DALI: the crop size comes with the files through external_source, so epochs of different sizes run
    in the pipeline built for the first; a DALI checkpoint taken mid-ramp continues with the same batches
    (same size, crops and flips)."""
    pytest.importorskip("nvidia.dali")
    from fasttrain.config import DataConfig
    from fasttrain.data import dali_backend
    from fasttrain.data.base import Layout, check_shard_sizes
    from fasttrain.data.scan import scan_dataset
    from fasttrain.dist import DistInfo
    builds, real_build = [], dali_backend.DaliBatches._build
    monkeypatch.setattr(dali_backend.DaliBatches, "_build",
                        lambda self, *a: builds.append(self.train) or real_build(self, *a))
    train_split, val_split = scan_dataset(tiny_data)
    cfg = DataConfig(min_res=16, max_res=32, start_ramp=0, end_ramp=2, res_step=8, val_res=24, prefetch=2)
    make = functools.partial(dali_backend.build, train_split, val_split, 16, 1, cfg, Layout(torch.device("cpu"), False),
                             DistInfo(), 3, check_shard_sizes(len(train_split), 1, 16, len(val_split))[0])
    tr, va = make()
    straight = []
    for e in range(3):
        tr.set_epoch(e)
        straight.append(list(tr))
    assert [{tuple(x.shape[2:]) for x, _ in batches} for batches in straight] == [{(s, s)} for s in SIZES]
    assert {tuple(x.shape[2:]) for x, _ in va} == {(24, 24)}
    assert builds == [True, False]  # one train and one val pipeline for the whole ramp
    tr.close(), va.close()  # pipelines left open keep DALI's threads: a later fork (a DataLoader's, a Pool's)
    # in this process could copy a lock one of them holds, and hang
    tr, va = make()  # the same stream again, stopped after 2 batches of epoch 1
    va.close()
    tr.set_epoch(0)
    list(tr)
    tr.set_epoch(1)
    it = iter(tr)
    next(it), next(it)
    state = tr.state_dict()
    tr.close()
    fresh, va = make()
    va.close()
    fresh.load_state_dict(state)
    fresh.set_epoch(1, 2)
    rest = list(fresh)
    fresh.set_epoch(2)
    rest += list(fresh)
    fresh.close()
    assert len(rest) == len(straight[1][2:] + straight[2])
    for (x, lx), (y, ly) in zip(rest, straight[1][2:] + straight[2]):
        assert torch.equal(x, y) and torch.equal(lx, ly)
