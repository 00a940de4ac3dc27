"""`fasttrain check-data DATA`: decode every file once, in parallel, and say exactly what is wrong.

    fasttrain check-data /data/imagenet -j 16 --report report.json --write-clean-list clean.txt
    fasttrain train /data/imagenet --file-list clean.txt      # bad files quarantined, dataset untouched

Errors (the file cannot be trained on): unreadable, empty, not an image despite its extension, corrupt or
truncated, smaller than --min-side, more than --max-pixels. Info (decoded fine, converted to RGB by both
loaders): CMYK, palette, grayscale, alpha, 16-bit, and image data whose format differs from its extension
(ImageNet has PNGs named .JPEG). Tree problems (a missing split, an empty or hidden class folder, train
and val with different classes) are reported too, and the files that are there are still checked, so one
run lists everything to fix. Exit status: 0 clean, 1 bad files found, 2 the tree itself is wrong.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

from ..errors import UserError, check_counts
from .scan import scan_dataset

EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".pgm": "PPM", ".bmp": "BMP",
               ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


def check_file(path: str, min_side: int = 8, max_pixels: int = 89_478_485) -> dict:
    """{'path', 'error': str|None, 'info': [str]} for one file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return {"path": path, "error": f"unreadable ({e.strerror})", "info": []}
    return check_bytes(path, data, min_side, max_pixels)


def check_bytes(path: str, data: bytes, min_side: int = 8, max_pixels: int = 89_478_485) -> dict:
    """check_file on a file's bytes already read (`fasttrain shard` checks what it writes)."""
    from PIL import Image
    out = {"path": path, "error": None, "info": []}
    if not data:
        out["error"] = "empty file (0 bytes)"
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
                if w * h > max_pixels:
                    out["error"] = f"too large ({w}x{h} = {w * h} pixels > --max-pixels {max_pixels})"
                    return out
                im.load()  # a full decode: catches truncated and corrupt data
    except Image.UnidentifiedImageError:
        out["error"] = "not an image file (unknown format despite its extension)"
        return out
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        out["error"] = f"too large ({e})"
        return out
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... on corrupt data
        out["error"] = f"corrupt or truncated image ({e})"
        return out
    if min(w, h) < min_side:
        out["error"] = f"too small ({w}x{h} < --min-side {min_side})"
        return out
    expected = EXT_FORMATS.get(os.path.splitext(path)[1].lower())
    if expected and fmt != expected:
        out["info"].append(f"{fmt} data in a {os.path.splitext(path)[1]} file")
    if mode != "RGB":
        out["info"].append(f"mode {mode} (converted to RGB)")
    return out


def _check(args):
    path, *limits = args
    if isinstance(path, str):
        return check_file(path, *limits)
    try:  # a sample inside a tar shard (data/shards.py): checking shards after a copy decodes each sample
        data = path.read()
    except OSError as e:
        return {"path": str(path), "error": f"unreadable ({e.strerror})", "info": []}
    return check_bytes(str(path), data, *limits)


def check_data(data: str, workers: int = 2, min_side: int = 8, max_pixels: int = 89_478_485) -> dict:
    """Check a whole dataset; returns the report (also what --report writes)."""
    problems: list[str] = []  # tree errors (missing split, empty class, class mismatch): noted, and go on
    train, val = scan_dataset(data, problems=problems)
    files = [(p, min_side, max_pixels) for split in (train, val) for p, _ in split.samples]
    results = []
    if files:
        with ProcessPoolExecutor(max(1, workers)) as pool:
            results = list(pool.map(_check, files, chunksize=64))
    bad = [r for r in results if r["error"]]
    info = [r for r in results if r["info"] and not r["error"]]
    return {"data": os.path.abspath(data), "classes": len(train.classes), "train_files": len(train),
            "val_files": len(val), "tree_problems": problems, "bad": bad, "info": info,
            "good": [r["path"] for r in results if not r["error"]]}


def check_options(ns) -> None:
    """check-data's and shard's -j, --min-side and --max-pixels: each a count of at least 1."""
    check_counts(("--workers", ns.workers, 1), ("--min-side", ns.min_side, 1), ("--max-pixels", ns.max_pixels, 1))


def check_data_command(ns) -> int:
    from .shards import is_sharded
    check_options(ns)
    if ns.write_clean_list and is_sharded(ns.data):
        raise UserError(f"{ns.data} is a sharded dataset: --write-clean-list is for ImageFolder trees (`fasttrain "
                        "shard` already left the bad files out)")
    report = check_data(ns.data, ns.workers, ns.min_side, ns.max_pixels)
    for problem in report["tree_problems"]:
        print(f"tree: {problem}")
    for r in report["bad"]:
        print(f"bad: {r['path']}: {r['error']}")
    for r in report["info"]:
        print(f"info: {r['path']}: {'; '.join(r['info'])}")
    n_bad = len(report["bad"])
    n_tree = len(report["tree_problems"])
    print(f"fasttrain: checked {report['train_files']} train + {report['val_files']} val files in "
          f"{report['classes']} classes: {n_bad} bad, {len(report['info'])} converted"
          + (f"; {n_tree} problem{'s' if n_tree > 1 else ''} with the folders (tree: lines)" if n_tree else ""),
          file=sys.stderr)
    if ns.report:
        with open(ns.report, "w") as fh:
            json.dump({k: v for k, v in report.items() if k != "good"}, fh, indent=1)
    if ns.write_clean_list:
        with open(ns.write_clean_list, "w") as fh:
            fh.write(f"# fasttrain check-data {report['data']}: {len(report['good'])} good files\n")
            fh.writelines(p + "\n" for p in report["good"])
        print(f"fasttrain: wrote {len(report['good'])} good files to {ns.write_clean_list}; "
              f"train with --file-list {ns.write_clean_list}", file=sys.stderr)
    return 2 if n_tree else 1 if n_bad else 0
