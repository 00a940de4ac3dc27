"""Test-only entry point: `torchrun ... tests/ddp_worker.py train ARGS` runs fasttrain's CLI with behaviour
injected through environment variables, so distributed tests can be exact and deterministic:

    FT_TEST_TINY_MODEL=1         a small CNN without BatchNorm or dropout (per-rank batch statistics would
                                 otherwise make 2 ranks differ from 1 rank at the same global batch)
    FT_TEST_RAISE=RANK:STEP      that rank raises inside its STEP-th train step (1-based, counted per process)
    FT_TEST_SIGTERM=RANK:STEP    that rank sends itself SIGTERM at its STEP-th step, on the first attempt only
"""

import os
import signal
import sys

import torch

import fasttrain.train as T
from fasttrain.cli import main
from fasttrain.engine import Trainer


def tiny_model(cfg, num_classes):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def _at(var):
    if var not in os.environ:
        return None
    rank, step = os.environ[var].split(":")
    return int(rank), int(step)


def main_with_faults():
    if os.environ.get("FT_TEST_TINY_MODEL"):
        T.build_model = tiny_model
    raise_at, term_at = _at("FT_TEST_RAISE"), _at("FT_TEST_SIGTERM")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    rank = int(os.environ.get("RANK", "0"))
    original = Trainer.train_step
    count = [0]

    def train_step(self, *args, **kwargs):
        count[0] += 1
        if raise_at == (rank, count[0]):
            raise RuntimeError(f"injected failure on rank {rank} at step {count[0]}")
        if term_at == (rank, count[0]) and first_attempt:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)
    Trainer.train_step = train_step
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main_with_faults())
