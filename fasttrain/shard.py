"""`fasttrain shard DATA OUT`: an ImageFolder tree as tar shards (WebDataset's layout) that both loaders read.

    fasttrain shard /data/imagenet /scratch/imagenet-shards -j 16     # shards of ~256 MB
    fasttrain shard /data/imagenet /scratch/imagenet-448 --max-side 448   # pre-resized: cheaper decodes
    fasttrain train /scratch/imagenet-shards -a resnet50 ...           # trains as from the folder

For each good file, KEY.<ext> (the file's own bytes, not re-encoded; ext from its content: jpg, png, ...)
and KEY.cls (its label) in OUT/{train,val}/shard-NNNNNN.tar, DALI's index beside each shard, OUT/classes.json
and OUT/manifest.json (the layout: data/shards.py). Each file gets check-data's checks (a full decode, its
size) and, for a JPEG, the structural check that keeps DALI's parser from crashing (data/jpeg_check.py) on
the way: one that fails is printed and listed in the manifest, not written. With --max-side N, an image
longer than N px on a side is written as a JPEG scaled to N px there (--quality, default 90: data/resize.py);
the others keep their own bytes. The manifest records N, the quality, how many were resized and the image
bytes before and after.

Deterministic: which file goes to which shard, and where, depends only on the files' paths and sizes (with
--max-side, --shard-size counts the files' own sizes, so shards come out smaller), every tar header is fixed
(ustar, mtime 0, uid/gid 0, mode 0644, no user names) and JPEG encoding is deterministic, so the same DATA
gives byte-identical shards whatever -j is. Atomic: a shard is written under a temporary name, fsynced, then
renamed (its index first, the tar last), and a record of it goes to OUT/.partial/; the manifest is written
last. A killed job leaves whole shards under their final names, temporary files, and no manifest, so nothing
takes OUT for a dataset; the same command again keeps the shards its records vouch for and writes the rest.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from .data import shards as S
from .data.resize import resize_options, resized
from .errors import UserError

BLOCK, RECORD = 512, 10240  # tar's block, and the record size tarfile and GNU tar pad an archive to
SHARD_NAME = re.compile(r"shard-(\d{6})\.(tar|idx)$")


@dataclass(frozen=True)
class Item:
    rel: str        # path relative to DATA: what the report names
    path: str
    key: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Plan:
    """One shard to write: its samples in tar order."""
    split: str
    index: int
    items: tuple[Item, ...]
    checks: tuple[int, int]  # (min_side, max_pixels)
    resize: tuple[int, int] = (0, 0)  # (--max-side, --quality); max side 0: every file's own bytes

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}"

    def fingerprint(self) -> str:
        """What the shard's bytes depend on (and the mtimes, so an edited file is written again)."""
        h = hashlib.sha256(f"{S.FORMAT} v{S.VERSION} {self.name} {self.checks}\n".encode())
        if self.resize[0]:  # re-encoded bytes depend on the settings and on the encoder's version
            from PIL import __version__ as pillow
            h.update(f"resize {self.resize} Pillow {pillow}\n".encode())
        for it in self.items:
            h.update(f"{it.rel}\0{it.key}\0{it.label}\0{it.size}\0{it.mtime_ns}\n".encode())
        return h.hexdigest()


def _spread(rel: str) -> bytes:
    """The order samples go into shards: a hash of the path, so every shard holds every class (what a
    streaming reader's shuffle buffer needs), and a file added later moves few others."""
    return hashlib.blake2b(rel.encode(), digest_size=8).digest()


