"""Command line: `fasttrain train|tune|eval|predict|recipes|plot|demo-data|check-data|shard|bench`.

    fasttrain train                                   # embedded demo dataset, small model
    fasttrain train /data/imagenet --recipe rn50-16ep # a named recipe (`fasttrain recipes` lists them)
    fasttrain train /data/imagenet -a resnet50 -b 256 --amp bf16 --channels-last --compile
    fasttrain train /data/imagenet --resume auto --output-dir runs/r50
    fasttrain tune /data/imagenet -a resnet18 --compile # which loader feeds it fastest here; --loader auto reuses it
    fasttrain eval /data/imagenet --checkpoint runs/r50/model_best.pth.tar
    fasttrain predict runs/r50/model_best.pth.tar cat.jpg dog.jpg       # top-5 class names of each image
    fasttrain plot runs/r50 runs/r18 --out curves.png   # val top-1 by epoch and by time, loss, lr, img/s
    fasttrain shard /data/imagenet /scratch/shards -j 16 # tar shards (WebDataset layout); train reads them
    fasttrain shard /data/imagenet /scratch/s448 --max-side 448  # the same, images pre-resized to <= 448 px
    torchrun --nproc-per-node 8 -m fasttrain train /data/imagenet -a resnet50 -b 2048 --lr 0.8

Every flag of the reference script (pytorch/examples imagenet/main.py) is accepted with its meaning, so
`python main.py ARGS` becomes `fasttrain train ARGS`. The parser is generated from config.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config as C
from .errors import EXIT_SIGINT, EXIT_USAGE, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other bad input
        raise UserError(message)


def _default_text(group: str, f, demo: bool) -> str:
    """' (default: X)' for the help, unless the help says it already or the flag is off by default; with the
    demo's own value where it has one (`demo`: train)."""
    help_text = f.metadata["help"]
    if "default" in help_text or "(auto" in help_text or f.default in (None, False, ""):
        return ""
    demo = DEMO_DEFAULTS.get((group, f.name)) if demo else None
    return f" (default: {_fmt(f.default)}" + ("" if demo is None else f"; the demo without DATA: {_fmt(demo)}") + ")"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_config_flags(p: argparse.ArgumentParser, only: dict[str, tuple[str, ...]] | None = None) -> None:
    """The options of config.py as flags (`only`: {group: field names}, for eval); DATA optional for train
    (the demo dataset), required otherwise."""
    if only is None:
        p.add_argument("--recipe", metavar="NAME", default=None,
                       help="a named recipe's options (`fasttrain recipes` lists them); --config and flags win")
    p.add_argument("--config", metavar="TOML", default=None,
                   help="TOML file of options (keys are the long flag names, as OUTPUT_DIR/config.toml of a run "
                   "holds them); flags given here win")
    for group, f in C.all_fields():
        if only is not None and f.name not in only.get(group, ()):
            continue
        flags, dest = f.metadata["flags"], f"{group}.{f.name}"
        kw = dict(help=f.metadata["help"] + _default_text(group, f, only is None), default=argparse.SUPPRESS)
        if not flags:  # the positional DATA
            if only is None:
                p.add_argument(dest, nargs="?", metavar=f.metadata["metavar"], **kw)
            else:
                p.add_argument(dest, metavar=f.metadata["metavar"],
                               help="dataset root holding val/ in ImageFolder layout (the classes the checkpoint "
                               "was trained on)")
            continue
        if f.metadata["tristate"]:
            p.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(f.default, bool):
            p.add_argument(*flags, dest=dest, action="store_true", **kw)
        else:
            typ = float if isinstance(f.default, float) else int if isinstance(f.default, int) or \
                "int" in str(f.type) else str
            p.add_argument(*flags, dest=dest, type=typ, choices=f.metadata["choices"],
                           metavar=f.metadata["metavar"], **kw)


def _version() -> str:
    import platform

    import torch
    import torchvision

    from . import __version__
    return (f"fasttrain {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()})")


