"""--profile A:B: torch.profiler over steps A..B-1 of the first epoch, on rank 0.

    fasttrain train DATA --profile 20:30 --output-dir runs/p   # -> runs/p/profile/steps-20-30.json

The batches are wrapped, not the engine: the profiler's step boundary is the request for the next batch,
so a profiled step is data wait + forward + backward + optimizer, as the step times in the epoch line are.
The trace opens in Perfetto (ui.perfetto.dev) or chrome://tracing; the top-10 ops table (by device time on
a GPU, by CPU time without one) is printed and kept beside the trace as ops.txt. One warm-up step before
the window is profiled and thrown away (the profiler's own start-up would otherwise land in step A).
Training continues unprofiled after step B-1.
"""

from __future__ import annotations

import os
import sys

import torch


class ProfiledBatches:
    """Batches (see data/base.py) that run torch.profiler over the steps with 0-based index a..b-1."""

    def __init__(self, inner, window: tuple[int, int], out_dir: str, device: torch.device):
        self.inner, self.window, self.out_dir, self.device = inner, window, out_dir, device
        self.start_step = 0
        self.trace_path: str | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step
        self.inner.set_epoch(epoch, start_step)

    def close(self) -> None:
        self.inner.close()

    def __iter__(self):
        a, b = self.window
        a = max(a, self.start_step)  # a resumed epoch starts past some of the window: profile the rest
        it = iter(self.inner)
        if a >= b:
            print(f"fasttrain: --profile: this run starts the epoch at step {self.start_step}, past the window "
                  f"{self.window[0]}:{b}; nothing profiled", file=sys.stderr, flush=True)
            yield from it
            return
        lead = a - self.start_step  # steps before the window
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(lead - 1, 0), warmup=min(lead, 1), active=b - a, repeat=1),
            on_trace_ready=lambda p: self._ready(p, a, b))
        prof.start()
        try:
            for _ in range(self.start_step, b):
                batch = next(it, None)
                if batch is None:
                    return
                yield batch
                prof.step()  # the consumer asks for the next batch: the step is done
        finally:
            prof.stop()  # a window cut short (a stop request) still writes what it recorded
        yield from it

    def _ready(self, prof, a: int, b: int) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.trace_path = os.path.join(self.out_dir, f"steps-{a}-{b}.json")
        prof.export_chrome_trace(self.trace_path)
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=10)
        with open(os.path.join(self.out_dir, "ops.txt"), "w") as fh:
            fh.write(f"steps {a}..{b - 1}, sorted by {sort}\n{table}\n")
        print(f"fasttrain: profile of steps {a}..{b - 1}: top 10 ops by {sort.replace('_', ' ')}\n{table}\n"
              f"fasttrain: trace {self.trace_path} (open in ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr, flush=True)
