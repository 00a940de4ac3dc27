"""--loader auto's measurement: the model step alone, each loader alone and feeding it, on this host.

    rates = measure(cfg, dist, layout, train_split, val_split, workers, batch, ["torchvision", "dali", "hybrid"])
    loader_choice.decide(rates)   # tune.py: what a run and `fasttrain tune` do with it

What is measured, on every rank at once (so the loaders share the node as they will in training), on a few
hundred of this rank's own train files (JPEGs checked for structure first, as before DALI always):
1. the model step alone on a synthetic on-device batch: the run's model, batch, crop size, amp and
   channels_last, a throwaway copy (the run's RNG states are put back afterwards, so its weights, data order
   and crops are those of a run that measured nothing); eager, except in `fasttrain tune` of a --compile run;
2. each loader (torchvision, DALI) built as the run builds it: its queue drained, then its rate alone
   (batches delivered to the device, no step, CPU time per image), then its rate feeding the model step;
3. the hybrid at the share of the two loaders' fed rates, only where both are slower than the model
   (loader_choice.wants_hybrid);
4. `fasttrain tune` only: DALI's hardware-decoder share and prefetch depth, alone, before DALI feeds the
   model with the best of them; longer windows.
Each rate is the slowest rank's (DDP steps at the slowest rank's pace).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import cpu_share
from . import dist as D
from . import loader_choice as LC
from .config import Config, DataConfig
from .data.base import BadFileBudget, Layout
from .data.scan import Split
from .schedules import Resolution

TUNE_PREFETCH_FACTOR = 2  # the workers' queue while measuring: drained sooner, same rate once drained
POOL = 4096  # distinct files a rank measures on, repeated: after their first pass read from the page cache


@dataclass(frozen=True)
class Windows:
    """How long each measurement runs: seconds, and a cap in batches. `budget_s`: where feeding the model
    for every path would take the calibration past it (a model of seconds a step: a CPU), the paths' fed
    rates are estimated from their rates alone instead (loader_choice.score)."""
    model_s: float = 0.6
    alone_s: float = 0.4
    fed_s: float = 0.8
    max_batches: int = 60
    dali_variants: bool = False
    budget_s: float = 8.0


BRIEF = Windows()
THOROUGH = Windows(model_s=2.0, alone_s=1.5, fed_s=3.0, max_batches=300, dali_variants=True, budget_s=600.0)
FED_STEPS = 3  # the fewest model steps a fed rate is taken from (one of them a warm-up)


class _Quiet(BadFileBudget):
    """Bad files met while measuring are the run's to report, not the calibration's."""

    def __init__(self):
        super().__init__(limit=10**9)

    def report(self, path: str, reason: str) -> None:
        self.seen.append(path)


class _Keep:
    """An iterator that time_loop cannot close: the phases of one measurement share it."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)


# -- the model step ---------------------------------------------------------------------------------------

def model_step(cfg: Config, device: torch.device, num_classes: int, compiled: bool):
    """A train step of a throwaway copy of the run's model, as train.py builds and wraps it (no DDP)."""
    from .config import resolve_toggles
    from .metrics import DeviceMeter
    from .train import build_trainer, wrap_model
    run = resolve_toggles(cfg.run, device.type)  # a no-op on a run's resolved config
    run = dataclasses.replace(run, compile=compiled and run.compile)
    mine = dataclasses.replace(cfg, run=run, optim=dataclasses.replace(cfg.optim, ema=0.0))
    local = D.DistInfo(device=device)
    tr = build_trainer(mine, local, num_classes, steps_per_epoch=10**6)
    tr.forward, _ = wrap_model(tr.model, run, local)
    tr.forward.train()
    meter = DeviceMeter(device)
    return (lambda x, y: tr.train_step(x, y, meter)), ("compiled" if run.compile else "eager")


class _KeepRng:
    """Puts back Python's, numpy's and torch's (CPU and this GPU's) generators on exit: the run that measured
    starts with the states it would have had without measuring."""

    def __init__(self, device: torch.device):
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self):
        self.py, self.np = random.getstate(), np.random.get_state()
        self.fork.__enter__()

    def __exit__(self, *exc):
        self.fork.__exit__(*exc)
        random.setstate(self.py)
        np.random.set_state(self.np)


# -- the measurements --------------------------------------------------------------------------------------

