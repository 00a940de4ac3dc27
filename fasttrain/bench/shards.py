"""`fasttrain bench --shards`: the loader-only section also reads the same images from tar shards.

    fasttrain bench --shards --sections loader            # generated JPEGs, sharded into the cache
    fasttrain bench /data/subset --shards /scratch/subset-shards --sections loader
    fasttrain bench --like imagenet --shards --max-side 256 --sections loader   # full-size against pre-resized

Each of fasttrain's loaders gets a "-shards" twin (torchvision-shards, dali-cpu-shards, dali-gpu-shards),
measured right after it, interleaved with it in every repeat, over the same images as `fasttrain shard` wrote
them: the number a user needs to decide whether to shard. Without a DIR, DATA's shards are written (once)
into the cache, next to the generated JPEGs (a `fasttrain shard` of DATA, at its default shard size); with
--max-side N they are written pre-resized (`fasttrain shard --max-side N`), and each twin, named "(max side
N)", then measures decoding the smaller images against the full-size folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os

SUFFIX = "-shards"


def shard_twins(kinds: list[str], fasttrain_loaders: tuple[str, ...]) -> list[str]:
    """`kinds` with each of fasttrain's loaders followed by its shard-reading twin."""
    out = []
    for k in kinds:
        out += [k, k + SUFFIX] if k in fasttrain_loaders else [k]
    return out


def unsharded(kind: str) -> tuple[str, bool]:
    """(the loader, whether it reads the shards) of a bench kind."""
    return (kind[:-len(SUFFIX)], True) if kind.endswith(SUFFIX) else (kind, False)


def bench_shards(root: str, where: str | None = None, max_side: int | None = None) -> str:
    """The shards of DATA `root`: `where` if given (made by `fasttrain shard`), else written into the cache
    (once: a second call finds them complete), pre-resized to `max_side` if given."""
    from ..data.demo import default_root
    from ..shard import shard_command
    if where and where != "auto":
        from ..data.shards import load_manifest
        source = load_manifest(where).get("source")
        if source != os.path.abspath(root):
            print(f"fasttrain bench: note: {where} was sharded from {source}, not from {root}: the two entries "
                  "of a loader read different images", flush=True)
        return where
    tag = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10] + (f"-max{max_side}" if max_side else "")
    out = os.path.join(os.path.dirname(default_root()), f"shards-{os.path.basename(os.path.abspath(root))}-{tag}")
    shard_command(argparse.Namespace(data=root, out=out, shard_size=256.0, workers=os.cpu_count() or 1,
                                     min_side=8, max_pixels=89_478_485, max_side=max_side, quality=None))
    return out
