"""The main job, as one straight line: data -> model -> channels_last -> resume -> compile/DDP -> loop.

    run(cfg, dist)   # dist from dist.setup(); launch.py does that (and spawning, signals, exit codes)
"""

from __future__ import annotations

import inspect
import os
import random
import sys
import time

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import dist as D
from .config import Config, RunConfig, resolve_lr, resolve_toggles
from .data import build_loaders
from .data.base import Layout
from .ema import EMA
from .engine import Trainer, evaluate, train_one_epoch
from .errors import UserError
from .metrics import JsonlWriter, Progress
from .model import FlipTTA, build_model
from .optim import build_optimizer
from .schedules import Resolution, build_scheduler
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
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema and not cfg.run.evaluate else None
    return Trainer(model, model, optimizer, scheduler, scaler, criterion, AMP_DTYPES[cfg.run.amp], dist,
                   cfg.run.on_nan, ema=ema)


def log0(dist: D.DistInfo, msg: str) -> None:
    if dist.is_main:
        print(f"fasttrain: {msg}", file=sys.stderr, flush=True)


def run(cfg: Config, dist: D.DistInfo) -> int:
    """Train (or with -e, only evaluate). Returns the exit status: 0, or 143 after a SIGTERM stop."""
    cfg.run = resolve_toggles(cfg.run, dist.device.type)
    global_batch = dist.per_rank_batch(cfg.data.batch_size) * dist.world_size
    cfg.optim = resolve_lr(cfg.optim, global_batch)
    if cfg.optim.lr_per_256 and not cfg.run.evaluate:
        log0(dist, f"lr {cfg.optim.lr:g} = --lr-per-256 {cfg.optim.lr_per_256:g} x global batch {global_batch} / 256")
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
    sizes = Resolution.from_config(cfg.data)
    tr.forward, eval_fwd = wrap_model(tr.model, cfg.run, dist, len(sizes.sizes(state["epoch"], cfg.optim.epochs)))
    ema_fwd = eval_forward(tr.ema.module, cfg.run) if tr.ema is not None else None
    ctx = RunContext(cfg, dist, out, tr, loaders, state)
    if cfg.run.evaluate:
        res = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist, ctx.progress(len(loaders.val), "Test"))
        log0(dist, f"val: Acc@1 {res['val_top1']:.3f} Acc@5 {res['val_top5']:.3f} on {res['val_samples']} images")
        return 0
    signals.install()  # from here on, SIGTERM means: save at the next sync point, then exit 143
    log0(dist, f"training {cfg.model.arch} on {dist.device} for epochs {state['epoch']}..{cfg.optim.epochs - 1}; "
               f"outputs in {out}")
    for epoch in range(state["epoch"], cfg.optim.epochs):
        t_epoch = time.perf_counter()
        if sizes.progressive and (epoch == state["epoch"] or sizes(epoch) != sizes(epoch - 1)):
            log0(dist, f"epoch {epoch}: train crops of {sizes(epoch)} px (progressive resizing)")
        start_step = state["step"] if epoch == state["epoch"] else 0
        progress = ctx.progress(len(loaders.train), f"Epoch: [{epoch}]", start_step)
        stats = train_one_epoch(tr, loaders.train, epoch, start_step, cfg.run.print_freq, progress,
                                lambda step, meter: ctx.at_sync(epoch, step, meter),
                                state.get("meter") if epoch == state["epoch"] else None)
        progress.close()
        if epoch == state["epoch"] and cfg.run.compile:
            log0(dist, f"first epoch incl. torch.compile took {time.perf_counter() - t_compile:.1f}s")
        if stats.stopped:
            log0(dist, f"stopped by signal at epoch {epoch} step {stats.steps_done}; checkpoint saved in {out}; "
                       "continue with --resume auto")
            return 143
        val = evaluate(eval_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
        if ema_fwd is not None:  # the averaged weights, on the same images
            ema = evaluate(ema_fwd, loaders.val, tr.criterion, tr.amp_dtype, dist)
            val.update({f"{k}_ema": v for k, v in ema.items() if k != "val_samples"})
        ctx.end_epoch(epoch, stats, val, time.perf_counter() - t_epoch)
    log0(dist, f"done: best val Acc@1 {ctx.best_acc1:.3f}; metrics {os.path.join(out, 'metrics.jsonl')}, "
               f"checkpoints {os.path.join(out, ckpt_io.LATEST)} and {ckpt_io.BEST}")
    return 0


def restore(tr: Trainer, path: str, cfg: Config, dist: D.DistInfo, loaders) -> dict:
    """Load a checkpoint on every rank into the raw model, optimizer, schedule, scaler and RNGs."""
    ck = ckpt_io.load(path)
    ckpt_io.check_compatible(ck, path, cfg.model.arch, len(loaders.classes))
    tr.model.load_state_dict(ck["state_dict"])
    if cfg.run.evaluate and cfg.run.eval_weights == "ema":
        if not ck.get("ema"):
            raise UserError(f"checkpoint {path} holds no EMA weights (it was trained without --ema): "
                            "drop --eval-weights ema")
        tr.model.load_state_dict(ck["ema"])
    groups = len((ck.get("optimizer") or {}).get("param_groups", []))
    if groups not in (0, len(tr.optimizer.param_groups)) and not cfg.run.evaluate:
        raise UserError(f"checkpoint {path} was trained with other --no-bn-wd/--opt settings (its optimizer "
                        "has another number of parameter groups): resume with the settings it was trained with")
    for key, obj in (("optimizer", tr.optimizer), ("scheduler", tr.scheduler), ("scaler", tr.scaler)):
        if ck.get(key) and not cfg.run.evaluate:  # evaluation needs the weights only
            obj.load_state_dict(ck[key])
    if tr.ema is not None:
        if ck.get("ema"):
            tr.ema.load_state_dict(ck["ema"])
        else:
            tr.ema.reset(tr.model)
            log0(dist, f"{path} holds no EMA of the weights: the average starts from its weights")
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
    """What the epoch loop needs besides the Trainer: where to write, what is best, when to save."""

    def __init__(self, cfg: Config, dist: D.DistInfo, out: str, tr: Trainer, loaders, state: dict):
        self.cfg, self.dist, self.out, self.tr, self.loaders = cfg, dist, out, tr, loaders
        self.best_acc1 = state["best_acc1"]
        self.metrics = JsonlWriter(os.path.join(out, "metrics.jsonl"), dist.is_main and not cfg.run.evaluate,
                                   keep_before_epoch=state["epoch"])
        self.sizes = Resolution.from_config(cfg.data)
        # The run's wall time across resumes: the checkpoint's, plus this process's since it got here.
        self.wall_before, self.t0 = state["wall_seconds"], time.perf_counter()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def progress(self, total: int, desc: str, initial: int = 0) -> Progress:
        return Progress(total, desc, self.dist.is_main, initial)

    def at_sync(self, epoch: int, step: int, meter=None) -> bool:
        """Called at the same steps on every rank. Saves mid-epoch on schedule or on a stop request, with
        each rank's train meter of the epoch so far (a resumed epoch's metrics then cover all of it)."""
        stop = D.any_rank(stop_requested(), self.dist)
        every = self.cfg.run.checkpoint_interval
        if stop or (every and step % every == 0 and step < len(self.loaders.train)):
            # at the last step too: the resumed run goes straight to validation
            self.save(epoch, step, val_top1=None, is_best=False, meter=meter)
        return stop

    def end_epoch(self, epoch: int, stats, val: dict, epoch_seconds: float) -> None:
        """Metrics row first, then the checkpoint: a crash between the two redoes the epoch on resume, and
        the resumed run drops the rows of epochs it redoes, so no epoch is missing or doubled."""
        is_best = val["val_top1"] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, val["val_top1"])
        record = {"epoch": epoch, "lr": self.tr.optimizer.param_groups[0]["lr"], "train_loss": stats.loss,
                  "train_top1": stats.top1, "train_top5": stats.top5, **val,
                  "train_samples": stats.samples,
                  "train_images_per_sec": stats.images_per_sec, "data_time_fraction": stats.data_time_fraction,
                  "skipped_steps": self.tr.skipped_steps, "best_acc1": self.best_acc1, "time": time.time(),
                  "image_size": self.sizes(epoch), "val_image_size": self.sizes.val_size,
                  "epoch_seconds": epoch_seconds, "wall_seconds": self.wall_seconds()}
        self.metrics.write(record)
        self.save(epoch + 1, 0, val_top1=val["val_top1"], is_best=is_best)
        log0(self.dist, f"epoch {epoch}: train loss {stats.loss:.4f} top1 {stats.top1:.2f} | val loss "
                        f"{val['val_loss']:.4f} top1 {val['val_top1']:.2f} top5 {val['val_top5']:.2f} "
                        f"({val['val_samples']} images)"
                        + (f", EMA top1 {val['val_top1_ema']:.2f}" if "val_top1_ema" in val else "")
                        + f" | {stats.images_per_sec:.0f} img/s, data wait {100 * stats.data_time_fraction:.0f}%")

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
                "ema": tr.ema.state_dict() if tr.ema is not None else None, "wall_seconds": self.wall_seconds(),
            }, os.path.join(self.out, ckpt_io.LATEST))
            if is_best:
                ckpt_io.atomic_copy(os.path.join(self.out, ckpt_io.LATEST), os.path.join(self.out, ckpt_io.BEST))
        elif self.dist.is_main:
            log0(self.dist, "weights are not finite: checkpoint NOT written (the previous one is kept)")
        D.barrier(self.dist)
