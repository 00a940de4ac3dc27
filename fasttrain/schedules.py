"""What changes over a run, as pure functions of where the run is: the learning rate per step, the train
crop size per epoch.

    factor = lr_factor(cfg.optim, step, steps_per_epoch)        # LR multiplier at a global train step
    sizes = Resolution.from_config(cfg.data); sizes(epoch)      # train crop size of an epoch

LR schedules (all per step, so a schedule means the same at any batch size or number of GPUs):
- step: 0.1x every 30 epochs, as the reference script (pytorch/examples imagenet/main.py);
- cosine: half a cosine from the peak to 0 at the last step (SGDR without restarts);
- linear: a straight line from the peak to 0 at the last step;
- triangular: FFCV's "cyclic" (libffcv/ffcv-imagenet train_imagenet.py, get_cyclic_lr + train_loop): the LR
  of each epoch boundary is read off the line 1e-4 x peak at epoch 0 -> peak at --lr-peak-epoch -> 0 at
  --epochs, and interpolated linearly inside the epoch, step by step.
step, cosine and linear start with a linear warm-up over --warmup-epochs (Goyal et al. 2017); triangular's
warm-up is its first leg.

Progressive resizing (FFCV's get_resolution): --min-res up to epoch --start-ramp, --max-res from epoch
--end-ramp on, in between the straight line between them rounded to a multiple of --res-step (numpy's
round: halves go to the even multiple, so FFCV's 160 -> 192 ramp has no 176 epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig, OptimConfig

# FFCV's triangular schedule starts at this fraction of the peak, not at 0 (a first step at LR 0 is wasted).
TRIANGULAR_START = 1e-4


def _triangular_epoch(cfg: OptimConfig, epoch: int) -> float:
    """FFCV's get_cyclic_lr at an epoch boundary, as a fraction of the peak."""
    return float(np.interp([epoch], [0, cfg.lr_peak_epoch, cfg.epochs], [TRIANGULAR_START, 1.0, 0.0])[0])


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """LR multiplier (of --lr) at a global train step (0-based)."""
    if cfg.lr_schedule == "triangular":
        epoch, i = divmod(step, steps_per_epoch)
        start, end = _triangular_epoch(cfg, epoch), _triangular_epoch(cfg, epoch + 1)
        return float(np.interp([i], [0, steps_per_epoch], [start, end])[0])
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.lr_schedule == "step":
        return 0.1 ** (int(epoch) // 30)
    progress = min((epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9), 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per train step; its state_dict (last_epoch = steps done) resumes it exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))


def lr_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> float:
    """The LR the schedule gives global train step `step` (0-based) of the first parameter group; reads the
    schedule, changes nothing."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)


def ffcv_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    """FFCV's get_resolution, with its rounding step (32 there) as a parameter."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / step)) * step


@dataclass(frozen=True)
class Resolution:
    """Train crop size per epoch, and the validation size. Without --min-res/--max-res: --image-size always."""
    image_size: int
    min_res: int = 0
    max_res: int = 0
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32
    val_res: int = 0

    @classmethod
    def from_config(cls, data: DataConfig) -> "Resolution":
        return cls(data.image_size, data.min_res, data.max_res, data.start_ramp, data.end_ramp, data.res_step,
                   data.val_res)

    @property
    def progressive(self) -> bool:
        return bool(self.min_res)

    def __call__(self, epoch: int) -> int:
        if not self.progressive:
            return self.image_size
        return ffcv_resolution(epoch, self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step)

    def sizes(self, first: int, epochs: int) -> list[int]:
        """The distinct train sizes of epochs first..epochs-1, in the order they come."""
        return list(dict.fromkeys(self(e) for e in range(first, max(epochs, first + 1))))

    @property
    def val_size(self) -> int:
        """--val-res, else the last train size (--max-res, or --image-size)."""
        return self.val_res or (self.max_res if self.progressive else self.image_size)
