"""The main job, as one straight line: resume file -> seed -> data -> model -> restore -> compile/DDP -> loop.

    run(cfg, dist)   # dist from dist.setup(); launch.py does that (and spawning, signals, exit codes)
"""

from __future__ import annotations

import inspect
import random
import signal
import time

import numpy as np
import torch

from . import dist as D
from . import signals
from .checkpointer import Checkpointer, Start, log0, output_dir, read_resume
from .config import Config, RunConfig, resolve_lr, resolve_toggles
from .data import build_loaders
from .data.base import Layout
from .ema import EMA
from .engine import Trainer, evaluate, train_one_epoch
from .metrics import Progress
from .model import FlipTTA, build_model
from .optim import build_optimizer
from .schedules import Resolution, build_scheduler
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


VAL_SHAPES = 2  # input shapes of a val pass: its full batches and its last, smaller one
DYNAMO_RECOMPILE_LIMIT = 8  # torch's default for graphs per function, where torch.compile cannot set it


def compile_options(shapes: int) -> dict:
    """torch.compile arguments for a forward that will see `shapes` input shapes (progressive resizing: one
    per distinct train size). dynamic=False: every shape gets its own static graph (static kernels, and
    CUDA graphs with reduce-overhead), compiled the first time it comes and reused after, so a run compiles
    at most once per distinct size and never per step; cuDNN's autotuner (--cudnn-benchmark) likewise tunes
    once per new shape. Dynamo keeps a bounded number of graphs per function and runs eagerly past it, so
    the bound is sized to the schedule where torch.compile takes one (recompile_limit, with
    isolate_recompiles so the train, val and EMA compiles of one model do not share it); 2 to spare for a
    guard on something other than the shape. Where it cannot be set (older torch) and the run needs more
    than the default 8 graphs, dynamic shapes (torch's default) are used instead: one dynamic graph for
    every size after the first."""
    params = inspect.signature(torch.compile).parameters
    if "recompile_limit" in params:
        kw = {"dynamic": False, "recompile_limit": shapes + 2}
        if "isolate_recompiles" in params:
            kw["isolate_recompiles"] = True
        return kw
    return {"dynamic": False} if shapes + 2 * VAL_SHAPES <= DYNAMO_RECOMPILE_LIMIT else {}


def wrap_model(model: torch.nn.Module, run: RunConfig, dist: D.DistInfo, train_shapes: int = 1):
    """(train forward, eval forward). DDP first, then compile: dynamo's DDPOptimizer splits the graph at
    bucket boundaries so gradient all-reduce overlaps the backward. Eval uses the un-DDP'd module, so
    validation needs no collective per batch and ranks may hold different numbers of val batches.
    `train_shapes`: the distinct train input sizes of the run (progressive resizing)."""
    train_fwd = model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if run.compile:
        train_fwd = torch.compile(train_fwd, mode=run.compile_mode, **compile_options(train_shapes))
    return train_fwd, eval_forward(model, run)


def eval_forward(model: torch.nn.Module, run: RunConfig):
    """A raw model (or the EMA's) for validation: with --val-tta flip inside FlipTTA, compiled if --compile."""
    fwd = FlipTTA(model) if run.val_tta == "flip" else model
    return torch.compile(fwd, mode=run.compile_mode, **compile_options(VAL_SHAPES)) if run.compile else fwd


def build_trainer(cfg: Config, dist: D.DistInfo, num_classes: int, steps_per_epoch: int):
    model = build_model(cfg.model, num_classes).to(dist.device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.optim, dist.device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.run.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema and not cfg.run.evaluate else None
    return Trainer(model, model, optimizer, scheduler, scaler, criterion, AMP_DTYPES[cfg.run.amp], dist,
                   cfg.run.on_nan, ema=ema)


def run(cfg: Config, dist: D.DistInfo) -> int:
    """Train (or with -e, only evaluate). Returns the exit status: 0, or 128 + the signal after a stop."""
    cfg.run = resolve_toggles(cfg.run, dist.device.type)
    global_batch = dist.per_rank_batch(cfg.data.batch_size) * dist.world_size
    cfg.optim = resolve_lr(cfg.optim, global_batch)
    if cfg.optim.lr_per_256 and not cfg.run.evaluate:
        log0(dist, f"lr {cfg.optim.lr:g} = --lr-per-256 {cfg.optim.lr_per_256:g} x global batch {global_batch} / 256")
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
    sizes = Resolution.from_config(cfg.data)
    tr.forward, eval_fwd = wrap_model(tr.model, cfg.run, dist, len(sizes.sizes(start.epoch, cfg.optim.epochs)))
    ema_fwd = eval_forward(tr.ema.module, cfg.run) if tr.ema is not None else None
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
        if sizes.progressive and (resumed or sizes(epoch) != sizes(epoch - 1)):
            log0(dist, f"epoch {epoch}: train crops of {sizes(epoch)} px (progressive resizing)")
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
        if ema_fwd is not None:  # the averaged weights, on the same images
            ema = evaluate(ema_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
            val.update({f"{k}_ema": v for k, v in ema.items() if k != "val_samples"})
        watch.end_epoch(epoch, stats, val, time.perf_counter() - t_val, max(saver.best_acc1, val["val_top1"]))
        saver.end_epoch(epoch, val["val_top1"])  # after the metrics row (see Watch.end_epoch)
    watch.finish()
    return 0
