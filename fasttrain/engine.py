"""The training step and the evaluation loop. Knows nothing of loaders, files or processes.

Batches arrive as on-device `(images, labels)` from any backend. Nothing here reads a device value back
to the host per step: loss and accuracy stay in DeviceMeter and are read at print frequency, which is
also when non-finite losses are checked and a stop request is agreed on by all ranks.

A step is one optimizer step: with --grad-accum-steps N, N batches (each backward adds its gradients,
scaled by 1/N, so they sum to the mean over all N x B images, as one batch of N x B would give; under DDP
the first N-1 skip the all-reduce). Sync points, checkpoints and a stop come only between steps, never
inside a window, so a checkpoint never holds half-summed gradients and a resume starts a fresh window.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import dist as D
from .capture import CompiledUpdate, keep_lr_kind
from .errors import UserError
from .metrics import DeviceMeter, GpuIdle, Progress, batch_stats
from .scaling import is_dynamic_scaler, same_kind


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Trainer:
    model: torch.nn.Module          # raw module: what checkpoints hold
    forward: torch.nn.Module        # what runs: compiled and/or DDP-wrapped `model`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler    # or scaling.StaticScaler (--loss-scale)
    criterion: torch.nn.Module
    amp_dtype: torch.dtype | None
    dist: D.DistInfo
    on_nan: str = "abort"
    accum_steps: int = 1            # batches per optimizer step (--grad-accum-steps)
    clip_grad: float = 0.0          # max total gradient norm (--clip-grad); 0 = off
    mix: Callable | None = None     # MixUp/CutMix of a batch: (images, labels) -> (images, soft labels)
    skipped_steps: int = 0
    ema: object = None              # ema.EMA of the weights with --ema, updated after every optimizer step
    update: CompiledUpdate | None = None  # --compile-step: the optimizer step, compiled (capture.py)
    _nonfinite: torch.Tensor | None = field(default=None, repr=False)
    _skipped: torch.Tensor | None = field(default=None, repr=False)  # --compile-step's skips, not yet counted
    _window: list = field(default_factory=list, repr=False)  # this window's (loss, meter stats, n) so far
    _schedule_started: bool = field(default=False, repr=False)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, meter: DeviceMeter) -> bool:
        """Forward and backward of one batch; after the window's last batch, the optimizer step. Returns True
        when a step was taken (or skipped: --on-nan skip), i.e. at a step boundary of the training loop."""
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        last = len(self._window) + 1 == self.accum_steps
        with self._sync_grads(last):
            with self.autocast():
                logits = self.forward(images)
                loss = self.criterion(logits, labels)
            self.scaler.scale(loss / self.accum_steps if self.accum_steps > 1 else loss).backward()
        self._window.append((loss.detach(), *batch_stats(loss, logits, labels)))
        if not last:
            return False
        window, self._window = self._window, []
        if self.update is not None:
            keep = self._compiled_update()
        elif self._eager_update():
            keep = None
        else:
            return True  # skipped (--on-nan skip): nor do the skipped step's losses enter the meters
        for loss, stats, n in window:
            bad = ~torch.isfinite(loss)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            meter.add(stats, n, keep)
        return True

    def _eager_update(self) -> bool:
        """The optimizer step, op by op; False when --on-nan skip skipped it."""
        if self.on_nan == "skip" and not is_dynamic_scaler(self.scaler) and not self._grads_finite():
            # The same decision on every rank: DDP has all-reduced the grads, so a NaN anywhere is everywhere.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.scaler.update()
            self._step_schedule()
            return False
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16's scaler)
            # No host sync: the clip factor min(1, max_norm / norm) is applied on the device.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._step_schedule()
        self.optimizer.zero_grad(set_to_none=True)  # after the step: the next window starts from nothing
        if self.ema is not None:
            self.ema.update(self.model)  # on the device, no sync
        return True

    def _compiled_update(self) -> torch.Tensor | None:
        """--compile-step: the step as one compiled function (capture.py), skipped on the device where it must
        be. Returns the --on-nan skip decision (a 0-d bool tensor) for the meters, None without one."""
        if is_dynamic_scaler(self.scaler):
            self.scaler.unscale_(self.optimizer)  # GradScaler's own inf check, on the device; update() reads it
        keep = self.update()
        self.scaler.update()
        self._step_schedule()
        self.update.after_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        if keep is None or self.on_nan != "skip" or is_dynamic_scaler(self.scaler):
            return None  # fp16's GradScaler skips an overflowing step's update only, as op by op
        skipped = (~keep).to(torch.int64)
        self._skipped = skipped if self._skipped is None else self._skipped + skipped
        return keep

    def _step_schedule(self) -> None:
        """One LR schedule step per optimizer step, taken or skipped (fp16's scaler skipping an overflowing
        step, --on-nan skip): the schedule counts steps, and asking whether the scaler skipped one would cost
        a host sync. torch warns once, at the schedule's first step, when no optimizer step came before it, as
        when the first step is skipped (fp16's initial loss scale often overflows): meant here, so that one
        warning is dropped."""
        if self._schedule_started:
            self.scheduler.step()
            return
        self._schedule_started = True
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                    r"`optimizer\.step\(\)`")
            self.scheduler.step()

    def _sync_grads(self, sync: bool):
        """DDP's no_sync() for the batches of a window before its last: their gradients are all-reduced once,
        with the last one's. (`forward` may be torch.compile's wrapper, which passes attributes through.)"""
        no_sync = None if sync else getattr(self.forward, "no_sync", None)
        return contextlib.nullcontext() if no_sync is None else no_sync()

    def count_skipped(self) -> int:
        """--on-nan skip's skipped steps so far; with --compile-step a host sync (checkpoints, print steps)."""
        if self._skipped is not None:
            self.skipped_steps += int(self._skipped.item())
            self._skipped = None
        return self.skipped_steps

    def state_dict(self) -> dict:
        """The reference's keys (state_dict, optimizer, scheduler) and ours (scaler, skipped_steps, ema)."""
        self.count_skipped()
        return {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_steps": self.skipped_steps, "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, ck: dict, global_step: int) -> None:
        """From our checkpoint or the reference script's (its StepLR counts epochs, ours counts steps: its
        schedule is not loaded, ours is set to `global_step`, the steps the checkpoint had done)."""
        self.model.load_state_dict(ck["state_dict"])
        groups = len((ck.get("optimizer") or {}).get("param_groups", []))
        if groups not in (0, len(self.optimizer.param_groups)):
            raise UserError("the checkpoint was trained with other --no-bn-wd/--opt settings (its optimizer has "
                            "another number of parameter groups): resume with the settings it was trained with")
        if ck.get("optimizer"):
            how = [{k: g[k] for k in ("foreach", "fused", "capturable") if k in g}
                   for g in self.optimizer.param_groups]
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ck["optimizer"])
            for group, kept, lr in zip(self.optimizer.param_groups, how, lrs):
                group.update(kept)  # this machine's kernel choice, not the one of the run that saved it
                group["lr"] = keep_lr_kind(lr, group["lr"])  # a tensor LR with --compile-step, else a float
        sched = ck.get("scheduler") or {}
        if "lr_lambdas" in sched:
            self.scheduler.load_state_dict(sched)
        else:  # where a LambdaLR stepped once per train step would be; step() sets the LR for it
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": meant here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.last_epoch = global_step - 1
                self.scheduler.step()
        if same_kind(self.scaler, ck.get("scaler")):  # a static --loss-scale's state is no GradScaler's
            self.scaler.load_state_dict(ck["scaler"])
        self.skipped_steps = int(ck.get("skipped_steps", 0))  # --on-nan skip: counted over the whole run
        if self.ema is not None:
            if ck.get("ema"):
                self.ema.load_state_dict(ck["ema"])
            else:  # a run that starts averaging on resume
                self.ema.reset(self.model)

    def _grads_finite(self) -> bool:
        # A host sync per step, paid only with --on-nan skip (fp16's GradScaler skips non-finite steps itself;
        # --compile-step decides on the device).
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def check_finite(self) -> None:
        """At a sync point: under --on-nan abort, stop every rank together if any saw a non-finite loss (under
        --on-nan skip, count --compile-step's skipped steps)."""
        self.count_skipped()
        seen = bool(self._nonfinite) if self._nonfinite is not None else False
        self._nonfinite = None
        if self.on_nan == "abort" and D.any_rank(seen, self.dist):
            raise NonFiniteLoss("loss became NaN or infinite (--on-nan abort); the last checkpoint holds "
                                "finite weights: lower --lr, or use --on-nan skip")


