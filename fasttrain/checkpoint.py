"""Checkpoints: written atomically by rank 0, holding everything an exact resume needs.

Keys the reference script writes (`epoch, arch, state_dict, best_acc1, optimizer, scheduler`) keep their
meaning (`epoch` = the next epoch to run), so its tools can read ours; fasttrain adds `step` (steps done in
that epoch), `scaler`, `rng` (every rank's generators), `data` (loader position), `classes`, `config`,
`val_top1` (this model's own val accuracy, for `fasttrain eval`), `ema` (with --ema: the averaged weights,
a state_dict with the model's keys), `wall_seconds` (the run's wall time so far, across resumes).

A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the old one: a crash
or kill -9 at any moment leaves either the old or the new checkpoint, both whole.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from .errors import UserError

LATEST, BEST = "checkpoint.pth.tar", "model_best.pth.tar"


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load(path: str) -> dict:
    """Load a checkpoint to the CPU, or a one-line error saying why not."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist (to start from scratch, drop --resume; "
                        "--resume auto resumes only if OUTPUT_DIR/checkpoint.pth.tar exists)")
    try:
        # Our own file (it holds numpy RNG state), so not weights_only. Load only checkpoints you trust.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                        "it may be truncated or not a PyTorch file") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} has no state_dict: not a fasttrain or reference checkpoint")
    return ckpt


def check_compatible(ckpt: dict, path: str, arch: str, num_classes: int) -> None:
    if ckpt.get("arch", arch) != arch:
        raise UserError(f"checkpoint {path} is for arch {ckpt['arch']}, not {arch}: pass -a {ckpt['arch']}")
    for key in ("fc.weight", "classifier.weight", "head.weight", "heads.head.weight", "classifier.1.weight",
                "classifier.3.weight", "classifier.6.weight"):
        w = ckpt["state_dict"].get(key)
        if w is not None and w.shape[0] != num_classes:
            raise UserError(f"checkpoint {path} has {w.shape[0]} classes but the dataset has {num_classes}: "
                            "resume on the same dataset, or fine-tune with --weights instead")
    classes = ckpt.get("classes")
    if classes is not None and len(classes) != num_classes:
        raise UserError(f"checkpoint {path} has {len(classes)} classes but the dataset has {num_classes}")
