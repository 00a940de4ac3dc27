"""Checkpoint files: what they hold, written atomically, read safely.

Keys the reference script writes (`epoch, arch, state_dict, best_acc1, optimizer, scheduler`) keep their
meaning (`epoch` = the next epoch to run), so its tools can read ours and ours read its; fasttrain adds
`step` (steps done in that epoch), `seed` (the run's seed: data order and augmentation), `scaler`, `rng`
(every rank's generators), `data` (every rank's loader position), `meters`, `skipped_steps`, `classes`,
`config`, `val_top1` (this model's own val accuracy, for `fasttrain eval`), `ema` (with --ema: the averaged
weights, a state_dict with the model's keys).

Everything in a checkpoint is a tensor or a plain Python value (RNG states included), so it loads with
`torch.load(path, weights_only=True)`, and that is the only way fasttrain loads one: a file from elsewhere
cannot run code. A write goes to a temporary file in the same folder, is fsync'ed, then renamed over the
old one: a crash or kill -9 at any moment leaves either the old or the new checkpoint, both whole.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from .errors import UserError

LATEST, BEST = "checkpoint.pth.tar", "model_best.pth.tar"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


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


def to_cpu(obj):
    """A copy of a checkpoint's contents that nothing else refers to: every tensor copied to the CPU (from the
    GPU, or cloned), every container new; plain values as they are. What a background write can take while
    training goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst)


def rng_state(device: torch.device) -> dict:
    """This process's generators as tensors and plain values (numpy's array as a list): weights_only-safe."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _one_line(e: Exception, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def load(path: str, what: str = "checkpoint", mmap: bool = False) -> dict:
    """Load a checkpoint (or weights file) to the CPU with weights_only=True, or a one-line error saying why
    not. A file that holds pickled Python objects (classes, functions) is refused, never executed. `mmap`:
    tensors map the file (copy-on-write) instead of being read into memory at once, where the file allows
    (torch.save's zip format; an old-format file is read whole)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch wraps every unpickling failure of weights_only=True in "Weights only load failed": only an
        # "Unsupported global" is a pickled Python object; anything else (a text file, garbage) is no checkpoint.
        if "Unsupported global" in str(e):
            raise UserError(f"{what} {path} holds pickled Python objects, which fasttrain does not load (they "
                            "could run code): only tensors and plain values, as torch.load(weights_only=True) "
                            "reads them; if you trust the file, re-save just its state_dict") from None
        # The unpickler's own words, without torch's advice to load it with weights_only=False.
        said = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", str(e), re.S)
        why = f"{type(e).__name__}: {' '.join(said.group(1).split())[:160]}" if said else _one_line(e)
        raise UserError(f"{what} {path} cannot be read ({why}); it may be truncated or not a PyTorch file") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def model_state(ckpt: dict, path: str) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint (ours, the reference's, or a bare state_dict), without the
    prefixes wrappers add (the reference saves its DDP/DataParallel module: `module.conv1.weight`)."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict: not a fasttrain or reference checkpoint")
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def resumable(ckpt: dict, path: str) -> dict:
    """`ckpt` with a prefix-free state_dict, if it is a checkpoint a run can continue from."""
    if "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} has no state_dict: not a fasttrain or reference checkpoint "
                        "(to start from bare weights, use --weights)")
    return {**ckpt, "state_dict": model_state(ckpt, path)}


def _gist(names: list[str]) -> str:
    return f"[{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}]"


def check_compatible(ckpt: dict, path: str, arch: str, classes: tuple[str, ...]) -> None:
    """Same arch, same class names in the same order (label i must mean the same class); a checkpoint
    without names (the reference's) is checked by the size of its classifier."""
    if ckpt.get("arch", arch) != arch:
        raise UserError(f"checkpoint {path} is for arch {ckpt['arch']}, not {arch}: pass -a {ckpt['arch']}")
    saved = ckpt.get("classes")
    if saved is not None and list(saved) != list(classes):
        only_ck = [c for c in saved if c not in set(classes)]
        only_data = [c for c in classes if c not in set(saved)]
        diff = (f"only in the checkpoint: {_gist(only_ck)}; only in DATA: {_gist(only_data)}" if only_ck or only_data
                else "the same names in another order")
        raise UserError(f"checkpoint {path} was trained on other classes than DATA has ({len(saved)} against "
                        f"{len(classes)}; {diff}): use the dataset it was trained on, or fine-tune with --weights")
    for key in ("fc.weight", "classifier.weight", "head.weight", "heads.head.weight", "classifier.1.weight",
                "classifier.3.weight", "classifier.6.weight"):
        w = ckpt["state_dict"].get(key)
        if w is not None and w.shape[0] != len(classes):
            raise UserError(f"checkpoint {path} has {w.shape[0]} classes but the dataset has {len(classes)}: "
                            "resume on the same dataset, or fine-tune with --weights instead")
