"""LARS and LAMB against an independent implementation (timm's, in the dev extras), their checkpoints, and
--optim-impl."""

from __future__ import annotations

import copy

import pytest
import torch

from fasttrain.config import OptimConfig
from fasttrain.optim import LARS, Lamb, build_optimizer

timm_optim = pytest.importorskip("timm.optim")


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # no conv bias before the BatchNorm (as in a ResNet): its gradient would be rounding noise, which LAMB
    # scales up to a full step, so two correct implementations would part ways there
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def run_steps(model, opt, steps: int, lrs=None) -> list[torch.Tensor]:
    """`steps` steps on fixed random batches (the same for every model built with the same seed)."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def split(model):
    return [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_equals_timms_lars(foreach):
    """timm.optim.Lars with trust_coeff 0.001, eps 0 and its weight decay only on the weights (BatchNorm and
    biases: weight decay 0, so timm adapts no LR there, as MLPerf's skip list): the same weights after 6 steps
    at a constant LR. (timm keeps the LR outside the momentum buffer, MLPerf and fasttrain inside: the same
    steps while the LR does not change, other steps when it does.)"""
    ours = small_model()
    opt = build_optimizer(ours.parameters(), OptimConfig(optimizer="lars", lr=0.5, momentum=0.9, weight_decay=5e-5),
                          torch.device("cpu"))
    theirs = small_model()
    decay, no_decay = split(theirs)
    ref = timm_optim.Lars([{"params": decay, "weight_decay": 5e-5}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.5, momentum=0.9, trust_coeff=0.001, eps=0.0, foreach=foreach)
    for a, b in zip(run_steps(ours, opt, 6), run_steps(theirs, ref, 6)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ours[0].weight, small_model()[0].weight)  # it moved


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_equals_timms_lamb(foreach):
    """timm.optim.Lamb with always_adapt (the trust ratio on every tensor, as here) and max_grad_norm None (its
    built-in clipping is --clip-grad here), bias correction and grad averaging on (its defaults): the same
    weights after 6 steps with a changing LR."""
    lrs = [0.01, 0.02, 0.03, 0.02, 0.01, 0.005]
    ours = small_model()
    opt = build_optimizer(ours.parameters(), OptimConfig(optimizer="lamb", lr=0.01, weight_decay=0.05),
                          torch.device("cpu"))
    theirs = small_model()
    ref = timm_optim.Lamb(theirs.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05,
                          max_grad_norm=None, always_adapt=True, foreach=foreach)
    for a, b in zip(run_steps(ours, opt, 6, lrs), run_steps(theirs, ref, 6, lrs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {6.0} and all(s["step"].dtype == torch.float64 for s in opt.state.values())


def test_lars_and_lamb_take_a_tensor_lr():
    """--compile-step makes the LR a 0-d tensor the schedule writes into: the same steps as a float LR."""
    for optimizer, lr in (("lars", 0.5), ("lamb", 0.01)):
        cfg = OptimConfig(optimizer=optimizer, lr=lr, weight_decay=1e-4)
        a, b = small_model(), small_model()
        opt_a = build_optimizer(a.parameters(), cfg, torch.device("cpu"))
        opt_b = build_optimizer(b.parameters(), cfg, torch.device("cpu"))
        for group in opt_b.param_groups:
            group["lr"] = torch.tensor(lr)
        for x, y in zip(run_steps(a, opt_a, 3), run_steps(b, opt_b, 3)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


def test_old_lamb_and_lars_checkpoints_load_and_continue():
    """A LAMB state_dict of the per-tensor version (step a Python int, which weights_only loads as an int),
    and a LARS one written before some tensors had a momentum buffer: both load, and the next steps are those
    of an optimizer that never stopped."""
    straight = small_model()
    opt = Lamb(straight.parameters(), lr=0.01, weight_decay=0.05)
    run_steps(straight, opt, 2)
    state = copy.deepcopy(opt.state_dict())  # as torch.save + load would: not the live tensors
    old = {"state": {k: {**v, "step": int(v["step"])} for k, v in state["state"].items()},
           "param_groups": state["param_groups"]}
    resumed = small_model()
    resumed.load_state_dict(straight.state_dict())
    opt2 = Lamb(resumed.parameters(), lr=0.01, weight_decay=0.05)
    opt2.load_state_dict(old)
    assert all(s["step"].dtype == torch.float64 and float(s["step"]) == 2.0 for s in opt2.state.values())
    gen_state = torch.get_rng_state()
    a = run_steps(straight, opt, 2)
    torch.set_rng_state(gen_state)
    b = run_steps(resumed, opt2, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    model = small_model()
    lars = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sd = lars.state_dict()
    sd["state"] = {0: sd["state"][0]}  # only the first tensor had a buffer
    fresh = LARS(small_model().parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh.load_state_dict(sd)
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(p)) for p, s in
               zip(fresh.param_groups[0]["params"], fresh.state.values()))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optim_impl_picks_torchs_kernel(impl, capsys):
    from fasttrain import cli
    sgd = build_optimizer(small_model().parameters(), OptimConfig(optim_impl=impl), torch.device("cpu"))
    adamw = build_optimizer(small_model().parameters(), OptimConfig(optimizer="adamw", optim_impl=impl),
                            torch.device("cpu"))
    for opt in (sgd, adamw):
        assert opt.defaults["fused" if impl == "fused" else "foreach"] is True
    assert cli.main(["train", "--opt", "lars", "--optim-impl", impl, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--optim-impl picks torch's SGD or AdamW kernels; --opt lars has its own update" in err
