"""The benchmark matrix: loader only, then per arch model only and end to end; every entry is timed by
measure.time_loop. On request: "ceiling" (model-only variants: ceiling.py), "dali" (DALI's own knobs: the
hardware decoder's share and the prefetch depth, loader only and feeding the model: dali_sweep.py), "auto"
(--loader auto against every path: auto.py).

fasttrain entries run fasttrain's own pieces: its loaders (loaders.py), build_trainer/wrap_model from
train.py and Trainer.train_step from engine.py, so what is timed is what `fasttrain train` runs. The
reference entries run the reference loop (reference.py) on the same files, in the same process tree.
Peer entries (peers.py: timm's loader, torchvision's GPU decode) run the peer's loader on the same files;
end to end they feed the same fasttrain trainer, with the same toggles, as fasttrain's loaders do, so
only the loader differs.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, resolve_lr
from ..data import build_loaders
from ..data.base import Layout
from ..data.torchvision_backend import PREFETCH_FACTOR
from ..dist import DistInfo
from ..metrics import DeviceMeter
from ..train import AMP_DTYPES, build_trainer, compile_update, wrap_model
from .loaders import FASTTRAIN_LOADERS, BenchData, is_peer, open_loader
from .measure import Timing, time_loop
from .reference import ReferenceStep
from .shards import unsharded


@dataclass(frozen=True, kw_only=True)
class Toggles:
    """The settings an entry trains with, each one `fasttrain train` flag."""
    amp: str = "none"              # none | bf16 | fp16 (--amp)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    cudnn_benchmark: bool = False
    sgd: str = "auto"              # --optim-impl: auto (fused on CUDA, foreach elsewhere) | fused | foreach
    compile_step: bool = False     # --compile-step: the optimizer step compiled too
    loss_scale: float = 0.0        # --loss-scale: fp16's static loss scale (0: torch's dynamic GradScaler)
    opt: str = "sgd"               # --opt: sgd | lars (with --lr-per-256, as a large batch wants)

    @property
    def label(self) -> str:
        amp = self.amp if self.amp != "none" else "fp32"
        parts = [amp + (f"(scale{self.loss_scale:g})" if self.loss_scale else "")]
        mode = "" if self.compile_mode == "default" else f"({self.compile_mode})"
        return "+".join(parts + ["channels_last"] * self.channels_last + [f"compile{mode}"] * self.compile
                        + ["step"] * self.compile_step + [f"sgd-{self.sgd}"] * (self.sgd != "auto")
                        + [self.opt] * (self.opt != "sgd"))

    def config(self, data: DataConfig, arch: str) -> Config:
        """The Config `fasttrain train` would run with these settings (its LR: --lr-per-256 0.1)."""
        optim = resolve_lr(OptimConfig(optimizer=self.opt, optim_impl=self.sgd, lr_per_256=0.1), data.batch_size)
        return Config(data=data, model=ModelConfig(arch=arch), optim=optim,
                      run=RunConfig(amp=self.amp, channels_last=self.channels_last, compile=self.compile,
                                    compile_mode=self.compile_mode, compile_step=self.compile_step,
                                    loss_scale=self.loss_scale, cudnn_benchmark=self.cudnn_benchmark))


@dataclass(frozen=True)
class DaliKnobs:
    """The DALI loader's own knobs (`fasttrain train --hw-decoder-load F --prefetch N`); the defaults are
    fasttrain's."""
    hw_decoder_load: float = DataConfig.hw_decoder_load
    prefetch: int = DataConfig.prefetch

    def label(self, kind: str) -> str:
        """The settings that mean something for this loader: DALI's CPU mode has no hardware decoder."""
        return (f"hw{self.hw_decoder_load:g}+" if kind != "dali-cpu" else "") + f"prefetch{self.prefetch}"


