"""`fasttrain bench --sections recipe`: what the recipe knobs do to throughput, end to end (torchvision
loader feeding fasttrain's train step, as `fasttrain train` runs them).

Per arch, three entries over the same epochs of `steps` batches each, each epoch through a new pass of the
loader (its epoch boundary included, as in a run):
- fixed SIZE (the section's reference): every epoch at the plan's model image size (224 px; 64 with --quick);
- progressive LO->HI: FFCV's ramp scaled to that size (160 -> 192 px at 224), half the epochs at each end,
  the sizes fed to the loader per epoch exactly as training does (Resolution + the sampler);
- blurpool SIZE: the fixed entry with --blurpool.
The warm-up runs one short epoch at every size the entry will see (compile, cuDNN autotuning, worker
start-up are paid there, once per size, as in a long run), then the timed epochs follow. With --repeats N
(default 3 on a CPU) the three runs are repeated N times, interleaved, and the best of each is kept.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import islice

import torch

from ..config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from ..data import torchvision_backend
from ..data.base import Layout
from ..dist import DistInfo
from ..metrics import DeviceMeter
from ..schedules import Resolution
from ..train import AMP_DTYPES, build_trainer, wrap_model
from .loaders import BenchData
from .suite import Plan, Toggles, entry, log, queued_batches

EPOCHS = 4  # timed epochs: 2 at the low size and 2 at the high one for the progressive entry


def toggles(device: torch.device) -> Toggles:
    """What `fasttrain train` picks by itself: fp32 on a CPU; bf16 + channels_last + compile on a GPU."""
    if device.type == "cuda":
        return Toggles(amp="bf16", channels_last=True, compile=True, cudnn_benchmark=True)
    return Toggles()


def ramp(size: int) -> Resolution:
    """FFCV's 160 -> 192 px at 224 px, scaled to `size` (multiples of 8), over the EPOCHS timed epochs."""
    lo, hi = (max(16, round(size * f / 224 / 8) * 8) for f in (160, 192))
    return Resolution(size, min_res=lo, max_res=hi, start_ramp=EPOCHS // 2 - 1, end_ramp=EPOCHS // 2, step=8)


def _run(plan: Plan, data: BenchData, arch: str, tg: Toggles, sizes: list[int], blurpool: bool) -> tuple:
    """Warm-up epochs (one per distinct size) then the timed epochs of `sizes`, `plan.e2e_steps[1]` batches
    each. Returns (Timing, warm-up steps, timed steps)."""
    from .measure import time_loop
    batch, steps = plan.model_batch, plan.e2e_steps[1]
    distinct = list(dict.fromkeys(sizes))
    warm_each = math.ceil(max(plan.e2e_steps[0], queued_batches("fasttrain", plan.workers)) / len(distinct))
    epochs = [(s, warm_each) for s in distinct] + [(s, steps) for s in sizes]
    cfg = Config(data=DataConfig(batch_size=batch, image_size=sizes[0], workers=plan.workers),
                 model=ModelConfig(arch=arch, blurpool=blurpool), optim=OptimConfig(),
                 run=RunConfig(amp=tg.amp, channels_last=tg.channels_last, compile=tg.compile,
                               compile_mode=tg.compile_mode, cudnn_benchmark=tg.cudnn_benchmark))
    dist = DistInfo(device=plan.device)
    torch.backends.cudnn.benchmark = tg.cudnn_benchmark
    torch.manual_seed(0)
    tr = build_trainer(cfg, dist, plan.num_classes, steps)
    tr.forward, _ = wrap_model(tr.model, cfg.run, dist, len(distinct))
    tr.forward.train()
    meter = DeviceMeter(plan.device)
    per_epoch = max(n for _, n in epochs)
    train = dataclasses.replace(data.train, samples=data.train.samples * data.repeat_for(per_epoch * batch))
    layout = Layout(plan.device, tg.channels_last, AMP_DTYPES[tg.amp] or torch.float32)
    loader, val = torchvision_backend.build(train, data.val, batch, plan.workers, sizes[0], layout, 0, 1, 0,
                                            per_epoch, max_bad_files=0, size_at=lambda e: epochs[e][0])

    def batches():
        for e, (_, n) in enumerate(epochs):
            loader.set_epoch(e)
            yield from islice(iter(loader), n)
    try:
        timing = time_loop(batches(), lambda x, y: tr.train_step(x, y, meter), plan.device,
                           warm_each * len(distinct), steps * len(sizes))
    finally:
        loader.close()
        val.close()
    return timing, warm_each * len(distinct), steps * len(sizes)


def recipe_section(plan: Plan, data: BenchData, arch: str) -> list[dict]:
    tg, size = toggles(plan.device), plan.model_image_size
    schedule = ramp(size)
    progressive = [schedule(e) for e in range(EPOCHS)]
    runs = ((f"fixed {size}", [size] * EPOCHS, False, True),
            (f"progressive {schedule.min_res}->{schedule.max_res}", progressive, False, False),
            (f"blurpool {size}", [size] * EPOCHS, True, False))
    results: dict[str, list] = {label: [] for label, *_ in runs}
    for _ in range(plan.repeats):  # interleaved, so a busy neighbour hurts every configuration alike
        for label, sizes, blurpool, _ in runs:
            results[label].append(_run(plan, data, arch, tg, sizes, blurpool))
            log(f"recipe {arch} {label}: {results[label][-1][0].images_per_sec:.1f} img/s (epochs at {sizes} px)")
    out = []
    for label, sizes, blurpool, reference in runs:
        # Best of the repeats, as the loader section: noise only ever slows a run down.
        t, warm, timed = max(results[label], key=lambda r: r[0].images_per_sec)
        out.append(entry("recipe", f"recipe/{arch}/{label}", "torchvision", arch, tg, plan.model_batch, plan.workers,
                         t, (warm, timed), reference=reference, epoch_sizes=sizes, blurpool=blurpool,
                         all_images_per_sec=[round(r[0].images_per_sec, 2) for r in results[label]]))
    return out
