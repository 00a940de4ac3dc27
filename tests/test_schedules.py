"""The recipe knobs against their published formulas, step by step: FFCV's resolution schedule and triangular
LR, the reference's step LR, cosine and linear decay, MLPerf's LARS; no weight decay on BatchNorm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fasttrain import recipes
from fasttrain.config import DataConfig, OptimConfig
from fasttrain.optim import LARS, build_optimizer
from fasttrain.schedules import Resolution, build_scheduler


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """libffcv/ffcv-imagenet train_imagenet.py ImageNetTrainer.get_resolution, restated."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0]
    return int(np.round(res / 32)) * 32


def recipe_data(name: str) -> DataConfig:
    values = recipes.load(name)[0]
    return DataConfig(**{f: v for (g, f), v in values.items() if g == "data"})


@pytest.mark.parametrize("name", [n for n in recipes.names() if n.startswith("rn")])
def test_resolution_schedule_is_ffcvs(name):
    data, epochs = recipe_data(name), recipes.load(name)[0][("optim", "epochs")]
    sizes = Resolution.from_config(data)
    assert [sizes(e) for e in range(epochs)] == [
        ffcv_get_resolution(e, data.min_res, data.max_res, data.end_ramp, data.start_ramp) for e in range(epochs)]
    assert sizes.val_size == 256 and sizes.sizes(0, epochs) == [160, 192]


def test_resolution_schedule_rounds_like_numpy():
    # rn50-16ep: 160 through epoch 11; epoch 12 sits half-way (176 = 5.5 x 32), which numpy rounds to the even
    # multiple, 192: FFCV never trains at 176 there.
    sizes = Resolution.from_config(recipe_data("rn50-16ep"))
    assert [sizes(e) for e in range(16)] == [160] * 12 + [192] * 4
    ramp = Resolution(224, min_res=128, max_res=256, start_ramp=2, end_ramp=6, step=16)
    assert [ramp(e) for e in range(8)] == [128, 128, 128, 160, 192, 224, 256, 256]
    assert ramp.sizes(0, 8) == [128, 160, 192, 224, 256] and ramp.sizes(5, 8) == [224, 256]
    assert Resolution(224).sizes(0, 90) == [224] and Resolution(224, val_res=288).val_size == 288


def lrs(cfg: OptimConfig, steps_per_epoch: int) -> list[float]:
    """The LR of every train step of the run, through the scheduler train.py builds."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_is_the_references():
    """pytorch/examples imagenet/main.py: StepLR(step_size=30, gamma=0.1) stepped once per epoch."""
    cfg, spe = OptimConfig(lr=0.1, epochs=90, lr_schedule="step"), 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref_sched, ref = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1), []
    for _ in range(cfg.epochs):
        ref += [opt.param_groups[0]["lr"]] * spe
        opt.step()
        ref_sched.step()
    assert lrs(cfg, spe) == pytest.approx(ref, rel=1e-12)


def test_cosine_schedule_per_step():
    """SGDR's cosine without restarts, step by step: torch's CosineAnnealingLR over all steps."""
    cfg, spe = OptimConfig(lr=0.4, epochs=5, lr_schedule="cosine"), 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    ref_sched, ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * spe), []
    for _ in range(cfg.epochs * spe):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    assert lrs(cfg, spe) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step"])
def test_warmup_then_decay(schedule):
    """Linear warm-up over --warmup-epochs (Goyal et al.: lr x (step + 1) / warm-up steps), then the decay
    over the remaining epochs: cosine 0.5 (1 + cos(pi t)), linear 1 - t, t = the fraction of it done."""
    cfg, spe = OptimConfig(lr=2.0, epochs=6, lr_schedule=schedule, warmup_epochs=1.5), 4
    warm = round(cfg.warmup_epochs * spe)
    expected = []
    for s in range(cfg.epochs * spe):
        t = (s / spe - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t, "step": 1.0}[schedule]
        expected.append(cfg.lr * ((s + 1) / warm if s < warm else decay))
    assert lrs(cfg, spe) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("peak,spe", [(2, 5), (0.5, 4)])
def test_triangular_schedule_is_ffcvs(peak, spe):
    """FFCV's "cyclic" schedule (train_imagenet.py): get_cyclic_lr(epoch) = interp(epoch, [0, peak, epochs],
    [1e-4 lr, lr, 0]); train_loop sets step i of epoch e to interp(i, [0, iters], [lr(e), lr(e + 1)])."""
    cfg = OptimConfig(lr=1.7, epochs=6, lr_schedule="triangular", lr_peak_epoch=peak)

    def cyclic(epoch):
        return np.interp([epoch], [0, cfg.lr_peak_epoch, cfg.epochs], [1e-4 * cfg.lr, cfg.lr, 0])[0]
    expected = []
    for e in range(cfg.epochs):
        expected += list(np.interp(np.arange(spe), [0, spe], [cyclic(e), cyclic(e + 1)]))
    got = lrs(cfg, spe)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[0] == pytest.approx(1.7e-4) and max(got) <= 1.7 and 0 < got[-1] < got[-2]  # down to ~0


def test_lars_follows_mlperfs_update():
    """MLPerf's ResNet-50 LARS (lars_optimizer.py, eeta 0.001, epsilon 0): trust = eta |w| / (|g| + wd |w|)
    for weights, whose gradient gets + wd w; BatchNorm and biases plain momentum SGD; the LR (scaled by the
    trust ratio) inside the momentum buffer; w -= buffer. Five steps with a changing LR."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    cfg = OptimConfig(lr=0.5, momentum=0.9, weight_decay=5e-5, optimizer="lars")
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    assert isinstance(opt, LARS)
    ref_w = [p.detach().clone() for p in model.parameters()]
    ref_v = [torch.zeros_like(p) for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        lr = 0.5 * (step + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for w, v, g in zip(ref_w, ref_v, grads):
            if w.ndim > 1:  # a weight: trust ratio and weight decay
                wn, gn = w.norm(), g.norm()
                trust = 0.001 * wn / (gn + 5e-5 * wn) if wn > 0 and gn > 0 else 1.0
                v.mul_(0.9).add_(lr * trust * (g + 5e-5 * w))
            else:  # on MLPerf's skip list
                v.mul_(0.9).add_(lr * g)
            w.sub_(v)
        for p, w in zip(model.parameters(), ref_w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)


def test_lars_trust_ratio_is_one_for_zero_weights():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=1e-4)
    w.grad = torch.ones(3, 3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3, 3), -0.1))  # plain lr x grad, no NaN from 0 / 0


def test_no_bn_wd_leaves_batchnorm_and_biases_undecayed():
    """With zero gradients, only weight decay moves a parameter: conv and linear weights shrink, BatchNorm
    weights and biases (the classifier's too, and a ResNet's downsample BatchNorms) do not."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=3)
    cfg = OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.1, no_bn_wd=True)
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        decayed = not torch.equal(p.detach(), before[n])
        assert decayed == (p.ndim > 1), n
    assert "layer2.0.downsample.1.weight" in before and "fc.bias" in before
    plain = build_optimizer(model.parameters(), OptimConfig(), torch.device("cpu"))
    assert len(plain.param_groups) == 1