@dataclass
class Plan:
    """What to run on this machine; bench_command() fills it from the flags and the device."""
    device: torch.device
    archs: list[str]
    workers: int
    loader_batch: int
    model_batch: int
    image_size: int = 224         # loader-only crops, as the reference's RandomResizedCrop(224)
    model_image_size: int = 224   # model-only and end-to-end (smaller only in --quick on CPU)
    num_classes: int = 8
    loader_steps: tuple[int, int] = (3, 12)   # (warm-up, timed) batches
    model_steps: tuple[int, int] = (2, 6)
    e2e_steps: tuple[int, int] = (2, 6)
    combos: list[Toggles] = field(default_factory=list)
    loaders: list[str] = field(default_factory=list)  # reference, fasttrain's and the peers' that run here
    skipped: dict[str, str] = field(default_factory=dict)  # loaders left out on this machine, and why
    repeats: int = 1  # loader-only: run each loader this many times, interleaved; keep the best
    ceiling: list[tuple[Toggles, int]] = field(default_factory=list)  # section "ceiling": (toggles, batch)
    dali_loader: list[DaliKnobs] = field(default_factory=list)  # section "dali": loader-only variants
    dali_e2e: list[DaliKnobs] = field(default_factory=list)     # section "dali": variants feeding the model


def entry(section: str, name: str, loader: str, arch: str | None, toggles: Toggles | None, batch: int,
          workers: int | None, timing: Timing, steps: tuple[int, int], **extra) -> dict:
    extra.setdefault("reference", False)
    extra.setdefault("peer", False)
    return {"name": name, "section": section, "loader": loader, "arch": arch,
            "toggles": asdict(toggles) if toggles else None, "batch_size": batch, "workers": workers,
            "warmup_steps": steps[0], "timed_steps": steps[1], **timing.summary(), **extra}


def log(msg: str) -> None:
    print(f"fasttrain bench: {msg}", flush=True)


def queued_batches(kind: str, workers: int) -> int:
    """Batches a loader can have ready before the clock starts: DataLoader workers x prefetch_factor (the
    reference's and the peers' DataLoaders keep torch's default 2; fasttrain's PREFETCH_FACTOR, which also
    covers DALI's shallower queue), plus the one in hand and the pinned or prefetched one. A warm-up shorter
    than this times batches made before the window opened."""
    return workers * (2 if kind == "reference" or is_peer(kind) else PREFETCH_FACTOR) + 2


def warmed(steps: tuple[int, int], kind: str, workers: int) -> tuple[int, int]:
    return max(steps[0], queued_batches(kind, workers)), steps[1]


# What a peer's library may raise where its API or its GPU support differs from what peers.py expects.
PEER_ERRORS = (ImportError, AttributeError, TypeError, ValueError, RuntimeError, OSError)


def timed(plan: Plan, kind: str, run: Callable[[], Timing]) -> Timing | None:
    """run(); for a peer, an error leaves the peer out of the rest of the run, with the reason in
    plan.skipped, instead of ending the benchmark: another version of timm or torchvision than the one
    peers.py was written against must not cost fasttrain's own numbers."""
    if not is_peer(kind):
        return run()
    try:
        return run()
    except PEER_ERRORS as e:
        last = (str(e).strip().splitlines() or [""])[-1]  # the line that says what went wrong
        plan.skipped[kind] = f"failed: {type(e).__name__}: {last}"
        plan.loaders.remove(kind)
        log(f"left out peer {kind}: {plan.skipped[kind]}")
        return None


Add = Callable[[dict], None]  # a section hands each entry to this as soon as it is measured


def _nothing(entry: dict) -> None:
    pass


def best_of_repeats(plan: Plan, jobs: list[tuple[str, Callable[[], Timing]]]) -> dict[str, list[Timing]]:
    """{kind: its timings}: each job run plan.repeats times, interleaved, so a busy neighbour hurts every
    job alike. A peer that fails is left out (timed())."""
    runs: dict[str, list[Timing]] = {k: [] for k, _ in jobs}
    for _ in range(plan.repeats):
        for kind, run in jobs:
            if kind not in runs:
                continue
            t = timed(plan, kind, run)
            if t is None:
                runs.pop(kind)
                continue
            log(f"loader {kind}{' (peer)' * is_peer(kind)}: {t.images_per_sec:.0f} img/s, "
                f"{t.summary()['cpu_ms_per_image'] or 0:.2f} CPU ms/img")
            runs[kind].append(t)
    return runs


