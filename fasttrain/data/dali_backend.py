"""NVIDIA DALI input: JPEG decode and augmentation inside DALI, handed to the engine as ordinary batches.

On a GPU the decoders run "mixed" (nvJPEG plus the hardware JPEG decoder, `--hw-decoder-load` of the
work on the latter) and crop, resize, flip and normalize run on the GPU; with `--device cpu` every op runs
in DALI's CPU-only mode (`device_id=None`). The engine sees the same on-device `(images, labels)` as from
the torchvision backend: float32, or under AMP fp16 straight out of DALI (DALI has no bfloat16: bf16 is one
cast from it), NCHW, or with `--channels-last` a channels_last NCHW view of DALI's NHWC output (no copy, no
transpose kernel).

    fasttrain train DATA --loader dali -j 16 --hw-decoder-load 0.9 --prefetch 2 --amp bf16 --channels-last

    train, val = dali_backend.build(train_split, val_split, per_rank_batch, workers, cfg.data, layout, dist,
                                    seed, steps)
    train.set_epoch(epoch, start_step)
    for images, labels in train: ...

The same samples as the torchvision backend, by construction: each epoch this rank reads exactly the files
the torchvision backend's sampler gives it (DistributedSampler's permutation for seed + epoch at the
GLOBAL rank, truncated to `steps` whole batches), so every rank runs the same number of steps; val rank r
reads samples r, r+W, r+2W, ... so every val image is scored once. Each pass (one train epoch, one val
run) gets a fresh pipeline on that list in that order (the reader's num_shards=1: the sharding by global
rank is in the list). Why not DALI's own shuffling and sharding: `random_shuffle` is a 1024-sample shuffle
buffer whose state, like the shard rotation between epochs, depends on every earlier epoch, so a resumed run
could not get its epoch back without replaying them all, and an epoch cut short by --steps-per-epoch cannot
be reset without decoding the rest of it. Starting a pass (list, file_list, pipeline build) took 0.8 s for
ImageNet's 1.28M files on one rank on the 2-core machine, about 0.1 s per rank on 8.

Resume: train pipelines run with DALI's checkpointing on. state_dict() is this rank's position in the pass
plus DALI's checkpoint of its pipeline (reader position, the state of every random op; a few hundred
bytes), which the run's checkpoint stores per rank; after load_state_dict(), the pass that starts at that
point restores the pipeline from it and continues with the same batches, crops and flips, decoding nothing
twice. Without a usable state (another number of ranks, a DALI that refuses the checkpoint or cannot
checkpoint an operator) the pass decodes and drops its first `start_step` batches instead, which gives the
same batches too: DALI's random ops depend only on the pipeline seed, not on thread timing.

Bad files: DALI 2.4 stops the whole pipeline on a file it cannot read, sometimes naming it ("Failed to
decode sample #1 : PATH" for a truncated JPEG, "File mapping failed: PATH" for an empty one) and
sometimes not ("nvImageCodec failure: '#4'" for a text file named .jpg). Here the failing batch is
searched (the name in DALI's message, else decode.decode_file on each file), the file is reported through
BadFileBudget like the torchvision backend does (warning naming it, at most --max-bad-files), and the pass
goes on from the same batch in a new pipeline: val drops the file, train puts another image of the epoch in
its place so every rank still runs the same number of steps. Known bad files are left out of later epochs
without a new warning.

This is the only module that imports nvidia.dali, and only inside functions: importing it loads CUDA
libraries, and the package is an optional extra (`pip install 'fasttrain[dali]'`).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ..errors import UserError
from .base import IMAGENET_MEAN, IMAGENET_STD, BadFileBudget, Layout, val_resize_size
from .decode import BadImage, decode_file
from .scan import Split

READER = "Reader"
_import_error: str | None = None


def available() -> bool:
    """True when nvidia.dali and its PyTorch plugin import (CUDA is not needed for the CPU-only mode)."""
    global _import_error
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or OSError/RuntimeError from a CUDA library it could not load
        _import_error = f"{type(e).__name__}: {e}"
        return False
    return True


def import_error() -> str:
    """Why available() is False ("" when it is True)."""
    return "" if available() else str(_import_error)


@dataclass(frozen=True)
class Spec:
    """Everything a pipeline is built from, besides its file list and seed."""
    batch: int
    image_size: int
    threads: int
    prefetch: int
    device_id: int | None      # None: DALI's CPU-only mode
    hw_decoder_load: float
    channels_last: bool
    half: bool                 # fp16 out of DALI (DALI has no bfloat16: bf16 is one cast on the torch side)


def _pipeline(source: dict, train: bool, spec: Spec, seed: int, checkpoint: bytes | None = None,
              checkpointing: bool = True):
    """`source`: the reader's file_list= or files=/labels= (see DaliBatches._source). Order and sharding are ours.
    Train pipelines keep DALI checkpoints (reader position, every random op's state) unless `checkpointing` is
    off; `checkpoint` restores one."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.device_id is not None

    def graph():
        jpegs, labels = fn.readers.file(**source, random_shuffle=False, pad_last_batch=True, name=READER)
        # NVIDIA's ResNet-50 example pads nvJPEG's buffers so the first epochs do not keep reallocating them.
        dec = (dict(device="mixed", hw_decoder_load=spec.hw_decoder_load, device_memory_padding=211025920,
                    host_memory_padding=140544512) if gpu else dict(device="cpu"))
        size = spec.image_size
        if train:  # the torchvision backend's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + flip
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **dec)
            images = fn.resize(images, resize_x=size, resize_y=size)  # linear + antialias, as torchvision's
            crop, mirror = None, fn.random.coin_flip(probability=0.5)
        else:  # resize the short side to size*256/224, center crop
            images = fn.decoders.image(jpegs, output_type=types.RGB, **dec)
            images = fn.resize(images, resize_shorter=val_resize_size(size))
            crop, mirror = (size, size), 0
        images = fn.crop_mirror_normalize(
            images, crop=crop, mirror=mirror, mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD], dtype=types.FLOAT16 if spec.half else types.FLOAT,
            output_layout="HWC" if spec.channels_last else "CHW")
        return images, (labels.gpu() if gpu else labels)

    return pipeline_def(graph)(batch_size=spec.batch, num_threads=spec.threads, device_id=spec.device_id,
                               prefetch_queue_depth=spec.prefetch, seed=seed,
                               enable_checkpointing=train and checkpointing, checkpoint=checkpoint)


