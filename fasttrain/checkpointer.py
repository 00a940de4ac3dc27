"""The one checkpointer: when to save, what goes in, and putting every component back on resume.

Each component hands over its own state: the Trainer (model, optimizer, schedule, scaler, skipped steps:
Trainer.state_dict), each rank's train loader position (DALI's checkpoint; the torchvision sampler needs
only the epoch and step), each rank's RNGs and train meter of the epoch so far, and the run's own numbers
(seed, epoch, step, best_acc1). Nothing a resume needs lives only in a local variable of the loop.

When: at every epoch end, every `--checkpoint-interval` steps (counted in steps, whatever `-p` is: the
engine stops at those steps too), and at the sync point after a stop request (SIGTERM, Ctrl-C).
Saving is collective (the per-rank parts are gathered), rank 0 writes, a barrier follows. Reading: rank 0
reads the file once (weights_only) and broadcasts it, so every rank resumes from the same bytes and a
rank that cannot see the file (no shared disk) still can; an unreadable file is the same one-line error
on every rank.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from . import checkpoint as ckpt_io
from . import dist as D
from . import signals
from .config import Config
from .engine import Trainer
from .errors import UserError


def log0(dist: D.DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"fasttrain: {msg}", file=sys.stderr, flush=True)


def output_dir(cfg: Config, dist: D.DistInfo) -> str:
    """The run's folder (rank 0's clock names a default one), created, with the temporary files of a process
    killed mid-write removed (the real files are whole). Only for training: an evaluation writes nothing,
    and must not delete the in-flight temporary checkpoint of a run still writing there."""
    out = [cfg.run.output_dir or os.path.join("runs", f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}")]
    out = D.broadcast_object(out, dist)
    if dist.is_main:
        os.makedirs(out[0], exist_ok=True)
        for name in os.listdir(out[0]):
            if ".tmp." in name:
                os.remove(os.path.join(out[0], name))
    return out[0]


def read_resume(resume: str, out: str | None, dist: D.DistInfo) -> dict | None:
    """The checkpoint a run continues from (None: start afresh), read on rank 0 and broadcast. `resume` is
    a path or 'auto' (OUTPUT_DIR/checkpoint.pth.tar if it exists)."""
    if not resume:
        return None
    path = os.path.join(out, ckpt_io.LATEST) if resume == "auto" else resume
    got = None
    if dist.is_main:
        try:
            if resume == "auto" and not os.path.isfile(path):
                got = ("none",)
            elif not os.path.isfile(path):
                got = ("error", f"checkpoint {path} does not exist (to start from scratch, drop --resume; "
                                "--resume auto resumes only if OUTPUT_DIR/checkpoint.pth.tar exists)")
            else:
                got = ("ok", {**ckpt_io.resumable(ckpt_io.load(path), path), "path": path})
        except UserError as e:
            got = ("error", str(e))
    got = D.broadcast_object(got, dist)
    if got[0] == "error":
        raise UserError(got[1])
    return got[1] if got[0] == "ok" else None


@dataclass
class Start:
    """Where the loop begins: an epoch, steps already done in it, and this rank's meter of those steps."""
    epoch: int
    step: int = 0
    meter: dict | None = None
    wall_seconds: float = 0.0  # the run's time before this process (its earlier, resumed-from parts)


