"""The main job, as one straight line: resume file -> seed -> data -> threads -> settings -> model ->
restore -> compile/DDP (and the optimizer step with --compile-step) -> loop.

    run(cfg, dist)   # dist from dist.setup(); launch.py does that (and spawning, signals, exit codes)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import random
import signal
import time

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import cpu_share
from . import dist as D
from . import settings
from . import signals
from . import tune
from .capture import CompiledUpdate, tensor_lr
from .checkpointer import Checkpointer, Start, log0, output_dir, read_resume, warn0
from .config import Config, RunConfig, resolve_lr, resolve_toggles
from .data import build_loaders
from .data.base import Layout
from .ema import EMA
from .engine import Trainer, evaluate, train_one_epoch
from .errors import UserError
from .metrics import Progress
from .mix import build_mix
from .model import FlipTTA, build_model
from .optim import build_optimizer
from .scaling import build_scaler
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
            warn0(dist, f"--seed {cfg_seed} ignored: the resumed run continues with its own seed {saved}")
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


def compile_update(tr: Trainer, run: RunConfig) -> None:
    """--compile-step: the trainer's optimizer step as one compiled function (capture.py), built after the
    checkpoint is restored, in --compile-mode."""
    tr.update = CompiledUpdate(tr, run.compile_mode) if run.compile_step else None


def eval_forward(model: torch.nn.Module, run: RunConfig):
    """A raw model (or the EMA's) for validation: with --val-tta flip inside FlipTTA, compiled if --compile."""
    fwd = FlipTTA(model) if run.val_tta == "flip" else model
    return torch.compile(fwd, mode=run.compile_mode, **compile_options(VAL_SHAPES)) if run.compile else fwd


def build_trainer(cfg: Config, dist: D.DistInfo, num_classes: int, steps_per_epoch: int):
    """steps_per_epoch: optimizer steps (the schedule's unit)."""
    model = build_model(cfg.model, num_classes).to(dist.device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.optim, dist.device, compiled_step=cfg.run.compile_step)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    if cfg.run.compile_step:
        tensor_lr(optimizer, dist.device)  # after the schedule has taken the float LRs as its base
    scaler = build_scaler(cfg.run.amp, cfg.run.loss_scale, dist.device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)  # also takes soft labels
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema and not cfg.run.evaluate else None
    return Trainer(model, model, optimizer, scheduler, scaler, criterion, AMP_DTYPES[cfg.run.amp], dist,
                   cfg.run.on_nan, accum_steps=cfg.optim.grad_accum_steps, clip_grad=cfg.optim.clip_grad,
                   mix=build_mix(cfg.optim, num_classes), ema=ema)


def run(cfg: Config, dist: D.DistInfo) -> int:
    """Train (or with -e, only evaluate). Returns the exit status: 0, or 128 + the signal after a stop.
    `cfg` stays as the caller has it, and so does the process (cuDNN's autotuner flag, torch's threads, the
    signal handlers) when this returns: a test, a notebook or the bench may call it in-process."""
    global_batch = dist.per_rank_batch(cfg.data.batch_size) * dist.world_size
    cfg = dataclasses.replace(cfg, run=resolve_toggles(cfg.run, dist.device.type),
                              optim=resolve_lr(cfg.optim, global_batch))
    if cfg.optim.lr_per_256 and not cfg.run.evaluate:
        log0(dist, f"lr {cfg.optim.lr:g} = --lr-per-256 {cfg.optim.lr_per_256:g} x global batch {global_batch} / 256")
    out = cfg.run.output_dir if cfg.run.evaluate else output_dir(cfg, dist)  # an evaluation writes nothing
    ck = read_resume(cfg.run.resume, out, dist)  # read once, on rank 0; every rank gets it
    seed = run_seed(cfg.run.seed, ck, dist)
    seed_everything(seed)
    with process_state():
        torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
        layout = Layout(dist.device, cfg.run.channels_last, AMP_DTYPES[cfg.run.amp] or torch.float32)
        threads = cpu_share.describe(*cpu_share.apply(dist.local_world_size))  # before --loader auto measures
        # --loader auto: the profile cached for this host, data and model, else a brief measurement
        pick = None if cfg.run.evaluate else tune.picker(cfg, dist, layout, ck)
        loaders = build_loaders(cfg.data, dist, layout, seed, cfg.optim.grad_accum_steps, pick)
        try:
            if cfg.run.evaluate:
                return _evaluate(cfg, dist, loaders, ck, threads)
            return _run(cfg, dist, seed, out, loaders, ck, threads)
        finally:
            # DALI pipelines live for the run: free them (threads, GPU buffers) before the process ends
            loaders.train.close()
            loaders.val.close()


@contextlib.contextmanager
def process_state():
    """What a run sets for the whole process, put back as it was when the run ends however it ends."""
    cudnn, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    try:
        yield
    finally:
        signals.uninstall()  # the handlers _run installs around the loop, if it got that far
        torch.backends.cudnn.benchmark = cudnn
        torch.set_num_threads(threads)


def resolved(cfg: Config, seed: int, out: str, loaders, dist: D.DistInfo) -> Config:
    """The config as this run uses it: what config.toml holds and checkpoints keep."""
    workers = cfg.data.workers if cfg.data.workers is not None else loaders.workers * dist.local_world_size
    data = loaders.data or cfg.data  # with --loader auto's choice: the loader's knobs it measured best
    loader = loaders.name.split("-")[0]  # dali-gpu, dali-cpu -> dali
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed, output_dir=out),
                               data=dataclasses.replace(cfg.data, workers=workers, loader=loader,
                                                        dali_share=data.dali_share if loader == "hybrid" else 0.0,
                                                        hw_decoder_load=data.hw_decoder_load, prefetch=data.prefetch))