@dataclass
class EpochStats:
    loss: float
    top1: float
    top5: float
    samples: int
    images_per_sec: float
    data_time_fraction: float
    steps_done: int        # index of the next step; == len(loader) when the epoch finished
    stopped: bool = False  # a stop was requested (SIGTERM): the run should save and exit
    gpu_idle_fraction: float | None = None  # metrics.GpuIdle: the GPU waiting between steps (None on CPU)


def train_one_epoch(tr: Trainer, loader, epoch: int, start_step: int, print_freq: int, save_every: int,
                    progress: Progress, at_sync: Callable[[int, DeviceMeter], bool],
                    meter_state: dict | None = None) -> EpochStats:
    """One pass over this rank's shard from optimizer step `start_step`. Every print_freq steps and every
    save_every steps (the same steps on every rank) `at_sync(step, meter)` runs: it may checkpoint, and
    returns True to stop the run; at print steps the meters are also read, summed over all ranks (so a step
    line covers every rank's images, as the epoch line does). `meter_state`: the meter of the steps before
    `start_step` (a resumed epoch), so the epoch's loss and accuracy cover all of it; speeds count only the
    steps run here."""
    tr.forward.train()
    meter = DeviceMeter(tr.dist.device)
    if meter_state is not None:
        meter.load_state_dict(meter_state)
    n0 = meter.n
    loader.set_epoch(epoch, start_step * tr.accum_steps)  # the loader counts batches, this loop steps
    total = len(loader) // tr.accum_steps
    step, data_time, stopped = start_step, 0.0, False
    t0 = t_data = time.perf_counter()
    idle = GpuIdle(tr.dist.device)
    for images, labels in loader:
        data_time += time.perf_counter() - t_data
        idle.start()
        stepped = tr.train_step(images, labels, meter)
        idle.end()
        if not stepped:  # inside an accumulation window: no optimizer step yet
            t_data = time.perf_counter()
            continue
        step += 1
        show = step % print_freq == 0 or step == total
        if show or (save_every and step % save_every == 0):
            tr.check_finite()  # host sync: reads the device-side flag
            if show:
                stats = reduce_meter(meter, tr.dist, timed=meter.n - n0)  # a collective: same steps everywhere
                idle.collect()  # after reduce_meter's host sync: the step's end event is done
                now = time.perf_counter()
                progress.update(step, stats, stats["timed"] / (now - t0), data_time / (now - t0))
            stopped = at_sync(step, meter)
            if stopped:
                break
        t_data = time.perf_counter()
    if tr.dist.device.type == "cuda":
        torch.cuda.synchronize(tr.dist.device)  # so the wall time below covers the work, not its launch
    elapsed = time.perf_counter() - t0
    idle.collect()
    stats = reduce_meter(meter, tr.dist, timed=meter.n - n0)  # the epoch's numbers cover every rank
    return EpochStats(stats["loss"], stats["top1"], stats["top5"], stats["samples"],
                      stats["timed"] / max(elapsed, 1e-9), data_time / max(elapsed, 1e-9), step, stopped,
                      idle.fraction())


