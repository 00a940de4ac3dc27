"""The rules a Config must keep (ranges, and options that contradict each other): `validate` raises UserError
with one line that says which option and why, and changes nothing. config.build_config calls it, so a
bad value from the command line or a TOML file stops a run before any data is read.

    validate(cfg)                  # raises UserError("--lr must be positive, got -0.1")
    profile_window("20:30")        # (20, 30): --profile's steps, also read by watch.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError, check_counts

if TYPE_CHECKING:
    from .config import Config


def validate(cfg: Config) -> None:
    """Raise UserError for a bad combination of options; changes nothing."""
    check_counts(("--batch-size", cfg.data.batch_size, 1), ("--workers", cfg.data.workers, 0),
                 ("--image-size", cfg.data.image_size, 16, " pixels"))
    if cfg.optim.epochs < 1 and not cfg.run.evaluate:
        raise UserError(f"--epochs must be at least 1, got {cfg.optim.epochs}")
    if cfg.optim.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.optim.lr}")
    if not 0.0 <= cfg.data.hw_decoder_load <= 1.0:
        raise UserError(f"--hw-decoder-load must be between 0 and 1, got {cfg.data.hw_decoder_load}")
    if not 0.0 <= cfg.data.dali_share < 1.0:
        raise UserError(f"--dali-share must be at least 0 (0 = measured) and below 1, got {cfg.data.dali_share}")
    check_counts(("--print-freq", cfg.run.print_freq, 1))
    validate_recipe_knobs(cfg)
    if cfg.run.profile is not None:
        profile_window(cfg.run.profile)  # a malformed window is an error now, not after the data is scanned
    if cfg.run.resume == "auto" and not cfg.run.output_dir:
        raise UserError("--resume auto continues the run in --output-dir, and without it each run gets a new "
                        "folder (runs/<arch>-<timestamp>): pass the same --output-dir DIR on every (re)start")
    if cfg.model.pretrained and not cfg.model.weights:
        raise UserError("--pretrained would download weights, and fasttrain downloads nothing: "
                        "pass the weights file with --weights PATH")
    if cfg.dist.gpu is not None and cfg.run.device == "cpu":
        raise UserError(f"--gpu {cfg.dist.gpu} and --device cpu contradict each other: drop one")
    validate_knobs(cfg)


def validate_knobs(cfg: Config) -> None:
    """The training knobs of issue 14 (timm's): ranges, and which loader can apply the per-image ones."""
    d, o = cfg.data, cfg.optim
    check_counts(("--val-steps", d.val_steps, 0), ("--clip-grad", o.clip_grad, 0), ("--mixup", o.mixup, 0),
                 ("--cutmix", o.cutmix, 0), ("--steps-per-epoch", d.steps_per_epoch, 0),
                 ("--max-bad-files", d.max_bad_files, 0), ("--checkpoint-interval", cfg.run.checkpoint_interval, 0),
                 ("--start-epoch", o.start_epoch, 0), ("--warmup-epochs", o.warmup_epochs, 0),
                 ("--momentum", o.momentum, 0), ("--wd", o.weight_decay, 0))
    if cfg.run.loss_scale < 0 or (cfg.run.loss_scale and cfg.run.amp != "fp16"):
        raise UserError(f"--loss-scale is fp16's static loss scale (e.g. 1024, or 0 = dynamic): it needs --amp fp16 "
                        f"and a value above 0, got {cfg.run.loss_scale:g} with --amp {cfg.run.amp}")
    if o.optim_impl != "auto" and o.optimizer not in ("sgd", "adamw"):
        raise UserError(f"--optim-impl picks torch's SGD or AdamW kernels; --opt {o.optimizer} has its own update "
                        "(with --compile-step it is compiled): drop --optim-impl")
    if not 0.0 <= o.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1) (0.1 is usual), got {o.label_smoothing}")
    check_counts(("--prefetch", d.prefetch, 1), ("--num-classes", d.num_classes, 1),
                 ("--grad-accum-steps", o.grad_accum_steps, 1))
    if not 0 <= cfg.data.randaugment <= 30:
        raise UserError(f"--randaugment is RandAugment's magnitude, 0 to 30, got {cfg.data.randaugment}")
    if cfg.data.auto_augment and cfg.data.randaugment:
        raise UserError("--auto-augment and --randaugment are two policies for the same step: pick one")
    loader = "synthetic" if cfg.data.dummy else cfg.data.loader
    if (cfg.data.auto_augment or cfg.data.randaugment) and loader in ("dali", "hybrid", "synthetic"):
        what = "--dummy's synthetic batches have no images to augment" if loader == "synthetic" else \
            "fasttrain's DALI pipeline has no AutoAugment/RandAugment"
        raise UserError(f"--auto-augment and --randaugment are torchvision's, applied in the torchvision loader; "
                        f"{what}: use --loader torchvision (or leave --loader auto)")


def profile_window(spec: str) -> tuple[int, int]:
    """--profile A:B -> (A, B): the steps with 0-based index A..B-1 of an epoch, as a Python slice."""
    a, sep, b = spec.partition(":")
    if sep and a.strip().isdigit() and b.strip().isdigit() and int(a) < int(b):
        return int(a), int(b)
    raise UserError(f"--profile must be START:END train steps of the first epoch with START < END, e.g. 20:30 "
                    f"(steps 20..29, counted from 0), got {spec!r}")


def validate_recipe_knobs(cfg: Config) -> None:
    """Progressive resizing, validation size, LR schedule, EMA: the options recipes set."""
    d, o = cfg.data, cfg.optim
    if bool(d.min_res) != bool(d.max_res):
        raise UserError("progressive resizing needs both --min-res and --max-res (or neither)")
    if d.min_res and not 16 <= d.min_res <= d.max_res:
        raise UserError(f"--min-res must be at least 16 and at most --max-res, got {d.min_res} and {d.max_res}")
    if d.start_ramp < 0 or d.end_ramp < d.start_ramp:
        raise UserError(f"--end-ramp must be at least --start-ramp (>= 0), got {d.start_ramp} and {d.end_ramp}")
    check_counts(("--res-step", d.res_step, 1))
    if d.val_res and d.val_res < 16:
        raise UserError(f"--val-res must be at least 16 pixels (or 0), got {d.val_res}")
    if not 0.0 < d.val_crop_ratio <= 1.0:
        raise UserError(f"--val-crop-ratio must be in (0, 1], got {d.val_crop_ratio}")
    if o.lr_per_256 < 0:
        raise UserError(f"--lr-per-256 must be positive (or 0 = off), got {o.lr_per_256}")
    if o.lr_schedule == "triangular":
        if o.warmup_epochs:
            raise UserError("--lr-schedule triangular warms up to --lr-peak-epoch: drop --warmup-epochs")
        if not 0 <= o.lr_peak_epoch < o.epochs and not cfg.run.evaluate:
            raise UserError(f"--lr-peak-epoch must be at least 0 and below --epochs ({o.epochs}), "
                            f"got {o.lr_peak_epoch}")
    if not 0.0 <= o.ema < 1.0:
        raise UserError(f"--ema is a decay in [0, 1) (e.g. 0.9999; 0 = off), got {o.ema}")