def _tar_bytes(size: int) -> int:
    return 3 * BLOCK + -(-size // BLOCK) * BLOCK  # image header + data, cls header + one block of data


def plan_split(data: str, name: str, split, shard_bytes: float, checks: tuple[int, int],
               resize: tuple[int, int] = (0, 0)):
    """(shard plans, first key of each class, key digits) of one split."""
    digits = max(S.KEY_DIGITS, len(str(len(split) - 1)))
    items, first = [], {}
    for i, (path, label) in enumerate(split.samples):  # ImageFolder's order: a class's files together
        first.setdefault(label, i)
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = 0, 0  # written as unreadable when its turn comes
        items.append(Item(os.path.relpath(path, data), path, S.key_of(i, digits), label, size, mtime))
    plans, current, used = [], [], 0
    for it in sorted(items, key=lambda it: _spread(it.rel)):
        if current and used + _tar_bytes(it.size) > shard_bytes:
            plans.append(Plan(name, len(plans), tuple(current), checks, resize))
            current, used = [], 0
        current.append(it)
        used += _tar_bytes(it.size)
    if current:
        plans.append(Plan(name, len(plans), tuple(current), checks, resize))
    return plans, [first[c] for c in range(len(split.classes))], digits


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _ext(data: bytes, path: str) -> str:
    """The member's extension from what the file holds (ImageNet has PNG data named .JPEG)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    ext = os.path.splitext(path)[1][1:].lower()
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)


def check_sample(item: Item, checks: tuple[int, int]) -> tuple[bytes | None, dict]:
    """(the file's bytes, or None when it is bad; check-data's result for it)."""
    from .data.check import check_bytes, check_file
    from .data.jpeg_check import jpeg_problem_bytes
    try:
        with open(item.path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None, check_file(item.path, *checks)  # says why, as check-data does
    result = check_bytes(item.path, data, *checks)
    if not result["error"] and data[:2] == b"\xff\xd8":
        result["error"] = jpeg_problem_bytes(data)
    return (None if result["error"] else data), result


class _TarWriter:
    """A tar file written member by member, hashed on the way; offsets of each member's data."""

    def __init__(self, fh):
        self.fh, self.sha, self.offset = fh, hashlib.sha256(), 0

    def _put(self, b: bytes) -> None:
        self.fh.write(b)
        self.sha.update(b)
        self.offset += len(b)

    def add(self, name: str, data: bytes) -> int:
        self._put(_header(name, len(data)))
        at = self.offset
        self._put(data)
        self._put(bytes(-len(data) % BLOCK))
        return at

    def finish(self) -> None:
        self._put(bytes(2 * BLOCK))  # the end-of-archive marker
        self._put(bytes(-self.offset % RECORD))


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard(plan: Plan, out: str) -> dict:
    """Check and write one shard and its index; returns (and records in OUT/.partial/) what it holds."""
    tar_path, idx_path = (os.path.join(out, f"{plan.name}.{e}") for e in ("tar", "idx"))
    lines, bad, info, per_class = [], [], [], collections.Counter()
    sizes = {"resized": 0, "bytes_in": 0, "bytes_out": 0}  # image bytes of the written samples, as read and as written
    tmp = f"{tar_path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        tar = _TarWriter(fh)
        for it in plan.items:
            data, result = check_sample(it, plan.checks)
            if data is None:
                bad.append({"path": it.rel, "error": result["error"]})
                continue
            small, error = resized(data, *plan.resize, min_side=plan.checks[0])
            if error:
                bad.append({"path": it.rel, "error": error})
                continue
            sizes["bytes_in"] += len(data)
            if small is not None:
                data = small
                sizes["resized"] += 1
            sizes["bytes_out"] += len(data)
            if result["info"]:
                info.append({"path": it.rel, "info": result["info"]})
            ext, cls = _ext(data, it.path), str(it.label).encode()
            at = tar.add(f"{it.key}.{ext}", data)
            cls_at = tar.add(f"{it.key}.cls", cls)
            lines.append(S.index_line(it.key, ext, at, len(data), cls_at, len(cls)))
            per_class[it.label] += 1
        tar.finish()
        fh.flush()
        os.fsync(fh.fileno())
    record = {"fingerprint": plan.fingerprint(), "samples": len(lines), "bad": bad, "info": info,
              "per_class": sorted(per_class.items()), **sizes}
    if lines:
        index = f"{S.IDX_VERSION} {len(lines)}\n{''.join(lines)}".encode()
        _write_atomic(idx_path, index)
        os.replace(tmp, tar_path)  # last: a shard under its own name is a whole one
        record.update(tar=f"{plan.name}.tar", idx=f"{plan.name}.idx", bytes=tar.offset, sha256=tar.sha.hexdigest(),
                      idx_bytes=len(index), idx_sha256=hashlib.sha256(index).hexdigest())
    else:  # every file bad: no shard
        os.remove(tmp)
    _write_atomic(_record_path(out, plan), json.dumps(record).encode())
    return record


def _record_path(out: str, plan: Plan) -> str:
    return os.path.join(out, S.PARTIAL, f"{plan.split}-{plan.index:06d}.json")


def _kept(out: str, plan: Plan) -> dict | None:
    """The record of a shard an earlier run of this job wrote, if its files are still whole and the same."""
    try:
        with open(_record_path(out, plan)) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != plan.fingerprint():
        return None
    if record["samples"]:
        for name, size in ((record["tar"], record["bytes"]), (record["idx"], record["idx_bytes"])):
            try:
                if os.path.getsize(os.path.join(out, name)) != size:
                    return None
            except OSError:
                return None
    return record


def _clean(out: str, keep: set[str] | None = None) -> None:
    """Remove the temporary files of killed runs; given `keep`, also the shards of ours not in it (an
    earlier run's, of another DATA or shard size). Nothing else in OUT is touched."""
    for split in ("train", "val", S.PARTIAL):
        folder = os.path.join(out, split)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            ours = split != S.PARTIAL and SHARD_NAME.match(name)
            if ".tmp." in name or (keep is not None and ours and f"{split}/{name}" not in keep):
                os.remove(os.path.join(folder, name))


def _check_paths(data: str, out: str) -> None:
    d, o = os.path.realpath(data), os.path.realpath(out)
    if o == d or o.startswith(d + os.sep):
        raise UserError(f"OUT ({out}) must be outside DATA ({data}): shards inside the tree would be scanned as "
                        "part of it")
    if S.is_sharded(data):
        raise UserError(f"{data} is already a sharded dataset; `fasttrain shard` takes an ImageFolder tree")


def shard_command(ns: argparse.Namespace) -> int:
    from .data.check import check_options
    from .data.scan import scan_dataset
    if ns.shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of MB, got {ns.shard_size}")
    check_options(ns)
    resize = resize_options(ns)
    _check_paths(ns.data, ns.out)
    t0 = time.perf_counter()
    train, val = scan_dataset(ns.data)
    checks = (ns.min_side, ns.max_pixels)
    plans, layout = [], {}
    for name, split in (("train", train), ("val", val)):
        p, first, digits = plan_split(ns.data, name, split, ns.shard_size * 1e6, checks, resize)
        plans += p
        layout[name] = {"class_first_key": first, "key_digits": digits, "scanned": len(split)}
    fingerprint = hashlib.sha256(" ".join(p.fingerprint() for p in plans).encode()).hexdigest()
    if _complete(ns.out, fingerprint):
        print(f"fasttrain: {ns.out} already holds these shards, complete: nothing to do", file=sys.stderr)
        return 0
    try:
        for split in ("train", "val", S.PARTIAL):
            os.makedirs(os.path.join(ns.out, split), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write shards into {ns.out}: {e.strerror}") from None
    for name in (S.MANIFEST, S.CLASSES):  # from here on OUT is unfinished (.partial/ and no manifest)
        if os.path.exists(os.path.join(ns.out, name)):
            os.remove(os.path.join(ns.out, name))
    _clean(ns.out)
    records, kept = _write_all(plans, ns.out, ns.workers)
    _clean(ns.out, keep={r[k] for r in records.values() if r["samples"] for k in ("tar", "idx")})
    manifest = _manifest(ns, train.classes, plans, records, layout, fingerprint)
    _write_atomic(os.path.join(ns.out, S.CLASSES), json.dumps(list(train.classes), indent=1).encode())
    _write_atomic(os.path.join(ns.out, S.MANIFEST), json.dumps(manifest, indent=1).encode())  # the last word
    shutil.rmtree(os.path.join(ns.out, S.PARTIAL))
    _summary(ns, manifest, kept, time.perf_counter() - t0)
    return 0


def _complete(out: str, fingerprint: str) -> bool:
    """OUT holds a finished job of this very plan, every shard still of its recorded size."""
    if not S.is_sharded(out):
        return False
    try:
        manifest = S.load_manifest(out)
    except UserError:
        return False
    if manifest.get("plan") != fingerprint:
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    paths = [(os.path.join(out, s["tar"]), s["bytes"]) for s in shards]
    return all(os.path.isfile(p) and os.path.getsize(p) == size for p, size in paths)


def _write_all(plans: list[Plan], out: str, workers: int) -> tuple[dict[str, dict], int]:
    """Every shard's record, writing those no earlier run left whole. Progress: a bar on a terminal, a
    line per shard otherwise."""
    from tqdm import tqdm
    records = {p.name: r for p in plans if (r := _kept(out, p)) is not None}
    todo = [p for p in plans if p.name not in records]
    total = sum(len(p.items) for p in plans)
    bar = tqdm(total=total, initial=total - sum(len(p.items) for p in todo), unit="img", desc="fasttrain shard",
               dynamic_ncols=True, disable=not sys.stderr.isatty())

    every = max(1, len(plans) // 100)

    def done(plan: Plan, record: dict) -> None:
        records[plan.name] = record
        for b in record["bad"]:
            print(f"bad: {b['path']}: {b['error']}", flush=True)
        bar.update(len(plan.items))
        if bar.disable and (len(records) % every == 0 or len(records) == len(plans)):  # ~100 lines in a log
            print(f"fasttrain: {plan.name}.tar: {record['samples']} samples, {record.get('bytes', 0) / 1e6:.1f} MB "
                  f"[{len(records)}/{len(plans)}]", file=sys.stderr, flush=True)
    try:
        if workers == 1:
            for p in todo:
                done(p, write_shard(p, out))
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(write_shard, p, out): p for p in todo}
                for f in as_completed(futures):
                    done(futures[f], f.result())
    finally:
        bar.close()
    return records, len(plans) - len(todo)


def _manifest(ns, classes, plans: list[Plan], records: dict[str, dict], layout: dict, fingerprint: str) -> dict:
    splits, bad, info = {}, [], []
    max_side, quality = plans[0].resize if plans else (0, 0)
    resize = {"max_side": max_side or None, "quality": quality or None, "resized": 0, "bytes_before": 0,
              "bytes_after": 0}
    for name in ("train", "val"):
        per_class, shards = [0] * len(classes), []
        for p in (p for p in plans if p.split == name):
            r = records[p.name]
            for mine, theirs in (("resized", "resized"), ("bytes_before", "bytes_in"), ("bytes_after", "bytes_out")):
                resize[mine] += r.get(theirs, 0)  # records of an older fasttrain have no sizes
            bad += r["bad"]
            info += r["info"]
            for label, n in r["per_class"]:
                per_class[label] += n
            if r["samples"]:
                shards.append({k: r[k] for k in ("tar", "idx", "samples", "bytes", "sha256", "idx_bytes",
                                                 "idx_sha256")})
        splits[name] = {"samples": sum(per_class), **layout[name], "per_class": per_class, "shards": shards}
    return {"format": S.FORMAT, "version": S.VERSION, "source": os.path.abspath(ns.data), "plan": fingerprint,
            "shard_size_mb": ns.shard_size, "checks": {"min_side": ns.min_side, "max_pixels": ns.max_pixels},
            "resize": resize, "num_classes": len(classes), "splits": splits, "bad": sorted(bad, key=lambda b: b["path"]),
            "info": sorted(info, key=lambda i: i["path"])}


def _summary(ns, manifest: dict, kept: int, seconds: float) -> None:
    sp = manifest["splits"]
    shards = [s for v in sp.values() for s in v["shards"]]
    mb = sum(s["bytes"] for s in shards) / 1e6
    images = sp["train"]["samples"] + sp["val"]["samples"]
    rs = manifest["resize"]
    if rs["max_side"]:
        print(f"fasttrain: --max-side {rs['max_side']}: resized {rs['resized']} of {images} images (JPEG quality "
              f"{rs['quality']}; the others kept as they are); image bytes {rs['bytes_before'] / 1e6:.1f} MB -> "
              f"{rs['bytes_after'] / 1e6:.1f} MB", file=sys.stderr)
    print(f"fasttrain: wrote {sp['train']['samples']} train + {sp['val']['samples']} val images of "
          f"{manifest['num_classes']} classes as {len(shards)} shards ({mb:.1f} MB) in {ns.out}, "
          f"{seconds:.1f}s ({mb / seconds:.1f} MB/s, {images / seconds:.0f} img/s)"
          + (f"; {kept} shard(s) kept from the earlier, unfinished run" if kept else ""), file=sys.stderr)
    if manifest["bad"]:
        print(f"fasttrain: {len(manifest['bad'])} bad file(s) left out (listed above, and in "
              f"{os.path.join(ns.out, S.MANIFEST)})", file=sys.stderr)
    print(f"fasttrain: train on it with `fasttrain train {ns.out}`", file=sys.stderr)
