"""build_loaders(): pick a backend and build this rank's train and val batches.

Backends: torchvision (CPU decode, works everywhere), dali (GPU "mixed" decode, or DALI's CPU-only mode
with --device cpu; imported lazily, only in dali_backend.py), hybrid (both feeding the same steps: hybrid.py),
synthetic (random tensors on the device). `--loader auto` is decided by a `pick` the caller hands in (the
trainer's: tune.py, by measurement), after the one scan of DATA; without one, by resolve_backend.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from ..config import DataConfig
from ..dist import DistInfo
from ..errors import UserError
from ..cpu_share import workers_per_process
from ..schedules import Resolution
from .base import Layout, Loaders, check_shard_sizes
from .scan import Split, scan_dataset


# (train split, val split, workers per process, batch per process) -> (the DataConfig with its loader decided,
# and with hybrid its --dali-share; the settings line that says why)
Pick = Callable[[Split, Split, int, int], tuple[DataConfig, str]]


def resolve_backend(loader: str, device_type: str, augment: bool = False) -> str:
    """auto, unmeasured (--calibrate off, and wherever nothing is measured): DALI on a GPU where it imports,
    else torchvision; torchvision when a per-image augmentation (--auto-augment, --randaugment) is asked for,
    which only that loader applies."""
    if loader != "auto":
        return loader
    if device_type == "cuda" and not augment:
        from . import dali_backend
        if dali_backend.available():
            return "dali"
    return "torchvision"


def spaced(split: Split, n: int) -> Split:
    """n samples spread evenly over the split (it is sorted by class: the first n would be one class)."""
    if n >= len(split):
        return split
    picked = tuple(split.samples[i * len(split) // n] for i in range(n))
    return Split(split.root, split.classes, picked)


def train_steps(steps: int, limit: int, accum: int, batch: int) -> int:
    """Batches an epoch: at most --steps-per-epoch optimizer steps, whole accumulation windows only."""
    if limit:
        steps = min(steps, limit * accum)
    if steps < accum:
        raise UserError(f"--grad-accum-steps {accum} needs {accum} batches an epoch, and each process has "
                        f"{steps} batch{'es' if steps != 1 else ''} of {batch}: lower --grad-accum-steps or -b")
    return steps // accum * accum


def build_loaders(cfg: DataConfig, dist: DistInfo, layout: Layout, seed: int, accum: int = 1,
                  pick: Pick | None = None) -> Loaders:
    """This rank's train and val batches. `accum`: batches per optimizer step (an epoch holds whole windows).
    `pick`: decides --loader auto (and hybrid's --dali-share 0) from the scanned splits; see Pick."""
    augment = augmentation(cfg)
    backend = resolve_backend(cfg.loader, layout.device.type, augment is not None)
    batch = dist.per_rank_batch(cfg.batch_size)
    sizes = Resolution.from_config(cfg)  # train crop size per epoch (progressive resizing), val size
    if backend == "synthetic":
        from . import synthetic
        train, val = synthetic.build(batch, dist.world_size, sizes(0), cfg.num_classes, layout, seed,
                                     dist.rank, cfg.val_steps, size_at=sizes, val_size=sizes.val_size)
        train.steps = train_steps(train.steps, cfg.steps_per_epoch, accum, batch)
        classes = tuple(str(i) for i in range(cfg.num_classes))
        val_size = sum(synthetic.val_share(r, dist.world_size, batch, cfg.val_steps) for r in range(dist.world_size))
        return Loaders(train, val, classes, "synthetic", synthetic.TRAIN_SIZE, val_size, batch, 0, "", accum)

    if cfg.data is None:
        raise UserError("no DATA given (and no embedded dataset for this command)")
    workers, why = workers_per_process(cfg.workers, dist.local_world_size)
    train_split, val_split = scan_dataset(cfg.data, cfg.file_list)
    if cfg.val_steps:
        val_split = spaced(val_split, cfg.val_steps * batch * dist.world_size)
    choice = ""
    if pick is not None and (cfg.loader == "auto" or (cfg.loader == "hybrid" and not cfg.dali_share)):
        cfg, choice = pick(train_split, val_split, workers, batch)
        backend = cfg.loader
    if backend == "hybrid" and not cfg.dali_share:
        cfg = dataclasses.replace(cfg, dali_share=0.5)
        choice = "--dali-share 0.5: nothing measured the two sources' rates here"
    if backend in ("dali", "hybrid"):
        from . import dali_backend
        dali_backend.require(f"--loader {backend}")  # also checked before any work (launch.preflight)
        # A broken JPEG can crash DALI's parser (no error to catch): DALI never sees one.
        from .jpeg_check import drop_broken_jpegs
        train_split, val_split = drop_broken_jpegs(train_split, val_split, dist, workers, cfg.max_bad_files)
    steps, fits = check_shard_sizes(len(train_split), dist.world_size, batch, len(val_split))
    if fits < batch and dist.rank == 0:
        print(f"fasttrain: warning: {len(train_split)} training images make less than one batch of {batch} for "
              f"each of the {dist.world_size} process(es): training on batches of {fits}, 1 step per epoch",
              file=sys.stderr, flush=True)
    batch = fits
    steps = train_steps(steps, cfg.steps_per_epoch, accum, batch)
    detail = why
    if backend == "dali":
        train, val = dali_backend.build(train_split, val_split, batch, workers, cfg, layout, dist, seed, steps)
        name = dali_backend.loader_name(layout.device)
    elif backend == "hybrid":
        from . import hybrid
        train, val = hybrid.build(train_split, val_split, batch, workers, cfg, layout, dist, seed, steps, sizes,
                                  sizes.val_size)
        name = "hybrid"
        detail += (f" + {dali_backend.loader_name(layout.device)} with {workers} thread{'s' * (workers != 1)}, "
                   f"DALI making {len(train.dali.batch_ids)} of the {steps} batches an epoch (--dali-share "
                   f"{cfg.dali_share:g}); val on DALI")
    elif backend == "torchvision":
        from . import torchvision_backend
        train, val = torchvision_backend.build(train_split, val_split, batch, workers, cfg.image_size, layout,
                                               dist.rank, dist.world_size, seed, steps, cfg.max_bad_files,
                                               augment, size_at=sizes, val_size=sizes.val_size,
                                               crop_ratio=cfg.val_crop_ratio, check_unused=not cfg.steps_per_epoch)
        name = "torchvision"
        from .decode import crop_decoder_available
        if not crop_decoder_available():
            detail += "; whole-image JPEG decode (fasttrain/data/_jpeg.c was not built, see README)"
    else:  # pragma: no cover - config choices stop this earlier
        raise UserError(f"unknown loader {backend}")
    return Loaders(train, val, train_split.classes, name, len(train_split), len(val_split), batch, workers, detail,
                   accum, choice, cfg)


def augmentation(cfg: DataConfig):
    """torchvision's AutoAugment or RandAugment for uint8 train images, or None."""
    if not (cfg.auto_augment or cfg.randaugment):
        return None
    from torchvision.transforms import v2
    if cfg.auto_augment:
        return v2.AutoAugment(v2.AutoAugmentPolicy(cfg.auto_augment))
    return v2.RandAugment(num_ops=2, magnitude=cfg.randaugment)
