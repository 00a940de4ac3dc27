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

One pipeline per split per run. Which files a batch holds is decided here, not by a DALI reader: the
pipeline's input is an `external_source` that asks, for its g-th batch, for file names and labels
(Stream.feed), and `fn.io.file.read` reads the files in DALI's own threads (samples of tar shards,
data/shards.py, come in as their bytes instead: DALI has no reader of a byte range that follows an
external order, so the feed reads each with one pread). The names come from a plan
that runs across epochs: iteration g of a pipeline built at (epoch e0, step s0) is step s0 + g of epoch e0,
continuing into e0 + 1, ... So epochs follow each other without a new pipeline (nvJPEG and the hardware
decoder are set up once per run), and the prefetch queue runs on into the next epoch's first batches. The
train crop size of each batch comes in the same way, per sample, as an argument input of the resize: with
progressive resizing (--min-res/--max-res) the size changes between epochs inside the same pipeline.

The same samples as the torchvision backend, by construction: epoch e on this rank reads exactly the files
the torchvision backend's sampler gives it (DistributedSampler's permutation for seed + epoch at the GLOBAL
rank, truncated to `steps` whole batches), so every rank runs the same number of steps; val rank r reads
samples r, r+W, r+2W, ... so every val image is scored once, every pass. Why not DALI's own shuffling and
sharding: `random_shuffle` is a 1024-sample shuffle buffer whose state, like the shard rotation between
epochs, depends on every earlier epoch, and an epoch cut short by --steps-per-epoch could not be reset.

Resume: the train pipeline runs with DALI's checkpointing on. state_dict() is where the stream is (the next
batch's epoch and step, and what the pipeline was built from) plus DALI's checkpoint of it: the state of
every random op and the external source's iteration, a few hundred bytes. A run that loads it builds its
pipeline from that checkpoint, and the stream continues with the same files, crops and flips, decoding
nothing twice, mid-epoch or at an epoch boundary. Crops and flips depend on everything the pipeline drew
since it was built, so without a usable checkpoint (another number of ranks, a DALI that cannot checkpoint
an operator) a resumed run reads the same files from the same step on, with other random crops and flips.

