"""--loader hybrid: the torchvision backend's CPU workers and the DALI pipeline feeding the same training steps.

    fasttrain train DATA --loader hybrid --dali-share 0.4     # 2 batches in 5 from DALI, the rest from workers
    fasttrain train DATA --loader auto                         # picks hybrid (and its share) where it measured best

    train, val = hybrid.build(train_split, val_split, batch, workers, cfg, layout, dist, seed, steps, size_at)
    train.set_epoch(epoch, start_step)
    for images, labels in train: ...

Why: on a GPU machine both loaders are often slower than the model (ResNet-18), and they are limited by
different things (the CPU cores; the GPU's decoders), so together they can make more batches than either.

Each batch of an epoch comes whole from one source. Batch k of the epoch is the same samples whichever source
makes it: positions [k*b, (k+1)*b) of the epoch's order that both backends already share (DistributedSampler's
permutation for seed + epoch at the GLOBAL rank, truncated to whole batches), so per-rank sharding and equal
steps on every rank are theirs. Which source makes batch k is fixed by k and the share alone (dali_batch_ids:
an even interleave, DALI's batches spread over the epoch in the ratio of the two sources' measured rates), so
neither source waits on the other more than the ratio's rounding, and a resumed run gives every batch to the
same source as the run it continues. The share is part of the run's resolved config (config.toml, the
checkpoint), and `--loader auto` on resume keeps the checkpoint's loader and share.

Exact resume: the torchvision workers seed each sample's crop and flip from the sample (its position is the
sampler's), DALI continues from its own checkpoint (state_dict holds it, per rank, with the share). A resumed
run's next batch, from either source, is the uninterrupted run's. Validation: DALI's (every image once, no
padding: rank r scores samples r, r+W, ...). Bad files: one BadFileBudget for both sources, so
--max-bad-files counts every file either skipped, each named once.

The engine cannot tell: this is a Batches like the others (base.py). DALI itself is imported only in
dali_backend.py.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from typing import Callable

from ..errors import UserError
from .base import BadFileBudget, Layout
from .scan import Split

SHARE_STEPS = 32  # a measured share is rounded to a multiple of 1/32 (config.toml then reads e.g. 0.40625)


def share_fraction(share: float) -> Fraction:
    """The share as an exact small fraction: a float from a TOML file or the command line rounds the same way
    on every rank and machine."""
    if not 0.0 <= share <= 1.0:
        raise UserError(f"--dali-share must be between 0 and 1, got {share}")
    return Fraction(share).limit_denominator(1000)


def dali_batch_ids(steps: int, share: float) -> list[int]:
    """The positions of an epoch's `steps` batches that DALI makes: batch k when floor((k+1) s) > floor(k s),
    which spreads round(steps x s) of them evenly (share 1/3: batches 2, 5, 8, ...)."""
    s = share_fraction(share)
    return [k for k in range(steps) if math.floor((k + 1) * s) > math.floor(k * s)]


def round_share(share: float) -> float:
    """A measured share as the hybrid takes it: a multiple of 1/SHARE_STEPS, neither source left empty."""
    return min(SHARE_STEPS - 1, max(1, round(share * SHARE_STEPS))) / SHARE_STEPS


class HybridBatches:
    """An epoch's batches, batch k from DALI if k is in `dali_ids`, else from the torchvision workers."""

    def __init__(self, cpu, dali, steps: int, dali_ids: list[int], share: float, rank: int = 0):
        self.cpu, self.dali, self.steps, self.share, self.rank = cpu, dali, steps, share, rank
        self.from_dali = [False] * steps
        for k in dali_ids:
            self.from_dali[k] = True
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.steps

    def _before(self, step: int) -> tuple[int, int]:
        """(torchvision batches, DALI batches) among the epoch's first `step` batches."""
        dali = sum(self.from_dali[:step])
        return step - dali, dali

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step
        cpu, dali = self._before(start_step)
        self.cpu.set_epoch(epoch, cpu)
        self.dali.set_epoch(epoch, dali)

    def __iter__(self):
        rest = self.from_dali[self.start:]
        # Both sources start now (workers and DALI's threads work ahead in parallel), the workers first, even with
        # no batch left to make in this epoch: they are forked at the first pass, and a fork must not copy DALI's
        # threads mid-work (a worker could deadlock on a lock one of them held). DALI starts only where it has a
        # batch to make (a part with none at all has no plan to follow).
        cpu = iter(self.cpu)
        dali = iter(self.dali) if any(rest) else None
        return self._pass(cpu, dali, rest)

    def _pass(self, cpu, dali, rest: list[bool]):
        try:
            for from_dali in rest:
                source = dali if from_dali else cpu
                try:
                    yield next(source)
                except StopIteration:  # not expected: each source's plan holds exactly its batches
                    raise RuntimeError(f"the hybrid loader's {'DALI' if from_dali else 'torchvision'} part ended "
                                       "before the epoch did") from None
            for it in (cpu, dali):  # each part's end of the epoch: the workers' check of the unused files
                for _ in it or ():
                    raise RuntimeError("a part of the hybrid loader made more batches than its plan holds")
        finally:
            for it in (cpu, dali):  # a pass left early (a stop request): its workers and pipeline pause now
                if it is not None and hasattr(it, "close"):
                    it.close()

    def state_dict(self) -> dict:
        """The share and DALI's position (its own checkpoint); the workers need none (crops seeded per sample)."""
        return {"share": self.share, "dali": self.dali.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        if "share" not in state or state["share"] != self.share:
            what = (f"a hybrid loader with --dali-share {state['share']:g}" if "share" in state
                    else "another loader")
            print(f"fasttrain: warning: rank {self.rank}: the checkpoint's data position is from {what}, this run "
                  f"has --dali-share {self.share:g}: the resumed epoch reads the same files, and DALI's part of it "
                  "other random crops and flips", file=sys.stderr, flush=True)
            return
        self.dali.load_state_dict(state["dali"])

    def close(self) -> None:
        self.cpu.close()
        self.dali.close()


def build(train: Split, val: Split, batch: int, workers: int, cfg, layout: Layout, dist, seed: int, steps: int,
          size_at: Callable[[int], int], val_size: int, share: float | None = None,
          budget: BadFileBudget | None = None, check_unused: bool | None = None):
    """This rank's hybrid train batches and DALI's val batches. `cfg`: config.DataConfig (its dali_share unless
    `share` is given; DALI's knobs). Each source gets the process's `workers` (DataLoader workers; DALI
    threads): DALI's threads mostly read files and wait on the GPU's decoders, the workers decode.
    `check_unused`: see torchvision_backend.build (None: for whole epochs, not with --steps-per-epoch)."""
    from . import dali_backend, torchvision_backend
    share = cfg.dali_share if share is None else share
    if not 0.0 < share < 1.0:
        raise UserError(f"--loader hybrid needs a --dali-share between 0 and 1 (0 = measured by --loader auto's "
                        f"calibration), got {share:g}")
    dali_ids = dali_batch_ids(steps, share)
    dali_set = set(dali_ids)
    cpu_ids = [k for k in range(steps) if k not in dali_set]
    budget = budget or BadFileBudget(cfg.max_bad_files, dist.rank)
    # The files no batch of an epoch holds are checked once, by the workers' part (base.UnusedFiles): it runs
    # every pass, DALI only where it has batches left.
    cpu, cpu_val = torchvision_backend.build(train, val, batch, workers, cfg.image_size, layout, dist.rank,
                                             dist.world_size, seed, steps, cfg.max_bad_files, None, size_at=size_at,
                                             val_size=val_size, crop_ratio=cfg.val_crop_ratio,
                                             check_unused=not cfg.steps_per_epoch if check_unused is None else
                                             check_unused, budget=budget, batch_ids=cpu_ids)
    cpu_val.close()  # validation is DALI's: the workers' val loader is never started
    dali, dali_val = dali_backend.build(train, val, batch, workers, cfg, layout, dist, seed, steps, budget=budget,
                                        batch_ids=dali_ids, check_unused=False)
    return HybridBatches(cpu, dali, steps, dali_ids, share, dist.rank), dali_val
