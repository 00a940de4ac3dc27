"""Tar shards in WebDataset's layout, as `fasttrain shard` writes them, read back as a Split.

    OUT/classes.json                 class names, in ImageFolder's order (label i = classes[i])
    OUT/manifest.json                counts per split and class, shards with sizes and sha256, bad files,
                                     resize settings (--max-side, --quality) and what they resized
    OUT/train/shard-000000.tar       KEY.jpg (the file's bytes, or with --max-side a resized JPEG) + KEY.cls
    OUT/train/shard-000000.idx       DALI's index of it (wds2idx's v1.2 format), for fn.readers.webdataset
    OUT/val/...

KEY is the sample's index in ImageFolder's order over DATA/<split> (zero-padded, the same width across the
split; a bad file keeps its number, so keys have gaps), and the class follows from it: ImageFolder's order
lists each class's files together, so the manifest's `class_first_key` says where each class starts. The
samples are spread over the shards in an order hashed from their paths (each shard holds every class, as
streaming readers with a shuffle buffer need); fasttrain itself does not stream.

How fasttrain reads them (read_sharded): each split becomes the same list of samples an ImageFolder scan
gives, in ImageFolder's order, where each sample names a byte range of a shard (Member) instead of a file.
Both backends, their samplers, the per-rank sharding, exact resume and the bad-file handling are the ones
the folder uses, so a sharded dataset trains exactly as the folder it came from (same batches, same crops)
and keeps every guarantee. A sample's bytes are read with one os.pread on a shard opened once per process:
one open per shard per process instead of one per image, and no per-image metadata lookups.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import json
import os
import threading
from typing import NamedTuple

from ..errors import UserError
from .scan import Split

FORMAT, VERSION = "fasttrain-webdataset", 1
MANIFEST, CLASSES = "manifest.json", "classes.json"
PARTIAL = ".partial"  # per-shard records of an unfinished `fasttrain shard` job (shard.py)
IDX_VERSION = "v1.2"  # DALI's index format, as its wds2idx tool writes it
KEY_DIGITS = 8


class Member(NamedTuple):
    """One sample's image inside a shard: where its bytes are. Stands where an ImageFolder sample has its
    path, and prints as SHARD:KEY (warnings about a bad sample name it so)."""
    shard: str
    offset: int
    size: int
    key: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}"

    def read(self) -> bytes:
        """The image's bytes. Raises OSError (a shard shorter than its index says, or gone)."""
        with _FDS_LOCK:  # a descriptor read while another thread's _fd closes it would be a wrong file
            data = os.pread(_fd(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(0, f"shard ends before this sample ({len(data)} of {self.size} bytes at byte "
                             f"{self.offset}): the shard was cut short, rerun `fasttrain shard`")
        return data


_FDS: collections.OrderedDict[str, int] = collections.OrderedDict()
MAX_OPEN = 256  # shards kept open per process (ImageNet at the default size: ~500); the least recent closes
# The training process reads with two threads at most (-j 0 batches, the check of the files no batch holds:
# base.UnusedFiles): reads go one at a time, each with its descriptor open.
_FDS_LOCK = threading.Lock()


def _fd(path: str) -> int:
    """An open descriptor of `path`, kept for the process's life. pread needs no shared file position, so a
    descriptor a forked DataLoader worker inherits is as good as its own."""
    fd = _FDS.get(path)
    if fd is not None:
        _FDS.move_to_end(path)
        return fd
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    _FDS[path] = fd
    if len(_FDS) > MAX_OPEN:
        os.close(_FDS.popitem(last=False)[1])
    return fd


def key_of(index: int, digits: int) -> str:
    return f"{index:0{digits}d}"


def index_line(key: str, ext: str, offset: int, size: int, cls_offset: int, cls_size: int) -> str:
    """One sample's line of DALI's index: `ext offset size name` for each of its files, tar order."""
    return f"{ext} {offset} {size} {key}.{ext} cls {cls_offset} {cls_size} {key}.cls\n"


def parse_index(path: str) -> list[tuple[str, int, int]]:
    """(key, offset, size) of each sample's image in a shard, from its DALI index file."""
    try:
        with open(path) as fh:
            head, *lines = fh.read().splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read shard index {path} ({e}): rerun `fasttrain shard`") from None
    version, _, count = head.partition(" ")
    if version != IDX_VERSION or not count.isdigit() or int(count) != len(lines):
        raise UserError(f"{path} is not a {IDX_VERSION} index of {len(lines)} samples (first line {head!r}): "
                        "rerun `fasttrain shard`")
    out = []
    try:
        for line in lines:  # `ext offset size name` per file of the sample; fasttrain writes the image first
            parts = line.split(" ")
            if parts[0] == "cls":
                parts = parts[4:8]
            out.append((parts[3].partition(".")[0], int(parts[1]), int(parts[2])))
    except (IndexError, ValueError):
        raise UserError(f"{path}: not an index line of an image and its label: {line!r}") from None
    return out


def is_sharded(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MANIFEST))


def unfinished(root: str) -> bool:
    """An output of `fasttrain shard` that was stopped before it wrote its manifest."""
    return os.path.isdir(os.path.join(root, PARTIAL)) and not is_sharded(root)


def load_manifest(root: str) -> dict:
    try:
        with open(os.path.join(root, MANIFEST)) as fh:
            manifest = json.load(fh)
        with open(os.path.join(root, CLASSES)) as fh:
            classes = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"{root} is not a readable sharded dataset ({e}): rerun `fasttrain shard`") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{root}/{MANIFEST} is not a {FORMAT} v{VERSION} manifest (format "
                        f"{manifest.get('format')!r}, version {manifest.get('version')!r})")
    if len(classes) != manifest["num_classes"]:
        raise UserError(f"{root}/{CLASSES} lists {len(classes)} classes, the manifest {manifest['num_classes']}")
    manifest["classes"] = tuple(classes)
    return manifest