def _evaluate(cfg: Config, dist: D.DistInfo, loaders, ck: dict | None, threads: str) -> int:
    """-e / `fasttrain eval`: score the checkpoint's weights (or, as the reference, a fresh model) on val."""
    tr = build_trainer(cfg, dist, len(loaders.classes), loaders.steps)
    what = "a fresh model (no --resume)"
    if ck:
        ckpt_io.check_compatible(ck, ck["path"], cfg.model.arch, tuple(loaders.classes))
        weights = ck["state_dict"]
        if cfg.run.eval_weights == "ema":  # fasttrain eval --eval-weights ema
            if not ck.get("ema"):
                raise UserError(f"checkpoint {ck['path']} holds no EMA weights (it was trained without --ema): "
                                "drop --eval-weights ema")
            weights = ck["ema"]
        tr.model.load_state_dict(weights)
        what = (f"{ck['path']}{' (EMA weights)' * (cfg.run.eval_weights == 'ema')} (saved at epoch "
                f"{int(ck.get('epoch', 0))} step {int(ck.get('step', 0))})")
    elif cfg.run.eval_weights == "ema":
        raise UserError("--eval-weights ema needs a checkpoint trained with --ema (--resume PATH)")
    log0(dist, f"evaluating {what}: {cfg.model.arch} at {cfg.data.image_size} px on {loaders.val_size} val images "
               f"of {cfg.data.data or 'synthetic data'}; {loaders.name}, {loaders.batch} per process x "
               f"{dist.world_size}, {loaders.workers} workers; {dist.device}, amp {cfg.run.amp}; {threads}")
    res = evaluate(eval_forward(tr.model, cfg.run), loaders.val, tr.criterion, tr.amp_dtype, dist,
                   Progress(len(loaders.val), "Test", dist.is_main), cfg.run.print_freq)
    log0(dist, f"val: Acc@1 {res['val_top1']:.3f} Acc@5 {res['val_top5']:.3f} loss {res['val_loss']:.6f} "
               f"on {res['val_samples']} images")
    return 0


def _run(cfg: Config, dist: D.DistInfo, seed: int, out: str, loaders, ck: dict | None, threads: str) -> int:
    cfg = resolved(cfg, seed, out, loaders, dist)
    config_path = os.path.join(out, "config.toml")
    if dist.is_main:
        settings.write_toml(cfg, config_path)
    log0(dist, "\n".join(settings.describe(cfg, dist, loaders, threads, config_path)))
    tr = build_trainer(cfg, dist, len(loaders.classes), loaders.steps)  # same init on every rank
    seed_everything(seed + 1000 * dist.rank)  # ranks differ (e.g. dropout masks) from here on
    saver = Checkpointer(cfg, dist, out, tr, loaders, seed)
    start = saver.restore(ck) if ck else Start(cfg.optim.start_epoch)  # RNGs too, as the checkpoint left them
    if start.epoch >= cfg.optim.epochs:  # the reference would print nothing, or "epochs 3..2"
        log0(dist, f"nothing to train: {ck['path']} is at epoch {start.epoch} of {cfg.optim.epochs}: the run is "
                   "already done (raise --epochs to train on)" if ck else
                   f"nothing to train: --start-epoch {start.epoch} is not below --epochs {cfg.optim.epochs}")
        return 0
    try:
        return _train(cfg, dist, out, tr, loaders, saver, start)
    finally:
        saver.close()  # the last checkpoint's write finishes, whatever ended the run


def _train(cfg: Config, dist: D.DistInfo, out: str, tr: Trainer, loaders, saver: Checkpointer, start: Start) -> int:
    """The epochs from `start` on: compile/DDP, then train, validate and checkpoint each epoch."""
    t_compile = time.perf_counter()
    sizes = Resolution.from_config(cfg.data)
    tr.forward, eval_fwd = wrap_model(tr.model, cfg.run, dist, len(sizes.sizes(start.epoch, cfg.optim.epochs)))
    compile_update(tr, cfg.run)
    ema_fwd = eval_forward(tr.ema.module, cfg.run) if tr.ema is not None else None
    watch = Watch(cfg, dist, out, tr, loaders, start)
    saver.wall_seconds = watch.clock.wall_seconds  # kept in every checkpoint: the run's time across resumes
    signals.install()  # from here on, SIGTERM or Ctrl-C means: save at the next sync point, then exit
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
            saver.close()  # written, before the line that says so
            watch.tb.close()
            log0(dist, f"stopped by {signal.Signals(saver.stopped_by).name} at epoch {epoch} step "
                       f"{stats.steps_done}; checkpoint saved in {out}; continue with --resume auto --output-dir {out}")
            return signals.exit_status(saver.stopped_by)
        D.broadcast_buffers(tr.model, dist)  # validate (and save) rank 0's BatchNorm statistics on every rank
        t_val = time.perf_counter()
        val_progress = watch.val_progress(len(loaders.val))
        val = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist, val_progress, cfg.run.print_freq)
        val_progress.close()
        if ema_fwd is not None:  # the averaged weights, on the same images
            ema = evaluate(ema_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
            val.update({f"{k}_ema": v for k, v in ema.items() if k != "val_samples"})
        watch.end_epoch(epoch, stats, val, time.perf_counter() - t_val, max(saver.best_acc1, val["val_top1"]))
        saver.end_epoch(epoch, val["val_top1"])  # after the metrics row (see Watch.end_epoch)
    saver.close()  # the last checkpoint whole on disk before the summary names it
    watch.finish()
    return 0
