"""The optimizer (--opt): SGD as the reference (momentum, weight decay on every parameter), or timm's AdamW
and LAMB (build_adaptive); and a per-step LR schedule.

The fused CUDA kernel is used where available (one launch for all parameters; faster than foreach for
ResNet-50 on an H100: benchmarks/ANCHORS.md), foreach elsewhere.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD; fused (one kernel for all parameters) on CUDA unless `fused` says otherwise, foreach elsewhere.
    AdamW and LAMB: build_adaptive."""
    params = list(params)
    if cfg.optimizer in ADAPTIVE:
        return build_adaptive(params, cfg, device)
    fused = device.type == "cuda" if fused is None else fused
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({"fused": True} if fused else {"foreach": True}))
    if fused and cfg.momentum:
        # The fused kernel creates a missing momentum buffer with empty_like and fills it in the same launch,
        # but returns before writing anything when the fp16 GradScaler found an inf, which it does on the
        # first steps: the buffer then holds garbage from then on and the loss goes NaN. Zeros are what the
        # first step would make of it (with dampening 0: buf = momentum * 0 + grad), so the step is the same
        # whether or not the first one is skipped. tests/test_train.py checks it against foreach.
        for p in params:
            if p.requires_grad:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """LR multiplier at a global step: linear warm-up, then step (0.1x every 30 epochs) or cosine."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.lr_schedule == "step":
        return 0.1 ** (int(epoch) // 30)
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min((epoch - cfg.warmup_epochs) / span, 1.0)))


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per train step; its state_dict (last_epoch = steps done) resumes it exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))


def lr_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> float:
    """The LR the schedule gives global train step `step` (0-based) of the first parameter group; reads the
    schedule, changes nothing."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)


# AdamW and LAMB, as timm offers them (--opt adamw, --opt lamb): weight decay on every parameter as for SGD.
ADAPTIVE = ("adamw", "lamb")
BETAS = (0.9, 0.999)


def build_adaptive(params: list, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(params, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay, **fast)
    return Lamb(params, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as timm's Lamb without its
    built-in gradient clipping (that is --clip-grad here). For each tensor w with gradient g, at step t:

        m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay w
        w = w - lr * trust * u,            trust = |w| / |u|   (1 where |w| or |u| is 0)

    torch has no LAMB. A loop over the tensors with public ops; norms and the trust ratio stay on the device
    (no host sync). The step count is a plain int, so checkpoints load with weights_only=True."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = BETAS, eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                if wd:
                    update.add_(p, alpha=wd)
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (trust * lr))
        return loss
