"""`fasttrain bench --sections ceiling`: the model-only variants that might raise the compiled rate.

    fasttrain bench --sections ceiling -a resnet50 -j 16 -b 256        # a GPU machine: benchmarks/gpu_run.sh
    fasttrain bench --quick --sections ceiling                         # CPU: the mechanism, not the numbers

Each variant (bench.ceiling_variants: compile modes, fp16 against bf16, larger batches with LARS, the SGD
kernel, the compiled optimizer step) is a fresh trainer built from its `fasttrain train` flags
(suite.fasttrain_step), compiled anew, timed on synthetic device batches beside the reference loop.
"""

from __future__ import annotations

import gc
import itertools

import torch

from ..data import build_loaders
from ..dist import DistInfo
from .measure import time_loop
from .reference import ReferenceStep
from .suite import Add, Plan, Toggles, _nothing, entry, fasttrain_step, log


def ceiling_section(plan: Plan, arch: str, add: Add = _nothing) -> list[dict]:
    """Model only, the variants that might raise the compiled ceiling (compile modes, fp16 against bf16,
    larger batches, SGD implementation): each a fresh trainer, compiled anew, on synthetic device batches.
    The reference loop at the plan's batch is this section's reference. Each entry is handed to `add` as
    soon as it is measured: a run stopped by a time limit keeps the variants done so far."""
    steps, size = plan.model_steps, plan.model_image_size
    ref = ReferenceStep(arch, plan.num_classes, plan.device)
    x = torch.randn(plan.model_batch, 3, size, size, device=plan.device)
    y = torch.randint(0, plan.num_classes, (plan.model_batch,), device=plan.device)
    t = time_loop(itertools.repeat((x, y)), ref, plan.device, *steps)
    out = [entry("ceiling", f"ceiling/{arch}/reference", "synthetic", arch, Toggles(), plan.model_batch, None, t,
                 steps, reference=True)]
    add(out[-1])
    del ref, x, y
    for tg, b in plan.ceiling:
        try:
            step, layout, cfg = fasttrain_step(plan, arch, tg, sum(steps), batch=b)
            loaders = build_loaders(cfg.data, DistInfo(device=plan.device), layout, seed=0)  # loader "synthetic"
            t = time_loop(loaders.train, step, plan.device, *steps)
        except CEILING_ERRORS as e:  # one variant torch cannot compile or fit must not cost the others
            last = (str(e).strip().splitlines() or [""])[-1]
            plan.skipped[f"ceiling/{arch}/{tg.label}@{b}"] = f"failed: {type(e).__name__}: {last[:300]}"
            log(f"ceiling {arch} {tg.label} batch {b}: failed ({type(e).__name__}: {last[:300]})")
        else:
            loss = step.meter.read()["loss"]  # random labels: about ln(classes) while the variant trains right
            out.append(entry("ceiling", f"ceiling/{arch}/{tg.label}@{b}", "synthetic", arch, tg, b, None, t, steps,
                             train_loss=loss))
            add(out[-1])
            log(f"ceiling {arch} {tg.label} batch {b}: {t.images_per_sec:.1f} img/s (warm-up {t.warmup_s:.1f}s)")
        step = loaders = None
        torch.compiler.reset()  # each variant compiles anew: the last one's graphs (and CUDA graph pools) go
        gc.collect()
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# What a ceiling variant may raise that leaves the process able to go on: torch.compile's errors (dynamo's and
# inductor's derive from RuntimeError), out of memory (torch.OutOfMemoryError is one too), a missing feature.
CEILING_ERRORS = (RuntimeError, NotImplementedError, AssertionError, TypeError, ValueError)
