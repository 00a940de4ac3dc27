"""The run's resolved settings: printed once at start, and written as OUTPUT_DIR/config.toml.

    fasttrain train DATA ...                                   # prints the settings, writes runs/X/config.toml
    fasttrain train --config runs/X/config.toml                # the same run again (or --resume auto it)

A new user cannot see which defaults a run took (the demo trains with lr 0.05, cosine, 10 epochs; a dataset
of one's own goes back to the reference's lr 0.1, step, 90 epochs), so the values that decide a run are
printed, resolved: the seed drawn, the demo's folder, the performance toggles this device got, the workers
and threads each process has. config.toml holds every option under its long flag name (the keys --config
reads), so `--config` accepts it back unchanged and rebuilds the same Config.
"""

from __future__ import annotations

import dataclasses
import json
import os

from .config import EXCLUSIVE, GROUPS, Config, all_fields
from .schedules import Resolution


def toml_key(f: dataclasses.Field) -> str:
    """The TOML key of a field: its first long flag without dashes (`batch-size`), or its name (`data`)."""
    return next((fl[2:] for fl in f.metadata["flags"] if fl.startswith("--")), f.name)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # floats as Python writes them: 0.1, 1e-05, inf are all valid TOML
    # A JSON string is a TOML basic string (the same escapes); ensure_ascii=False keeps characters outside
    # the BMP whole, where JSON would write surrogate pairs that TOML refuses.
    return json.dumps(str(value), ensure_ascii=False)


def to_toml(cfg: Config) -> str:
    """Every option as `key = value`, grouped by section in comments. None ("not set") is left out: TOML has
    no null, and a missing key is the default None again."""
    lines = ["# fasttrain: the resolved settings of this run; `fasttrain train --config config.toml` reads it back"]
    group_now, unused = None, unused_sides(cfg)
    for group, f in all_fields():
        value = getattr(getattr(cfg, group), f.name)
        if value is None or (group, f.name) in unused:
            continue
        if group != group_now:
            lines.append(f"\n# {group}")
            group_now = group
        lines.append(f"{toml_key(f)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def unused_sides(cfg: Config) -> set[tuple[str, str]]:
    """Of each pair of options that say the same thing two ways (config.EXCLUSIVE), the side not in use: the
    plain side (--lr, --image-size) when the opt-in side (--lr-per-256, --min-res/--max-res) is set, else the
    opt-in side. A TOML file that set both would be refused."""
    unused = set()
    for plain, opt_in in EXCLUSIVE:
        used = any(getattr(getattr(cfg, g), n) != getattr(GROUPS[g], n) for g, n in opt_in)
        unused |= plain if used else opt_in
    return unused


def write_toml(cfg: Config, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"  # a reader never sees half a file (output_dir() removes stale ones)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(to_toml(cfg))
    os.replace(tmp, path)


def _on(flag) -> str:
    return "on" if flag else "off"


def describe(cfg: Config, dist, loaders, threads: str, config_path: str | None) -> list[str]:
    """The lines printed at start: what a person needs to know the run is the one they meant."""
    d, o, r = cfg.data, cfg.optim, cfg.run
    world = dist.world_size
    procs = f"{world} process{'es' if world > 1 else ''}"
    accum = f" x {o.grad_accum_steps} accumulated" if o.grad_accum_steps > 1 else ""
    global_batch = loaders.batch * world * o.grad_accum_steps
    if o.lr_schedule == "step":
        sched = "step schedule (0.1x every 30 epochs)"
    elif o.lr_schedule == "triangular":
        sched = f"triangular schedule (peak at epoch {o.lr_peak_epoch:g})"
    else:
        sched = f"{o.lr_schedule} schedule"
    warm = f", warm-up {o.warmup_epochs:g} epoch{'s' if o.warmup_epochs != 1 else ''}" if o.warmup_epochs else ""
    extras = [f"clip-grad {o.clip_grad:g}" if o.clip_grad else "", f"label smoothing {o.label_smoothing:g}"
              if o.label_smoothing else "", f"mixup {o.mixup:g}" if o.mixup else "",
              f"cutmix {o.cutmix:g}" if o.cutmix else "", "no weight decay on BatchNorm and biases"
              if o.no_bn_wd and o.optimizer != "lars" else "", f"EMA {o.ema:g}" if o.ema else ""]
    momentum = f" momentum {o.momentum:g}" if o.optimizer in ("sgd", "lars") else ""
    res = Resolution.from_config(d)
    crops = (f"{d.min_res}-{d.max_res} px crops (progressive, epochs {d.start_ramp}-{d.end_ramp})"
             if res.progressive else f"{d.image_size} px crops")
    crops += f", val {res.val_size} px" + (", flip TTA" if r.val_tta == "flip" else "")
    crops += ", BlurPool" if cfg.model.blurpool else ""
    augment = (f"; AutoAugment {d.auto_augment}" if d.auto_augment else
               f"; RandAugment magnitude {d.randaugment}" if d.randaugment else "")
    val = f" (--val-steps {d.val_steps}: {loaders.val_size} of them)" if d.val_steps else ""
    lines = [
        "settings" + (f" (written to {config_path})" if config_path else "") + ":",
        f"  data     {d.data or 'synthetic'}: {loaders.train_size} train / {loaders.val_size} val images{val}, "
        f"{len(loaders.classes)} classes",
        f"  loader   {loaders.name}, {loaders.workers} worker{'s' if loaders.workers != 1 else ''} per process"
        f"{augment}{loaders.detail}" + (f"\n  choice   {loaders.choice}" if loaders.choice else ""),
        f"  model    {cfg.model.arch}{' from ' + cfg.model.weights if cfg.model.weights else ''}, "
        f"{crops}",
        f"  batch    {global_batch} global = {loaders.batch} per process x {procs}{accum}; {loaders.steps} "
        f"steps an epoch",
        f"  optim    {o.optimizer}{f' ({o.optim_impl})' if o.optim_impl != 'auto' else ''} lr {o.lr:g}"
        f"{momentum} wd {o.weight_decay:g}, {sched}{warm}"
        + "".join(f", {e}" for e in extras if e),
        f"  epochs   {o.epochs}" + (f" (from {o.start_epoch})" if o.start_epoch else ""),
        f"  device   {dist.device}: amp {r.amp}{f' (static loss scale {r.loss_scale:g})' if r.loss_scale else ''}, "
        f"channels_last {_on(r.channels_last)}, compile {r.compile_mode if r.compile else 'off'}"
        f"{f', compiled optimizer step ({r.compile_mode})' if r.compile_step else ''}, cudnn.benchmark "
        f"{_on(r.cudnn_benchmark)}; {threads}",
        f"  seed     {r.seed}",
        f"  output   {r.output_dir}" + (f", resume {r.resume}" if r.resume else ""),
    ]
    return lines
