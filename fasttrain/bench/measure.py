"""The one timing loop every benchmark entry goes through, so every number means the same thing.

    timing = time_loop(batches, step, device, warmup=3, steps=20)

`batches` yields on-device (images, labels); `step(images, labels)` is the work (a train step, or nothing
for loader-only). Warm-up steps (worker start-up, cuDNN autotuning, torch.compile) are run and not timed;
the timed window starts after a device synchronize that follows the last warm-up step and ends with one.
- images_per_sec: images in the timed window / its wall time.
- data_wait_fraction: HOST time blocked in the loader's next() / wall time (what the engine reports as
  data_time_fraction; for loader-only entries it is ~1 by construction). It says the training loop waited
  for its input, not that the device did: with CUDA work queued ahead, the device may still be busy.
- device_idle_fraction: the share of the window in which the device ran no training step: the gaps from
  the end of one step's work to the start of the next's, over the window. On CUDA these are CUDA events
  recorded on the compute stream just before and just after each step (the stream reaches "before" only
  once the host has the next batch and the previous step is done), so a gap is the GPU waiting for input:
  data, its copy, or the host. On a CPU the same stamps come from the host clock, where it is about the
  data wait. This is the number to act on: more workers or a faster loader shrink it; a loader that
  competes with the model for the GPU (DALI GPU) shows instead as a model-only share (of_ceiling) below 1
  with little idle time.
- cpu_ms_per_image: CPU time (user + system) of this process and all its descendants (DataLoader workers,
  DALI threads) in the timed window, per image; Linux only. Unlike img/s it barely moves when a neighbour
  loads the machine, so it shows what a data path costs even on a shared 2-core box.
- gpu_peak_mb, gpu_reserved_mb, gpu_used_mb (CUDA only, see gpu_memory()): what the entry held on the GPU,
  by torch's tensors and by everything (DALI allocates outside torch).
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

from .. import monitor


@dataclass
class Timing:
    images: int
    seconds: float
    data_wait_s: float
    step_ms: list[float]
    warmup_s: float  # wall time of the untimed warm-up (includes torch.compile where on)
    cpu_s: float | None = None  # CPU time of the process tree in the timed window
    idle_ms: list[float] | None = None  # per timed step: end of the previous step's work to start of its own
    gpu_mb: dict | None = None  # on CUDA: peak of tensors (warm-up included), torch's cache, driver's in use

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return min(1.0, self.data_wait_s / max(self.seconds, 1e-9))

    @property
    def device_idle_fraction(self) -> float | None:
        if self.idle_ms is None or not self.step_ms:
            return None
        return min(1.0, sum(self.idle_ms) / max(sum(self.step_ms), 1e-9))

    def percentile_ms(self, q: int) -> float:
        """The q-th percentile (0-100) of the per-step times, interpolated between the two nearest ranks as
        numpy.percentile does by default (statistics' "inclusive" method)."""
        return percentile(self.step_ms, q)

    def summary(self) -> dict:
        return {"images_per_sec": self.images_per_sec, "data_wait_fraction": self.data_wait_fraction,
                "device_idle_fraction": self.device_idle_fraction,
                "p50_ms": self.percentile_ms(50), "p95_ms": self.percentile_ms(95),
                "mean_ms": statistics.fmean(self.step_ms), "timed_images": self.images,
                "timed_s": self.seconds, "warmup_s": self.warmup_s,
                "cpu_ms_per_image": None if self.cpu_s is None else 1e3 * self.cpu_s / max(self.images, 1),
                **(self.gpu_mb or {})}


def percentile(xs: list[float], q: int) -> float:
    """Exact q-th percentile (integer q, 0-100) with linear interpolation: numpy.percentile's default."""
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    if len(xs) == 1 or q in (0, 100):
        return min(xs) if q == 0 else max(xs) if q == 100 else xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tree_cpu_seconds() -> float | None:
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


_clock = time.perf_counter  # the host clock of every timing here (a test replaces it)


class _Stamps:
    """Per-step start and end times: CUDA events on the current stream, or the host clock on a CPU. The
    first end mark closes the warm-up; every timed step then adds a start mark and an end mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.starts: list = []
        self.ends: list = []

    def _now(self):
        if not self.cuda:
            return _clock()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()  # on the current stream: passed when the GPU gets there, not when the host does
        return ev

    def start(self) -> None:
        self.starts.append(self._now())

    def end(self) -> None:
        self.ends.append(self._now())

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def gaps_ms(self) -> list[float]:
        """Call after a synchronize. Gap i = end of step i - end of step i-1."""
        return [self._ms(a, b) for a, b in zip(self.ends, self.ends[1:])]

    def idle_ms(self) -> list[float]:
        """Call after a synchronize. Idle i = start of step i - end of step i-1: no step ran in between."""
        return [self._ms(a, b) for a, b in zip(self.ends, self.starts)]


def time_loop(batches: Iterable, step: Callable | None, device: torch.device, warmup: int, steps: int) -> Timing:
    """Run warmup + steps batches through `step`; time the last `steps`. Raises if the loader runs dry."""
    if warmup < 1 or steps < 2:
        raise ValueError("need at least 1 warm-up step and 2 timed steps")
    monitor.reset_gpu_peak(device)
    it = iter(batches)
    stamps, images, wait = _Stamps(device), 0, 0.0
    t_begin = t_start = _clock()
    try:
        for i in range(warmup + steps):
            t0 = _clock()
            try:
                x, y = next(it)
            except StopIteration:
                raise RuntimeError(f"loader ended after {i} of {warmup + steps} batches") from None
            waited = _clock() - t0
            if i >= warmup:
                stamps.start()
            if step is not None:
                step(x, y)
            if i >= warmup:
                wait += waited
                images += int(y.shape[0])
            if i == warmup - 1:
                sync(device)  # everything up to here is warm-up
                cpu_start = tree_cpu_seconds()
                t_start = _clock()
            if i >= warmup - 1:
                stamps.end()
        sync(device)
        t_end = _clock()
        cpu_end = tree_cpu_seconds()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a generator: runs its cleanup (stops DataLoader workers, DALI pipelines) now
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return Timing(images, t_end - t_start, wait, stamps.gaps_ms(), t_start - t_begin, cpu,
                  stamps.idle_ms() if step is not None else None, gpu_memory(device))


def gpu_memory(device: torch.device) -> dict | None:
    """On CUDA, MiB: gpu_peak_mb, the most memory tensors held since the entry began (torch's counter);
    gpu_reserved_mb, torch's caching allocator now (earlier entries' cached blocks included); gpu_used_mb,
    the driver's in use now: torch's cache plus what torch does not allocate (the CUDA context, DALI's
    buffers and queued batches), so used - reserved is roughly DALI's and the context's share."""
    if device.type != "cuda":
        return None
    return {"gpu_peak_mb": monitor.gpu_peak_mb(device), "gpu_reserved_mb": torch.cuda.memory_reserved(device) / 2**20,
            "gpu_used_mb": monitor.gpu_in_use_mb(device)[0]}