def reduce_meter(meter: DeviceMeter, dist: D.DistInfo, timed: int = 0) -> dict[str, float]:
    """Sum a meter over all ranks (exact: counts and sums, not a mean of means). `timed`: this rank's samples
    run in this process (not restored from a checkpoint), summed as "timed"."""
    extra = torch.tensor([float(meter.n), float(timed)], dtype=torch.float64, device=dist.device)
    if meter.dropped is not None:  # steps --compile-step skipped (--on-nan skip), all run in this process
        extra = extra - meter.dropped
    totals = torch.cat([meter.sums, extra])
    D.all_reduce_sum(totals, dist)
    loss_sum, c1, c5, n, timed_all = totals.tolist()
    n_ = max(n, 1.0)
    return {"loss": loss_sum / n_, "top1": 100.0 * c1 / n_, "top5": 100.0 * c5 / n_, "samples": int(n),
            "timed": int(timed_all)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, criterion, amp_dtype, dist: D.DistInfo,
             progress: Progress | None = None, print_freq: int = 50) -> dict[str, float]:
    """Exact validation: each rank scores its own images once; sums and counts are all-reduced.
    `model` is the raw or compiled module, never the DDP wrapper (its forward may sync buffers).
    `progress` shows this rank's part every `print_freq` batches (ranks may hold different numbers of val
    batches, so nothing is summed before the end)."""
    model.eval()
    meter = DeviceMeter(dist.device)
    loader.set_epoch(0)
    ctx = torch.autocast(dist.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    t0 = time.perf_counter()
    for i, (images, labels) in enumerate(loader, 1):
        if labels.shape[0] == 0:
            continue
        with ctx:
            logits = model(images)
            loss = criterion(logits, labels)
        meter.update(loss, logits.float(), labels)
        if progress is not None and (i % print_freq == 0 or i == len(loader)):
            s = meter.read()
            progress.update(i, s, s["samples"] / (time.perf_counter() - t0))
    totals = reduce_meter(meter, dist)
    return {f"val_{k}": totals[k] for k in ("loss", "top1", "top5", "samples")}
