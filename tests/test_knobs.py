"""The training knobs users expect from timm: gradient accumulation, gradient clipping, MixUp/CutMix,
AutoAugment/RandAugment, AdamW and LAMB; and `fasttrain predict`."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
import torchvision

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli
from fasttrain.config import DataConfig, OptimConfig
from fasttrain.dist import DistInfo
from fasttrain.engine import Trainer
from fasttrain.metrics import DeviceMeter, read_jsonl
from fasttrain.mix import build_mix
from fasttrain.optim import build_optimizer

from .fault_worker import tiny_model

COMMON = ["--device", "cpu", "-j", "0", "--image-size", "32", "--seed", "4", "-p", "1", "--lr", "0.05",
          "--epochs", "1", "--no-tensorboard"]  # tiny_data: 96 train images


def train(data, out, *extra, code=0):
    assert cli.main(["train", str(data), *COMMON, "--output-dir", str(out), *extra]) == code
    return ckpt_io.load(str(out / ckpt_io.LATEST))["state_dict"]


def test_accumulation_equals_the_larger_batch_and_resumes_exactly(tiny_data, tmp_path, monkeypatch, capsys):
    """-b 16 accumulated over 2 batches = -b 32 (the same 32 images per step: the sampler's order does not
    depend on the batch), within float tolerance (sums in another order); plain -b 16 differs. A stop after
    optimizer step 2 (checkpoints come only between accumulation windows) resumes to the same weights."""
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)  # no BatchNorm: batch statistics would differ
    accum = train(tiny_data, tmp_path / "accum", "-b", "16", "--grad-accum-steps", "2")
    big = train(tiny_data, tmp_path / "big", "-b", "32")
    small = train(tiny_data, tmp_path / "small", "-b", "16")
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-4, atol=1e-6)
    assert max((small[k] - big[k]).abs().max() for k in big) > 1e-3
    assert read_jsonl(tmp_path / "accum" / "metrics.jsonl")[0]["train_samples"] == 96

    calls = iter([0, signal.SIGTERM])  # at_sync after optimizer steps 1, 2: stop after step 2 (batch 4 of 6)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    train(tiny_data, tmp_path / "stopped", "-b", "16", "--grad-accum-steps", "2", code=143)
    ck = ckpt_io.load(str(tmp_path / "stopped" / ckpt_io.LATEST))
    assert (ck["epoch"], ck["step"]) == (0, 2)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    resumed = train(tiny_data, tmp_path / "stopped", "-b", "16", "--grad-accum-steps", "2", "--resume", "auto")
    assert all(torch.equal(resumed[k], accum[k]) for k in accum)
    mid = tmp_path / "mid.pth.tar"  # the mid-epoch checkpoint, resumed with windows of another size
    torch.save(ck, mid)
    assert cli.main(["train", str(tiny_data), *COMMON, "-b", "16", "--resume", str(mid),
                     "--output-dir", str(tmp_path / "o")]) == 2
    assert "stopped mid-epoch (step 2) with --grad-accum-steps 2" in capsys.readouterr().err


def _one_step(clip: float) -> float:
    """Norm of the weight change of one plain SGD step (lr 1) on a batch with a large gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tr = Trainer(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                 torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), None, DistInfo(),
                 clip_grad=clip)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    assert tr.train_step(torch.randn(16, 8) * 100, torch.randint(0, 4, (16,)), DeviceMeter(torch.device("cpu")))
    return float(torch.linalg.vector_norm(before - torch.cat([p.detach().flatten() for p in model.parameters()])))


def test_clip_grad_bounds_the_gradient_norm():
    assert _one_step(0.0) > 1.0
    assert 0.45 < _one_step(0.5) <= 0.5 + 1e-5


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_labels_sum_to_one_and_train(mixup, cutmix):
    mix = build_mix(OptimConfig(mixup=mixup, cutmix=cutmix), 4)
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    for _ in range(4):
        x, y = mix(images, labels)
        assert y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
        assert ((y > 0).sum(1) <= 2).all()  # an image's own class and its neighbour's
    assert not torch.equal(x, images) and build_mix(OptimConfig(), 4) is None
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Trainer(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                 torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(label_smoothing=0.1), None,
                 DistInfo(), mix=mix)
    meter = DeviceMeter(torch.device("cpu"))
    assert tr.train_step(images, labels, meter)
    stats = meter.read()
    assert stats["samples"] == 8 and torch.isfinite(torch.tensor(stats["loss"])) and 0 <= stats["top1"] <= 100


