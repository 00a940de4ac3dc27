"""What a person watching a run sees: progress with the run's ETA, TensorBoard, the profiler window, each
epoch's metrics row and line (with time and memory), and the summary at the end. Rank 0 writes; every
rank may call it. The checkpointer (checkpointer.py) decides what is saved; this only reports."""

from __future__ import annotations

import os
import time

from . import checkpoint as ckpt_io
from . import dist as D
from . import monitor
from . import tb
from .checkpointer import Start, log0
from .config import Config
from .config_rules import profile_window
from .errors import UserError
from .metrics import JsonlWriter, Progress, read_jsonl
from .profiling import ProfiledBatches
from .schedules import Resolution, lr_at


class Watch:
    def __init__(self, cfg: Config, dist: D.DistInfo, out: str, tr, loaders, start: Start):
        self.cfg, self.dist, self.out, self.tr, self.loaders = cfg, dist, out, tr, loaders
        writes = dist.is_main
        self.metrics = JsonlWriter(os.path.join(out, "metrics.jsonl"), writes, keep_before_epoch=start.epoch)
        self.steps = loaders.steps  # optimizer steps an epoch
        self.sizes = Resolution.from_config(cfg.data)  # train crop size per epoch (progressive resizing)
        self.clock = monitor.RunClock(start.wall_seconds, cfg.optim.epochs, self.steps)
        self.tb = tb.TensorBoard(os.path.join(out, "tb"), writes and tb.wanted(cfg.run.tensorboard),
                                 tb.purge_step(start.epoch, start.step, self.steps), cfg.to_dict())
        self.window = profile_window(cfg.run.profile) if cfg.run.profile else None
        batches = len(loaders.train)  # the profiler counts batches (more than steps with --grad-accum-steps)
        if self.window and self.window[1] > batches:
            unit = "train steps" if loaders.accum == 1 else "train batches (--grad-accum-steps: steps x N)"
            raise UserError(f"--profile {cfg.run.profile} goes past the {batches} {unit} of an epoch: "
                            f"END can be at most {batches}")
        self.profiled: ProfiledBatches | None = None

    def progress(self, epoch: int, initial: int = 0) -> Progress:
        """A train epoch's progress: shows the run's ETA and feeds TensorBoard at print steps."""
        self.clock.start_epoch(epoch, initial)
        monitor.reset_gpu_peak(self.dist.device)
        group = self.tr.optimizer.param_groups[0]
        # Read at print steps only: a Python float, or with --compile-step a 0-d tensor (a sync where the meters'
        # read has just synced anyway).
        return Progress(self.steps, f"Epoch: [{epoch}]", self.dist.is_main, initial, eta=self.clock.eta,
                        on_update=lambda step, v: self.tb.step(epoch * self.steps + step,
                                                               {**v, "lr": float(group["lr"])}),
                        lr=lambda: float(group["lr"]))

    def val_progress(self, batches: int) -> Progress:
        """Validation's progress: a bar that goes away when done, or plain lines every -p batches. Under DDP
        they show rank 0's share (ranks may hold different numbers of val batches: no per-line sum)."""
        label = f"Test (rank 0 of {self.dist.world_size})" if self.dist.distributed else "Test"
        return Progress(batches, label, self.dist.is_main, leave=False)

    def train_batches(self, first_epoch: bool):
        """The train batches, under the profiler in the run's first epoch with --profile (rank 0 only)."""
        if not (first_epoch and self.window and self.dist.is_main):
            return self.loaders.train
        self.profiled = ProfiledBatches(self.loaders.train, self.window, os.path.join(self.out, "profile"),
                                        self.dist.device)
        return self.profiled

    def end_epoch(self, epoch: int, stats, val: dict, val_seconds: float, best_acc1: float) -> None:
        """The epoch's metrics.jsonl row, TensorBoard points and line. Written before the epoch's checkpoint: a
        crash between the two redoes the epoch on resume, and the resumed run drops the rows of epochs it
        redoes, so no epoch is missing or doubled. `lr` and `lr_last`: what the epoch's first and last steps
        used (the optimizer's value after the last step is the next epoch's: 0 at the end of a cosine run)."""
        first = epoch * self.steps
        record = {"epoch": epoch, "lr": lr_at(self.tr.scheduler, first),
                  "lr_last": lr_at(self.tr.scheduler, first + self.steps - 1), "train_loss": stats.loss,
                  "train_top1": stats.top1, "train_top5": stats.top5, **val, "train_samples": stats.samples,
                  "train_images_per_sec": stats.images_per_sec, "data_time_fraction": stats.data_time_fraction,
                  "skipped_steps": self.tr.count_skipped(), "best_acc1": best_acc1, "time": time.time(),
                  "image_size": self.sizes(epoch), "val_image_size": self.sizes.val_size,
                  **self.time_and_memory(val_seconds)}
        if stats.gpu_idle_fraction is not None:
            record["gpu_idle_fraction"] = stats.gpu_idle_fraction
        self.metrics.write(record)
        self.tb.epoch((epoch + 1) * self.steps, record)
        gpu = f", GPU peak {record['gpu_max_mem_mb']:.0f} MiB" if "gpu_max_mem_mb" in record else ""
        if "gpu_used_mb" in record:
            gpu += f" (device: {record['gpu_used_mb']:.0f} of {record['gpu_total_mb']:.0f} MiB in use)"
        idle = f", GPU idle {100 * record['gpu_idle_fraction']:.0f}%" if "gpu_idle_fraction" in record else ""
        host = f"host {record['host_rss_mb']:.0f} MiB" if record["host_rss_mb"] is not None else "host ?"
        log0(self.dist, f"epoch {epoch}: train loss {stats.loss:.4f} top1 {stats.top1:.2f} | val loss "
                        f"{val['val_loss']:.4f} top1 {val['val_top1']:.2f} top5 {val['val_top5']:.2f} "
                        f"({val['val_samples']} images)"
                        + (f", EMA top1 {val['val_top1_ema']:.2f}" if "val_top1_ema" in val else "")
                        + f" | {stats.images_per_sec:.0f} img/s, "
                        f"data wait {100 * stats.data_time_fraction:.0f}%{idle} | {record['epoch_seconds']:.1f} s, "
                        f"run {monitor.fmt_seconds(record['wall_seconds'])}, ETA "
                        f"{monitor.fmt_seconds(self.clock.eta_after(epoch))}"
                        f" | {host}{gpu}")

    def time_and_memory(self, val_seconds: float) -> dict:
        """This epoch's seconds in this process, the run's wall time so far (across resumes), rank 0's host
        memory with its loader workers, and on CUDA the epoch's peak of memory allocated by tensors and what
        the driver says is in use on the device at the epoch's end (DALI's buffers and the CUDA context
        included: what is left for a larger batch is total - used)."""
        out = {"epoch_seconds": self.clock.end_epoch(val_seconds), "wall_seconds": self.clock.wall_seconds(),
               "host_rss_mb": monitor.host_memory_mb() if self.dist.is_main else None}
        if self.dist.device.type == "cuda":
            out["gpu_max_mem_mb"] = monitor.gpu_peak_mb(self.dist.device)
            out["gpu_used_mb"], out["gpu_total_mb"] = monitor.gpu_in_use_mb(self.dist.device)
        return out

    def finish(self) -> None:
        """End of the run (rank 0): close TensorBoard, draw curves.png, print the summary line."""
        wrote_tb = self.tb.enabled
        self.tb.close()
        if not self.dist.is_main:
            return
        path = os.path.join(self.out, "metrics.jsonl")
        rows = read_jsonl(path)
        files = [path, os.path.join(self.out, ckpt_io.LATEST)]
        if os.path.isfile(os.path.join(self.out, ckpt_io.BEST)):
            files.append(os.path.join(self.out, ckpt_io.BEST))
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
