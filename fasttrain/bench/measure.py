"""The one timing loop every benchmark entry goes through, so every number means the same thing.

    timing = time_loop(batches, step, device, warmup=3, steps=20)

`batches` yields on-device (images, labels); `step(images, labels)` is the work (a train step, or nothing
for loader-only). Warm-up steps (worker start-up, cuDNN autotuning, torch.compile) are run and not timed;
the timed window starts after a device synchronize that follows the last warm-up step and ends with one.
- images_per_sec: images in the timed window / its wall time.
- data_wait_fraction: host time blocked in the loader's next() / wall time (what the engine reports as
  data_time_fraction; for loader-only entries it is ~1 by construction).
- cpu_ms_per_image: CPU time (user + system) of this process and all its descendants (DataLoader workers,
  DALI threads) in the timed window, per image; Linux only. Unlike img/s it barely moves when a neighbour
  loads the machine, so it shows what a data path costs even on a shared 2-core box.
- step times: on CUDA the gaps between CUDA events recorded after each step on the compute stream (no
  per-step host sync is added, so the loop runs as it would in training); on CPU perf_counter stamps.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass
class Timing:
    images: int
    seconds: float
    data_wait_s: float
    step_ms: list[float]
    warmup_s: float  # wall time of the untimed warm-up (includes torch.compile where on)
    cpu_s: float | None = None  # CPU time of the process tree in the timed window

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return min(1.0, self.data_wait_s / max(self.seconds, 1e-9))

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the per-step times."""
        xs = sorted(self.step_ms)
        return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]

    def summary(self) -> dict:
        return {"images_per_sec": self.images_per_sec, "data_wait_fraction": self.data_wait_fraction,
                "p50_ms": self.percentile_ms(50), "p95_ms": self.percentile_ms(95),
                "mean_ms": statistics.fmean(self.step_ms), "timed_images": self.images,
                "timed_s": self.seconds, "warmup_s": self.warmup_s,
                "cpu_ms_per_image": None if self.cpu_s is None else 1e3 * self.cpu_s / max(self.images, 1)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tree_cpu_seconds() -> float | None:
    """utime + stime of this process and every live descendant, from /proc (None where there is none)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        fields = fh.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    except (OSError, ValueError, AttributeError):
        return None
    tree, grew = {os.getpid()}, True
    while grew:  # descendants at any depth (forkserver/spawn workers are grandchildren)
        new = {pid for pid, (ppid, _) in stats.items() if ppid in tree and pid not in tree}
        tree |= new
        grew = bool(new)
    total = sum(stats[pid][1] for pid in tree if pid in stats)
    return total / tick


class _Stamps:
    """Per-step end times: CUDA events on the current stream, or host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def gaps_ms(self) -> list[float]:
        """Call after a synchronize. Gap i = end of step i - end of step i-1."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def time_loop(batches: Iterable, step: Callable | None, device: torch.device, warmup: int, steps: int) -> Timing:
    """Run warmup + steps batches through `step`; time the last `steps`. Raises if the loader runs dry."""
    if warmup < 1 or steps < 2:
        raise ValueError("need at least 1 warm-up step and 2 timed steps")
    it = iter(batches)
    stamps, images, wait = _Stamps(device), 0, 0.0
    t_begin = t_start = time.perf_counter()
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                raise RuntimeError(f"loader ended after {i} of {warmup + steps} batches") from None
            waited = time.perf_counter() - t0
            if step is not None:
                step(x, y)
            if i >= warmup:
                wait += waited
                images += int(y.shape[0])
            if i == warmup - 1:
                sync(device)  # everything up to here is warm-up
                cpu_start = _tree_cpu_seconds()
                t_start = time.perf_counter()
            if i >= warmup - 1:
                stamps.mark()
        sync(device)
        t_end = time.perf_counter()
        cpu_end = _tree_cpu_seconds()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator: runs its cleanup (stops DataLoader workers, DALI pipelines) now
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return Timing(images, t_end - t_start, wait, stamps.gaps_ms(), t_start - t_begin, cpu)
