"""What every data backend hands the engine, and the pieces they share.

A backend builds two `Batches`: iterables of `(images, labels)` already on the training device, images
normalized float (or the AMP dtype) in the memory format the model wants, labels int64 [B]. The engine
only ever sees this protocol, so it cannot tell DALI from torchvision from synthetic data.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch.utils.data import DistributedSampler

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


VAL_CROP_RATIO = 224 / 256  # the reference's: resize to 256, center-crop 224


def val_resize_size(image_size: int, crop_ratio: float = VAL_CROP_RATIO) -> int:
    """The short side before the center crop: the reference resizes to 256 for a 224 crop; keep that ratio
    (or --val-crop-ratio) for other sizes."""
    return int(round(image_size / crop_ratio))


class Batches(Protocol):
    """One split's batches for this rank."""

    def __len__(self) -> int: ...  # steps per epoch on this rank
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...  # reshuffle; resume mid-epoch
    def close(self) -> None: ...


@dataclass
class Loaders:
    train: Batches
    val: Batches
    classes: tuple[str, ...]
    name: str  # the backend actually used, e.g. "dali-gpu", printed at start-up
    train_size: int  # images in the whole train split (all ranks)
    val_size: int    # images validated (all ranks): the val split, or --val-steps' part of it
    batch: int = 0   # per process
    workers: int = 0  # per process (DALI: threads)
    detail: str = ""  # said at start-up after the loader's name
    accum: int = 1   # batches per optimizer step (--grad-accum-steps): len(train) is a multiple of it
    choice: str = ""  # how --loader auto (or hybrid's share) was decided, said at start-up; "" = as asked
    data: object = None  # the config.DataConfig the loaders were built from (auto and the share decided)

    @property
    def steps(self) -> int:
        """Optimizer steps an epoch: what the training loop, the schedule and checkpoints count."""
        return len(self.train) // self.accum


@dataclass(frozen=True)
class Layout:
    """How the engine wants its input: where, in which memory format and dtype."""
    device: torch.device
    channels_last: bool
    dtype: torch.dtype = torch.float32


class BadFileBudget:
    """Counts files skipped at training time; past the budget the run stops with an error."""

    def __init__(self, limit: int, rank: int = 0):
        self.limit, self.rank, self.seen = limit, rank, []

    def count_known(self, path: str) -> None:
        """Count, without a new warning, a file an earlier run (the one a resume continues) reported."""
        if path not in self.seen:
            self.seen.append(path)

    def report(self, path: str, reason: str) -> None:
        if path in self.seen:
            return  # said once already (val files come round every epoch)
        self.seen.append(path)
        print(f"fasttrain: warning: rank {self.rank}: skipped bad file {path}: {reason} "
              f"({len(self.seen)} of at most {self.limit})", file=sys.stderr, flush=True)
        if len(self.seen) > self.limit:
            raise UserError(f"more than --max-bad-files={self.limit} files could not be decoded (last: {path}); "
                            "run `fasttrain check-data DATA --write-clean-list clean.txt` and train with "
                            "--file-list clean.txt")


def unused_samples(sampler: DistributedSampler, used: int) -> list[int]:
    """Of an epoch of `sampler` (DistributedSampler with drop_last, its epoch set), the samples no batch holds
    that this rank answers for: its shard past the first `used` (the last whole batch; or window, with
    --grad-accum-steps), and on rank 0 those DistributedSampler leaves out so that every rank gets as many
    (it draws the same permutation: seed + epoch). Over all ranks these and the batches are the whole split."""
    tail = list(sampler)[used:]
    n = len(sampler.dataset)
    if sampler.rank == 0 and sampler.total_size < n:
        g = torch.Generator()
        g.manual_seed(sampler.seed + sampler.epoch)
        tail += torch.randperm(n, generator=g).tolist()[sampler.total_size:]
    return tail


def bad_files(paths: list) -> list[tuple[str, str]]:
    """(path, reason) of the files that do not decode, as the torchvision loader judges them: a full decode."""
    from .decode import BadImage, decode_file
    bad = []
    for path in paths:
        try:
            decode_file(path)
        except BadImage as e:
            bad.append((e.path, e.reason))
    return bad


class UnusedFiles:
    """Decodes the train files no batch of an epoch holds, on a thread while the epoch trains (a decode
    releases the GIL; at most a batch or two of files an epoch). Without it, a bad file that the shuffle puts
    past the last whole batch goes unreported that epoch, and in a short run perhaps in all of them. Start it
    after the DataLoader's workers have forked, never before."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None

    def start(self, paths: list) -> Future | None:
        """A future of bad_files(paths), or None for no paths."""
        if not paths:
            return None
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="fasttrain-unused-files")
        return self.pool.submit(bad_files, paths)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def check_shard_sizes(train_size: int, world_size: int, per_rank_batch: int, val_size: int) -> tuple[int, int]:
    """(train steps per epoch, per-rank batch), the same on every rank, or a clear error. A training set
    smaller than one batch per process trains as the reference trains on it: on what there is, one step of
    every rank's whole shard per epoch (whole shards, so every rank runs the same steps)."""
    if world_size > train_size or world_size > val_size:
        raise UserError(f"world size {world_size} is larger than the dataset ({train_size} train, "
                        f"{val_size} val images): use fewer processes")
    per_rank = train_size // world_size
    if per_rank_batch > per_rank:
        return 1, per_rank
    return per_rank // per_rank_batch, per_rank_batch
