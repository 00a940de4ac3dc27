"""What reading a sharded dataset's layout costs at the start of a run at ImageNet's size: the index files
of ~500 shards holding 1,281,167 samples, parsed into the train Split both loaders read (data/shards.py:
read_split), its time and the Python memory the sample list takes. No image is read, so the shards are
sparse files of the right sizes; the index lines are what `fasttrain shard` writes.

    .venv/bin/python benchmarks/shard_index_cost.py [SAMPLES] [SHARDS] [REPEATS]

One process, files in the page cache (just written). Results go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc

from fasttrain.data import shards as S


def fake_shards(root: str, samples: int, n_shards: int, classes: int = 1000) -> dict:
    """A manifest (as read by load_manifest) over sparse shards with real index files; ~110 KB images."""
    os.makedirs(os.path.join(root, "train"))
    per, key, infos = -(-samples // n_shards), 0, []
    for i in range(n_shards):
        lines, offset = [], 0
        for _ in range(min(per, samples - key)):
            size = 110_000 + key % 997
            k = S.key_of(key, S.KEY_DIGITS)
            lines.append(S.index_line(k, "jpg", offset + 512, size, offset + 1536 + -(-size // 512) * 512, 3))
            offset += 2048 + -(-size // 512) * 512
            key += 1
        name = f"train/shard-{i:06d}"
        with open(os.path.join(root, name + ".idx"), "w") as fh:
            fh.write(f"{S.IDX_VERSION} {len(lines)}\n{''.join(lines)}")
        with open(os.path.join(root, name + ".tar"), "wb") as fh:
            fh.truncate(offset + 1024)
        infos.append({"tar": name + ".tar", "idx": name + ".idx", "samples": len(lines), "bytes": offset + 1024})
    first = [c * samples // classes for c in range(classes)]
    return {"classes": tuple(f"n{c:08d}" for c in range(classes)),
            "splits": {"train": {"samples": samples, "scanned": samples, "class_first_key": first, "shards": infos}}}


def main(samples: int = 1_281_167, n_shards: int = 500, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as root:
        manifest = fake_shards(root, samples, n_shards)
        for r in range(repeats):
            t0 = time.perf_counter()
            split = S.read_split(root, "train", manifest)
            seconds = time.perf_counter() - t0
            del split
            print(f"run {r}: {samples} samples in {n_shards} shards: read_split {seconds:.2f} s", flush=True)
        tracemalloc.start()
        split = S.read_split(root, "train", manifest)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(f"the Split holds {held / 2**20:.0f} MiB of Python objects ({held / len(split):.0f} bytes a sample)")
        del split
        tracemalloc.start()  # the folder's Split of as many files, at ImageNet's path lengths, for comparison
        folder = tuple((f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG", c) for i in range(samples)
                       for c in [i * 1000 // samples])
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(f"an ImageFolder Split of as many files: {held / 2**20:.0f} MiB ({held / len(folder):.0f} bytes a sample)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
