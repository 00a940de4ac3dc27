"""Shared fixtures: small generated ImageFolder trees (real JPEG files), nothing downloaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fasttrain.capture import compile_fn as _real_compile_fn
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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests train tiny models in the pytest process: with torch's default of one OpenMP thread per core,
    on the 2-core CI machine its threads spin at every barrier while a DataLoader worker or DALI thread wants
    a core, which made a one-epoch tiny run ~5x slower here (3 s against 17 s for 2 epochs, under load).
    The training processes the tests start get one thread too (OMP_NUM_THREADS, which fasttrain honours),
    unless a test says otherwise: the tests are about behaviour, and the CI machine is shared."""
    import torch
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes, 24 train and 9 val images each (val 36: not a multiple of common batch sizes)."""
    return make_tree(tmp_path_factory.mktemp("tiny"))


def run_group(cmd, timeout=300, env=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too,
    which subprocess.run's own timeout would leave running) and fail. `env` adds to this process's
    environment; a value None removes that variable."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={k: v for k, v in full.items() if v is not None},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args, timeout=300, env=None):
    """Run `python -m fasttrain ARGS` in a subprocess; returns CompletedProcess (text)."""
    return run_group([sys.executable, "-m", "fasttrain", *args], timeout=timeout, env=env)


def eager_backend(fn, mode):
    """--compile-step's compile_fn with dynamo's eager backend: the graphs traced as a run traces them, run
    without inductor's code generation (minutes on 2 cores). Bound to the real compile_fn at import, so a test
    can monkeypatch capture.compile_fn with it."""
    return _real_compile_fn(fn, mode, backend="eager")
