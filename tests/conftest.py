"""Shared fixtures: small generated ImageFolder trees (real JPEG files), nothing downloaded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fasttrain.data.demo import CLASSES, draw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tree(root, n_train=24, n_val=9, classes=CLASSES[:4], size=(40, 48), seed=0) -> str:
    """DATA/{train,val}/<class>/*.jpg with the demo's learnable textures."""
    for split_i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for c, name in enumerate(classes):
            texture, palette = name.split("_")
            rng = np.random.default_rng([seed, split_i, c])
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = draw(texture, palette == "warm", rng, *size)
                Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    return str(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes, 24 train and 9 val images each (val 36: not a multiple of common batch sizes)."""
    return make_tree(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, timeout=300, env=None):
    """Run `python -m fasttrain ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
