"""`fasttrain bench --sections dali`: the DALI loader's own knobs, loader only and feeding the model.

    fasttrain bench --sections dali -a resnet18 -j 16 -b 256 --images 4096     # a GPU machine
    fasttrain bench --quick --sections dali                                    # CPU: DALI's CPU mode

The settings (bench.dali_variants: on a GPU the hardware decoder's share and the prefetch depth; on a CPU the
depth only) are timed loader only, in interleaved repeats, then feeding the same compiled trainer; each
entry's vs_default is its rate over fasttrain's defaults in the same run.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from .loaders import BenchData
from .suite import (Add, DaliKnobs, Plan, _ceiling_of, _e2e_log, _nothing, best_of_repeats, best_run, dali_kind,
                    entry, feeding, loader_only, warmed)


def dali_loader_section(plan: Plan, data: BenchData, add: Add = _nothing) -> list[dict]:
    """Section "dali", loader only: the DALI loader at each of plan.dali_loader's knob settings, fasttrain's
    defaults among them, interleaved repeats, each timed over 3x the loader section's window (at ~25,000
    img/s that window is half a second, and one batch more or less in DALI's queue moves the rate)."""
    kind = dali_kind(plan)
    if kind is None or not plan.dali_loader:
        return []
    steps = warmed((plan.loader_steps[0], 3 * plan.loader_steps[1]), kind, plan.workers)
    runs = best_of_repeats(plan, [(f"{kind}@{k.label(kind)}", loader_only(plan, data, kind, steps, k))
                                  for k in plan.dali_loader])
    out = []
    for knobs in plan.dali_loader:
        ts = runs[f"{kind}@{knobs.label(kind)}"]
        out.append(entry("dali", f"dali/{kind}@{knobs.label(kind)}", kind, None, None, plan.loader_batch, plan.workers,
                         best_run(ts), steps, dali=asdict(knobs), default_knobs=knobs == DaliKnobs(),
                         all_images_per_sec=[round(t.images_per_sec, 1) for t in ts]))
    _vs_default(out)
    for e in out:
        add(e)
    return out


def _vs_default(entries: list[dict]) -> None:
    """vs_default: each entry's img/s over the entry with fasttrain's default knobs of the same arch."""
    base = {e["arch"]: e["images_per_sec"] for e in entries if e["default_knobs"]}
    for e in entries:
        if e["arch"] in base:
            e["vs_default"] = e["images_per_sec"] / base[e["arch"]]


def dali_e2e_section(plan: Plan, data: BenchData, arch: str, model_entries: list[dict], fastest,
                     add: Add = _nothing) -> list[dict]:
    """Section "dali", end to end: the DALI loader at each of plan.dali_e2e's knob settings (fasttrain's
    defaults among them) feeding the same trainer, already compiled: where DALI shares the GPU with the
    model, the hardware decoder's share and the queue depth move the model's rate, not only the loader's."""
    kind = dali_kind(plan)
    if kind is None or not plan.dali_e2e:
        return []
    steps, b = warmed(plan.e2e_steps, kind, plan.workers), plan.model_batch
    tg = fastest[0]
    ceiling = _ceiling_of(model_entries, tg)
    torch.backends.cudnn.benchmark = tg.cudnn_benchmark
    out = []
    for knobs in plan.dali_e2e:
        t = feeding(plan, data, kind, fastest, steps, knobs)()
        out.append(entry("dali", f"dali/{arch}/{kind}@{knobs.label(kind)}+{tg.label}", kind, arch, tg, b, plan.workers,
                         t, steps, dali=asdict(knobs), default_knobs=knobs == DaliKnobs(),
                         of_ceiling=t.images_per_sec / ceiling["images_per_sec"]))
        _e2e_log(arch, f"{kind}@{knobs.label(kind)}", tg, t, ceiling)
    _vs_default(out)
    for e in out:
        add(e)
    return out