def _seed(*parts: int) -> int:
    """A DALI seed (< 2**31) from the run seed and where we are; the same in every process."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(1)[0]) % 2**31


def _find_bad(message: str, paths: list[str]) -> tuple[str, str] | None:
    """(path, reason) of the file DALI failed on: the one its message names, else the first of `paths`
    that decode_file cannot decode either."""
    named = [p for p in dict.fromkeys(paths) if p in message]
    for path in sorted(named, key=len, reverse=True)[:1] + [p for p in dict.fromkeys(paths) if p not in named]:
        try:
            decode_file(path)
        except BadImage as e:
            return path, e.reason
        if path in named:  # decode_file reads it, DALI does not: DALI's own words are the reason
            lines = [ln for ln in message.splitlines()
                     if ln.strip() and "no longer valid" not in ln and not ln.startswith("C++ context")]
            return path, f"DALI cannot read it ({lines[-1].strip() if lines else 'no reason given'})"
    return None


def _patch(idx: list[int], samples, bad: set[str], keep_length: bool) -> list[int]:
    """Sample indices `idx` without bad files; with keep_length (train) each is replaced by the next good one
    instead, since every rank must run the same number of steps."""
    if not bad:
        return idx
    good = [i for i in idx if samples[i][0] not in bad]
    if not keep_length or len(good) == len(idx):
        return good
    if not good:
        raise UserError(f"no file of this epoch's {len(idx)} could be decoded (first: {samples[idx[0]][0]})")
    out, g = [], 0
    for i in idx:
        if samples[i][0] in bad:
            out.append(good[g % len(good)])
        else:
            out.append(i)
            g += 1
    return out


class DaliBatches:
    """One split's batches through DALI pipelines; subclasses say which samples a pass reads, in what order
    (as indices into split.samples)."""
    train = False

    def __init__(self, split: Split, spec: Spec, layout: Layout, budget: BadFileBudget, bad: set[str], seed: int,
                 rank: int):
        self.samples, self.spec, self.layout, self.budget, self.bad = split.samples, spec, layout, budget, bad
        self.seed, self.rank, self.epoch, self.start_step = seed, rank, 0, 0
        self._live: Iterator | None = None
        self._lines: list[str] | None = None
        self._pass: dict | None = None     # where the live pass is: what state_dict() saves
        self._resume: dict | None = None   # a saved position for the next pass (load_state_dict)
        self._checkpointing = self.train   # off if this DALI cannot checkpoint an operator of the pipeline

    def _items(self) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        self.close()  # a pass left unfinished (a stop, an exception) must not keep its pipeline and threads
        saved, self._resume = self._resume, None
        skip = self.start_step * self.spec.batch
        if saved is not None and (saved["epoch"], saved["pos"]) != (self.epoch, skip):
            saved = None  # saved at another point than this pass starts from: replay instead
        if saved is not None:
            self.bad.update(saved["bad_at_start"])
        self._pass = {"epoch": self.epoch, "pos": 0, "bad_at_start": sorted(self.bad), "recoveries": [], "it": None}
        items = _patch(self._items(), self.samples, self.bad, self.train)
        self._live = self._walk(items, _seed(self.seed, self.epoch, self.rank, self.train), skip, saved)
        return self._live

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def _walk(self, items: list[int], seed: int, skip: int, saved: dict | None = None):
        """Yield `items` in batches, in order, from item `skip` on: from a saved DALI checkpoint when there is
        one for this point, else by decoding and dropping the first `skip` (so the random crops and flips
        after them are the same as in a pass that did not skip)."""
        pos, it = 0, None  # items before `pos` are done: yielded, or skipped
        if saved is not None:
            it, pos = self._restore(items, seed, saved)
            items = self._pass["items"]
        if it is None:
            pos, it = 0, self._open(items, seed)
        try:
            while it is not None:
                self._pass["it"] = it
                try:
                    out = next(it, None)
                except RuntimeError as e:  # DALI: after any error the pipeline object is dead
                    it = self._pass["it"] = None
                    items = self._recover(e, items, pos)
                    it = self._open(items[pos:], _seed(seed, pos))
                    continue
                if out is None:
                    break
                images, labels = out[0]["images"], out[0]["labels"]
                pos += labels.shape[0]
                self._pass["pos"] = pos
                # PARTIAL + pad_last_batch may hand back an EMPTY last batch: nothing to yield.
                if pos > skip and labels.shape[0]:
                    yield self._to_layout(images, labels)
        finally:  # a finished or closed pass holds no pipeline (and has no position to save)
            self._pass["it"] = None

    def _source(self, items: list[int]) -> tuple[dict, str | None]:
        """(reader arguments, temporary file to delete once the pipeline is built). A file_list builds ~3x
        faster than files=/labels= (DALI parses it in C++: 0.7 s against 1.9 s for 300k files here), and a
        pass pays it once per epoch. A name with a line break cannot be a line: then files=/labels=."""
        if self._lines is None:  # formatted once, not every epoch: ~1 s for ImageNet's 1.28M
            self._lines = [f"{p} {label}\n" for p, label in self.samples]  # DALI: the label is the last field
            if "".join(self._lines).count("\n") != len(self._lines) or any("\r" in ln for ln in self._lines):
                self._lines = []
        if not self._lines:
            return dict(files=[self.samples[i][0] for i in items], labels=[self.samples[i][1] for i in items]), None
        with tempfile.NamedTemporaryFile("w", prefix="fasttrain-dali-", suffix=".txt", delete=False) as fh:
            fh.write("".join([self._lines[i] for i in items]))
        return dict(file_list=fh.name), fh.name

    def _open(self, items: list[int], seed: int, checkpoint: bytes | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        if not items:
            return None
        source, list_file = self._source(items)

        def build():
            # PARTIAL: the last batch holds only the real samples (the reader pads it with copies, then they
            # are cut); reader_name lets the iterator stop at the end of the list. No first batch in the
            # constructor, so a bad file in it fails in _walk, where it is handled.
            pipe = _pipeline(source, self.train, self.spec, seed, checkpoint, self._checkpointing)
            return DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                       last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        try:
            try:
                return build()
            except RuntimeError as e:  # "Checkpointing is not implemented for this operator: ..." (older DALI)
                if not self._checkpointing or checkpoint is not None or "heckpointing" not in str(e):
                    raise
                self._checkpointing = False
                print(f"fasttrain: warning: rank {self.rank}: DALI cannot checkpoint this pipeline "
                      f"({str(e).strip().splitlines()[-1]}); a resumed epoch replays its done part instead",
                      file=sys.stderr, flush=True)
                return build()
        finally:  # the constructor built the pipeline, which has read the list
            if list_file:
                os.unlink(list_file)

    def _recover(self, err: RuntimeError, items: list[int], pos: int) -> list[int]:
        """Name the file DALI failed on, report it, and return `items` without it from `pos` on."""
        # Errors come back with the batch that failed (the next one), but prefetch runs ahead: look further.
        window = [self.samples[i][0] for i in items[pos:pos + (self.spec.prefetch + 1) * self.spec.batch]]
        found = _find_bad(str(err), window)
        if found is None:
            raise RuntimeError(f"DALI failed on one of the {len(window)} files from {window[0] if window else '?'}"
                               f" on, and none of them fails to decode with torchvision or PIL: {err}") from err
        path, reason = found
        self.bad.add(path)
        self.budget.report(path, reason)
        self._pass["recoveries"].append((pos, path))
        return items[:pos] + _patch(items[pos:], self.samples, self.bad, self.train)

    def _restore(self, items: list[int], seed: int, saved: dict):
        """(DALI iterator, position) continuing a saved pass exactly where it was, without decoding what it
        had done; (None, 0) to fall back to replaying, with a warning, if DALI cannot take the checkpoint.
        The pass's list is rebuilt as the saved pass changed it (each bad file found patched the rest of
        the list from where it was found), and its last pipeline (built at the last such point, with the
        seed it was built with) is restored from DALI's own checkpoint: reader position and random state."""
        start, seg_seed = 0, seed
        for pos, path in saved["recoveries"]:
            self.bad.add(path)
            self._pass["recoveries"].append((pos, path))
            items = items[:pos] + _patch(items[pos:], self.samples, self.bad, self.train)
            start, seg_seed = pos, _seed(seed, pos)
        self._pass["items"] = items
        for path in sorted(self.bad):
            self.budget.count_known(path)
        try:
            it = self._open(items[start:], seg_seed, checkpoint=saved["dali"])
        except (RuntimeError, ValueError) as e:
            print(f"fasttrain: warning: rank {self.rank}: DALI could not restore its checkpoint ({e}); "
                  f"replaying the epoch's first {saved['pos']} samples instead", file=sys.stderr, flush=True)
            self._pass["recoveries"].clear()
            return None, 0
        self._pass["pos"] = saved["pos"]
        return it, saved["pos"]

    def state_dict(self) -> dict | None:
        """This rank's position in the live pass, with DALI's checkpoint of it (a few hundred bytes): what
        load_state_dict() + set_epoch(epoch, step) continue from. None when no pass is under way."""
        p = self._pass
        if p is None or p["it"] is None or not self._checkpointing:  # _walk clears "it" when a pass ends
            return None
        return {"epoch": p["epoch"], "pos": p["pos"], "bad_at_start": list(p["bad_at_start"]),
                "recoveries": list(p["recoveries"]), "dali": p["it"].checkpoints()[0]}

    def load_state_dict(self, state: dict | None) -> None:
        """Take a state_dict() for the next pass; it is used if that pass starts where the state was saved."""
        self._resume = state

    def _to_layout(self, images: torch.Tensor, labels: torch.Tensor):
        if self.spec.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: torch.channels_last, no copy
        # A no-op when DALI already made the device and dtype; else one copy or cast (bf16: from fp16).
        images = images.to(self.layout.device, self.layout.dtype, non_blocking=True)
        return images, labels.view(-1).to(self.layout.device, torch.int64, non_blocking=True)