Bad files: DALI 2.4 stops the whole pipeline on a file it cannot read, sometimes naming it ("Failed to
decode sample #1 : PATH") and sometimes not ("nvImageCodec failure: '#4'" for a text file named .jpg). Here
the failing batch and those fed after it are searched (the name in DALI's message, else decode.decode_file
on each file), the file is reported through BadFileBudget like the torchvision backend does (a warning
naming it, at most --max-bad-files), and a new pipeline continues from that batch. From then on the plan
leaves the file out: val drops it, train puts the next good file of the epoch in its place so every rank
still runs the same number of steps. Known bad files are left out of later epochs without a new warning.

This is the only module that imports nvidia.dali, and only inside functions: importing it loads CUDA
libraries, and the package is an optional extra (`pip install 'fasttrain[dali]'`).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ..errors import UserError, check_counts
from ..schedules import Resolution
from .base import (IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_RATIO, BadFileBudget, Layout, UnusedFiles, unused_samples,
                   val_resize_size)
from .decode import BadImage, decode_file
from .scan import Split

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


def require(what: str = "--loader dali") -> None:
    """A one-line error where --loader dali (or hybrid) is asked for and DALI does not import."""
    if not available():
        raise UserError(f"{what} needs NVIDIA DALI: pip install 'fasttrain[dali]' ({import_error()})")


def loader_name(device: torch.device) -> str:
    """What `--loader dali` runs on this device: "dali-gpu" ("mixed" decoding) on CUDA, else "dali-cpu"."""
    return "dali-gpu" if device.type == "cuda" else "dali-cpu"


def version() -> str | None:
    """nvidia.dali's version, None where it does not import."""
    if not available():
        return None
    import nvidia.dali
    return nvidia.dali.__version__


@dataclass(frozen=True)
class Spec:
    """Everything a pipeline is built from, besides its input and seed."""
    batch: int
    image_size: int
    threads: int
    prefetch: int
    device_id: int | None      # None: DALI's CPU-only mode
    hw_decoder_load: float
    channels_last: bool
    half: bool                 # fp16 out of DALI (DALI has no bfloat16: bf16 is one cast on the torch side)
    padding: int = 0           # nvJPEG's host and device buffer padding, bytes (see decoder_padding)
    crop_ratio: float = VAL_CROP_RATIO  # val: resize the short side to image_size / crop_ratio, center-crop
    encoded: bool = False      # the source hands over the images' bytes (tar shards), not file names to read


def _pipeline(feed, train: bool, spec: Spec, seed: int, checkpoint: bytes | None = None,
              checkpointing: bool = True):
    """`feed(batch_info)` -> (file names as uint8 arrays, labels[, train crop sizes]): see DaliBatches.feed.
    Train pipelines keep DALI checkpoints (the source's iteration, every random op's state) unless
    `checkpointing` is off; `checkpoint` restores one."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.device_id is not None

    def graph():
        if train:  # the crop size comes in with the file names, per sample: progressive resizing changes it
            # between epochs in the same pipeline (an argument input to resize, not a constant of the graph)
            names, labels, sizes = fn.external_source(source=feed, num_outputs=3, batch=True, batch_info=True,
                                                      dtype=[types.UINT8, types.INT32, types.FLOAT])
        else:
            names, labels = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True,
                                               dtype=[types.UINT8, types.INT32])
        # Files are read in DALI's threads, not the training process's Python thread; samples of tar shards
        # come as bytes (DALI has no reader of a byte range: DaliBatches.source_of reads them, one pread each).
        jpegs = names if spec.encoded else fn.io.file.read(names)
        dec = dict(device="cpu")
        if gpu:
            dec = dict(device="mixed", hw_decoder_load=spec.hw_decoder_load)
            if spec.padding:
                dec.update(device_memory_padding=spec.padding, host_memory_padding=spec.padding)
        size = spec.image_size
        if train:  # the torchvision backend's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + flip
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **dec)
            images = fn.resize(images, resize_x=sizes, resize_y=sizes)  # linear + antialias, as torchvision's
            crop, mirror = None, fn.random.coin_flip(probability=0.5)
        else:  # resize the short side to size / crop_ratio (256/224 by default), center crop
            images = fn.decoders.image(jpegs, output_type=types.RGB, **dec)
            images = fn.resize(images, resize_shorter=val_resize_size(size, spec.crop_ratio))
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


def decoder_padding(samples, n: int = 256, seed: int = 0) -> int:
    """nvJPEG's buffer padding: the decoded size (H x W x 3 bytes) of the largest of `n` files drawn at random,
    read from their headers, plus 10%. nvJPEG grows a buffer when an image does not fit; padding sized to the
    data's large images spares most regrowths without pinning memory no image needs (NVIDIA's examples pin
    140 MB of host memory per decoder thread: 2.2 GB with 16 threads). 0 (DALI's default) if none can be read."""
    from PIL import Image
    largest = 0
    for path, _ in random.Random(seed).sample(list(samples), min(n, len(samples))):
        try:
            with Image.open(path if isinstance(path, str) else io.BytesIO(path.read())) as im:  # header only
                largest = max(largest, im.width * im.height * 3)
        except Exception:
            continue  # a bad file is the decoder's business, and reported there
    return int(largest * 1.1)


def _find_bad(message: str, paths: list[str]) -> tuple[str, str] | None:
    """(path, reason) of the file DALI failed on: the one its message names, else the first of `paths`
    that decode_file cannot decode either."""
    named = [p for p in dict.fromkeys(paths) if str(p) in message]
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


class DaliBatches:
    """One split's batches from one DALI pipeline, fed by a plan. Subclasses say which samples step k of
    epoch e holds (`_batch`) and how many steps an epoch has (`__len__`)."""
    train = False

    def __init__(self, split: Split, spec: Spec, layout: Layout, budget: BadFileBudget, bad: set[str], seed: int,
                 rank: int):
        self.samples, self.spec, self.layout, self.budget, self.bad = split.samples, spec, layout, budget, bad
        self.seed, self.rank, self.epoch, self.start_step = seed, rank, 0, 0
        self._it = None                    # DALI iterator over the live pipeline
        self._base = (0, 0)                # (epoch, step) of the live pipeline's iteration 0
        self._pipe_seed = 0
        self._next: tuple[int, int] | None = None  # (epoch, step) of the batch the live pipeline hands out next
        self._fed: dict[int, list[int]] = {}       # iteration -> sample indices, for batches not yet handed out
        self._resume: dict | None = None   # a saved state for the next pass (load_state_dict)
        self._checkpointing = self.train   # off if this DALI cannot checkpoint an operator of the pipeline
        self.builds = 0                    # pipelines built so far (one per run unless a bad file or a jump)

    # -- the plan -----------------------------------------------------------------------------------------
    def _batch(self, epoch: int, step: int) -> list[int]:
        raise NotImplementedError

    def _locate(self, g: int) -> tuple[int, int]:
        """(epoch, step) of iteration g of the live pipeline."""
        e, s = divmod(self._base[1] + g, len(self))
        return self._base[0] + e, s

    def _iteration(self, at: tuple[int, int]) -> int:
        return (at[0] - self._base[0]) * len(self) + at[1] - self._base[1]

    def feed(self, info):
        """external_source's callback: file names and labels of the pipeline's batch `info.iteration`."""
        idx = self._batch(*self._locate(info.iteration))
        self._fed[info.iteration] = idx
        names = [self.source_of(i) for i in idx]
        return names, np.array([self.samples[i][1] for i in idx], dtype=np.int32).reshape(-1, 1)

    def source_of(self, i: int) -> np.ndarray:
        """What the pipeline's source gets for sample i: its file name, or for a sample of a tar shard its
        bytes (unreadable ones become bytes no decoder takes: DALI fails on them and _recover names them)."""
        ref = self.samples[i][0]
        if isinstance(ref, str):
            return np.frombuffer(os.fsencode(ref), dtype=np.uint8)
        try:
            return np.frombuffer(ref.read(), dtype=np.uint8)
        except OSError:
            return np.frombuffer(b"unreadable sample", dtype=np.uint8)

    def good(self, i: int) -> bool:
        """Not a known bad file. Bad files are kept by name (str): a checkpoint holds their names."""
        return str(self.samples[i][0]) not in self.bad

    # -- passes -------------------------------------------------------------------------------------------
    def _start(self) -> tuple[int, int]:
        return self.epoch, self.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        start = self._start()
        if self._it is None or self._next != start:
            self._open_at(start)
        return self._pass(start)

    def _pass(self, start: tuple[int, int]):
        epoch, step = start
        while step < len(self):
            try:
                out = next(self._it)
            except StopIteration:  # not expected: the plan has no end
                raise RuntimeError("the DALI pipeline ended before the epoch did") from None
            except RuntimeError as e:  # DALI: after any error the pipeline object is dead
                self._recover(e, (epoch, step))
                continue
            fed = self._fed.pop(self._iteration((epoch, step)), None)
            step += 1
            self._next = (epoch, step) if step < len(self) else (epoch + 1, 0)
            if fed != []:  # [] marks a batch whose files were all bad (ValBatches.feed)
                yield self._to_layout(out[0]["images"], out[0]["labels"])

    def _open_at(self, at: tuple[int, int]) -> None:
        """A pipeline whose next batch is `at`: restored from a saved state of that point if there is one."""
        saved, self._resume = self._resume, None
        if saved is not None and tuple(saved["next"]) == at:
            self.bad.update(saved["bad"])
            for path in saved["bad"]:
                self.budget.count_known(path)
            try:
                self._build(tuple(saved["base"]), saved["seed"], saved["dali"])
                self._next = at
                return
            except (RuntimeError, ValueError) as e:
                print(f"fasttrain: warning: rank {self.rank}: DALI could not restore its checkpoint ({e}); the "
                      "resumed epoch reads the same files with other random crops and flips",
                      file=sys.stderr, flush=True)
        self._build(at, _seed(self.seed, self.rank, self.train, *at))
        self._next = at

    def _build(self, base: tuple[int, int], seed: int, checkpoint: bytes | None = None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        self.close()
        self._base, self._pipe_seed, self._fed = base, seed, {}

        def make():
            pipe = _pipeline(self.feed, self.train, self.spec, seed, checkpoint, self._checkpointing)
            # No first batch in the constructor, so a bad file in it fails in _pass, where it is handled.
            return DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                       prepare_first_batch=False, auto_reset=False)
        try:
            self._it = make()
        except RuntimeError as e:  # "Checkpointing is not implemented for this operator: ..." (older DALI)
            if not self._checkpointing or checkpoint is not None or "heckpointing" not in str(e):
                raise
            self._checkpointing = False
            print(f"fasttrain: warning: rank {self.rank}: DALI cannot checkpoint this pipeline "
                  f"({str(e).strip().splitlines()[-1]}); a resumed run reads the same files with other random "
                  "crops and flips", file=sys.stderr, flush=True)
            self._it = make()
        self.builds += 1

    def _recover(self, err: RuntimeError, at: tuple[int, int]) -> None:
        """Name the file DALI failed on, report it, and continue from batch `at` in a new pipeline."""
        # The error comes with the batch that failed; it is this one or one fed after it (prefetch).
        first = self._iteration(at)
        window = [self.samples[i][0] for g in sorted(self._fed) if g >= first for i in self._fed[g]]
        found = _find_bad(str(err), window)
        if found is None:
            raise RuntimeError(f"DALI failed on one of the {len(window)} files from {window[0] if window else '?'}"
                               f" on, and none of them fails to decode with torchvision or PIL: {err}") from err
        path, reason = str(found[0]), found[1]
        self.bad.add(path)
        self.budget.report(path, reason)
        self._build(at, _seed(self.seed, self.rank, self.train, *at, len(self.bad)))
        self._next = at

    def close(self) -> None:
        """Drop the pipeline (its threads, nvJPEG state and prefetched batches). A later pass builds a new one."""
        if self._it is not None:
            self._it = None  # the pipeline refers back to self.feed: drop our end so the cycle is gone now
            self._next = None

    def state_dict(self) -> dict | None:
        """Where the stream is, with DALI's checkpoint of it: what load_state_dict() + set_epoch(epoch, step)
        continue from. None before the first pass, after close(), or where DALI cannot checkpoint."""
        if self._it is None or not self._checkpointing or self._next is None:
            return None
        return {"next": list(self._next), "base": list(self._base), "seed": self._pipe_seed,
                "bad": sorted(self.bad), "dali": self._it.checkpoints()[0]}

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
    """Exactly `steps` full batches per epoch on every rank: the torchvision backend's sampler order. The
    crop size of every batch is `size_at(its epoch)`, fed in with its files."""
    train = True

    def __init__(self, split: Split, steps: int, world_size: int, size_at: Callable[[int], int] | None = None,
                 check_unused: bool = False, batch_ids: Sequence[int] | None = None, **kw):
        """`check_unused`: also decode, each epoch, the files no batch holds (base.UnusedFiles); whole epochs
        only, not with --steps-per-epoch. `batch_ids`: the positions in the epoch's batch order this loader
        makes, its step j being batch_ids[j] (the hybrid loader, data/hybrid.py, gives the other batches to
        the torchvision workers); None: all."""
        super().__init__(split, **kw)
        self.steps, self.check_unused, self.unused_files = steps, check_unused, UnusedFiles()
        self.batch_ids = None if batch_ids is None else list(batch_ids)
        self.size_at = size_at or (lambda epoch: self.spec.image_size)
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=self.rank,
                                          shuffle=True, seed=self.seed, drop_last=True)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its sample order): one epoch cached

    def __len__(self) -> int:
        return self.steps if self.batch_ids is None else len(self.batch_ids)

    def feed(self, info):
        names, labels = super().feed(info)
        size = self.size_at(self._locate(info.iteration)[0])
        return names, labels, np.full(len(names), size, dtype=np.float32)

    def items(self, epoch: int) -> list[int]:
        """This rank's samples of an epoch, in order, before bad files are replaced."""
        if self._order is None or self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, list(self.sampler)[:self.steps * self.spec.batch])
        return self._order[1]

    def __iter__(self):
        epoch = self.epoch
        batches = super().__iter__()
        unused = []
        if self.check_unused:
            self.sampler.set_epoch(epoch)
            unused = [self.samples[i][0] for i in unused_samples(self.sampler, self.steps * self.spec.batch)
                      if self.good(i)]
        return self._then_unused(batches, self.unused_files.start(unused))

    def _then_unused(self, batches, check):
        """The epoch's batches, then the bad files among those no batch held: named, and known from now on
        (a later batch that draws one takes the next good file instead, as for any bad file)."""
        yield from batches
        for path, reason in check.result() if check is not None else ():
            self.bad.add(str(path))
            self.budget.report(str(path), reason)

    def _batch(self, epoch: int, step: int) -> list[int]:
        items, b = self.items(epoch), self.spec.batch
        pos = step if self.batch_ids is None else self.batch_ids[step]
        idx = items[pos * b:(pos + 1) * b]
        if not self.bad or all(self.good(i) for i in idx):
            return idx
        # A bad file's place goes to the next good file of the epoch's order (the same on a resumed run).
        out = []
        for j, i in enumerate(idx):
            k = pos * b + j
            for n in range(len(items)):
                i = items[(k + n) % len(items)]
                if self.good(i):
                    break
            else:
                raise UserError(f"no file of this epoch's {len(items)} could be decoded (first: "
                                f"{self.samples[items[0]][0]})")
            out.append(i)
        return out


