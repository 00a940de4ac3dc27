"""Build the model: any torchvision classification architecture, optional local pretrained weights.

Wrapping (channels_last, torch.compile, DDP) happens in one place, train.wrap_model(); the raw module is
kept for checkpoints, so saved state_dicts have no `module.` or `_orig_mod.` prefixes.
"""

from __future__ import annotations

import torch
import torchvision

from .blurpool import apply_blurpool
from .config import ModelConfig
from .errors import UserError


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """A one-line error for a name torchvision does not know (launch.preflight calls it before any work)."""
    names = classification_models()
    if arch not in names:
        near = [n for n in names if arch.lower().rstrip("0123456789_") in n][:6]
        raise UserError(f"unknown arch '{arch}': use a torchvision classification model"
                        f"{' such as ' + ', '.join(near) if near else ' (e.g. resnet18, resnet50, vit_b_16)'}")


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    check_arch(cfg.arch)
    kwargs = {"aux_logits": False, "init_weights": True} if cfg.arch in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=num_classes, **kwargs)
    if cfg.blurpool and not apply_blurpool(model):
        raise UserError(f"--blurpool: {cfg.arch} has no strided convolution with 16 or more input channels "
                        "(it is meant for ResNets)")
    if cfg.pretrained or cfg.weights:
        load_weights(model, cfg.weights)
    return model


class FlipTTA(torch.nn.Module):
    """--val-tta flip: the mean of the logits of the images and of their mirror images (FFCV sums them; the
    mean gives the same predictions and a loss on the usual scale). Wraps the raw model, holds no state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a local weights file (a state_dict, or a fasttrain/reference checkpoint) with weights_only=True.
    Layers whose shape differs (a classifier for another number of classes) are left as initialized, and
    said so."""
    from .checkpoint import load, model_state
    state = model_state(load(path, "--weights"), f"--weights {path}")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise UserError(f"--weights {path} does not fit this architecture ({len(usable)} of {len(own)} "
                        "tensors match): check -a/--arch")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    if skipped:
        print(f"fasttrain: weights: {len(skipped)} tensor(s) kept at initialization (shape differs or "
              f"missing): {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}", flush=True)
