"""The main job, as one straight line: data -> model -> channels_last -> resume -> compile/DDP -> loop.

    run(cfg, dist)   # dist from dist.setup(); launch.py does that (and spawning, signals, exit codes)
"""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import dist as D
from . import monitor
from . import tb
from .config import Config, RunConfig, profile_window, resolve_toggles
from .data import build_loaders
from .data.base import Layout
from .engine import Trainer, evaluate, train_one_epoch
from .errors import UserError
from .metrics import JsonlWriter, Progress, read_jsonl
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .profiling import ProfiledBatches
from . import signals
from .signals import stop_requested

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def agreed_seed(cfg_seed: int | None, dist: D.DistInfo) -> int:
    """--seed, or one random seed that every rank shares (their samplers must shuffle alike)."""
    seed = [cfg_seed if cfg_seed is not None else random.SystemRandom().randrange(2**31)]
    if dist.distributed:
        torch.distributed.broadcast_object_list(seed, src=0)
    return seed[0]


def wrap_model(model: torch.nn.Module, run: RunConfig, dist: D.DistInfo):
    """(train forward, eval forward). DDP first, then compile: dynamo's DDPOptimizer splits the graph at
    bucket boundaries so gradient all-reduce overlaps the backward. Eval uses the un-DDP'd module, so
    validation needs no collective per batch and ranks may hold different numbers of val batches."""
    train_fwd = model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if run.compile:
        return torch.compile(train_fwd, mode=run.compile_mode), torch.compile(model, mode=run.compile_mode)
    return train_fwd, model