class ValBatches(DaliBatches):
    """Samples rank, rank+W, ...: every val image scored exactly once across the ranks, no padding. Each
    pass over them is one "epoch" of the plan."""

    def __init__(self, split: Split, world_size: int, **kw):
        super().__init__(split, **kw)
        self.items = list(range(self.rank, len(split), world_size))
        self._passes = 0

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.spec.batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass  # the same images, in the same order, every time

    def _start(self) -> tuple[int, int]:
        return self._passes, 0

    def __iter__(self):
        if not self.items:
            return iter(())
        it = super().__iter__()
        self._passes += 1
        return it

    def _batch(self, epoch: int, step: int) -> list[int]:
        idx = self.items[step * self.spec.batch:(step + 1) * self.spec.batch]
        return [i for i in idx if self.good(i)]

    def feed(self, info):
        if self._batch(*self._locate(info.iteration)):
            return super().feed(info)
        # Only bad files in this batch. DALI wants at least one sample: feed a good one, drop the batch.
        good = next((i for i in self.items if self.good(i)), None)
        if good is None:
            raise UserError(f"no val file of this process could be decoded (first: {self.samples[self.items[0]][0]})")
        self._fed[info.iteration] = []
        return [self.source_of(good)], np.zeros((1, 1), np.int32)