def test_auto_augment_and_randaugment_depend_only_on_the_sample():
    """torchvision's policies draw from torch's generator: seeded per sample (same ops for the same sample, any
    worker, after a resume) and the process's generator put back."""
    from fasttrain.data import augmentation
    from fasttrain.data.torchvision_backend import TrainTransform
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = [TrainTransform(32)(image, random.Random(s)) for s in range(8)]
    for cfg in (DataConfig(auto_augment="imagenet"), DataConfig(randaugment=9)):
        tf = TrainTransform(32, augmentation(cfg))
        state = torch.get_rng_state()
        a = [tf(image, random.Random(s)) for s in range(8)]
        assert torch.equal(torch.get_rng_state(), state)
        assert all(torch.equal(x, y) for x, y in zip(a, [tf(image, random.Random(s)) for s in range(8)]))
        assert sum(not torch.equal(x, y) for x, y in zip(a, plain)) >= 4 and a[0].dtype == torch.uint8


def test_adamw_is_torchs_with_the_runs_weight_decay():
    """--opt adamw is torch's own AdamW (LAMB is checked against timm's in test_optim.py)."""
    adamw = build_optimizer(torch.nn.Linear(2, 2).parameters(), OptimConfig(optimizer="adamw", lr=1e-3),
                            torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 1e-4


def test_adaptive_optimizers_train_and_resume_only_with_themselves(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    out = tmp_path / "lamb"
    train(tiny_data, out, "-b", "16", "--opt", "lamb", "--lr", "0.01", "--mixup", "0.2", "--cutmix", "1.0",
          "--clip-grad", "1", "--steps-per-epoch", "2", "--val-steps", "1")
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and row["train_samples"] == 32
    assert "optim    lamb lr 0.01 wd 0.0001" in capsys.readouterr().out
    assert cli.main(["train", str(tiny_data), *COMMON, "-b", "16", "--epochs", "2", "--resume", "auto",
                     "--output-dir", str(out)]) == 2
    assert "was trained with --opt lamb, not sgd" in capsys.readouterr().err


def test_predict_prints_class_names(tiny_data, tmp_path, capsys):
    classes = sorted(os.listdir(os.path.join(tiny_data, "train")))
    model = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():  # whatever the image, class 2 then 3 (softmax of 0, 0, 5, 1: 96.9%, 1.8%)
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 1.0]))
    path = tmp_path / "ck.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": model.state_dict(), "classes": classes,
                "config": {"model": {"arch": "resnet18"}, "data": {"image_size": 32}}}, path)
    images = [os.path.join(tiny_data, "val", c, "0000.jpg") for c in classes[:2]]
    assert cli.main(["predict", str(path), *images, "-k", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}: {classes[2]} 96.9%, {classes[3]} 1.8%" for p in images]
    assert cli.main(["predict", str(path), str(tmp_path / "missing.jpg"), images[0], "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "missing.jpg: unreadable" in captured.err and captured.out.startswith(f"{images[0]}: {classes[2]} ")


def test_predict_uses_the_runs_val_size_crop_and_blurpool(tmp_path):
    """A recipe's checkpoint (progressive resizing up to 40 px, val crop ratio 0.5, BlurPool layers): predict
    builds the model with BlurPool (its weights load) and the val transform the run validated with."""
    from fasttrain.blurpool import BlurConv2d, apply_blurpool
    from fasttrain.predict import load_classifier, predict
    model = torchvision.models.resnet18(num_classes=3)
    assert apply_blurpool(model) > 0
    path = tmp_path / "ck.pth.tar"
    torch.save({"epoch": 4, "arch": "resnet18", "state_dict": model.state_dict(), "classes": ["a", "b", "c"],
                "config": {"model": {"arch": "resnet18", "blurpool": True},
                           "data": {"image_size": 32, "min_res": 16, "max_res": 40, "end_ramp": 2,
                                    "val_crop_ratio": 0.5}}}, path)
    loaded, classes, transform = load_classifier(str(path), torch.device("cpu"))
    assert classes == ["a", "b", "c"] and transform.size == [40, 40] and transform.resize == 80
    # BlurPool adds no weights, so a plain model would load them too, silently, and predict otherwise
    blurred = [sum(isinstance(m, BlurConv2d) for m in net.modules()) for net in (loaded, model)]
    assert blurred[0] == blurred[1] > 0
    assert predict(loaded, torch.zeros(1, 3, 40, 40, dtype=torch.uint8)).shape == (1, 3)