def best_run(ts: list[Timing]) -> Timing:
    """Best of the repeats, as timeit does: noise only ever slows a run down."""
    return max(ts, key=lambda t: t.images_per_sec)


def loader_only(plan: Plan, data: BenchData, kind: str, steps: tuple[int, int],
                dali: DaliKnobs | None = None) -> Callable[[], Timing]:
    """A run of loader `kind` alone (batches delivered to the device, no step), `steps` (warm-up, timed)."""
    def run() -> Timing:
        with open_loader(kind, data, plan.loader_batch, plan.workers, plan.image_size,
                         Layout(plan.device, channels_last=False), sum(steps), dali=dali) as batches:
            return time_loop(batches, None, plan.device, *steps)
    return run


def loader_section(plan: Plan, data: BenchData, add: Add = _nothing) -> list[dict]:
    """Images/s of each data path alone: same files, batch and worker (or DALI thread) count."""
    # Every loader gets the longest queue's warm-up, so all entries time the same window length.
    steps = (max(warmed(plan.loader_steps, k, plan.workers)[0] for k in plan.loaders), plan.loader_steps[1])
    runs = best_of_repeats(plan, [(k, loader_only(plan, data, k, steps)) for k in list(plan.loaders)])
    out = [entry("loader", f"loader/{k}{_resized(k, data)}", k, None, None, plan.loader_batch, plan.workers,
                 best_run(ts), steps, reference=k == "reference", peer=is_peer(k),
                 all_images_per_sec=[round(t.images_per_sec, 1) for t in ts],
                 **({"max_side": data.shards.max_side} if _resized(k, data) else {})) for k, ts in runs.items()]
    rates = {e["loader"]: e["images_per_sec"] for e in out}
    for e in out:  # a loader reading tar shards against itself reading the folder (bench --shards)
        base, sharded = unsharded(e["loader"])
        if sharded and base in rates:
            e["vs_folder"] = e["images_per_sec"] / rates[base]
        add(e)
    return out


def _resized(kind: str, data: BenchData) -> str:
    """" (max side N)" after a loader reading shards that `fasttrain shard --max-side N` wrote."""
    sharded = unsharded(kind)[1]
    return f" (max side {data.shards.max_side})" if sharded and data.shards.max_side else ""


def dali_kind(plan: Plan) -> str | None:
    """The DALI loader a run of `fasttrain train --loader dali` takes on this device, if it runs here."""
    from ..data import dali_backend
    kind = dali_backend.loader_name(plan.device)
    return kind if kind in plan.loaders else None


def fasttrain_step(plan: Plan, arch: str, tg: Toggles, steps_per_epoch: int,
                   batch: int | None = None) -> tuple[Callable, Layout, Config]:
    """fasttrain's trainer for these toggles, wrapped as `fasttrain train` wraps it (--compile-step too).
    Returns (step function, the input Layout it wants, its Config)."""
    cfg = tg.config(DataConfig(loader="synthetic", batch_size=batch or plan.model_batch,
                               image_size=plan.model_image_size, num_classes=plan.num_classes,
                               steps_per_epoch=steps_per_epoch, workers=plan.workers), arch)
    dist = DistInfo(device=plan.device)
    torch.backends.cudnn.benchmark = tg.cudnn_benchmark  # as train.run() sets it
    torch.manual_seed(0)
    tr = build_trainer(cfg, dist, plan.num_classes, steps_per_epoch)
    tr.forward, _ = wrap_model(tr.model, cfg.run, dist)
    compile_update(tr, cfg.run)
    tr.forward.train()
    meter = DeviceMeter(plan.device)
    layout = Layout(plan.device, tg.channels_last, AMP_DTYPES[tg.amp] or torch.float32)

    def step(x, y):
        return tr.train_step(x, y, meter)
    step.meter = meter  # the steps' losses: the ceiling section records their mean (NaN: a broken variant)
    return step, layout, cfg