class TrainBatches(DaliBatches):
    """Exactly `steps` full batches per epoch on every rank: the torchvision backend's sampler order."""
    train = True

    def __init__(self, split: Split, steps: int, world_size: int, **kw):
        super().__init__(split, **kw)
        self.steps = steps
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=self.rank,
                                          shuffle=True, seed=self.seed, drop_last=True)

    def __len__(self) -> int:
        return self.steps

    def _items(self) -> list[int]:
        self.sampler.set_epoch(self.epoch)
        return list(self.sampler)[:self.steps * self.spec.batch]


class ValBatches(DaliBatches):
    """Samples rank, rank+W, ...: every val image scored exactly once across the ranks, no padding."""

    def __init__(self, split: Split, world_size: int, **kw):
        super().__init__(split, **kw)
        self.items = list(range(self.rank, len(split), world_size))

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.spec.batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass  # the same images, in the same order, every time

    def _items(self) -> list[int]:
        return self.items


def build(train: Split, val: Split, per_rank_batch: int, workers: int, cfg, layout: Layout, dist, seed: int,
          steps: int) -> tuple[TrainBatches, ValBatches]:
    """This rank's train and val batches. `cfg` is config.DataConfig, `dist` dist.DistInfo."""
    if cfg.prefetch < 1:
        raise UserError(f"--prefetch must be at least 1, got {cfg.prefetch}")
    gpu = layout.device.type == "cuda"
    spec = Spec(batch=per_rank_batch, image_size=cfg.image_size, threads=max(1, workers), prefetch=cfg.prefetch,
                device_id=(layout.device.index if layout.device.index is not None else torch.cuda.current_device())
                if gpu else None,
                hw_decoder_load=cfg.hw_decoder_load, channels_last=layout.channels_last,
                half=layout.dtype in (torch.float16, torch.bfloat16))
    shared = dict(spec=spec, layout=layout, budget=BadFileBudget(cfg.max_bad_files, dist.rank), bad=set(),
                  seed=seed, rank=dist.rank)
    return (TrainBatches(train, steps, dist.world_size, **shared), ValBatches(val, dist.world_size, **shared))
