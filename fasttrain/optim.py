"""SGD as the reference (momentum, weight decay on every parameter) and a per-step LR schedule.

The fused CUDA kernel is used where available (one launch for all parameters; faster than foreach for
ResNet-50 on an H100: benchmarks/ANCHORS.md), foreach elsewhere.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD; fused (one kernel for all parameters) on CUDA unless `fused` says otherwise, foreach elsewhere."""
    params = list(params)
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