def model_section(plan: Plan, arch: str, add: Add = _nothing, combos: list[Toggles] | None = None
                  ) -> tuple[list[dict], tuple[Toggles, Callable, Layout]]:
    """Synthetic batches already on the device: the compute ceiling of each toggle combination (`combos`,
    default plan.combos). Returns the entries and the fastest combination with its step function (its
    compiled graph is reused end to end)."""
    steps, size, b = plan.model_steps, plan.model_image_size, plan.model_batch
    ref = ReferenceStep(arch, plan.num_classes, plan.device)
    x = torch.randn(b, 3, size, size, device=plan.device)
    y = torch.randint(0, plan.num_classes, (b,), device=plan.device)
    t = time_loop(itertools.repeat((x, y)), ref, plan.device, *steps)
    out = [entry("model", f"model/{arch}/reference", "synthetic", arch, Toggles(), b, None, t, steps, reference=True)]
    add(out[-1])
    log(f"model {arch} reference loop: {t.images_per_sec:.1f} img/s")
    del ref, x, y
    best, best_ips = None, 0.0
    for tg in plan.combos if combos is None else combos:
        step, layout, cfg = fasttrain_step(plan, arch, tg, sum(steps))
        loaders = build_loaders(cfg.data, DistInfo(device=plan.device), layout, seed=0)  # loader "synthetic"
        t = time_loop(loaders.train, step, plan.device, *steps)
        out.append(entry("model", f"model/{arch}/{tg.label}", "synthetic", arch, tg, b, None, t, steps))
        add(out[-1])
        log(f"model {arch} {tg.label}: {t.images_per_sec:.1f} img/s (warm-up {t.warmup_s:.1f}s)")
        if t.images_per_sec > best_ips:  # keep only the fastest trainer alive (GPU memory)
            best, best_ips = (tg, step, layout), t.images_per_sec
        del step, loaders
    return out, best


def e2e_loaders(plan: Plan) -> list[str]:
    """The loaders that feed fasttrain's trainer end to end: fasttrain's, then the peers'. Not DALI's CPU
    mode on a GPU machine: `fasttrain train --loader dali` decodes "mixed" there, so it is no path a GPU
    run takes (the loader-only section still measures it, delivered to the GPU)."""
    ours = [k for k in plan.loaders if k in FASTTRAIN_LOADERS
            and not (k == "dali-cpu" and plan.device.type == "cuda")]
    return ours + [k for k in plan.loaders if is_peer(k)]


def _ceiling_of(model_entries: list[dict], tg: Toggles) -> dict:
    return next(e for e in model_entries if e["toggles"] == asdict(tg) and not e["reference"])


def _e2e_log(arch: str, name: str, tg: Toggles, t: Timing, ceiling: dict) -> None:
    log(f"e2e {arch} {name} {tg.label}: {t.images_per_sec:.1f} img/s, "
        f"{100 * t.images_per_sec / ceiling['images_per_sec']:.0f}% of model-only, "
        f"device idle {100 * (t.device_idle_fraction or 0):.0f}%, data wait {100 * t.data_wait_fraction:.0f}%")


def feeding(plan: Plan, data: BenchData, kind: str, fastest, steps: tuple[int, int],
            dali: DaliKnobs | None = None, share: float = 0.5) -> Callable[[], Timing]:
    """A run of loader `kind` feeding the model-only section's fastest trainer (toggles, step, layout)."""
    _, step, layout = fastest

    def run() -> Timing:
        with open_loader(kind, data, plan.model_batch, plan.workers, plan.model_image_size, layout, sum(steps),
                         dali=dali, share=share) as batches:
            return time_loop(batches, step, plan.device, *steps)
    return run


