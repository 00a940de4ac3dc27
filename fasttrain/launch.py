"""From a parsed Config to running processes: demo data, spawning, process groups, exit codes.

    fasttrain train DATA ...                                  # one process
    torchrun --nproc-per-node 8 -m fasttrain train DATA ...   # one process per GPU, any number of nodes
    fasttrain train DATA --multiprocessing-distributed [--nproc-per-node N] ...   # the reference's way
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys

import torch

from . import config as C
from . import dist as D
from . import signals
from .config import Config
from .engine import NonFiniteLoss
from .errors import UserError


def use_demo_data(cfg: Config) -> Config:
    """No DATA: `cfg` training on the embedded dataset (written once into the cache folder)."""
    from .data.demo import default_root, write_demo_dataset
    root = default_root()
    if not os.path.isdir(os.path.join(root, "val")):
        print(f"fasttrain: writing the embedded demo dataset to {root} (once)", flush=True)
    return C.replace(cfg, data={"data": write_demo_dataset(root)})


def prepare_eval(cfg: Config, checkpoint: str) -> Config:
    """`fasttrain eval DATA --checkpoint PATH`: `cfg` with the checkpoint's arch (with --blurpool if it had it)
    and image size, validation only; the validation size, crop ratio and TTA of its run unless given here."""
    from .checkpoint import load
    ck = load(checkpoint)
    saved = ck.get("config") or {}
    model, data, optim = saved.get("model", {}), saved.get("data", {}), saved.get("optim", {})
    data_changes = {"image_size": data.get("image_size", cfg.data.image_size)}
    for key in ("min_res", "max_res", "val_res", "val_crop_ratio"):  # validated as the run was, unless given
        if getattr(cfg.data, key) == getattr(C.DataConfig, key) and key in data:
            data_changes[key] = data[key]
    val_tta = saved.get("run", {}).get("val_tta", "none") if cfg.run.val_tta == "none" else cfg.run.val_tta
    return C.replace(
        cfg, data=data_changes,
        model={"arch": model.get("arch", ck.get("arch", cfg.model.arch)),
               "blurpool": model.get("blurpool", cfg.model.blurpool)},  # its layers: the keys do not tell
        # its optimizer's layout, so the checkpoint's optimizer state loads (an evaluation does not use it)
        optim={"optimizer": optim.get("optimizer", cfg.optim.optimizer),
               "no_bn_wd": optim.get("no_bn_wd", cfg.optim.no_bn_wd)},
        run={"val_tta": val_tta, "resume": checkpoint, "evaluate": True})  # nothing is written: no output folder


def preflight(cfg: Config) -> None:
    """Every check of the command line that needs no data, before any work (the data scan, loaders, a
    process group): a typo in -a must not wait for ImageNet's 1.3 M files to be listed."""
    from .model import check_arch
    check_arch(cfg.model.arch)
    if cfg.model.weights and not os.path.isfile(cfg.model.weights):
        raise UserError(f"--weights {cfg.model.weights} does not exist")
    D.check_gpu_flag(cfg.dist.gpu)
    if cfg.data.loader in ("dali", "hybrid"):
        from .data import dali_backend
        dali_backend.require(f"--loader {cfg.data.loader}")
    if cfg.run.tensorboard:
        from . import tb
        tb.wanted(True)  # the package imports, or a one-line error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: Config, eval_checkpoint: str | None = None) -> int:
    """Run `cfg` (left as the caller has it): train, or with `eval_checkpoint` evaluate that checkpoint."""
    if eval_checkpoint:
        cfg = prepare_eval(cfg, eval_checkpoint)
    preflight(cfg)
    if cfg.data.data is None and cfg.data.loader != "synthetic":
        if eval_checkpoint:
            raise UserError("fasttrain eval needs DATA (the folder holding val/)")
        cfg = use_demo_data(cfg)
    if not cfg.dist.multiprocessing_distributed:
        return worker(None, cfg, 1)
    nproc = cfg.dist.nproc_per_node or (torch.cuda.device_count() if cfg.run.device != "cpu" else 0) or 1
    url = cfg.dist.dist_url
    if url is None:
        if cfg.dist.world_size > 1:
            raise UserError("--multiprocessing-distributed on several nodes needs --dist-url tcp://HOST:PORT")
        url = f"tcp://127.0.0.1:{_free_port()}"  # this launch's, not a setting: config.toml leaves it out
    return spawn(cfg, nproc, url)


def spawn(cfg: Config, nproc: int, url: str) -> int:
    """The reference's mp.spawn, with a SIGTERM or Ctrl-C to the parent passed on to every child (each
    child takes a repeat within a second as the same request: see signals.py), the parent waiting for them
    to save and exit. Each child gives itself its share of the cores (cpu_share.py, in train.run): spawned
    processes would otherwise each start one torch thread per core of the machine."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_spawned, args=(cfg, nproc, url), nprocs=nproc, join=False, start_method="spawn")

    def pass_on(signum, frame):
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)
    before = {sig: signal.signal(sig, pass_on) for sig in signals.STOP_SIGNALS}
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code > 0 else 128 - e.exit_code
    except mp.ProcessRaisedException as e:
        print(f"fasttrain: error: a worker failed:\n{e}", file=sys.stderr)
        return 1
    finally:  # the caller's handlers back (a test, a notebook, the bench: launch may run in-process)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return 0


def _spawned(local_rank: int, cfg: Config, nproc: int, url: str) -> None:
    code = worker(local_rank, cfg, nproc, url)
    if code:
        sys.exit(code)


def worker(local_rank: int | None, cfg: Config, nproc: int, url: str | None = None) -> int:
    from .train import run
    info = D.setup(dataclasses.replace(cfg.dist, dist_url=url) if url else cfg.dist, cfg.run.device, local_rank,
                   nproc)
    try:
        return run(cfg, info)
    except UserError as e:
        if local_rank is None:
            raise
        print(f"fasttrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:
        print(f"fasttrain: error: rank {info.rank}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        D.teardown(info)