class _Version(argparse.Action):
    """--version, imported only when asked for (torch's import costs a second)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    """The file checks check-data and shard share (data/check.py)."""
    p.add_argument("--max-pixels", type=int, default=89_478_485, metavar="N",
                   help="images above this many pixels are reported (default: PIL's decompression-bomb limit, "
                   "89478485)")
    p.add_argument("--min-side", type=int, default=8, metavar="PX",
                   help="images below this side are reported (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fasttrain", description="Fast ImageNet-style image-classification training.")
    p.add_argument("--version", action=_Version, help="print fasttrain's, torch's and torchvision's versions")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = dict(formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(sub.add_parser("train", help="train (and validate each epoch)", **fmt,
                                     description="Train on DATA (without DATA: the embedded demo dataset, with "
                                     "its own defaults), validating each epoch."))
    tu = sub.add_parser("tune", help="measure the loaders on this host for a model and batch; cache the profile "
                        "--loader auto reuses", **fmt,
                        description="Time the model step alone and each loader (torchvision, DALI, both at once; "
                        "DALI's --hw-decoder-load and --prefetch) alone and feeding it, on DATA's files, with the "
                        "options `fasttrain train` would get; print the table and the loader --loader auto will "
                        "take, and cache the profile it reads (per host, data, model, batch and world size).")
    _add_config_flags(tu)
    tu.add_argument("--quick", action="store_true",
                    help="the brief measurement `train --loader auto` makes (seconds), not the thorough one")
    ev = sub.add_parser("eval", help="evaluate a checkpoint on DATA/val", **fmt,
                        description="Score a checkpoint on DATA/val. Its arch and image size come from the "
                        "checkpoint; nothing is written.")
    _add_config_flags(ev, only=C.EVAL_OPTIONS)
    ev.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint to evaluate")
    pr = sub.add_parser("predict", help="print the top-k classes of images under a checkpoint")
    pr.add_argument("checkpoint", metavar="CHECKPOINT", help="a fasttrain checkpoint (or the reference's)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    pr.add_argument("-k", "--top", type=int, default=5, metavar="K", help="classes to print per image (default: 5)")
    pr.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                    help="where to run the model (default: auto = a GPU if there is one)")
    sub.add_parser("recipes", help="list the named training recipes and the published results they target")
    pl = sub.add_parser("plot", help="draw training curves of one or more runs (from their metrics.jsonl)")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (OUTPUT_DIR of fasttrain train)")
    pl.add_argument("--out", required=True, metavar="FILE.png", help="where to write the figure")
    dd = sub.add_parser("demo-data", help="write the embedded demo dataset (JPEGs, ImageFolder layout)")
    dd.add_argument("out", metavar="OUT", help="folder to write train/ and val/ into")
    cd = sub.add_parser("check-data", help="decode every file of DATA and report the bad ones")
    cd.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/ in ImageFolder layout")
    cd.add_argument("-j", "--workers", type=int, default=2, metavar="N",
                    help="processes decoding files in parallel (default: 2)")
    cd.add_argument("--report", default=None, metavar="PATH", help="where to write the JSON report")
    cd.add_argument("--write-clean-list", default=None, metavar="PATH",
                    help="write the list of good files, for train --file-list")
    _add_check_flags(cd)
    sh = sub.add_parser("shard", help="write DATA as tar shards (WebDataset layout) that `fasttrain train` reads")
    sh.add_argument("data", metavar="DATA", help="ImageFolder tree with train/ and val/")
    sh.add_argument("out", metavar="OUT", help="where the shards go (outside DATA)")
    sh.add_argument("--shard-size", type=float, default=256, metavar="MB", help="target shard size (default: 256)")
    sh.add_argument("-j", "--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                    help="processes reading, checking and writing (default: the cores, at most 8)")
    sh.add_argument("--max-side", type=int, default=None, metavar="PX",
                    help="write images longer than PX on a side as JPEGs scaled to PX there (aspect kept, "
                    "antialiased), so every epoch decodes fewer pixels; the others keep their bytes (default: off)")
    sh.add_argument("--quality", type=int, default=None, metavar="Q",
                    help="JPEG quality of the images --max-side resizes (default: 90)")
    _add_check_flags(sh)
    bn = sub.add_parser("bench", help="measure img/s against the reference loop; writes bench.json/png")
    bn.add_argument("data", nargs="?", default=None, metavar="DATA",
                    help="dataset root holding train/ in ImageFolder layout (default: generated JPEGs, see --images)")
    bn.add_argument("--out", default="runs/bench", metavar="DIR",
                    help="where bench.json and bench.png go (default: runs/bench)")
    bn.add_argument("--quick", action="store_true", help="fewer steps: checks that it runs, numbers are rough")
    bn.add_argument("-j", "--workers", type=int, default=None, metavar="N",
                    help="loader workers (DALI: threads) of every loader measured (default: the cores, at most 16)")
    bn.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                    help="batch of every entry (default: 256 on GPU; on CPU 128 for loaders and 16 for models, "
                    "with --quick 32 and 4)")
    bn.add_argument("-a", "--arch", action="append", default=None, metavar="ARCH",
                    help="model of the model and end-to-end sections; repeat for several (default: resnet18 on "
                    "CPU, resnet50 and resnet18 on GPU)")
    bn.add_argument("--images", type=int, default=None, metavar="N",
                    help="JPEGs to generate when no DATA is given (default: 512 on CPU, 128 with --quick, 4096 on GPU)")
    bn.add_argument("--full", action="store_true", help="on CPU also time torch.compile (minutes)")
    bn.add_argument("--compile-mode", default="default", choices=C.COMPILE_MODES,
                    help="torch.compile mode of the compiled entries (as train --compile-mode)")
    bn.add_argument("--best-of", default=None, metavar="BENCH_JSON",
                    help="the model, end-to-end and DALI sections' compiled entries take the settings and batch of "
                    "the fastest ceiling variant in BENCH_JSON (an earlier `--sections ceiling` run)")
    bn.add_argument("--sections", default=None, metavar="LIST",
                    help="comma list of loader,model,e2e,ceiling,recipe,dali,auto (default: loader,model,e2e; "
                         "ceiling: model-only variants past the compiled rate, each compiled anew; recipe: progressive "
                         "resizing and BlurPool end to end; dali: the DALI loader's --hw-decoder-load and "
                         "--prefetch settings, loader only and end to end; auto: what --loader auto picks, with its "
                         "calibration's cost, against torchvision, DALI and the hybrid end to end)")
    bn.add_argument("--repeats", type=int, default=None, metavar="N",
                    help="loader-only: run each loader N times, interleaved, and keep the best (default: 3 on CPU)")
    bn.add_argument("--shards", nargs="?", const="auto", default=None, metavar="DIR",
                    help="loader-only: each fasttrain loader also reads the same images as tar shards (DIR: made by "
                    "`fasttrain shard` from DATA; without it they are written into the cache)")
    bn.add_argument("--max-side", type=int, default=None, metavar="PX",
                    help="with --shards: write them pre-resized (`fasttrain shard --max-side PX`), so each shards "
                    "twin measures decoding the smaller images against the full-size folder")
    bn.add_argument("--like", default="default", choices=("default", "imagenet"),
                    help="the generated JPEGs (no DATA): default = ~460x375 px, ~70 KB, all alike (those "
                    "benchmarks/ANCHORS.md was measured on); imagenet = sized like ImageNet's photos (mean "
                    "~400x350 px and ~110 KB, widths from ~100 to over 2,000 px)")
    bn.add_argument("--from-json", default=None, metavar="PATH",
                    help="measure nothing: redraw the table and bench.png from an earlier bench.json")
    return p


# With no DATA, `fasttrain train` trains on the embedded demo dataset with these settings (flags still win):
# ResNet-18 at 64 px, 10 epochs. lr 0.05 because 0.1 diverged for a while with some seeds (the runs behind
# both, with their accuracies and times: benchmarks/RESULTS.md and the README's "Two commands").
DEMO_DEFAULTS = {("data", "batch_size"): 64, ("data", "image_size"): 64, ("data", "workers"): 2,
                 ("optim", "epochs"): 10, ("optim", "lr"): 0.05, ("optim", "warmup_epochs"): 1.0,
                 ("optim", "lr_schedule"): "cosine", ("run", "seed"): 0}


def _over(lower: dict, upper: dict, where: str) -> dict:
    """`upper`'s values over `lower`'s. Of the options that say the same thing two ways (config.EXCLUSIVE), a
    layer (recipe, --config, flags) that sets one side drops the other side set by a layer below it, so
    `--recipe rn50-16ep --lr 0.5` means lr 0.5, not the recipe's per-256 LR, and `--image-size 224` over a
    recipe turns its progressive resizing off."""
    out = dict(lower)
    for a, b in C.EXCLUSIVE:
        if upper.keys() & a and upper.keys() & b:
            raise UserError(f"{where} sets both {_flags(a)} and {_flags(b)}: give one of them")
        for mine, other in ((a, b), (b, a)):
            if upper.keys() & mine:
                for key in other:
                    out.pop(key, None)
    out.update(upper)
    return out


def _flags(keys) -> str:
    return "/".join(f"--{name.replace('_', '-')}" for _, name in sorted(keys))


def parse_config(ns: argparse.Namespace) -> C.Config:
    """Defaults < demo defaults (train without DATA) < recipe < TOML file < flags."""
    flags = {}
    for key, value in vars(ns).items():
        if "." in key and value is not None:
            group, name = key.split(".", 1)
            flags[(group, name)] = value
    values = recipe = {}
    if getattr(ns, "recipe", None):
        from . import recipes
        values = recipe = recipes.load(ns.recipe)[0]
    given = set(flags)  # what the layers above the recipe set
    if ns.config:
        toml = C.load_toml(ns.config)
        given |= set(toml)
        values = _over(values, toml, f"config file {ns.config}")
    values = _over(values, flags, "the command line")
    if recipe and ("optim", "epochs") in given:
        values = _scale_recipe(ns.recipe, recipe, values, given)
    demo = (ns.command in ("train", "tune") and values.get(("data", "data")) is None
            and not values.get(("data", "dummy")) and values.get(("data", "loader")) != "synthetic")
    if demo:
        defaults = dict(DEMO_DEFAULTS)
        if ("optim", "lr_schedule") in values:  # the demo's warm-up belongs to its cosine schedule
            defaults.pop(("optim", "warmup_epochs"))
        values = _over(defaults, values, "")
    return C.build_config(values)


def _scale_recipe(name: str, recipe: dict, values: dict, given: set) -> dict:
    """--recipe with another --epochs: the recipe's epoch knobs in proportion (recipes.scale_to_epochs), said
    once (by rank 0 under torchrun, whose every process parses the command line)."""
    from . import recipes
    epochs = values[("optim", "epochs")]
    scaled = recipes.scale_to_epochs(recipe, values, given)
    if scaled and os.environ.get("RANK", "0") == "0":
        own = recipe[("optim", "epochs")]
        print(f"fasttrain: {recipes.describe_scaling(name, own, epochs, recipe, scaled)}", flush=True)
    return {**values, **scaled}


def use_huge_pages() -> None:
    """Large CPU tensors (a float batch is 77 MB at 128 x 224 px; conv activations are bigger) on 2 MB
    transparent huge pages: torch's CPU allocator madvises buffers >= 2 MB when THP_MEM_ALLOC_ENABLE is set
    (torch >= 2.2), read at its first large allocation, so the `fasttrain` program sets it before it makes
    any tensor (DataLoader workers inherit it); importing fasttrain changes nothing. Otherwise each fresh
    batch is faulted in 4 KB page by 4 KB page (what that costs a loader, measured: benchmarks/RESULTS.md).
    An explicit THP_MEM_ALLOC_ENABLE=0 in the environment wins."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    use_huge_pages()
    try:
        ns = build_parser().parse_args(argv)
        if ns.command in ("train", "eval"):
            cfg = parse_config(ns)
            from .launch import launch
            return launch(cfg, eval_checkpoint=getattr(ns, "checkpoint", None))
        if ns.command == "tune":
            from .tune import tune_command
            return tune_command(parse_config(ns), quick=ns.quick)
        if ns.command == "predict":
            from .predict import predict_command
            return predict_command(ns)
        if ns.command == "recipes":
            from .recipes import recipes_command
            return recipes_command()
        if ns.command == "plot":
            from .plot import plot_command
            return plot_command(ns)
        if ns.command == "demo-data":
            from .data.demo import write_demo_dataset
            write_demo_dataset(ns.out)
            print(f"fasttrain: demo dataset written to {ns.out}")
            return 0
        if ns.command == "check-data":
            from .data.check import check_data_command
            return check_data_command(ns)
        if ns.command == "shard":
            from .shard import shard_command
            return shard_command(ns)
        if ns.command == "bench":
            from .bench import bench_command
            return bench_command(ns)
        raise AssertionError(ns.command)
    except UserError as e:
        print(f"fasttrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (there it saves first: signals.py)
        print("fasttrain: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
