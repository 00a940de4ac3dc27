"""One scan of an ImageFolder tree: the class list and the (path, label) list every backend reads.

Labels follow torchvision's ImageFolder exactly (sorted first-level folders; files found recursively,
walked in sorted order; the same extensions, case-insensitive), so a model trained by fasttrain and one
trained by the reference script agree on what label 7 means. Both the torchvision and the DALI backends
are fed from this list, so they see the same files with the same labels. Where ImageFolder would fail
later or silently, the scan fails now with a message that says what to fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Split:
    root: str
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]  # (absolute path, label); from tar shards (shards.Member, label)
    sharded: bool = False                 # read from `fasttrain shard`'s tar shards (data/shards.py)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _is_image(name: str) -> bool:
    # ImageFolder's test exactly: the extension, nothing else. Hidden files (`.x.jpg`, macOS's `._x.jpg`) and
    # files in hidden subfolders count, as they do there; one that is not an image is a bad file at training
    # time (skipped with a warning), as `fasttrain check-data` reports it beforehand.
    return name.lower().endswith(IMG_EXTENSIONS)


def _problem(message: str, problems: list[str] | None) -> None:
    """A tree error: raised at once (training), or noted and the scan goes on (check-data reports them all)."""
    if problems is None:
        raise UserError(message)
    problems.append(message)


def scan_split(root: str, allowed: set[str] | None = None, problems: list[str] | None = None) -> Split:
    """Scan one split folder (DATA/train or DATA/val). With `problems`, tree errors are appended there and
    the scan keeps what it can (a missing folder is an empty split; an empty or hidden class is left out)."""
    empty = Split(root=os.path.abspath(root), classes=(), samples=())
    if not os.path.isdir(root):
        _problem(f"{root} is not a folder: DATA must hold train/ and val/ in ImageFolder layout "
                 "(DATA/train/<class>/<image>.jpg)", problems)
        return empty
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        _problem(f"{root} has no class folders: put each class's images in {root}/<class>/", problems)
        return empty
    hidden = [c for c in classes if c.startswith(".")]
    if hidden:
        _problem(f"{root} has hidden folder(s) {', '.join(hidden)} that ImageFolder would count as "
                 "classes: remove or move them out of the dataset", problems)
        classes = [c for c in classes if not c.startswith(".")]
    samples, kept = [], []
    for cls in classes:
        found = []
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.abspath(os.path.join(dirpath, fname))
                if _is_image(fname) and (allowed is None or path in allowed):
                    found.append(path)
        if not found:
            _problem(f"class folder {os.path.join(root, cls)} has no images (extensions: "
                     f"{', '.join(IMG_EXTENSIONS)}): add images or remove the folder", problems)
            continue
        samples += [(path, len(kept)) for path in found]
        kept.append(cls)
    return Split(root=os.path.abspath(root), classes=tuple(kept), samples=tuple(samples))


def read_file_list(path: str) -> set[str]:
    """A --file-list: one path per line (absolute, or relative to the list's folder); '#' comments."""
    try:
        with open(path) as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as e:
        raise UserError(f"cannot read --file-list {path}: {e.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    return {os.path.abspath(os.path.join(base, ln)) for ln in lines if ln and not ln.startswith("#")}


def scan_dataset(data: str, file_list: str | None = None, problems: list[str] | None = None) -> tuple[Split, Split]:
    """Scan DATA/train and DATA/val; their class lists must be the same. With `problems`, every tree error is
    appended there instead of raised, and the splits hold what could be scanned. DATA may also be the output
    of `fasttrain shard`: then the samples are byte ranges of its tar shards, in the folder's order."""
    from . import shards
    if shards.is_sharded(data):
        return shards.read_sharded(data, file_list)
    if shards.unfinished(data):
        raise UserError(f"{data} is an unfinished `fasttrain shard` output (no {shards.MANIFEST} yet): run the "
                        "same `fasttrain shard DATA OUT` again to finish it")
    if not os.path.isdir(data):  # nothing to go on with, even for check-data
        raise UserError(f"dataset folder {data} does not exist (expected DATA/train and DATA/val)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data, split)):
            _problem(f"{data} has no {split}/ folder: DATA must hold train/ and val/ in ImageFolder layout",
                     problems)
    allowed = read_file_list(file_list) if file_list else None
    train = scan_split(os.path.join(data, "train"), allowed, problems)
    val = scan_split(os.path.join(data, "val"), allowed, problems)
    if train.classes != val.classes and train.classes and val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        _problem(f"train/ and val/ have different classes (only in train: {only_t[:5] or 'none'}; "
                 f"only in val: {only_v[:5] or 'none'}): both need the same class folders", problems)
    return train, val
