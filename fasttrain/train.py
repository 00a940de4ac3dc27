"""The main job, as one straight line: resume file -> seed -> data -> model -> restore -> compile/DDP -> loop.

    run(cfg, dist)   # dist from dist.setup(); launch.py does that (and spawning, signals, exit codes)
"""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import torch

from . import dist as D
from . import signals
from .checkpointer import Checkpointer, Start, log0, output_dir, read_resume
from .config import Config, RunConfig, resolve_toggles
from .data import build_loaders
from .data.base import Layout
from .engine import Trainer, evaluate, train_one_epoch
from .metrics import Progress
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .watch import Watch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_seed(cfg_seed: int | None, ck: dict | None, dist: D.DistInfo) -> int:
    """The run's seed (it decides the data order and augmentation): a resumed run keeps the one it started
    with, whatever --seed says now (another would reshuffle the epoch it continues); else --seed, else one
    random seed that every rank shares (their samplers must shuffle alike)."""
    saved = ck.get("seed") if ck else None
    if saved is not None:
        if cfg_seed is not None and cfg_seed != saved:
            log0(dist, f"warning: --seed {cfg_seed} ignored: the resumed run continues with its own seed {saved}")
        return int(saved)
    seed = cfg_seed if cfg_seed is not None else random.SystemRandom().randrange(2**31)
    return D.broadcast_object(seed, dist)


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


def run(cfg: Config, dist: D.DistInfo) -> int:
    """Train (or with -e, only evaluate). Returns the exit status: 0, or 128 + the signal after a stop."""
    cfg.run = resolve_toggles(cfg.run, dist.device.type)
    out = cfg.run.output_dir if cfg.run.evaluate else output_dir(cfg, dist)  # an evaluation writes nothing
    ck = read_resume(cfg.run.resume, out, dist)  # read once, on rank 0; every rank gets it
    seed = run_seed(cfg.run.seed, ck, dist)
    seed_everything(seed)
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    layout = Layout(dist.device, cfg.run.channels_last, AMP_DTYPES[cfg.run.amp] or torch.float32)
    loaders = build_loaders(cfg.data, dist, layout, seed)
    try:
        return _run(cfg, dist, seed, out, loaders, ck)
    finally:  # DALI pipelines live for the run: free them (threads, GPU buffers) before the process ends
        loaders.train.close()
        loaders.val.close()


def _run(cfg: Config, dist: D.DistInfo, seed: int, out: str | None, loaders, ck: dict | None) -> int:
    log0(dist, f"device {dist.device}: amp {cfg.run.amp}, channels_last {cfg.run.channels_last}, "
               f"compile {cfg.run.compile and cfg.run.compile_mode}, cudnn.benchmark {cfg.run.cudnn_benchmark}")
    tr = build_trainer(cfg, dist, len(loaders.classes), len(loaders.train))  # same init on every rank
    seed_everything(seed + 1000 * dist.rank)  # ranks differ (e.g. dropout masks) from here on
    saver = Checkpointer(cfg, dist, out, tr, loaders, seed)
    start = saver.restore(ck) if ck else Start(cfg.optim.start_epoch)  # RNGs too, as the checkpoint left them
    t_compile = time.perf_counter()
    tr.forward, eval_fwd = wrap_model(tr.model, cfg.run, dist)
    if cfg.run.evaluate:
        res = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist,
                       Progress(len(loaders.val), "Test", dist.is_main))
        log0(dist, f"val: Acc@1 {res['val_top1']:.3f} Acc@5 {res['val_top5']:.3f} loss {res['val_loss']:.6f} "
                   f"on {res['val_samples']} images")
        return 0
    watch = Watch(cfg, dist, out, tr, loaders, start)
    saver.wall_seconds = watch.clock.wall_seconds  # kept in every checkpoint: the run's time across resumes
    signals.install()  # from here on, SIGTERM or Ctrl-C means: save at the next sync point, then exit
    log0(dist, f"training {cfg.model.arch} on {dist.device} for epochs {start.epoch}..{cfg.optim.epochs - 1}; "
               f"outputs in {out}")
    for epoch in range(start.epoch, cfg.optim.epochs):
        resumed = epoch == start.epoch
        step0 = start.step if resumed else 0
        progress = watch.progress(epoch, step0)
        stats = train_one_epoch(tr, watch.train_batches(resumed), epoch, step0, cfg.run.print_freq,
                                cfg.run.checkpoint_interval, progress,
                                lambda step, meter: saver.at_sync(epoch, step, meter), start.meter if resumed else None)
        progress.close()
        if resumed and cfg.run.compile:
            log0(dist, f"first epoch incl. torch.compile took {time.perf_counter() - t_compile:.1f}s")
        if stats.stopped:
            watch.tb.close()
            again = "--resume auto" + ("" if cfg.run.output_dir else f" --output-dir {out}")
            log0(dist, f"stopped by {signal.Signals(saver.stopped_by).name} at epoch {epoch} step "
                       f"{stats.steps_done}; checkpoint saved in {out}; continue with {again}")
            return signals.exit_status(saver.stopped_by)
        D.broadcast_buffers(tr.model, dist)  # validate (and save) rank 0's BatchNorm statistics on every rank
        t_val = time.perf_counter()
        val = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
        watch.end_epoch(epoch, stats, val, time.perf_counter() - t_val, max(saver.best_acc1, val["val_top1"]))
        saver.end_epoch(epoch, val["val_top1"])  # after the metrics row (see Watch.end_epoch)
    watch.finish()
    return 0
