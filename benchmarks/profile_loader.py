"""Where a DALI loader's time goes, loader only: torch.profiler over N batches of fasttrain's DALI loader
on the bench's JPEGs (issue 12: the DALI GPU loader's 25,000 img/s goal; its measured rates are in
benchmarks/RESULTS.md).

    python benchmarks/profile_loader.py [DATA] [-j 16] [-b 256] [--batches 40] [--hw-decoder-load 0.9]
                                        [--prefetch 2] [--trace PATH]

DATA defaults to the bench's generated JPEGs (`fasttrain bench` draws them once into $FASTTRAIN_CACHE).
On a GPU it times the "mixed" pipeline (what `fasttrain train --loader dali` runs there), on a CPU DALI's
CPU-only mode. Prints, for the profiled window (after a warm-up longer than DALI's queue):
- img/s and wall ms per batch;
- the training process's main thread: the share of the window it waited in next() (about all of it
  when the loader is the limit) and the rest (Python: feed, iterator, the hand-over to torch);
- the GPU: the share of the window in which any kernel or copy ran (the union of their intervals, all
  streams), kernel and copy time per batch, and the top kernels; a GPU busy well under 100% with the main
  thread waiting means the limit is upstream of the CUDA kernels: the hardware JPEG decoder (it runs no
  CUDA kernel and is invisible here), file reading or DALI's CPU stages;
- CPU time of the process tree per image (DALI's threads included) and the cores that makes busy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fasttrain.bench.images import bench_dataset  # noqa: E402
from fasttrain.bench.loaders import BenchData, open_loader  # noqa: E402
from fasttrain.bench.measure import tree_cpu_seconds, sync  # noqa: E402
from fasttrain.bench.suite import DaliKnobs, queued_batches  # noqa: E402
from fasttrain.data import dali_backend  # noqa: E402
from fasttrain.data.base import Layout  # noqa: E402
from fasttrain.errors import UserError  # noqa: E402


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals, in their unit: time in which at least one ran."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile(data: str, workers: int, batch: int, batches: int, knobs: DaliKnobs, trace: str | None) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    kind = dali_backend.loader_name(device)
    warm = queued_batches(kind, workers)
    gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with open_loader(kind, BenchData.scan(data), batch, workers, 224, Layout(device, False), warm + batches,
                     dali=knobs) as loader:
        it = iter(loader)
        for _ in range(warm):
            next(it)
        sync(device)
        wait = 0.0
        with torch.profiler.profile(activities=activities) as prof:
            cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
            for _ in range(batches):
                t = time.perf_counter()
                next(it)
                wait += time.perf_counter() - t
            sync(device)
            wall, cpu1 = time.perf_counter() - t0, tree_cpu_seconds()
        it.close()
    out = {"loader": kind, "knobs": knobs.label(kind), "batches": batches, "batch": batch, "workers": workers,
           "images_per_sec": batches * batch / wall, "ms_per_batch": 1e3 * wall / batches,
           "main_thread_wait": wait / wall,
           "cpu_ms_per_image": None if cpu0 is None or cpu1 is None else 1e3 * (cpu1 - cpu0) / (batches * batch),
           "cores_busy": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / wall}
    if gpu:
        kernels, copies = [], []
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            span = (ev.time_range.start, ev.time_range.end)
            (copies if "memcpy" in ev.name.lower() or "memset" in ev.name.lower() else kernels).append((span, ev.name))
        window_us = wall * 1e6
        out.update(gpu_busy=union_length([s for s, _ in kernels + copies]) / window_us,
                   kernel_ms_per_batch=sum(b - a for (a, b), _ in kernels) / 1e3 / batches,
                   copy_ms_per_batch=sum(b - a for (a, b), _ in copies) / 1e3 / batches,
                   kernels_per_batch=len(kernels) / batches)
        by_name: dict[str, float] = {}
        for (a, b), name in kernels:
            by_name[name] = by_name.get(name, 0.0) + (b - a)
        out["top_kernels_ms_per_batch"] = [(name[:90], us / 1e3 / batches)
                                           for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:10]]
    if trace:
        prof.export_chrome_trace(trace)
    return out


def report(r: dict) -> str:
    lines = [f"profile_loader: {r['loader']} @ {r['knobs']}, {r['batches']} batches of {r['batch']}, "
             f"{r['workers']} DALI threads",
             f"  {r['images_per_sec']:,.0f} img/s, {r['ms_per_batch']:.2f} ms a batch",
             f"  main thread: waited in next() {100 * r['main_thread_wait']:.0f}% of the window, "
             f"the rest ({100 * (1 - r['main_thread_wait']):.0f}%) Python: feed, iterator, hand-over"]
    if r["cpu_ms_per_image"] is not None:
        lines.append(f"  CPU: {r['cpu_ms_per_image']:.3f} ms an image (process tree), {r['cores_busy']:.1f} cores busy "
                     f"of {os.cpu_count()}")
    if "gpu_busy" in r:
        lines.append(f"  GPU: busy {100 * r['gpu_busy']:.0f}% of the window (any kernel or copy, all streams); "
                     f"kernels {r['kernel_ms_per_batch']:.2f} ms a batch ({r['kernels_per_batch']:.0f} launches), "
                     f"copies {r['copy_ms_per_batch']:.2f} ms a batch")
        lines += [f"    {ms:7.3f} ms  {name}" for name, ms in r["top_kernels_ms_per_batch"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=None, help="dataset root with train/ (default: the bench's JPEGs)")
    p.add_argument("-j", "--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40, help="profiled batches (after the warm-up)")
    p.add_argument("--images", type=int, default=4096, help="generated JPEGs when no DATA is given")
    p.add_argument("--hw-decoder-load", type=float, default=DaliKnobs().hw_decoder_load)
    p.add_argument("--prefetch", type=int, default=DaliKnobs().prefetch)
    p.add_argument("--trace", default=None, help="also write the Chrome trace here")
    ns = p.parse_args(argv)
    if not dali_backend.available():
        print(f"profile_loader: error: nvidia.dali does not import ({dali_backend.import_error()})", file=sys.stderr)
        return 2
    try:
        data = ns.data or bench_dataset(ns.images)
        r = profile(data, ns.workers, ns.batch_size, ns.batches, DaliKnobs(ns.hw_decoder_load, ns.prefetch),
                    ns.trace)
    except UserError as e:
        print(f"profile_loader: error: {e}", file=sys.stderr)
        return 2
    print(report(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
