"""`fasttrain bench`: images/sec and data-loading time of fasttrain against the reference loop, in one run.

    fasttrain bench --out runs/bench                  # generated JPEGs, the matrix that fits this machine
    fasttrain bench /data/imagenet --out runs/bench -j 16 -b 256 -a resnet50 -a resnet18
    fasttrain bench --quick --out /tmp/b              # seconds: checks that everything runs; rough numbers
    fasttrain bench --from-json runs/gpu/bench.json --out runs/gpu   # redraw table and PNG from a JSON
    fasttrain bench --shards --sections loader        # each loader also reading the same images as tar shards
    fasttrain bench --like imagenet --shards --max-side 256 --sections loader  # ImageNet-sized, full vs resized
    fasttrain bench --sections ceiling -a resnet50 --out runs/c     # model-only variants past the compiled rate
    fasttrain bench --sections e2e -a resnet50 --best-of runs/c/bench.json   # end to end with the fastest one
    make bench                                        # = fasttrain bench --out runs/bench

Sections: loader only (reference ImageFolder+PIL loader, fasttrain's torchvision path, DALI CPU and DALI
GPU when present, and the peers a user would pick instead: timm's loader when timm imports, torchvision's
GPU decode on a GPU; same files, batch and worker count, every batch delivered to the training device);
model only (synthetic on-device batches for each toggle combination); end to end (each loader feeding the
model); on request, --sections ceiling (model-only variants past the compiled rate: ceiling.py), --sections recipe
(progressive resizing and BlurPool end to end against a fixed-size run: recipe.py), --sections dali
(the DALI loader's hardware-decoder share and prefetch depth, loader only and end to end: dali_sweep.py) and
--sections auto (--loader auto's pick and its calibration's cost against each path it picks from: auto.py).
Writes DIR/bench.json, DIR/bench.png and prints a table. The pieces: images.py (data), reference.py (the
reference loop), peers.py (the peers), loaders.py, measure.py (the one timing loop), suite.py (the matrix),
report.py (outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

import torch

from ..errors import UserError, check_counts
from .images import CLASSES, bench_dataset
from .loaders import FASTTRAIN_LOADERS, BenchData, available_loaders
from .report import add_ratios, environment, load_average, plot, table, write_json
from .suite import DaliKnobs, Plan, Toggles, dali_kind, run_suite

SECTIONS = ("loader", "model", "e2e")
ALL_SECTIONS = SECTIONS + ("ceiling", "recipe", "dali", "auto")  # only when asked for: each trains anew


def toggle_combos(device: torch.device, with_compile: bool, compile_mode: str = "default") -> list[Toggles]:
    """fp32; channels_last; bf16; bf16 + channels_last; + compile. cuDNN autotuning on for every fasttrain
    entry on a GPU (the fastest correct setting; the reference entries keep the reference's False)."""
    cudnn = device.type == "cuda"
    combos = [Toggles(amp=amp, channels_last=cl, cudnn_benchmark=cudnn) for amp, cl in
              (("none", False), ("none", True), ("bf16", False), ("bf16", True))]
    if with_compile:
        combos.append(Toggles(amp="bf16", channels_last=True, compile=True, compile_mode=compile_mode,
                              cudnn_benchmark=cudnn))
    return combos


STATIC_LOSS_SCALE = 1024.0  # --loss-scale of the static fp16 variant: a power of 2 (unscaling is exact)


def ceiling_variants(device: torch.device, batch: int) -> list[tuple[Toggles, int]]:
    """Section "ceiling": what might raise the compiled model-only rate past bf16 + channels_last + compile,
    each a `fasttrain train` flag, in the order a short GPU window should measure them (each compiles anew:
    the ones that reuse a compiled model graph first, max-autotune's minutes of autotuning last). On a GPU,
    the H200 measurements in benchmarks/RESULTS.md set the order: CUDA graphs (reduce-overhead) were the
    fastest, and the compiled optimizer step (--compile-step) changed nothing, so reduce-overhead comes
    first and the untried changes are stacked on it: fp16 with a static and with the dynamic loss scale,
    batch x1.5 and x2 (--lr-per-256; LARS at x2, its step compiled), then the --compile-step variants,
    foreach against fused SGD, and the max-autotune modes. On a CPU (tests, --quick) the same changes
    without compile, at the plan's small batch: the mechanism, not the numbers."""
    gpu = device.type == "cuda"
    base = Toggles(amp="bf16", channels_last=True, compile=gpu, cudnn_benchmark=gpu)
    step = replace(base, compile_step=True)
    if not gpu:  # fasttrain's default SGD is foreach here: the other one is fused
        return [(base, batch), (step, batch), (replace(step, amp="fp16", loss_scale=STATIC_LOSS_SCALE), batch),
                (replace(step, sgd="fused"), batch), (replace(step, opt="lars"), batch * 2)]
    ro = replace(base, compile_mode="reduce-overhead")
    graphs = replace(step, compile_mode="reduce-overhead")
    return [(base, batch), (ro, batch), (replace(ro, amp="fp16", loss_scale=STATIC_LOSS_SCALE), batch),
            (ro, batch * 3 // 2), (replace(graphs, opt="lars"), batch * 2), (replace(ro, amp="fp16"), batch),
            (step, batch), (graphs, batch), (replace(ro, sgd="foreach"), batch),
            (replace(step, compile_mode="max-autotune-no-cudagraphs"), batch),
            (replace(step, compile_mode="max-autotune"), batch)]


BEST_OF_WARMUP_S = 120.0  # --best-of passes over variants whose warm-up (compile) took longer


def best_ceiling(path: str, archs: list[str]) -> tuple[Toggles, int]:
    """--best-of: the toggles and batch of the fastest ceiling variant (not the reference loop) of these archs
    in an earlier bench.json, for the compiled entries of this run. Not one whose warm-up took more than
    BEST_OF_WARMUP_S (max-autotune's minutes of autotuning): gpu_run.sh gives each later stage a time limit
    that such a compile alone would use up."""
    try:
        with open(path) as fh:
            entries = json.load(fh)["entries"]
        rows = [e for e in entries if e["section"] == "ceiling" and not e.get("reference") and e["arch"] in archs
                and (e.get("warmup_s") or 0.0) <= BEST_OF_WARMUP_S]
        best = max(rows, key=lambda e: e["images_per_sec"]) if rows else None
        if best is not None:
            return Toggles(**best["toggles"]), int(best["batch_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--best-of {path}: not a bench.json ({type(e).__name__}: {e})") from None
    raise UserError(f"--best-of {path}: no ceiling entry of {', '.join(archs)} in it (bench --sections ceiling "
                    "writes them)")


def dali_variants(device: torch.device) -> tuple[list[DaliKnobs], list[DaliKnobs]]:
    """Section "dali": (loader-only, end-to-end) knob settings of the DALI loader, fasttrain's defaults first.
    On a GPU the hardware JPEG decoder's share (0 = all on CUDA cores; ANCHORS.md measured 0.65 and 0.9;
    MLPerf's submissions use 0.99) and the prefetch depth; end to end the settings that might give the model
    back GPU time (more on the hardware decoder) or smooth its step-time tail (a deeper queue). On a CPU,
    DALI decodes on the CPU whatever the share: only the prefetch depth."""
    base = DaliKnobs()
    if device.type != "cuda":
        return [base, replace(base, prefetch=1), replace(base, prefetch=4)], [base, replace(base, prefetch=4)]
    loads = [replace(base, hw_decoder_load=x) for x in (0.0, 0.65, 0.99) if x != base.hw_decoder_load]
    depths = [replace(base, prefetch=n) for n in (1, 3, 4) if n != base.prefetch]
    e2e = [replace(base, hw_decoder_load=x) for x in (0.65, 0.99) if x != base.hw_decoder_load]
    return [base] + loads + depths, [base] + e2e + [replace(base, prefetch=n) for n in (3, 4) if n != base.prefetch]


def make_plan(ns: argparse.Namespace, device: torch.device) -> Plan:
    """Sizes that fit the machine: a 2-core CPU gets a small model batch and few steps (CPU training is
    ~100x slower than a GPU's), a GPU the anchors' batch 256 and enough steps for stable percentiles."""
    gpu = device.type == "cuda"
    workers = ns.workers if ns.workers is not None else min(os.cpu_count() or 1, 16)
    if gpu:
        plan = Plan(device, ns.arch or ["resnet50", "resnet18"], workers, ns.batch_size or 256, ns.batch_size or 256,
                    loader_steps=(5, 40), model_steps=(8, 40), e2e_steps=(8, 60))
    elif ns.quick:  # seconds: 64 px model inputs, a few steps; the loader section keeps 224 px crops
        plan = Plan(device, ns.arch or ["resnet18"], workers, ns.batch_size or 32, ns.batch_size or 4,
                    model_image_size=64, loader_steps=(1, 3), model_steps=(1, 2), e2e_steps=(1, 2))
    else:
        plan = Plan(device, ns.arch or ["resnet18"], workers, ns.batch_size or 128, ns.batch_size or 16,
                    loader_steps=(3, 30), model_steps=(1, 3), e2e_steps=(2, 4))
    if ns.quick and gpu:
        plan.loader_steps, plan.model_steps, plan.e2e_steps = (2, 5), (2, 5), (2, 5)
    plan.combos = toggle_combos(device, with_compile=gpu or ns.full, compile_mode=ns.compile_mode)
    if getattr(ns, "best_of", None):  # the compiled (or last) combination: the fastest of an earlier ceiling run
        tg, plan.model_batch = best_ceiling(ns.best_of, plan.archs)
        plan.combos[-1] = tg
    plan.loaders, plan.skipped = available_loaders(device)
    plan.repeats = ns.repeats or (1 if ns.quick or gpu else 3)
    plan.ceiling = ceiling_variants(device, plan.model_batch)
    plan.dali_loader, plan.dali_e2e = dali_variants(device)
    return plan


def default_images(ns: argparse.Namespace, gpu: bool) -> int:
    if ns.images:
        return ns.images
    return 4096 if gpu else 128 if ns.quick else 512


def render(out: str, doc: dict) -> None:
    """Table on stdout, bench.png next to bench.json (skipped, with a note, where matplotlib is missing)."""
    print(table(doc["entries"]), flush=True)
    if not doc["entries"]:
        print("fasttrain bench: no entries: no bench.png", file=sys.stderr)
        return
    try:
        plot(os.path.join(out, "bench.png"), doc["entries"], doc["environment"], doc.get("plan"))
    except ImportError:
        print("fasttrain bench: matplotlib is not installed: no bench.png (pip install matplotlib, then "
              f"fasttrain bench --from-json {os.path.join(out, 'bench.json')} --out {out})", file=sys.stderr)


def check_numbers(ns: argparse.Namespace) -> None:
    """Counts a user gives: a bad one is a one-line error, not a silent default or a traceback later; and
    the flags that only mean something with others."""
    check_counts(("--workers", ns.workers, 0), ("--batch-size", ns.batch_size, 1), ("--repeats", ns.repeats, 1),
                 ("--images", ns.images, CLASSES, " (one per class)"), ("--max-side", ns.max_side, 8))
    if ns.data and ns.like != "default":
        raise UserError(f"--like {ns.like} draws the benchmark's own JPEGs: it has no meaning with DATA ({ns.data})")
    if ns.max_side and (not ns.shards or ns.shards != "auto"):
        raise UserError("--max-side says how the bench writes its shards: give it with --shards (no DIR; a DIR's "
                        "shards were written with their own settings, `fasttrain shard --max-side`)")


def bench_command(ns: argparse.Namespace) -> int:
    out = ns.out
    if ns.sections and not {s.strip() for s in ns.sections.split(",")} <= set(ALL_SECTIONS):
        raise UserError(f"--sections takes a comma list of {', '.join(ALL_SECTIONS)}")
    check_numbers(ns)
    os.makedirs(out, exist_ok=True)
    if ns.from_json:
        try:
            with open(ns.from_json) as fh:
                doc = json.load(fh)
            doc["entries"], doc["environment"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--from-json {ns.from_json}: not a bench.json ({type(e).__name__}: {e})") from None
        if os.path.abspath(ns.from_json) != os.path.abspath(os.path.join(out, "bench.json")):
            write_json(os.path.join(out, "bench.json"), doc["entries"], doc["environment"], doc.get("plan", {}))
        render(out, doc)
        return 0
    # An explicit index, as dist.pick_device() gives `fasttrain train` (DALI wants a device id).
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    plan = make_plan(ns, device)
    threads = torch.get_num_threads()
    if ns.quick and device.type == "cpu":
        # A smoke run: one intra-op thread, because OpenMP's spinning threads slow a tiny model down 5-10x
        # as soon as anything else wants the cores (DataLoader workers, a neighbour's tests).
        torch.set_num_threads(1)
    try:
        return _measure(ns, out, device, plan)
    finally:
        torch.set_num_threads(threads)


def _measure(ns: argparse.Namespace, out: str, device: torch.device, plan: Plan) -> int:
    sections = tuple(s.strip() for s in (ns.sections or ",".join(SECTIONS)).split(","))
    if "dali" in sections and dali_kind(plan) is None:
        from ..data import dali_backend
        why = plan.skipped.get(dali_backend.loader_name(device), "left out")
        raise UserError(f"--sections dali: the DALI loader does not run here ({why})")
    root = ns.data or bench_dataset(default_images(ns, device.type == "cuda"), like=ns.like)
    data = BenchData.scan(root)
    if ns.shards:  # loader-only twins reading the same images from tar shards (bench/shards.py)
        from .shards import bench_shards, shard_twins
        data = replace(data, shards=BenchData.scan(bench_shards(root, ns.shards, ns.max_side)))
        plan.loaders = shard_twins(plan.loaders, FASTTRAIN_LOADERS)
    plan.num_classes = len(data.train.classes)  # the models' heads must fit the labels of the files read
    print(f"fasttrain bench: {device}, data {root} ({len(data.train)} images), loaders {', '.join(plan.loaders)}, "
          f"{plan.workers} workers, archs {', '.join(plan.archs)}", flush=True)
    for kind, why in plan.skipped.items():
        print(f"fasttrain bench: left out {kind}: {why}", flush=True)
    env = environment(device, dict(vars(ns)))
    plan_doc = {**asdict(plan), "device": str(device), "data": root, "train_images": len(data.train),
                "sections": list(sections), "like": None if ns.data else ns.like}

    def save(entries: list[dict]) -> None:
        plan_doc["skipped"] = dict(plan.skipped)  # a peer that failed during the run is left out from then on
        add_ratios(entries)
        env["load_average_at_end"] = load_average()
        write_json(os.path.join(out, "bench.json"), entries, env, plan_doc)

    entries = run_suite(plan, data, sections, save)
    if "recipe" in sections:
        from .recipe import recipe_section
        for arch in plan.archs:
            entries += recipe_section(plan, data, arch)
            save(entries)
    save(entries)
    render(out, {"environment": env, "plan": plan_doc, "entries": entries})
    print(f"fasttrain bench: wrote {os.path.join(out, 'bench.json')} and bench.png", flush=True)
    return 0