class Checkpointer:
    def __init__(self, cfg: Config, dist: D.DistInfo, out: str, tr: Trainer, loaders, seed: int):
        self.cfg, self.dist, self.out, self.tr, self.loaders, self.seed = cfg, dist, out, tr, loaders, seed
        self.every = cfg.run.checkpoint_interval
        self.best_acc1 = 0.0
        self.stopped_by = 0  # the signal that stopped the run, agreed by all ranks
        self.wall_seconds = lambda: 0.0  # the run's time so far, kept in each checkpoint (Watch's clock)

    def restore(self, ck: dict) -> Start:
        """Put every component back as the checkpoint left it (RNGs, loader positions and meters per rank,
        when this run has as many ranks as the one that saved it)."""
        ckpt_io.check_compatible(ck, ck["path"], self.cfg.model.arch, tuple(self.loaders.classes))
        epoch, step = int(ck.get("epoch", 0)), int(ck.get("step", 0))
        self.tr.load_state_dict(ck, global_step=epoch * len(self.loaders.train) + step)
        if self.cfg.run.evaluate and self.cfg.run.eval_weights == "ema":  # fasttrain eval --eval-weights ema
            if not ck.get("ema"):
                raise UserError(f"checkpoint {ck['path']} holds no EMA weights (it was trained without --ema): "
                                "drop --eval-weights ema")
            self.tr.model.load_state_dict(ck["ema"])
        self.best_acc1 = float(ck.get("best_acc1", 0.0))  # the reference saves a tensor
        world, rank = self.dist.world_size, self.dist.rank
        rngs = ck.get("rng") or []
        if len(rngs) == world:
            ckpt_io.set_rng_state(rngs[rank], self.dist.device)
        data = ck.get("data") or []  # one position per rank, from loaders that keep one (DALI)
        if any(d is not None for d in data) and hasattr(self.loaders.train, "load_state_dict"):
            if len(data) == world:
                self.loaders.train.load_state_dict(data[rank])
            else:
                log0(self.dist, f"the checkpoint holds data positions of {len(data)} rank(s), this run has "
                                f"{world}: each rank's loader starts at the saved step of its new shard")
        meters = ck.get("meters") or []  # each rank's train meter of the epoch so far (mid-epoch checkpoints)
        log0(self.dist, f"resumed from {ck['path']} at epoch {epoch} step {step}")
        return Start(epoch, step, meters[rank] if len(meters) == world else None,
                     float(ck.get("wall_seconds", 0.0)))

    def at_sync(self, epoch: int, step: int, meter=None) -> bool:
        """Called at the same steps on every rank. Saves mid-epoch on schedule or on a stop request, with
        each rank's train meter of the epoch so far (a resumed epoch's metrics then cover all of it).
        Returns True to stop the run (then `stopped_by` is the signal, the same on every rank)."""
        self.stopped_by = D.max_over_ranks(signals.stop_requested(), self.dist)  # SIGTERM over Ctrl-C
        stop = bool(self.stopped_by)
        due = self.every and step % self.every == 0 and step < len(self.loaders.train)  # the end saves anyway
        if stop or due:
            self.save(epoch, step, val_top1=None, is_best=False, meter=meter)
        return stop

    def end_epoch(self, epoch: int, val_top1: float) -> None:
        """The checkpoint of a finished, validated epoch (the next run starts at epoch + 1)."""
        is_best = val_top1 > self.best_acc1
        self.best_acc1 = max(self.best_acc1, val_top1)
        self.save(epoch + 1, 0, val_top1=val_top1, is_best=is_best)

    def save(self, epoch: int, step: int, val_top1: float | None, is_best: bool, meter=None) -> None:
        """Collective (RNG states, data positions and mid-epoch train meters are gathered from every rank);
        rank 0 writes; then a barrier."""
        data_state = getattr(self.loaders.train, "state_dict", None)  # loaders that keep a position (DALI)
        mine = (ckpt_io.rng_state(self.dist.device), data_state() if data_state else None,
                meter.state_dict() if meter is not None else None)
        every = D.all_gather_object(mine, self.dist)
        rng, data, meters = ([e[i] for e in every] for i in range(3))
        finite = all(bool(torch.isfinite(p).all()) for p in self.tr.model.parameters())
        if self.dist.is_main and finite:
            ckpt_io.atomic_save({
                "epoch": epoch, "step": step, "arch": self.cfg.model.arch, **self.tr.state_dict(),
                "best_acc1": self.best_acc1, "seed": self.seed, "rng": rng, "data": data if data_state else None,
                "meters": meters if meter is not None else None, "classes": list(self.loaders.classes),
                "config": self.cfg.to_dict(), "val_top1": val_top1, "wall_seconds": self.wall_seconds(),
            }, os.path.join(self.out, ckpt_io.LATEST))
            if is_best:
                ckpt_io.atomic_copy(os.path.join(self.out, ckpt_io.LATEST), os.path.join(self.out, ckpt_io.BEST))
        elif self.dist.is_main:
            log0(self.dist, "weights are not finite: checkpoint NOT written (the previous one is kept)")
        D.barrier(self.dist)