@contextlib.contextmanager
def no_gc():
    """Building a million small tuples triggers the cyclic garbage collector again and again, each pass over
    everything built so far: half of read_split's time at ImageNet's size (benchmarks/RESULTS.md). Tuples
    of ints and strings make no cycles, so nothing is lost by collecting after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_split(root: str, split: str, manifest: dict) -> Split:
    """One split's samples in ImageFolder's order: (Member, label) where the folder has (path, label)."""
    with no_gc():
        return _read_split(root, split, manifest)


def _read_split(root: str, split: str, manifest: dict) -> Split:
    info = manifest["splits"][split]
    first = info["class_first_key"]
    slots = [None] * info["scanned"]  # by key: ImageFolder's order without a sort
    for shard in info["shards"]:
        tar = os.path.abspath(os.path.join(root, shard["tar"]))
        try:
            size = os.stat(tar).st_size
        except OSError:
            size = None
        if size != shard["bytes"]:
            raise UserError(f"shard {tar} is {'missing' if size is None else f'{size} bytes'}, the manifest says "
                            f"{shard['bytes']} bytes: copy it again or rerun `fasttrain shard`")
        members = parse_index(os.path.join(root, shard["idx"]))
        if len(members) != shard["samples"]:
            raise UserError(f"{shard['idx']} indexes {len(members)} samples, the manifest says {shard['samples']}")
        for key, offset, nbytes in members:
            i = int(key)
            if not 0 <= i < len(slots):
                raise UserError(f"{shard['idx']}: key {key} is past the {len(slots)} files the manifest counts")
            slots[i] = (Member(tar, offset, nbytes, key), bisect.bisect_right(first, i) - 1)
    samples = [s for s in slots if s is not None]
    if len(samples) != info["samples"]:  # also a key given twice
        raise UserError(f"{root}: the {split} shards hold {len(samples)} samples, the manifest says {info['samples']}")
    if not samples:
        raise UserError(f"{root}: the {split} split has no samples (every file was bad?): see {MANIFEST}")
    return Split(root=os.path.abspath(os.path.join(root, split)), classes=manifest["classes"], samples=tuple(samples),
                 sharded=True)


def read_sharded(root: str, file_list: str | None = None) -> tuple[Split, Split]:
    """The train and val splits of a `fasttrain shard` output."""
    if file_list:
        raise UserError(f"--file-list picks files of an ImageFolder tree, and {root} is a sharded dataset: its "
                        "bad files were left out when it was written (see its manifest.json)")
    manifest = load_manifest(root)
    return read_split(root, "train", manifest), read_split(root, "val", manifest)