def e2e_section(plan: Plan, data: BenchData, arch: str, model_entries: list[dict], fastest,
                add: Add = _nothing) -> list[dict]:
    """Each data path feeding the model: the reference loop, then fasttrain's loaders and the peers' with the
    toggle combination that was fastest in this run's model-only section (its trainer, already compiled)."""
    steps, size, b = plan.e2e_steps, plan.model_image_size, plan.model_batch
    tg = fastest[0]
    ceiling = _ceiling_of(model_entries, tg)
    ref = ReferenceStep(arch, plan.num_classes, plan.device)
    # One step on a synthetic batch before its workers start: CUDA/cuDNN set-up done now would otherwise let
    # the workers pile up batches that the timed window then drains at model speed.
    ref(torch.randn(b, 3, size, size), torch.randint(0, plan.num_classes, (b,)))
    ref_steps = warmed(steps, "reference", plan.workers)
    with open_loader("reference", data, b, plan.workers, size, Layout(plan.device, False), sum(ref_steps),
                     raw_reference=True) as batches:
        t = time_loop(batches, ref, plan.device, *ref_steps)
    del ref
    out = [entry("e2e", f"e2e/{arch}/reference", "reference", arch, Toggles(), b, plan.workers, t, ref_steps,
                 reference=True)]
    add(out[-1])
    log(f"e2e {arch} reference loop: {t.images_per_sec:.1f} img/s")
    torch.backends.cudnn.benchmark = tg.cudnn_benchmark  # the reference step above set the reference's
    for kind in e2e_loaders(plan):
        kind_steps = warmed(steps, kind, plan.workers)
        t = timed(plan, kind, feeding(plan, data, kind, fastest, kind_steps))
        if t is None:
            continue
        out.append(entry("e2e", f"e2e/{arch}/{kind}+{tg.label}", kind, arch, tg, b, plan.workers, t, kind_steps,
                         peer=is_peer(kind), of_ceiling=t.images_per_sec / ceiling["images_per_sec"]))
        add(out[-1])
        _e2e_log(arch, kind + " (peer)" * is_peer(kind), tg, t, ceiling)
    return out


def run_suite(plan: Plan, data: BenchData, sections=("loader", "model", "e2e"),
              save: Callable[[list[dict]], None] = lambda entries: None) -> list[dict]:
    """Every entry, ordered loader, model, e2e, ceiling, dali, auto (within a section, in the order measured).
    `save` gets the entries so far after each one, so a run stopped by a time limit keeps every number it
    measured. Sections "e2e" and "dali" without "model" time only the most toggled combination (the fastest
    in every run so far, or --best-of's) for their end-to-end entries; "e2e" records its model entries (the
    reference loop and that combination: what of_ceiling divides by), "dali" alone none."""
    t0 = time.perf_counter()
    entries: list[dict] = []

    def add(e: dict) -> None:
        entries.append(e)
        save(ordered(entries))

    from .ceiling import ceiling_section  # each imports this module: here, not at its top
    from .dali_sweep import dali_e2e_section, dali_loader_section
    if "loader" in sections:
        loader_section(plan, data, add)
    if "dali" in sections:
        dali_loader_section(plan, data, add)
    for arch in plan.archs:
        if "ceiling" in sections:
            ceiling_section(plan, arch, add)
        dali_e2e = "dali" in sections and dali_kind(plan) is not None and bool(plan.dali_e2e)
        if "model" not in sections and "e2e" not in sections and not dali_e2e and "auto" not in sections:
            continue
        if "model" in sections:
            model, best = model_section(plan, arch, add)
        else:  # end to end or DALI only: the most toggled combination alone (--best-of's, where given)
            model, best = model_section(plan, arch, add if "e2e" in sections else _nothing, combos=plan.combos[-1:])
        if "e2e" in sections:
            e2e_section(plan, data, arch, model, best, add)
        if dali_e2e:
            dali_e2e_section(plan, data, arch, model, best, add)
        if "auto" in sections:
            from .auto import auto_section
            auto_section(plan, data, arch, model, best, add)
        del best
        gc.collect()
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    log(f"matrix done in {time.perf_counter() - t0:.0f}s")
    return ordered(entries)


def ordered(entries: list[dict]) -> list[dict]:
    """Sections in the order loader, model, e2e, ceiling, dali, recipe, auto; within one, the order measured
    (sort is stable)."""
    order = {"loader": 0, "model": 1, "e2e": 2, "ceiling": 3, "dali": 4, "recipe": 5, "auto": 6}
    return sorted(entries, key=lambda e: order[e["section"]])
