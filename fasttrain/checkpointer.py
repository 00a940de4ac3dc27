"""The one checkpointer: when to save, what goes in, and putting every component back on resume.

Each component hands over its own state: the Trainer (model, optimizer, schedule, scaler, skipped steps:
Trainer.state_dict), each rank's train loader position (DALI's checkpoint; the torchvision sampler needs
only the epoch and step), each rank's RNGs and train meter of the epoch so far, and the run's own numbers
(seed, epoch, step, best_acc1). Nothing a resume needs lives only in a local variable of the loop.

When: at every epoch end, every `--checkpoint-interval` steps (counted in steps, whatever `-p` is: the
engine stops at those steps too), and at the sync point after a stop request (SIGTERM, Ctrl-C).
Saving is collective (the per-rank parts are gathered) and rank 0 writes: it copies the state to host
memory (the step waits only for that copy) and a thread of its own writes the file while training goes on,
one write at a time, atomically; the run waits for the last one before it ends, stops or fails, so nothing
is lost and a crash leaves the previous checkpoint whole. Reading: rank 0 reads the file (weights_only) and
decides; where every rank sees the same file each loads it itself, memory-mapped, else rank 0 sends it, so
a rank without the shared disk still resumes from the same bytes; an unreadable file is the same one-line
error on every rank.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import checkpoint as ckpt_io
from . import dist as D
from . import signals
from .config import Config
from .engine import Trainer
from .errors import UserError


def log0(dist: D.DistInfo, msg: str) -> None:
    """A line of the run's story (rank 0), on stdout with the step lines: `> log` keeps the whole run."""
    if dist.is_main:
        print(f"fasttrain: {msg}", flush=True)


def warn0(dist: D.DistInfo, msg: str) -> None:
    """A warning (rank 0), on stderr as errors are: seen on the terminal even when stdout goes to a file."""
    if dist.is_main:
        print(f"fasttrain: warning: {msg}", file=sys.stderr, flush=True)


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


def file_stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file this process can see, or None: whether two ranks see the same file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def read_resume(resume: str, out: str | None, dist: D.DistInfo) -> dict | None:
    """The checkpoint a run continues from (None: start afresh). `resume` is a path or 'auto'
    (OUTPUT_DIR/checkpoint.pth.tar if it exists). Rank 0 reads and checks it and tells every rank its verdict
    (start afresh, resume, or the one-line error); where every rank sees the same file (a shared file system:
    same size and modification time), each loads it itself, memory-mapped, so no rank receives a whole
    checkpoint through the process group; where some rank does not, rank 0 sends it to all (pickled)."""
    if not resume:
        return None
    path = os.path.join(out, ckpt_io.LATEST) if resume == "auto" else resume
    verdict, ck = None, None
    if dist.is_main:
        try:
            if resume == "auto" and not os.path.isfile(path):
                verdict = ("none",)
            elif not os.path.isfile(path):
                verdict = ("error", f"checkpoint {path} does not exist (to start from scratch, drop --resume; "
                                    "--resume auto resumes only if OUTPUT_DIR/checkpoint.pth.tar exists)")
            else:
                ck = _read(path)
                verdict = ("ok", file_stamp(path))
        except UserError as e:
            verdict = ("error", str(e))
    verdict = D.broadcast_object(verdict, dist)
    if verdict[0] == "error":
        raise UserError(verdict[1])
    if verdict[0] == "none":
        return None
    if not dist.distributed:
        return ck
    if all(D.all_gather_object(file_stamp(path) == verdict[1], dist)):
        failed = None
        if not dist.is_main:
            try:
                ck = _read(path)
            except UserError as e:
                failed = f"rank {dist.rank}: {e}"
        failed = next((f for f in D.all_gather_object(failed, dist) if f), None)
        if failed:
            raise UserError(failed)
        return {**ck, "read_by": "every rank"}
    return {**D.broadcast_object(ck, dist), "read_by": "rank 0"}


def _read(path: str) -> dict:
    return {**ckpt_io.resumable(ckpt_io.load(path, mmap=True), path), "path": path}


