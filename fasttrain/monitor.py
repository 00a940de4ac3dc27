"""How long and how much: the run's wall time across resumes, an ETA, host and GPU memory, the run summary.

Nothing here touches the device: memory is read from the allocator's counters and /proc, times from the
host clock, so none of it adds a host-device sync to a step.
"""

from __future__ import annotations

import os
import time

import torch


def fmt_seconds(seconds: float | None) -> str:
    """h:mm:ss, or '?' while unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunClock:
    """Wall time of the run summed over its processes (a resumed run starts from the checkpoint's
    `wall_seconds`), and the time left, from this process's own pace: the current epoch's seconds per
    train step for its remaining steps, plus the mean of whole epochs (train + val) finished here for the
    epochs after it (before one has finished: steps x seconds per step, plus the last validation's time)."""

    def __init__(self, wall_before: float, epochs: int, steps_per_epoch: int):
        self.t0, self.wall_before = time.perf_counter(), wall_before
        self.epochs, self.steps = epochs, steps_per_epoch
        self.epoch = self.start_step = 0
        self.t_epoch = self.t0
        self.whole_epochs: list[float] = []  # seconds of epochs run here from their first step
        self.val_seconds = self.last_epoch = 0.0

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def start_epoch(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step, self.t_epoch = epoch, start_step, time.perf_counter()

    def end_epoch(self, val_seconds: float) -> float:
        """Seconds of the epoch (train + val) in this process."""
        seconds = time.perf_counter() - self.t_epoch
        self.val_seconds, self.last_epoch = val_seconds, seconds
        if self.start_step == 0:
            self.whole_epochs.append(seconds)
        return seconds

    def _per_epoch(self, fallback: float) -> float:
        return sum(self.whole_epochs) / len(self.whole_epochs) if self.whole_epochs else fallback

    def eta(self, step: int) -> float | None:
        """Seconds until the run ends, with `step` steps of the current epoch done; None before a step ran."""
        done = step - self.start_step
        if done <= 0:
            return None
        per_step = (time.perf_counter() - self.t_epoch) / done
        later = self.epochs - self.epoch - 1
        return (self.steps - step) * per_step + self.val_seconds + later * self._per_epoch(
            per_step * self.steps + self.val_seconds)

    def eta_after(self, epoch: int) -> float:
        """Seconds until the run ends, once `epoch` is over (validation included)."""
        return (self.epochs - epoch - 1) * self._per_epoch(self.last_epoch)


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/*/stat (field 4 is the parent)."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:  # ended while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name in (...) may hold spaces
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _process_kb(pid: int) -> int:
    """Proportional set size: resident pages, each shared one split among the processes sharing it, so
    forked DataLoader workers do not count the parent's libraries and tensors again. RSS where the kernel
    has no smaps_rollup (before Linux 4.14)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return 0


def host_memory_mb(pid: int | None = None) -> float | None:
    """Resident host memory of this process and all its descendants (DataLoader workers; DALI's threads
    are in the process itself), in MiB, shared pages counted once. None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    pid = pid or os.getpid()
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _process_kb(p)
        todo.extend(tree.get(p, ()))
    return total / 1024


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset (the caching allocator's counter: no sync)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def gpu_in_use_mb(device: torch.device) -> tuple[float, float] | None:
    """(MiB in use on the device, its total MiB) from the driver (cudaMemGetInfo): everything, not only this
    process's tensors: torch's cached blocks, the CUDA context, cuDNN workspaces, DALI's own buffers and
    prefetched batches (DALI allocates outside torch), and any other process on the same GPU. None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20, total / 2**20


def summary(rows: list[dict], wall_seconds: float, files: list[str]) -> str:
    """The run's last line: best and last val top-1 with their epochs, time, mean train speed, outputs."""
    if not rows:
        return f"done in {fmt_seconds(wall_seconds)}; wrote {', '.join(files)}"
    best = max(rows, key=lambda r: r["val_top1"])  # the first epoch that reached the best
    last = rows[-1]
    speed = sum(r["train_images_per_sec"] for r in rows) / len(rows)
    return (f"done: best val Acc@1 {best['val_top1']:.3f} (epoch {best['epoch']}), last {last['val_top1']:.3f} "
            f"(epoch {last['epoch']}); {fmt_seconds(wall_seconds)} in all, mean {speed:.0f} train img/s; "
            f"wrote {', '.join(files)}")
