"""--loader auto in a run (a cached profile, else a brief calibration) and `fasttrain tune`.

    fasttrain tune DATA -a resnet50 -b 256 --amp bf16 --channels-last --compile   # measures, prints, caches
    fasttrain train DATA -a resnet50 -b 256 --amp bf16 --channels-last --compile  # --loader auto reuses it
    fasttrain train DATA ... --calibrate fresh                                     # measure again

A run's --loader auto (build_loaders calls `picker`'s Pick after its scan of DATA): the loader of the
checkpoint it resumes (another would give the resumed epoch other crops); torchvision where it is the one
loader that applies; else the profile cached for this host, data, model, batch and world size
(loader_choice.py); else, for a run long enough to repay it (MIN_RUN_IMAGES train images in all), the brief
measurement of calibrate.py, cached for the next run; else the unmeasured rule, said so. Rank 0 decides
(loader_choice.decide) and broadcasts, so every rank builds the same loader.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import torch

from . import cpu_share
from . import dist as D
from . import loader_choice as LC
from .calibrate import BRIEF, THOROUGH, measure
from .config import Config, DataConfig
from .data import resolve_backend
from .data.base import Layout
from .data.scan import Split
from .errors import UserError
from .schedules import Resolution

MIN_RUN_IMAGES = 200_000  # a run that trains on fewer images in all is not worth a few seconds of measuring


def profile_key(cfg: Config, dist: D.DistInfo, workers: int, batch: int) -> dict:
    """What a profile's rates depend on: this host and device, the data, the model step, the batch, the
    processes and their share of the cores, the loaders' versions."""
    from .data import dali_backend
    dev = dist.device
    return {"version": LC.VERSION, "host": socket.gethostname(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "cores": cpu_share.cores_per_process(dist.local_world_size), "data": os.path.abspath(cfg.data.data),
            "arch": cfg.model.arch, "blurpool": cfg.model.blurpool,
            "image_size": Resolution.from_config(cfg.data)(0), "batch": batch, "world": dist.world_size,
            "local_world": dist.local_world_size, "workers": workers, "amp": cfg.run.amp,
            "channels_last": cfg.run.channels_last, "compile": cfg.run.compile, "torch": torch.__version__,
            "dali": dali_backend.version()}


def run_images(cfg: Config, train_images: int, batch: int, world: int, start_epoch: int) -> int:
    """Train images the run has left to see: epochs x the epoch (cut by --steps-per-epoch)."""
    per_epoch = train_images
    if cfg.data.steps_per_epoch:
        per_epoch = min(per_epoch, cfg.data.steps_per_epoch * cfg.optim.grad_accum_steps * batch * world)
    return max(0, cfg.optim.epochs - start_epoch) * per_epoch


def _saved(ck: dict | None) -> dict | None:
    """The loader settings a checkpoint's run resolved (its config), if it names a real loader."""
    data = ((ck or {}).get("config") or {}).get("data") or {}
    return data if data.get("loader") in ("torchvision", "dali", "hybrid") else None


def _apply(d: DataConfig, choice: LC.Choice) -> DataConfig:
    knobs = {k: v for k, v in (("hw_decoder_load", choice.hw_decoder_load), ("prefetch", choice.prefetch))
             if v is not None}
    return dataclasses.replace(d, loader=choice.loader, dali_share=choice.dali_share or d.dali_share, **knobs)


def choose(cfg: Config, dist: D.DistInfo, layout: Layout, ck: dict | None, train: Split, val: Split, workers: int,
           batch: int) -> tuple[DataConfig, str]:
    """build_loaders' Pick for `fasttrain train`: --loader auto (or hybrid's --dali-share 0) decided."""
    from .data import dali_backend
    d = cfg.data
    augment = bool(d.auto_augment or d.randaugment)
    rule = resolve_backend("auto", layout.device.type, augment)
    saved = _saved(ck)
    if d.loader == "auto" and saved is not None and (saved["loader"] == "torchvision" or dali_backend.available()):
        keep = {k: saved[k] for k in ("loader", "dali_share", "hw_decoder_load", "prefetch") if k in saved}
        return dataclasses.replace(d, **keep), f"auto: {saved['loader']}, the loader of the run this one resumes"
    if d.loader == "auto" and augment:
        return dataclasses.replace(d, loader="torchvision"), \
            "auto: torchvision, the one loader that applies --auto-augment/--randaugment"
    if d.loader == "auto" and not dali_backend.available():
        return dataclasses.replace(d, loader="torchvision"), "auto: torchvision, the one loader here (no DALI)"
    if d.calibrate == "off":
        if d.loader == "hybrid":
            return d, ""  # build_loaders says --dali-share 0.5, unmeasured
        return dataclasses.replace(d, loader=rule), f"auto: {rule}, unmeasured (--calibrate off)"
    key = profile_key(cfg, dist, workers, batch)
    got = LC.load_profile(key) if dist.is_main and d.calibrate == "auto" else None
    got = D.broadcast_object(got, dist)
    start = int(ck.get("epoch", 0)) if ck else cfg.optim.start_epoch
    if got is None and d.calibrate == "auto" and d.loader == "auto" and \
            run_images(cfg, len(train), batch, dist.world_size, start) < MIN_RUN_IMAGES:
        return dataclasses.replace(d, loader=rule), (
            f"auto: {rule}, unmeasured: a run of under {MIN_RUN_IMAGES:,} train images does not repay a "
            "calibration (`fasttrain tune` or --calibrate fresh measures)")
    if got is not None:
        rates, where = got
        source = f"profile {where}"
    else:
        rates = measure(cfg, dist, layout, train, val, workers, batch, ["torchvision", "dali", "hybrid"])
        if rates is None:
            if d.loader == "hybrid":
                return d, ""
            return dataclasses.replace(d, loader=rule), f"auto: {rule}, unmeasured (the calibration failed)"
        where = LC.save_profile(key, rates) if dist.is_main else None
        source = f"calibrated in {rates.seconds:.1f}s" + (f", cached in {where}" if where else "")
    if d.loader == "hybrid":  # asked for, with --dali-share 0: the share from the rates
        share = D.broadcast_object(LC.measured_share(rates), dist)
        if share is None:
            return d, ""
        return dataclasses.replace(d, dali_share=share), \
            f"--dali-share {share:g}, the loaders' measured ratio: {LC.rates_text(rates)} ({source})"
    choice = D.broadcast_object(LC.decide(rates), dist)  # rank 0's decision, for every rank
    return _apply(d, choice), f"auto: {LC.describe_choice(choice, rates.device)}: {choice.why} ({source})"


def picker(cfg: Config, dist: D.DistInfo, layout: Layout, ck: dict | None):
    """The Pick `fasttrain train` hands build_loaders."""
    def pick(train: Split, val: Split, workers: int, batch: int) -> tuple[DataConfig, str]:
        return choose(cfg, dist, layout, ck, train, val, workers, batch)
    return pick


# -- fasttrain tune ----------------------------------------------------------------------------------------

def tune_command(cfg: Config, quick: bool = False) -> int:
    """Measure every path thoroughly (DALI's settings too; the compiled model with --compile), print the
    table and the choice, write the profile `fasttrain train --loader auto` then reuses. `quick`: the brief
    measurement a run makes instead."""
    from .launch import preflight, use_demo_data
    from .train import process_state  # train.py imports this module: not at its top
    preflight(cfg)
    if cfg.data.data is None:
        cfg = use_demo_data(cfg)  # a new Config (the caller's is left as it is)
    if cfg.data.auto_augment or cfg.data.randaugment:
        raise UserError("--auto-augment/--randaugment train with the torchvision loader only: nothing to tune")
    dist = D.setup(cfg.dist, cfg.run.device)
    try:
        with process_state():  # cuDNN's flag and torch's threads back as they were
            return _tune(cfg, dist, quick)
    finally:
        D.teardown(dist)


def _tune(cfg: Config, dist: D.DistInfo, quick: bool) -> int:
    """tune_command's measuring and report, on this process's ranks."""
    from .config import resolve_toggles
    from .data import dali_backend
    from .data.scan import scan_dataset
    from .train import AMP_DTYPES
    cpu_share.apply(dist.local_world_size)
    cfg = dataclasses.replace(cfg, run=resolve_toggles(cfg.run, dist.device.type))
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    layout = Layout(dist.device, cfg.run.channels_last, AMP_DTYPES[cfg.run.amp] or torch.float32)
    workers, _ = cpu_share.workers_per_process(cfg.data.workers, dist.local_world_size)
    batch = dist.per_rank_batch(cfg.data.batch_size)
    train, val = scan_dataset(cfg.data.data, cfg.data.file_list)
    paths = ["torchvision"] + (["dali", "hybrid"] if dali_backend.available() else [])
    if dist.is_main:
        print(f"fasttrain tune: {cfg.model.arch} at {Resolution.from_config(cfg.data)(0)} px, batch {batch} per "
              f"process x {dist.world_size}, {dist.device}, {workers} workers per process, amp {cfg.run.amp}, "
              f"channels_last {cfg.run.channels_last}, compile {cfg.run.compile}; measuring "
              f"{', '.join(LC.display(p, dist.device.type) for p in paths)}", flush=True)
    rates = measure(cfg, dist, layout, train, val, workers, batch, paths, BRIEF if quick else THOROUGH,
                    compiled=not quick, seed=cfg.run.seed or 0)
    if rates is None:
        raise UserError("the model step could not be timed (see the warning above)")
    key = profile_key(cfg, dist, workers, batch)
    if dist.is_main:
        where = LC.save_profile(key, rates)
        choice = LC.decide(rates)
        print(LC.table(rates), flush=True)
        print(f"fasttrain tune: --loader auto takes {LC.describe_choice(choice, rates.device)}: {choice.why}; "
              f"measured in {rates.seconds:.1f}s ({LC.phases_text(rates)})", flush=True)
        print(f"fasttrain tune: profile written to {where}" if where else
              "fasttrain tune: warning: the profile could not be written (cache folder not writable)", flush=True)
    return 0

