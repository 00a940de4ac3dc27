"""fp16's loss scaling (--amp fp16): torch's GradScaler, whose scale follows overflows and which skips the
steps that overflow, or with --loss-scale S a static scale.

    scaler = build_scaler(run, device)     # GradScaler (disabled unless fp16) or StaticScaler
    scaler.scale(loss).backward(); scaler.unscale_(opt); scaler.step(opt); scaler.update()

A static scale (MLPerf's fp16 ResNet-50 runs use one) needs no overflow check and no scale bookkeeping per
step: the loss is multiplied by S, the gradients by 1/S before the step (exact for a power of 2), and a step
whose gradients overflow is applied as it is, so it ends as a non-finite loss that --on-nan handles (abort:
stop with the last finite checkpoint; skip: the step is skipped). torch's GradScaler reads a device value on
the host in step() for an optimizer without a fused kernel (foreach SGD, LARS, LAMB); a static scale never
does. Unscaling is one multiply per gradient tensor eagerly; with --compile-step it is fused into the step.
"""

from __future__ import annotations

import torch


class StaticScaler:
    """GradScaler's interface (as the engine uses it) for a fixed scale."""

    def __init__(self, scale: float):
        self.scale_value = float(scale)
        self.inverse_scale = 1.0 / self.scale_value
        self._unscaled = False

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self._unscaled:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(self.inverse_scale)
        self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer):
        self.unscale_(optimizer)
        return optimizer.step()

    def update(self) -> None:
        self._unscaled = False

    def state_dict(self) -> dict:
        return {"static_scale": self.scale_value}

    def load_state_dict(self, state: dict) -> None:
        pass  # the scale is --loss-scale's, whatever the run that saved it used


def build_scaler(amp: str, loss_scale: float, device: torch.device):
    if amp == "fp16" and loss_scale:
        return StaticScaler(loss_scale)
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def is_dynamic_scaler(scaler) -> bool:
    """torch's GradScaler at work (fp16 without --loss-scale): it checks the gradients and skips a step itself."""
    return isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def same_kind(scaler, state: dict | None) -> bool:
    """Whether a checkpoint's scaler state is one `scaler` can load (a static scale's is not a GradScaler's)."""
    return bool(state) and ("static_scale" in state) == isinstance(scaler, StaticScaler)
