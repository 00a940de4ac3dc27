"""`fasttrain predict CHECKPOINT IMAGES...`: the top-k classes of each image, by name.

    fasttrain predict runs/r50/model_best.pth.tar cat.jpg dog.png -k 3
    cat.jpg: tabby_cat 71.2%, tiger_cat 20.3%, egyptian_cat 6.1%

The checkpoint says the arch, the validation size and crop ratio, and the class names (the folder names of
DATA/train); a reference checkpoint, which keeps no names, prints class indices (at 224 px). Images go
through the run's val transform (resize the short side to size / crop ratio, centre crop) and ImageNet normalization, as in validation. A file
that cannot be read is reported on stderr and the others are still predicted (exit status 1 then).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from . import checkpoint as ckpt_io
from .config import DataConfig, ModelConfig
from .data.base import IMAGENET_MEAN, IMAGENET_STD
from .data.decode import BadImage
from .data.torchvision_backend import ValTransform
from .dist import pick_device
from .errors import UserError, check_counts
from .schedules import Resolution


def load_classifier(path: str, device: torch.device) -> tuple[torch.nn.Module, list[str], ValTransform]:
    """(model in eval mode, class names, the run's val transform) from a checkpoint."""
    from .model import build_model
    ck = ckpt_io.load(path)
    state = ckpt_io.model_state(ck, path)
    config = ck.get("config") or {}
    arch = config.get("model", {}).get("arch") or ck.get("arch")
    if not arch:
        raise UserError(f"checkpoint {path} does not say its arch: not a fasttrain or reference checkpoint")
    data = config.get("data", {})
    saved = DataConfig(**{f.name: data[f.name] for f in dataclasses.fields(DataConfig) if f.name in data})
    size, crop_ratio = Resolution.from_config(saved).val_size, saved.val_crop_ratio  # as the run validated
    classes = ck.get("classes")
    if classes is None:  # the reference's: as many as its classifier has rows
        rows = [v.shape[0] for k, v in state.items() if k.endswith("weight") and v.ndim == 2]  # the last: the head
        if not rows:
            raise UserError(f"checkpoint {path} has no classifier layer to count its classes by")
        classes = [str(i) for i in range(rows[-1])]
    blurpool = bool(config.get("model", {}).get("blurpool", False))  # its layers: the keys do not tell
    model = build_model(ModelConfig(arch=arch, blurpool=blurpool), len(classes))
    model.load_state_dict(state)
    return model.to(device).eval(), list(classes), ValTransform(size, crop_ratio)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities [N, classes] of uint8 images [N, 3, H, W]."""
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    x = (images.to(device).float() - mean) / std
    return model(x).float().softmax(1)


def predict_command(ns) -> int:
    check_counts(("-k/--top", ns.top, 1))
    device = pick_device(ns.device, 0, None)
    model, classes, transform = load_classifier(ns.checkpoint, device)
    k, failed = min(ns.top, len(classes)), 0
    for path in ns.images:
        try:
            image = transform.load(path)
        except BadImage as e:
            print(f"fasttrain: error: {path}: {e.reason}", file=sys.stderr, flush=True)
            failed += 1
            continue
        probs = predict(model, image.unsqueeze(0))[0]
        top = probs.topk(k)
        names = ", ".join(f"{classes[i]} {100 * p:.1f}%" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {names}", flush=True)
    return 1 if failed else 0