def output_dir(cfg: Config, dist: D.DistInfo) -> str:
    out = [cfg.run.output_dir or os.path.join("runs", f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if dist.distributed:
        torch.distributed.broadcast_object_list(out, src=0)  # one folder, named by rank 0's clock
    if dist.is_main:
        os.makedirs(out[0], exist_ok=True)
        for name in os.listdir(out[0]):  # left by a process killed mid-write; the real files are whole
            if ".tmp." in name:
                os.remove(os.path.join(out[0], name))
    return out[0]


def resume_path(run: RunConfig, out: str) -> str | None:
    if run.resume == "auto":
        path = os.path.join(out, ckpt_io.LATEST)
        return path if os.path.isfile(path) else None
    return run.resume or None


def build_trainer(cfg: Config, dist: D.DistInfo, num_classes: int, steps_per_epoch: int):
    model = build_model(cfg.model, num_classes).to(dist.device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.optim, dist.device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.run.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return Trainer(model, model, optimizer, scheduler, scaler, criterion, AMP_DTYPES[cfg.run.amp], dist,
                   cfg.run.on_nan)


def log0(dist: D.DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"fasttrain: {msg}", file=sys.stderr, flush=True)


def run(cfg: Config, dist: D.DistInfo) -> int:
    """Train (or with -e, only evaluate). Returns the exit status: 0, or 143 after a SIGTERM stop."""
    cfg.run = resolve_toggles(cfg.run, dist.device.type)
    seed = agreed_seed(cfg.run.seed, dist)
    seed_everything(seed)
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    out = output_dir(cfg, dist)
    layout = Layout(dist.device, cfg.run.channels_last, AMP_DTYPES[cfg.run.amp] or torch.float32)
    loaders = build_loaders(cfg.data, dist, layout, seed)
    try:
        return _run(cfg, dist, seed, out, loaders)
    finally:  # DALI pipelines live for the run: free them (threads, GPU buffers) before the process ends
        loaders.train.close()
        loaders.val.close()


def _run(cfg: Config, dist: D.DistInfo, seed: int, out: str, loaders) -> int:
    log0(dist, f"device {dist.device}: amp {cfg.run.amp}, channels_last {cfg.run.channels_last}, "
               f"compile {cfg.run.compile and cfg.run.compile_mode}, cudnn.benchmark {cfg.run.cudnn_benchmark}")
    tr = build_trainer(cfg, dist, len(loaders.classes), len(loaders.train))  # same init on every rank
    seed_everything(seed + 1000 * dist.rank)  # ranks differ (e.g. dropout masks) from here on
    state = {"epoch": cfg.optim.start_epoch, "step": 0, "best_acc1": 0.0, "wall_seconds": 0.0}
    path = resume_path(cfg.run, out)
    if path:
        state = restore(tr, path, cfg, dist, loaders)  # also puts every RNG back where the checkpoint left it
    t_compile = time.perf_counter()
    tr.forward, eval_fwd = wrap_model(tr.model, cfg.run, dist)
    ctx = RunContext(cfg, dist, out, tr, loaders, state)
    if cfg.run.evaluate:
        res = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist, ctx.progress(len(loaders.val), "Test"))
        log0(dist, f"val: Acc@1 {res['val_top1']:.3f} Acc@5 {res['val_top5']:.3f} on {res['val_samples']} images")
        return 0
    signals.install()  # from here on, SIGTERM means: save at the next sync point, then exit 143
    log0(dist, f"training {cfg.model.arch} on {dist.device} for epochs {state['epoch']}..{cfg.optim.epochs - 1}; "
               f"outputs in {out}")
    for epoch in range(state["epoch"], cfg.optim.epochs):
        start_step = state["step"] if epoch == state["epoch"] else 0
        progress = ctx.progress(len(loaders.train), f"Epoch: [{epoch}]", start_step, epoch)
        stats = train_one_epoch(tr, ctx.train_batches(epoch == state["epoch"]), epoch, start_step,
                                cfg.run.print_freq, progress,
                                lambda step, meter: ctx.at_sync(epoch, step, meter),
                                state.get("meter") if epoch == state["epoch"] else None)
        progress.close()
        if epoch == state["epoch"] and cfg.run.compile:
            log0(dist, f"first epoch incl. torch.compile took {time.perf_counter() - t_compile:.1f}s")
        if stats.stopped:
            ctx.tb.close()
            log0(dist, f"stopped by signal at epoch {epoch} step {stats.steps_done}; checkpoint saved in {out}; "
                       "continue with --resume auto")
            return 143
        t_val = time.perf_counter()
        val = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
        ctx.end_epoch(epoch, stats, val, time.perf_counter() - t_val)
    ctx.finish()
    return 0


def restore(tr: Trainer, path: str, cfg: Config, dist: D.DistInfo, loaders) -> dict:
    """Load a checkpoint on every rank into the raw model, optimizer, schedule, scaler and RNGs."""
    ck = ckpt_io.load(path)
    ckpt_io.check_compatible(ck, path, cfg.model.arch, len(loaders.classes))
    tr.model.load_state_dict(ck["state_dict"])
    for key, obj in (("optimizer", tr.optimizer), ("scheduler", tr.scheduler), ("scaler", tr.scaler)):
        if ck.get(key):
            obj.load_state_dict(ck[key])
    rngs = ck.get("rng") or []
    if len(rngs) == dist.world_size:
        ckpt_io.set_rng_state(rngs[dist.rank], dist.device)
    data = ck.get("data") or []  # one position per rank, from loaders that keep one (DALI)
    if any(d is not None for d in data) and hasattr(loaders.train, "load_state_dict"):
        if len(data) == dist.world_size:
            loaders.train.load_state_dict(data[dist.rank])
        else:
            log0(dist, f"the checkpoint holds data positions of {len(data)} rank(s), this run has "
                       f"{dist.world_size}: the loaders replay the epoch's done part instead")
    tr.skipped_steps = int(ck.get("skipped_steps", 0))  # --on-nan skip: counted over the whole run
    meters = ck.get("meters") or []  # each rank's train meter of the epoch so far (mid-epoch checkpoints)
    log0(dist, f"resumed from {path} at epoch {ck['epoch']} step {ck.get('step', 0)}")
    return {"epoch": ck["epoch"], "step": ck.get("step", 0), "best_acc1": float(ck.get("best_acc1", 0.0)),
            "meter": meters[dist.rank] if len(meters) == dist.world_size else None,
            "wall_seconds": float(ck.get("wall_seconds", 0.0))}


class RunContext:
    """What the epoch loop needs besides the Trainer: where to write, what is best, when to save, and what
    a person watching sees (progress, TensorBoard, the profiler, time and memory)."""

    def __init__(self, cfg: Config, dist: D.DistInfo, out: str, tr: Trainer, loaders, state: dict):
        self.cfg, self.dist, self.out, self.tr, self.loaders = cfg, dist, out, tr, loaders
        self.best_acc1 = state["best_acc1"]
        writes = dist.is_main and not cfg.run.evaluate
        self.metrics = JsonlWriter(os.path.join(out, "metrics.jsonl"), writes, keep_before_epoch=state["epoch"])
        self.steps = len(loaders.train)
        self.clock = monitor.RunClock(state["wall_seconds"], cfg.optim.epochs, self.steps)
        self.tb = tb.TensorBoard(os.path.join(out, "tb"), writes and tb.wanted(cfg.run.tensorboard),
                                 tb.purge_step(state["epoch"], state["step"], self.steps), cfg.to_dict())
        self.window = profile_window(cfg.run.profile) if cfg.run.profile and not cfg.run.evaluate else None
        if self.window and self.window[1] > self.steps:
            raise UserError(f"--profile {cfg.run.profile} goes past the {self.steps} train steps of an epoch: "
                            f"END can be at most {self.steps}")
        self.profiled: ProfiledBatches | None = None

    def progress(self, total: int, desc: str, initial: int = 0, epoch: int | None = None) -> Progress:
        """A train epoch's progress (epoch given) shows the run's ETA and feeds TensorBoard at print steps."""
        if epoch is None:
            return Progress(total, desc, self.dist.is_main, initial)
        self.clock.start_epoch(epoch, initial)
        monitor.reset_gpu_peak(self.dist.device)
        group = self.tr.optimizer.param_groups[0]  # its lr is a Python float: reading it is no device sync
        return Progress(total, desc, self.dist.is_main, initial, eta=self.clock.eta,
                        on_update=lambda step, v: self.tb.step(epoch * self.steps + step, {**v, "lr": group["lr"]}))

    def train_batches(self, first_epoch: bool):
        """The train batches, under the profiler in the run's first epoch with --profile (rank 0 only)."""
        if not (first_epoch and self.window and self.dist.is_main):
            return self.loaders.train
        self.profiled = ProfiledBatches(self.loaders.train, self.window, os.path.join(self.out, "profile"),
                                        self.dist.device)
        return self.profiled

    def at_sync(self, epoch: int, step: int, meter=None) -> bool:
        """Called at the same steps on every rank. Saves mid-epoch on schedule or on a stop request, with
        each rank's train meter of the epoch so far (a resumed epoch's metrics then cover all of it)."""
        stop = D.any_rank(stop_requested(), self.dist)
        every = self.cfg.run.checkpoint_interval
        if stop or (every and step % every == 0 and step < len(self.loaders.train)):
            # at the last step too: the resumed run goes straight to validation
            self.save(epoch, step, val_top1=None, is_best=False, meter=meter)
        return stop

    def end_epoch(self, epoch: int, stats, val: dict, val_seconds: float) -> None:
        """Metrics row first, then the checkpoint: a crash between the two redoes the epoch on resume, and
        the resumed run drops the rows of epochs it redoes, so no epoch is missing or doubled."""
        is_best = val["val_top1"] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, val["val_top1"])
        record = {"epoch": epoch, "lr": self.tr.optimizer.param_groups[0]["lr"], "train_loss": stats.loss,
                  "train_top1": stats.top1, "train_top5": stats.top5, **val,
                  "train_samples": stats.samples,
                  "train_images_per_sec": stats.images_per_sec, "data_time_fraction": stats.data_time_fraction,
                  "skipped_steps": self.tr.skipped_steps, "best_acc1": self.best_acc1, "time": time.time(),
                  **self.time_and_memory(val_seconds)}
        self.metrics.write(record)
        self.tb.epoch((epoch + 1) * self.steps, record)
        self.save(epoch + 1, 0, val_top1=val["val_top1"], is_best=is_best)
        gpu = f", GPU peak {record['gpu_max_mem_mb']:.0f} MiB" if "gpu_max_mem_mb" in record else ""
        host = f"host {record['host_rss_mb']:.0f} MiB" if record["host_rss_mb"] is not None else "host ?"
        log0(self.dist, f"epoch {epoch}: train loss {stats.loss:.4f} top1 {stats.top1:.2f} | val loss "
                        f"{val['val_loss']:.4f} top1 {val['val_top1']:.2f} top5 {val['val_top5']:.2f} "
                        f"({val['val_samples']} images) | {stats.images_per_sec:.0f} img/s, "
                        f"data wait {100 * stats.data_time_fraction:.0f}% | {record['epoch_seconds']:.1f} s, "
                        f"run {monitor.fmt_seconds(record['wall_seconds'])}, ETA "
                        f"{monitor.fmt_seconds(self.clock.eta_after(epoch))}"
                        f" | {host}{gpu}")

    def time_and_memory(self, val_seconds: float) -> dict:
        """This epoch's seconds in this process, the run's wall time so far (across resumes), rank 0's host
        memory with its loader workers, and on CUDA the epoch's peak of allocated GPU memory."""
        out = {"epoch_seconds": self.clock.end_epoch(val_seconds), "wall_seconds": self.clock.wall_seconds(),
               "host_rss_mb": monitor.host_memory_mb() if self.dist.is_main else None}
        if self.dist.device.type == "cuda":
            out["gpu_max_mem_mb"] = monitor.gpu_peak_mb(self.dist.device)
        return out

    def finish(self) -> None:
        """End of the run (rank 0): close TensorBoard, draw curves.png, print the summary line."""
        wrote_tb = self.tb.enabled
        self.tb.close()
        if not self.dist.is_main:
            return
        path = os.path.join(self.out, "metrics.jsonl")
        rows = read_jsonl(path)
        files = [path, os.path.join(self.out, ckpt_io.LATEST), os.path.join(self.out, ckpt_io.BEST)]
        if wrote_tb:
            files.append(os.path.join(self.out, "tb") + "/")
        if self.profiled is not None and self.profiled.trace_path:
            files.append(self.profiled.trace_path)
        from .plot import matplotlib_missing, plot_runs
        why = matplotlib_missing()
        if why:
            log0(self.dist, f"no curves.png: {why}")
        elif rows:
            files.append(plot_runs([self.out], os.path.join(self.out, "curves.png")))
        log0(self.dist, monitor.summary(rows, self.clock.wall_seconds(), files))

    def save(self, epoch: int, step: int, val_top1: float | None, is_best: bool, meter=None) -> None:
        """Collective (RNG states, data positions and mid-epoch train meters are gathered from every rank);
        rank 0 writes; then a barrier."""
        tr = self.tr
        data_state = getattr(self.loaders.train, "state_dict", None)  # loaders that keep a position (DALI)
        mine = (ckpt_io.rng_state(self.dist.device), data_state() if data_state else None,
                meter.state_dict() if meter is not None else None)
        every = [mine] * self.dist.world_size
        if self.dist.distributed:
            torch.distributed.all_gather_object(every, mine)
        rng, data, meters = ([e[i] for e in every] for i in range(3))
        finite = all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())
        if self.dist.is_main and finite:
            ckpt_io.atomic_save({
                "epoch": epoch, "step": step, "arch": self.cfg.model.arch,
                "state_dict": tr.model.state_dict(), "best_acc1": self.best_acc1,
                "optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(),
                "scaler": tr.scaler.state_dict(), "rng": rng, "data": data if data_state else None,
                "meters": meters if meter is not None else None, "skipped_steps": tr.skipped_steps,
                "classes": list(self.loaders.classes), "config": self.cfg.to_dict(), "val_top1": val_top1,
                "wall_seconds": self.clock.wall_seconds(),
            }, os.path.join(self.out, ckpt_io.LATEST))
            if is_best:
                ckpt_io.atomic_copy(os.path.join(self.out, ckpt_io.LATEST), os.path.join(self.out, ckpt_io.BEST))
        elif self.dist.is_main:
            log0(self.dist, "weights are not finite: checkpoint NOT written (the previous one is kept)")
        D.barrier(self.dist)