def check_same_steps(ck: dict, cfg: Config, step: int) -> None:
    """A checkpoint's optimizer state fits only the optimizer that wrote it (the reference's: SGD), and its
    step counts accumulation windows of the size it was saved with: mid-epoch, another --grad-accum-steps
    would resume at another batch."""
    optim = (ck.get("config") or {}).get("optim", {})
    saved = optim.get("optimizer", "sgd")
    if ck.get("optimizer") and saved != cfg.optim.optimizer:
        raise UserError(f"checkpoint {ck['path']} was trained with --opt {saved}, not {cfg.optim.optimizer}: "
                        f"resume with --opt {saved}, or start anew from its weights with --weights")
    accum = int(optim.get("grad_accum_steps", 1))
    if step and accum != cfg.optim.grad_accum_steps:
        raise UserError(f"checkpoint {ck['path']} stopped mid-epoch (step {step}) with --grad-accum-steps {accum}: "
                        f"resume with --grad-accum-steps {accum} (it may change at an epoch boundary)")


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
        self.writer: ThreadPoolExecutor | None = None  # rank 0 writes checkpoints on this thread...
        self.pending: Future | None = None             # ...one at a time: this one, until flush()

    def restore(self, ck: dict) -> Start:
        """Put every component back as the checkpoint left it (RNGs, loader positions and meters per rank,
        when this run has as many ranks as the one that saved it)."""
        ckpt_io.check_compatible(ck, ck["path"], self.cfg.model.arch, tuple(self.loaders.classes))
        epoch, step = int(ck.get("epoch", 0)), int(ck.get("step", 0))
        check_same_steps(ck, self.cfg, step)
        self.tr.load_state_dict(ck, global_step=epoch * self.loaders.steps + step)
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
        how = {"every rank": " (each rank read it from the shared file system)",
               "rank 0": f" (read by rank 0 and sent to the other {world - 1}: not every rank can see the file)"}
        log0(self.dist, f"resumed from {ck['path']} at epoch {epoch} step {step}{how.get(ck.get('read_by'), '')}")
        return Start(epoch, step, meters[rank] if len(meters) == world else None,
                     float(ck.get("wall_seconds", 0.0)))

    def at_sync(self, epoch: int, step: int, meter=None) -> bool:
        """Called at the same steps on every rank. Saves mid-epoch on schedule or on a stop request, with
        each rank's train meter of the epoch so far (a resumed epoch's metrics then cover all of it).
        Returns True to stop the run (then `stopped_by` is the signal, the same on every rank)."""
        self.stopped_by = D.max_over_ranks(signals.stop_requested(), self.dist)  # SIGTERM over Ctrl-C
        stop = bool(self.stopped_by)
        due = self.every and step % self.every == 0 and step < self.loaders.steps  # the end saves anyway
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
            self.flush()  # one write at a time: the previous one is whole on disk before the next starts
            state = ckpt_io.to_cpu({  # a copy: training goes on changing the originals while it is written
                "epoch": epoch, "step": step, "arch": self.cfg.model.arch, **self.tr.state_dict(),
                "best_acc1": self.best_acc1, "seed": self.seed, "rng": rng, "data": data if data_state else None,
                "meters": meters if meter is not None else None, "classes": list(self.loaders.classes),
                "config": self.cfg.to_dict(), "val_top1": val_top1, "wall_seconds": self.wall_seconds(),
            })
            if self.writer is None:
                self.writer = ThreadPoolExecutor(1, thread_name_prefix="fasttrain-checkpoint")
            self.pending = self.writer.submit(_write, state, self.out, is_best)
        elif self.dist.is_main:
            warn0(self.dist, "weights are not finite: checkpoint NOT written (the previous one is kept)")
        D.barrier(self.dist)

    def flush(self) -> None:
        """Wait for the checkpoint being written, if any; its error, if it failed, is raised here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """flush(), and the writer thread ends. At the end of a run, a stop or an error: nothing is lost."""
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.shutdown(wait=True)
                self.writer = None


def _write(state: dict, out: str, is_best: bool) -> None:
    """The checkpoint file (atomically: a crash leaves the previous one whole), and model_best's copy."""
    ckpt_io.atomic_save(state, os.path.join(out, ckpt_io.LATEST))
    if is_best:
        ckpt_io.atomic_copy(os.path.join(out, ckpt_io.LATEST), os.path.join(out, ckpt_io.BEST))
