"""`fasttrain bench --sections auto`: what --loader auto picks against every path it picks from, end to end.

    fasttrain bench --sections auto                        # CPU: torchvision, dali-cpu, hybrid, and auto's pick
    fasttrain bench --sections auto -a resnet50 -a resnet18 -j 16 -b 256 --images 4096    # a GPU machine

Per arch: first the calibration `fasttrain train --loader auto` runs where no profile is cached (calibrate.py:
the brief one, its model step eager), on the same files, batch and workers, timed (its cost); then each
path it chooses from (torchvision, DALI, the hybrid at the share the calibration measured) feeding the
section's trainer (the fastest toggles of the model section, compiled on a GPU), interleaved repeats, the
best of each kept. Entries: one per path (`auto/ARCH/PATH+TOGGLES`) and `auto/ARCH/auto=PATH`, the path auto
took, with its rate from the same measurements, `auto_vs_best` (that rate over the best path's: the goal is
>= 0.95) and `calibration_s`. Every path is measured whatever auto picked, so the entry says how much a
wrong pick would have cost.
"""

from __future__ import annotations

import time

from ..config import Config, DataConfig, ModelConfig, RunConfig
from ..dist import DistInfo
from .loaders import BenchData
from .suite import Add, Plan, _ceiling_of, _e2e_log, _nothing, best_run, dali_kind, entry, feeding, log, warmed


def calibration(plan: Plan, data: BenchData, arch: str, fastest):
    """(rates, seconds) of the brief calibration a run of this arch, batch and toggles makes."""
    from .. import calibrate
    tg, _, layout = fastest
    cfg = Config(data=DataConfig(data=data.root, batch_size=plan.model_batch, image_size=plan.model_image_size,
                                 workers=plan.workers),
                 model=ModelConfig(arch=arch),
                 run=RunConfig(amp=tg.amp, channels_last=tg.channels_last, compile=tg.compile,
                               compile_mode=tg.compile_mode, cudnn_benchmark=tg.cudnn_benchmark))
    paths = ["torchvision"] + (["dali", "hybrid"] if dali_kind(plan) else [])
    t0 = time.perf_counter()
    rates = calibrate.measure(cfg, DistInfo(device=plan.device), layout, data.train, data.val, plan.workers,
                              plan.model_batch, paths)
    return rates, time.perf_counter() - t0


def auto_section(plan: Plan, data: BenchData, arch: str, model_entries: list[dict], fastest,
                 add: Add = _nothing) -> list[dict]:
    from .. import loader_choice as LC
    tg = fastest[0]
    ceiling = _ceiling_of(model_entries, tg)
    rates, seconds = calibration(plan, data, arch, fastest)
    if rates is None:
        log(f"auto {arch}: the calibration could not time the model: no auto entries")
        return []
    choice = LC.decide(rates)
    share = LC.measured_share(rates) or 0.5
    dali = dali_kind(plan)
    kinds = {"torchvision": "torchvision"}
    if dali:
        kinds.update(dali=dali, hybrid="hybrid")
    log(f"auto {arch}: calibrated in {seconds:.1f}s: {LC.describe_choice(choice, rates.device)} ({choice.why})")
    log(f"auto {arch}: the calibration's seconds: {LC.phases_text(rates)}")
    steps = {k: warmed(plan.e2e_steps, k, plan.workers) for k in kinds.values()}
    runs = {k: [] for k in kinds.values()}
    for _ in range(plan.repeats):  # interleaved: a busy neighbour slows every path alike
        for k in kinds.values():
            runs[k].append(feeding(plan, data, k, fastest, steps[k], share=share)())
    out = []
    for path, k in kinds.items():
        t = best_run(runs[k])
        out.append(entry("auto", f"auto/{arch}/{k}+{tg.label}", k, arch, tg, plan.model_batch, plan.workers, t,
                         steps[k], of_ceiling=t.images_per_sec / ceiling["images_per_sec"],
                         all_images_per_sec=[round(x.images_per_sec, 1) for x in runs[k]],
                         **({"dali_share": share} if path == "hybrid" else {})))
        _e2e_log(arch, k, tg, t, ceiling)
    picked = next(e for e in out if e["loader"] == kinds[choice.loader])
    best = max(e["images_per_sec"] for e in out)
    auto = {**picked, "name": f"auto/{arch}/auto={picked['loader']}", "auto_choice": picked["loader"],
            "auto_vs_best": picked["images_per_sec"] / best, "calibration_s": seconds, "calibration": rates.to_json(),
            "auto_why": choice.why}
    out.append(auto)
    log(f"auto {arch}: picked {picked['loader']}: {picked['images_per_sec']:.1f} img/s = "
        f"{100 * auto['auto_vs_best']:.0f}% of the best path measured here; calibration {seconds:.1f}s")
    for e in out:
        add(e)
    return out
