"""--ema DECAY: an exponential moving average of the weights, updated after every optimizer step.

    ema = EMA(model, decay=0.9999)     # a copy of the raw model, never trained itself
    ema.update(model)                  # after each step: ema = decay * ema + (1 - decay) * model
    evaluate(ema.module, ...)          # validated each epoch as val_top1_ema

Floating-point parameters and buffers (BatchNorm's running statistics too, as timm's ModelEmaV3) are
averaged with torch.optim.swa_utils.get_ema_multi_avg_fn, one foreach lerp over all of them on the device:
no host sync, a few kernels per step. Integer buffers (num_batches_tracked) are copied. The average lives
in checkpoints as a state_dict with the model's own keys, so `fasttrain eval --eval-weights ema` loads it
into the same architecture.
"""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._average = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        floats, sources, others = [], [], []
        for mine, theirs in zip(_tensors(self.module), _tensors(model)):
            if mine.is_floating_point():
                floats.append(mine)
                sources.append(theirs.detach())
            else:
                others.append((mine, theirs))
        self._average(floats, sources, None)
        for mine, theirs in others:
            mine.copy_(theirs)

    def float_tensors(self) -> list[torch.Tensor]:
        """What update() averages (the rest it copies)."""
        return [t for t in _tensors(self.module) if t.is_floating_point()]

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start the average over from the model's current weights."""
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
