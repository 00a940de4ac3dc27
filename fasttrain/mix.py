"""--mixup / --cutmix: torchvision's v2 MixUp and CutMix on each train batch, on the device.

    fasttrain train DATA --mixup 0.2 --cutmix 1.0 --label-smoothing 0.1   # one of the two per batch, as timm

They run in the Trainer, after the loader, so every backend (DALI, torchvision, synthetic) gets them. Labels
become soft, [B, classes] rows that sum to 1: CrossEntropyLoss takes them as class probabilities (label
smoothing then applies on top), and the train meters count a hit on the class with the largest share of a
row. Validation sees plain labels. Their random draws (the Beta sample, CutMix's box, which of the two)
come from torch's CPU generator, which checkpoints keep per rank: a resumed run mixes as the stopped one
would have. Pairs are neighbours in the batch (torchvision rolls the batch by one); batches are shuffled.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import OptimConfig


def build_mix(cfg: OptimConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """(images, labels) -> (mixed images, soft labels), or None when neither is on."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2
    mixes = []
    if cfg.mixup:
        mixes.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix:
        mixes.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