def build(train: Split, val: Split, per_rank_batch: int, workers: int, cfg, layout: Layout, dist, seed: int,
          steps: int, budget: BadFileBudget | None = None, batch_ids: Sequence[int] | None = None,
          check_unused: bool | None = None) -> tuple[TrainBatches, ValBatches]:
    """This rank's train and val batches. `cfg` is config.DataConfig, `dist` dist.DistInfo. `budget`: the bad
    files' count, shared with another loader (the hybrid's); `batch_ids`: see TrainBatches; `check_unused`:
    see TrainBatches (None: for whole epochs, not with --steps-per-epoch)."""
    check_counts(("--prefetch", cfg.prefetch, 1))
    gpu = layout.device.type == "cuda"
    spec = Spec(batch=per_rank_batch, image_size=cfg.image_size, threads=max(1, workers), prefetch=cfg.prefetch,
                device_id=(layout.device.index if layout.device.index is not None else torch.cuda.current_device())
                if gpu else None,
                hw_decoder_load=cfg.hw_decoder_load, channels_last=layout.channels_last,
                half=layout.dtype in (torch.float16, torch.bfloat16),
                padding=decoder_padding(train.samples, seed=seed) if gpu else 0, encoded=train.sharded)
    shared = dict(layout=layout, budget=budget or BadFileBudget(cfg.max_bad_files, dist.rank), bad=set(), seed=seed,
                  rank=dist.rank)
    sizes = Resolution.from_config(cfg)
    val_spec = dataclasses.replace(spec, image_size=sizes.val_size, crop_ratio=cfg.val_crop_ratio)
    if check_unused is None:
        check_unused = not cfg.steps_per_epoch
    return (TrainBatches(train, steps, dist.world_size, size_at=sizes, check_unused=check_unused,
                         batch_ids=batch_ids, spec=spec, **shared),
            ValBatches(val, dist.world_size, spec=val_spec, **shared))
