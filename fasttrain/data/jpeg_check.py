"""A structural check of every JPEG before DALI reads it, because DALI's JPEG parser can kill the process.

DALI 2.4's CPU decoders can crash (SIGSEGV, exit 139) on a JPEG cut off inside its header ("[jpeg_parser]
Invalid marker" first; how often: benchmarks/RESULTS.md), and the same parser runs in front of the GPU
decoder. No error handling can catch a crash, so such files must never reach DALI.
The check reads what the parser reads, without decoding: the marker segments from SOI up to the first SOS
(each segment whole, a frame header before the scan), then an end-of-image marker after the scan (entropy-
coded data cannot hold FF D9: its FF bytes are stuffed). A file that fails is reported like any bad file
(warning naming it, counted against --max-bad-files) and left out of the splits DALI is built from, on every
rank. Files that do not start like a JPEG are not this check's business: DALI reports those itself.

Cost: one small read at each end of each file. The ranks split the files between them and gather what they
found; each rank keeps its findings in the cache folder ($FASTTRAIN_CACHE, as the demo dataset), under a
fingerprint of its files' paths, sizes and modification times, so a later run over the same files costs one
stat per file. Measured figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ..dist import DistInfo, all_gather_object
from ..errors import UserError
from .scan import Split

VERSION = 1  # of the check: a new rule invalidates the caches
HEAD = 16384  # bytes read at a time from the start until the scan begins; most headers fit in the first
TAIL = 4096   # bytes read at the end, where the end-of-image marker is (trailing bytes after it happen)
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # not C4 C8 CC


def jpeg_problem(path: str) -> str | None:
    """Why a file that starts like a JPEG is not a whole one; None when it is whole or not a JPEG at all."""
    try:
        with open(path, "rb") as fh:
            return _problem(fh, os.fstat(fh.fileno()).st_size)
    except OSError:
        return None  # missing or unreadable: the loaders name it (DALI's error is clean for those)


def jpeg_problem_bytes(data: bytes) -> str | None:
    """jpeg_problem of a file's bytes already read (`fasttrain shard` checks each sample it writes)."""
    return _problem(io.BytesIO(data), len(data))


def _problem(fh, size: int) -> str | None:
    head = fh.read(HEAD)
    if head[:2] != b"\xff\xd8":
        return None
    pos, frame = 2, False
    while True:
        while pos + 4 > len(head) and len(head) < size:
            head += fh.read(HEAD)
        if pos + 4 > len(head):
            return f"truncated JPEG: it ends inside its header ({size} bytes)"
        if head[pos] != 0xFF:
            return f"corrupt JPEG header: no marker at byte {pos}"
        marker = head[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, standalone markers
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            return "corrupt JPEG: it ends before its image data"
        length = int.from_bytes(head[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > size:
            return f"truncated JPEG: a header segment runs past the end of the file ({size} bytes)"
        frame |= marker in SOF
        pos += 2 + length
        if marker == 0xDA:
            break
    if not frame:
        return "corrupt JPEG header: no frame header before the image data"
    fh.seek(max(pos, size - TAIL))
    if b"\xff\xd9" in fh.read() or (size - pos > TAIL and _eoi_after(fh, pos)):
        return None
    return "truncated JPEG: no end-of-image marker after the image data"


def _eoi_after(fh, pos: int) -> bool:
    """The end-of-image marker anywhere after `pos` (more than TAIL bytes follow it: rare)."""
    fh.seek(pos)
    return b"\xff\xd9" in fh.read()


def _fingerprint(paths: list[str]) -> str:
    h = hashlib.sha1(f"jpeg-check-v{VERSION}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _cache_file(key: str) -> str:
    from .demo import default_root
    return os.path.join(os.path.dirname(default_root()), "jpeg-check", f"{key}.json")


def _check(paths: list[str], threads: int) -> dict[str, str]:
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]

    def run(chunk):
        return [(p, jpeg_problem(p)) for p in chunk]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # I/O bound: threads overlap the reads
        return {p: why for found in pool.map(run, chunks) for p, why in found if why}


def broken_jpegs(paths: list[str], dist: DistInfo, threads: int) -> dict[str, str]:
    """{path: reason} for every broken JPEG among `paths` (the same on every rank; a collective)."""
    mine = paths[dist.rank::dist.world_size]
    cache = _cache_file(_fingerprint(mine))
    try:
        with open(cache) as fh:
            found = json.load(fh)
    except (OSError, ValueError):
        found = _check(mine, threads)
        try:  # a cache that cannot be written costs the next run a new check, nothing else
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(f"{cache}.tmp.{os.getpid()}", "w") as fh:
                json.dump(found, fh)
            os.replace(f"{cache}.tmp.{os.getpid()}", cache)
        except OSError:
            pass
    return {p: why for part in all_gather_object(found, dist) for p, why in part.items()}


def drop_broken_jpegs(train: Split, val: Split, dist: DistInfo, threads: int, max_bad: int) -> tuple[Split, Split]:
    """The splits without their broken JPEGs, each named in a warning (rank 0) and counted against
    --max-bad-files; past it, the same error the loaders give. Tar shards are not checked again: `fasttrain
    shard` ran this check on every sample it wrote, and left out those that failed."""
    if train.sharded and val.sharded:
        return train, val
    bad = broken_jpegs([p for split in (train, val) for p, _ in split.samples], dist, threads)
    if not bad:
        return train, val
    for i, (path, why) in enumerate(sorted(bad.items())[:max_bad + 1], 1):
        if dist.rank == 0:
            print(f"fasttrain: warning: rank 0: skipped bad file {path}: {why} ({i} of at most {max_bad})",
                  file=sys.stderr, flush=True)
    if len(bad) > max_bad:
        raise UserError(f"more than --max-bad-files={max_bad} files are broken JPEGs ({len(bad)}, e.g. "
                        f"{min(bad)}); run `fasttrain check-data DATA --write-clean-list clean.txt` and train "
                        "with --file-list clean.txt")

    def keep(split: Split) -> Split:
        return Split(split.root, split.classes, tuple(s for s in split.samples if s[0] not in bad))
    return keep(train), keep(val)