def _model_rate(step, layout: Layout, batch: int, size: int, classes: int, w: Windows) -> tuple[float, float]:
    """(img/s, seconds a step) of the model step alone on one synthetic on-device batch: a warm-up step
    (cuDNN's autotuning, compile), one step, and where that one was short, a window of w.model_s. A warm-up
    of over a quarter of the budget (seconds a step: a CPU) is the measurement itself: its one-time costs
    make the model look slower, which makes no loader look better than it is."""
    from .bench.measure import sync, time_loop
    fmt = torch.channels_last if layout.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=layout.device).to(layout.dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=layout.device)
    for i in range(2):
        sync(layout.device)
        t0 = time.perf_counter()
        step(x, y)
        sync(layout.device)
        step_s = time.perf_counter() - t0
        if i == 0 and step_s > w.budget_s / 4:
            return batch / step_s, step_s
    n = int(min(w.max_batches, w.model_s / max(step_s, 1e-6)))
    if n < 3:  # a model of a large share of the window a step (a CPU): the one step is the measurement
        return batch / step_s, step_s
    t = time_loop(_forever(x, y), step, layout.device, 1, n)
    return t.images_per_sec, t.seconds / n


def _forever(x, y):
    while True:
        yield x, y


def calibration_split(train: Split, dist: D.DistInfo, images: int, seed: int, distinct: int = POOL) -> Split:
    """`images` samples: at most `distinct` files of this rank's share of the train split drawn at random,
    whole JPEGs only (DALI never sees a broken one: jpeg_check.py; its cost is in benchmarks/RESULTS.md),
    repeated as needed."""
    from .data.jpeg_check import jpeg_problem
    mine = list(train.samples[dist.rank::dist.world_size])
    rng = random.Random(seed)
    pool = rng.sample(mine, min(len(mine), images, distinct))
    pool = [s for s in pool if not isinstance(s[0], str) or jpeg_problem(s[0]) is None] or pool[:1]
    picked = (pool * (images // len(pool) + 1))[:images]
    return dataclasses.replace(train, samples=tuple(picked))


def _queue(kind: str, workers: int, prefetch: int) -> int:
    """Batches a loader holds ready before it is asked: drained before its rate is taken."""
    tv = max(workers, 1) * TUNE_PREFETCH_FACTOR + 2
    return {"torchvision": tv, "dali": prefetch + 2, "hybrid": tv + prefetch + 2}[kind]


def _open(kind: str, split: Split, val: Split, batch: int, workers: int, data: DataConfig, layout: Layout,
          seed: int, share: float):
    from .data import dali_backend, hybrid, torchvision_backend
    steps = len(split) // batch
    sizes = Resolution.from_config(data)
    local = D.DistInfo(device=layout.device)
    budget = _Quiet()
    if kind == "torchvision":
        train, val_b = torchvision_backend.build(split, val, batch, workers, data.image_size, layout, 0, 1, seed, steps,
                                                 budget.limit, None, size_at=sizes, val_size=sizes.val_size,
                                                 crop_ratio=data.val_crop_ratio, budget=budget,
                                                 prefetch_factor=TUNE_PREFETCH_FACTOR)
    elif kind == "dali":
        train, val_b = dali_backend.build(split, val, batch, workers, data, layout, local, seed, steps, budget=budget,
                                          check_unused=False)  # a part of an epoch is read, on purpose
    else:
        train, val_b = hybrid.build(split, val, batch, workers, data, layout, local, seed, steps, sizes,
                                    sizes.val_size, share=share, budget=budget, check_unused=False)
    train.set_epoch(0)
    return train, val_b


def probe(kind: str, split: Split, val: Split, batch: int, workers: int, data: DataConfig, layout: Layout,
          step, step_s: float, w: Windows, seed: int = 0, share: float = 0.0,
          phases: dict[str, float] | None = None, name: str | None = None) -> LC.PathRate:
    """One loader: queue drained, then alone for w.alone_s, then (with `step`) feeding the model for ~w.fed_s
    (at least FED_STEPS steps). `phases[f"{name} open"]`: the seconds from building it to its queue drained."""
    from .bench.measure import sync, time_loop, tree_cpu_seconds
    t_open = time.perf_counter()
    train, val_b = _open(kind, split, val, batch, workers, data, layout, seed, share)
    it = iter(train)
    try:
        for _ in range(_queue(kind, workers, data.prefetch)):
            next(it)
        sync(layout.device)
        if phases is not None:
            phases[f"{name or kind} open"] = time.perf_counter() - t_open
        cpu0, t0, images, n = tree_cpu_seconds(), time.perf_counter(), 0, 0
        while n < 2 or (time.perf_counter() - t0 < w.alone_s and n < w.max_batches):
            images += int(next(it)[1].shape[0])
            n += 1
        sync(layout.device)
        wall, cpu1 = time.perf_counter() - t0, tree_cpu_seconds()
        out = LC.PathRate(alone=images / wall, cpu_ms=None if cpu0 is None or cpu1 is None else
                          1e3 * (cpu1 - cpu0) / images)
        if step is not None:
            fed = int(min(w.max_batches, max(FED_STEPS - 1, w.fed_s / max(step_s, 1e-6))))
            t = time_loop(_Keep(it), step, layout.device, 1, fed)
            out.fed, out.p50_ms, out.p95_ms = t.images_per_sec, t.percentile_ms(50), t.percentile_ms(95)
            out.fed_step_ms = [round(x, 1) for x in t.step_ms]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        train.close()
        val_b.close()
    if kind == "dali":
        out.knobs = {"hw_decoder_load": data.hw_decoder_load, "prefetch": data.prefetch}
    elif kind == "hybrid":
        out.knobs = {"dali_share": share}
    return out


def dali_variants(data: DataConfig, device: torch.device) -> list[DataConfig]:
    """`fasttrain tune`'s DALI settings, the configured ones first: on a GPU the hardware decoder's share
    (DALI's own 0.65, MLPerf's 0.99) and a deeper queue; on a CPU (no hardware decoder) the queue only."""
    base = [data]
    if device.type == "cuda":
        base += [dataclasses.replace(data, hw_decoder_load=x) for x in (0.65, 0.99) if x != data.hw_decoder_load]
    return base + [dataclasses.replace(data, prefetch=n) for n in (1, 4) if n != data.prefetch]


def _timed(phases: dict[str, float], name: str, run):
    """run(), its seconds (failed or not) in phases[name]."""
    t0 = time.perf_counter()
    try:
        return run()
    finally:
        phases[name] = time.perf_counter() - t0


def _combine(per_rank: list[LC.Rates | None]) -> LC.Rates | None:
    """The slowest rank's rates (DDP runs at its pace); None if a rank could not measure at all."""
    if any(r is None for r in per_rank):
        return None
    out = per_rank[0]
    out.model = min(r.model for r in per_rank)
    out.phases = {k: max(r.phases.get(k, 0.0) for r in per_rank) for k in out.phases}
    for name in list(out.paths):
        ps = [r.paths.get(name) for r in per_rank]
        if any(p is None for p in ps):
            del out.paths[name]
            continue
        p = out.paths[name]
        if p.fed is not None and all(q.fed is not None for q in ps):
            p.fed_step_ms = min(ps, key=lambda q: q.fed).fed_step_ms  # the slowest rank's steps
        for f in ("alone", "fed"):
            vals = [getattr(q, f) for q in ps]
            setattr(p, f, None if None in vals else min(vals))
        for f in ("cpu_ms", "p50_ms", "p95_ms"):
            vals = [getattr(q, f) for q in ps if getattr(q, f) is not None]
            setattr(p, f, max(vals) if vals else None)
    out.seconds = max(r.seconds for r in per_rank)
    return out


def measure(cfg: Config, dist: D.DistInfo, layout: Layout, train: Split, val: Split, workers: int, batch: int,
            paths: list[str], w: Windows = BRIEF, compiled: bool = False, seed: int = 0) -> LC.Rates | None:
    """Every rank measures at once (a collective); returns the combined rates on every rank, or None where a
    rank could not measure the model (each path that failed on any rank is left out, with a warning)."""
    t0 = time.perf_counter()
    size = Resolution.from_config(cfg.data)(0)
    batch = min(batch, max(1, len(train) // dist.world_size))
    phases: dict[str, float] = {}  # seconds of each part, in the order measured (the bench and tune print them)
    with _KeepRng(layout.device):
        rates, step, step_s = None, None, 0.0
        try:
            step, note = model_step(cfg, layout.device, len(train.classes), compiled)
            model, step_s = _model_rate(step, layout, batch, size, len(train.classes), w)
            phases["model"] = time.perf_counter() - t0  # building it (compile, in tune) and timing it
            rates = LC.Rates(model=model, device=layout.device.type, model_note=note,
                             cores=cpu_share.cores_per_process(dist.local_world_size), threads=torch.get_num_threads(),
                             phases=phases)
        except Exception as e:  # noqa: BLE001 - whatever it is, the run falls back to the unmeasured rule
            _warn(dist, f"could not time the model step ({type(e).__name__}: {e})")
        per_batch = _queue("hybrid", workers, max(cfg.data.prefetch, 4)) + 2 * w.max_batches + 4
        split = calibration_split(train, dist, per_batch * batch, seed)
        data = dataclasses.replace(cfg.data, loader="auto")
        if rates is not None:
            knobs = data
            if "dali" in paths and w.dali_variants:
                variants = {}
                for i, v in enumerate(dali_variants(data, layout.device)):
                    set_to = {"hw_decoder_load": v.hw_decoder_load, "prefetch": v.prefetch}
                    label = f"dali@{LC.dali_label(set_to, layout.device.type)}"
                    got = _try(dist, f"dali@{i}", lambda: _timed(phases, label, lambda: probe(
                        "dali", split, val, batch, workers, v, layout, None, step_s, w, seed, phases=phases,
                        name=label)))
                    if got is not None:
                        variants[label] = got
                best = LC.best_dali_knobs(variants, {"hw_decoder_load": data.hw_decoder_load,
                                                     "prefetch": data.prefetch})
                knobs = dataclasses.replace(data, **best)
                rates.paths.update(variants)
            singles = [k for k in ("torchvision", "dali") if k in paths]
            # Each fed rate costs FED_STEPS model steps or more; past the budget, they are estimated instead.
            fed_cost = len(singles) * (max(FED_STEPS * step_s, w.fed_s) + 0.5)
            feed = step if time.perf_counter() - t0 + fed_cost <= w.budget_s else None
            for kind in singles:
                got = _try(dist, kind, lambda: _timed(phases, kind, lambda: probe(
                    kind, split, val, batch, workers, knobs if kind == "dali" else data, layout, feed, step_s, w,
                    seed, phases=phases)))
                if got is not None:
                    rates.paths[kind] = got
            rates.seconds = time.perf_counter() - t0
        t_x = time.perf_counter()
        rates = _combine(D.all_gather_object(rates, dist))
        if rates is not None:
            rates.phases["ranks' exchange"] = time.perf_counter() - t_x
        if rates is not None and "hybrid" in paths and LC.wants_hybrid(rates) and \
                all(p.fed is not None for p in rates.paths.values()):
            share = LC.hybrid_share(rates)
            mine: dict[str, float] = {}
            got = _try(dist, "hybrid", lambda: _timed(mine, "hybrid", lambda: probe(
                "hybrid", split, val, batch, workers, knobs, layout, step, step_s, w, seed, share, phases=mine)))
            gathered = D.all_gather_object((got, mine), dist)
            hybrid = [h for h, _ in gathered]
            rates.phases.update({k: max(m.get(k, 0.0) for _, m in gathered) for k in mine})
            if all(h is not None for h in hybrid):
                rates.paths["hybrid"] = LC.PathRate(
                    alone=min(h.alone for h in hybrid), fed=min(h.fed for h in hybrid),
                    cpu_ms=max((h.cpu_ms or 0.0) for h in hybrid) or None,
                    p50_ms=max(h.p50_ms for h in hybrid), p95_ms=max(h.p95_ms for h in hybrid), knobs=hybrid[0].knobs,
                    fed_step_ms=min(hybrid, key=lambda h: h.fed).fed_step_ms)
        del step
    if rates is not None:
        rates.seconds = D.broadcast_object(time.perf_counter() - t0, dist)
    if layout.device.type == "cuda":
        torch.cuda.empty_cache()  # the throwaway model's memory, before the run's own
    return rates


def _try(dist: D.DistInfo, what: str, run):
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - a loader that fails to measure is no candidate; the run goes on
        print(f"fasttrain: warning: rank {dist.rank}: measuring {what} failed ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); it is left out of --loader auto",
              file=sys.stderr, flush=True)
        return None


def _warn(dist: D.DistInfo, msg: str) -> None:
    print(f"fasttrain: warning: rank {dist.rank}: --loader auto: {msg}", file=sys.stderr, flush=True)
