"""Meters that live on the device, progress a person can watch, and metrics.jsonl.

Loss and accuracy are accumulated as device tensors and read (a host sync) only at print frequency and at
the end of an epoch, never per step. Accuracy is summed as counts of correct predictions over images
actually scored, so a distributed result is exact rather than a mean of per-batch means.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import torch

from .monitor import fmt_seconds


@torch.no_grad()
def batch_stats(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(loss x n, top-1 hits, top-5 hits) of a batch as a float64 tensor on the device, and n. The training
    step takes them right after a batch's backward, so it keeps three numbers per batch, not the logits
    (which a CUDA-graphed forward may overwrite at its next replay)."""
    if labels.ndim == 2:
        labels = labels.argmax(1)
    n = labels.shape[0]
    k = min(5, logits.shape[1])
    top = logits.float().topk(k, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return torch.stack([loss.detach().double() * n, hit[:, :1].sum().double(), hit.sum().double()]), n


class DeviceMeter:
    """Sums of loss*n, top-1 and top-5 correct, kept on the device; n (known on the host) kept on the host, less
    `dropped`: the images of steps --compile-step skipped on the device (--on-nan skip), a device count."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.n = 0
        self.dropped: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """labels: class indices [B], or soft labels [B, C] (MixUp/CutMix), scored against their largest share."""
        self.add(*batch_stats(loss, logits, labels))

    @torch.no_grad()
    def add(self, stats: torch.Tensor, n: int, keep: torch.Tensor | None = None) -> None:
        """A batch's batch_stats. keep: a 0-d bool tensor, False for a step skipped on the device (its loss may
        be NaN: left out)."""
        if keep is None:
            self.sums += stats
        else:
            self.sums += torch.where(keep, stats, torch.zeros_like(stats))
            dropped = (~keep).double() * n
            self.dropped = dropped if self.dropped is None else self.dropped + dropped
        self.n += n

    def count(self) -> int:
        """Images counted (a host sync when some step may have been skipped on the device)."""
        return self.n - (int(self.dropped.item()) if self.dropped is not None else 0)

    def state_dict(self) -> dict:
        """A host sync (only at checkpoints): what a run resumed mid-epoch needs so its epoch metrics cover the
        whole epoch, not only the steps after the resume."""
        return {"sums": self.sums.tolist(), "n": self.count()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.sums.device)
        self.n = int(state["n"])
        self.dropped = None

    def read(self) -> dict[str, float]:
        """A host sync. Returns loss, top1, top5 (percent) and samples."""
        (loss_sum, c1, c5), n = self.sums.tolist(), self.count()
        n_ = max(n, 1.0)
        return {"loss": loss_sum / n_, "top1": 100.0 * c1 / n_, "top5": 100.0 * c5 / n_, "samples": int(n)}


class Progress:
    """tqdm bar on a terminal, the reference script's plain lines otherwise, on stdout: the run's story (step
    lines, epoch lines, the summary) is one stream, so `> log` keeps all of it; warnings and errors go to
    stderr. Silent on ranks other than 0. `eta(step)`: seconds left in the whole run (shown when given);
    `lr()`: the learning rate now (shown when given); `on_update(step, values)`: what was shown, for other
    watchers (TensorBoard)."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0,
                 eta: Callable[[int], float | None] | None = None,
                 on_update: Callable[[int, dict], None] | None = None,
                 lr: Callable[[], float] | None = None, leave: bool = True):
        self.enabled, self.desc, self.total, self.bar = enabled, desc, total, None
        self.eta, self.on_update, self.lr = eta, on_update, lr
        self.start = time.perf_counter()
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=leave,
                            file=sys.stdout)
        self.done = initial

    def update(self, step: int, stats: dict[str, float], images_per_sec: float,
               data_wait: float | None = None) -> None:
        """step: 1-based index of the last finished step; data_wait: share of the time spent waiting for
        batches so far."""
        if not self.enabled:
            return
        eta = fmt_seconds(self.eta(step)) if self.eta else None
        lr = self.lr() if self.lr else None
        if self.bar is not None:
            self.bar.update(step - self.done)
            extra = {"eta": eta} if eta else {}  # the run's; tqdm's own remaining time is the epoch's
            if lr is not None:
                extra["lr"] = f"{lr:.3g}"
            self.bar.set_postfix(loss=f"{stats['loss']:.4f}", top1=f"{stats['top1']:.2f}",
                                 img_s=f"{images_per_sec:.0f}", **extra, refresh=False)
        else:
            width = len(str(self.total))
            print(f"{self.desc}: [{step:>{width}}/{self.total}]\tLoss {stats['loss']:.4e}\t"
                  f"Acc@1 {stats['top1']:6.2f}\tAcc@5 {stats['top5']:6.2f}\t{images_per_sec:8.1f} img/s"
                  + (f"\tLR {lr:.4e}" if lr is not None else "") + (f"\tETA {eta}" if eta else ""), flush=True)
        self.done = step
        if self.on_update is not None:
            values = {"loss": stats["loss"], "top1": stats["top1"], "images_per_sec": images_per_sec}
            if data_wait is not None:
                values["data_wait"] = data_wait
            self.on_update(step, values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonlWriter:
    """Appends one JSON object per line and flushes it to disk, so a crash loses no finished epoch."""

    def __init__(self, path: str, enabled: bool, keep_before_epoch: int = 0):
        """A fresh run starts the file anew; a resumed one keeps the rows of the epochs it will not redo."""
        self.path, self.enabled = path, enabled
        if enabled:
            rows = [r for r in read_jsonl(path) if r.get("epoch", 0) < keep_before_epoch] \
                if keep_before_epoch and os.path.exists(path) else []
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class GpuIdle:
    """The share of a stretch of training in which the GPU ran no train step: CUDA events recorded on the
    compute stream just before and just after each step; the stream reaches "before" only once the host has
    handed it the next batch and the previous step is done, so a gap from one step's "after" to the next
    one's "before" is the GPU waiting for input (or for the host). Unlike `data_time_fraction` (host time
    blocked in the loader) it is what a user can act on: near 0, the loader keeps up even if the host waits.
    No sync of its own: events are read at the print steps' existing sync, and only once done. On a CPU
    device there is no such thing (fraction() is None). `event` makes the events (tests pass a fake)."""

    def __init__(self, device: torch.device, event: Callable[[], object] | None = None):
        self.on = device.type == "cuda" or event is not None
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.marks: list = []          # [start, end, start, end, ...] not read yet
        self.last_end = None           # the last end read, to time the gap to the next start
        self.idle_ms = self.busy_ms = 0.0

    def _mark(self) -> None:
        if self.on:
            ev = self.event()
            ev.record()
            self.marks.append(ev)

    start = end = _mark

    def collect(self) -> None:
        """Add up the steps whose end event is done (call at a point that already synced)."""
        n = 0
        while n + 1 < len(self.marks) and self.marks[n + 1].query():
            s, e = self.marks[n], self.marks[n + 1]
            if self.last_end is not None:
                self.idle_ms += max(0.0, self.last_end.elapsed_time(s))
            self.busy_ms += s.elapsed_time(e)
            self.last_end, n = e, n + 2
        del self.marks[:n]

    def fraction(self) -> float | None:
        total = self.idle_ms + self.busy_ms
        return self.idle_ms / total if self.on and total > 0 else None
