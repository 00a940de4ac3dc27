"""The typed configuration tree, and the one place that knows every option.

Each field carries its command-line flags and help in `metadata`; `cli.py` builds the parser from these
fields and a TOML config file uses the same names (`batch-size = 512` or `batch_size = 512`), so a key or
flag that is not a field here is an error. Defaults and meanings of the reference script's flags
(pytorch/examples imagenet/main.py) are kept, except where noted in the help text.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from .config_rules import validate
from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default, *flags: str, help: str, choices=None, metavar=None, tristate=False):
    """A config field with its CLI flags. The first long flag is also the TOML key. A tristate field is a
    bool that may stay None ("auto"): --flag sets it, --no-flag clears it."""
    return field(default=default, metadata={"flags": flags, "help": help, "choices": choices, "metavar": metavar,
                                            "tristate": tristate})


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass
class DataConfig:
    data: str | None = opt(None, help="dataset root holding train/ and val/ in ImageFolder layout "
                           "(omit it to use the embedded demo dataset)", metavar="DATA")
    loader: str = opt("auto", "--loader", choices=("auto", "torchvision", "dali", "hybrid", "synthetic"),
                      help="input pipeline; hybrid = torchvision's CPU workers and DALI feeding the same steps; auto = "
                      "the fastest for this host, model and batch, by measurement (see --calibrate)")
    calibrate: str = opt("auto", "--calibrate", choices=("auto", "fresh", "off"),
                         help="how --loader auto decides: auto = from the profile `fasttrain tune` or an earlier run "
                         "cached for this host, data, model and batch, else by a brief measurement (seconds) when "
                         "the run is long enough to repay it; fresh = measure again and rewrite the profile; off = "
                         "DALI on a GPU when installed, else torchvision, unmeasured")
    dali_share: float = opt(0.0, "--dali-share", metavar="F",
                            help="--loader hybrid: share of the train batches DALI makes, the rest from the "
                            "torchvision workers (0 = the measured rates' ratio, see --calibrate)")
    workers: int | None = opt(None, "-j", "--workers", metavar="N",
                              help="data loading workers (DALI: CPU threads) per node, split across its processes "
                              "(default: 4 as the reference, capped at the cores each process has)")
    batch_size: int = opt(256, "-b", "--batch-size", metavar="N",
                          help="mini-batch size per node, split across the node's processes as in the reference")
    image_size: int = opt(224, "--image-size", metavar="PX",
                          help="train crop size; val resizes the short side to size*256/224, then center-crops")
    # Progressive resizing and the validation size (see schedules.py): both loaders take the size per epoch.
    min_res: int = opt(0, "--min-res", metavar="PX",
                       help="progressive resizing: train crop size up to epoch --start-ramp (0 = off: --image-size)")
    max_res: int = opt(0, "--max-res", metavar="PX", help="progressive resizing: train crop size from --end-ramp on")
    start_ramp: int = opt(0, "--start-ramp", metavar="EPOCH", help="progressive resizing: last epoch at --min-res")
    end_ramp: int = opt(0, "--end-ramp", metavar="EPOCH", help="progressive resizing: first epoch at --max-res")
    res_step: int = opt(32, "--res-step", metavar="PX", help="progressive resizing: sizes are multiples of this")
    val_res: int = opt(0, "--val-res", metavar="PX",
                       help="validation center-crop size (0 = the last train size: --max-res or --image-size)")
    val_crop_ratio: float = opt(224 / 256, "--val-crop-ratio", metavar="R",
                                help="validation resizes the short side to val size / R, then center-crops")
    dummy: bool = opt(False, "--dummy", help="use synthetic data (same as --loader synthetic)")
    num_classes: int = opt(1000, "--num-classes", metavar="N", help="classes of the synthetic data")
    steps_per_epoch: int = opt(0, "--steps-per-epoch", metavar="N",
                               help="stop each train epoch after N steps (0 = the whole epoch); for benchmarks "
                               "(validation is not cut: see --val-steps)")
    val_steps: int = opt(0, "--val-steps", metavar="N",
                         help="validate on N batches per process, spread over the val set (0 = all of it); for "
                         "smoke tests")
    auto_augment: str | None = opt(None, "--auto-augment", choices=("imagenet", "cifar10", "svhn"),
                                   help="torchvision's AutoAugment with this policy on each train image, after the "
                                   "crop and flip (torchvision loader)")
    randaugment: int = opt(0, "--randaugment", metavar="M",
                           help="torchvision's RandAugment on each train image: 2 ops of magnitude M (0-30, 9 is "
                           "usual; 0 = off) after the crop and flip (torchvision loader)")
    hw_decoder_load: float = opt(0.9, "--hw-decoder-load", metavar="F",
                                 help="DALI: share of JPEG decoding sent to the hardware decoder (0..1)")
    prefetch: int = opt(2, "--prefetch", metavar="N", help="DALI prefetch queue depth (batches)")
    file_list: str | None = opt(None, "--file-list", metavar="PATH",
                                help="train/val only on the files listed (as written by check-data "
                                "--write-clean-list)")
    max_bad_files: int = opt(10, "--max-bad-files", metavar="N",
                             help="skip up to N undecodable files with a warning, then stop with an error")


@dataclass
class ModelConfig:
    arch: str = opt("resnet18", "-a", "--arch", metavar="ARCH",
                    help="any torchvision classification model (default: resnet18)")
    blurpool: bool = opt(False, "--blurpool",
                         help="blur (3x3 binomial) before every strided conv with 16+ input channels, as FFCV does "
                         "to torchvision ResNets; the state_dict keys stay torchvision's")
    pretrained: bool = opt(False, "--pretrained", help="start from pretrained weights (needs --weights)")
    weights: str | None = opt(None, "--weights", metavar="PATH",
                              help="local file of pretrained weights (nothing is downloaded)")


@dataclass
class OptimConfig:
    epochs: int = opt(90, "--epochs", metavar="N", help="number of total epochs to run")
    start_epoch: int = opt(0, "--start-epoch", metavar="N", help="manual epoch number (useful on restarts)")
    lr: float = opt(0.1, "--lr", "--learning-rate", metavar="LR", help="initial learning rate")
    momentum: float = opt(0.9, "--momentum", metavar="M", help="SGD momentum")
    weight_decay: float = opt(1e-4, "--wd", "--weight-decay", metavar="W", help="weight decay")
    lr_per_256: float = opt(0.0, "--lr-per-256", metavar="LR",
                            help="LR per 256 images of the global batch: --lr = LR x global batch / 256 "
                            "(0 = off: --lr as given); the later of --lr and --lr-per-256 wins")
    lr_schedule: str = opt("step", "--lr-schedule", choices=("step", "cosine", "linear", "triangular"),
                           help="per step: step = 0.1x every 30 epochs as the reference; cosine, linear = to zero "
                           "at the end; triangular = FFCV's: up to --lr-peak-epoch, then linearly to zero")
    warmup_epochs: float = opt(0.0, "--warmup-epochs", metavar="E",
                               help="linear LR warm-up, in epochs (step, cosine, linear)")
    lr_peak_epoch: float = opt(2.0, "--lr-peak-epoch", metavar="E", help="triangular: the epoch the LR peaks at")
    optimizer: str = opt("sgd", "--opt", choices=("sgd", "lars", "adamw", "lamb"),
                         help="optimizer: SGD with momentum as the reference; LARS as MLPerf's ResNet-50 (for "
                         "global batches of thousands); AdamW or LAMB (betas 0.9, 0.999; --momentum unused; they "
                         "want a far lower --lr, e.g. 0.001 x global batch / 512, and a larger --wd, e.g. 0.05)")
    optim_impl: str = opt("auto", "--optim-impl", choices=("auto", "fused", "foreach"),
                          help="torch's SGD/AdamW kernels: fused = one kernel for all parameters, foreach = "
                          "multi-tensor kernels op by op; auto = fused on CUDA, foreach elsewhere (LARS and LAMB: "
                          "their own update, compiled with --compile-step)")
    no_bn_wd: bool = opt(False, "--no-bn-wd", help="no weight decay on BatchNorm weights and biases (LARS: always)")
    ema: float = opt(0.0, "--ema", metavar="DECAY",
                     help="keep an exponential moving average of the weights (e.g. 0.9999), validated each epoch "
                     "as val_top1_ema; 0 = off")
    label_smoothing: float = opt(0.0, "--label-smoothing", metavar="S", help="cross-entropy label smoothing")
    # knobs from timm
    clip_grad: float = opt(0.0, "--clip-grad", metavar="NORM",
                           help="clip the gradients' total L2 norm to NORM before each optimizer step (0 = off)")
    grad_accum_steps: int = opt(1, "--grad-accum-steps", metavar="N",
                                help="sum gradients over N batches per optimizer step: global batch = -b x nodes "
                                "x N, memory of one -b; -p, --checkpoint-interval and --steps-per-epoch then count "
                                "optimizer steps")
    mixup: float = opt(0.0, "--mixup", metavar="ALPHA",
                       help="torchvision's MixUp on each train batch, Beta(ALPHA, ALPHA) (0 = off; 0.2 or 0.8 are "
                       "usual); with --cutmix, one of the two per batch")
    cutmix: float = opt(0.0, "--cutmix", metavar="ALPHA",
                        help="torchvision's CutMix on each train batch, Beta(ALPHA, ALPHA) (0 = off; 1.0 is usual)")


@dataclass
class RunConfig:
    device: str = opt("auto", "--device", choices=("auto", "cuda", "cpu"), help="where to train")
    # Performance toggles: "auto"/None = the fastest measured-correct setting on a GPU (bf16, channels_last,
    # compile, cuDNN autotuning) and the safe one on a CPU (fp32, NCHW, eager). resolve_toggles() fills them.
    amp: str = opt("auto", "--amp", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast precision; fp16 uses a gradient scaler (auto: bf16 on GPU, none on CPU)")
    loss_scale: float = opt(0.0, "--loss-scale", metavar="S",
                            help="with --amp fp16: a static loss scale S (e.g. 1024; a power of 2 unscales exactly): "
                            "no overflow check, a non-finite step is --on-nan's; 0 = torch's dynamic GradScaler, "
                            "which skips overflowing steps")
    channels_last: bool | None = opt(None, "--channels-last", tristate=True,
                                     help="NHWC memory format for model and input (auto: on for GPU)")
    compile: bool | None = opt(None, "--compile", tristate=True,
                               help="torch.compile the model (auto: on for GPU training)")
    compile_mode: str = opt("default", "--compile-mode", choices=COMPILE_MODES,
                            help="torch.compile mode; reduce-overhead adds CUDA graphs (fewer launch gaps); "
                            "max-autotune also tries Triton kernels for convolutions and matmuls (minutes to compile), "
                            "with CUDA graphs or without (max-autotune-no-cudagraphs)")
    compile_step: bool | None = opt(None, "--compile-step", tristate=True,
                                    help="torch.compile the optimizer step too (gradient clipping, the update, --ema, "
                                    "--on-nan skip's check), in --compile-mode, with the LR a tensor the schedule "
                                    "writes: no recompile, no host sync (auto: off)")
    cudnn_benchmark: bool | None = opt(None, "--cudnn-benchmark", tristate=True,
                                       help="let cuDNN autotune convolution algorithms (auto: on for GPU)")
    seed: int | None = opt(None, "--seed", metavar="N",
                           help="seed for initializing training (default: a random one); kept in checkpoints, "
                           "and a resumed run continues with its own")
    print_freq: int = opt(10, "-p", "--print-freq", metavar="N", help="print (and sync) every N steps")
    output_dir: str | None = opt(None, "--output-dir", metavar="DIR",
                                 help="where metrics and checkpoints go (default: runs/<arch>-<timestamp>)")
    resume: str = opt("", "--resume", metavar="PATH",
                      help="checkpoint to resume from (ours or the reference script's); 'auto' = "
                      "OUTPUT_DIR/checkpoint.pth.tar if present (needs --output-dir)")
    evaluate: bool = opt(False, "-e", "--evaluate", help="evaluate the model on the validation set and exit")
    val_tta: str = opt("none", "--val-tta", choices=("none", "flip"),
                       help="test-time augmentation: flip = average the logits of each val image and its mirror")
    eval_weights: str = opt("model", "--eval-weights", choices=("model", "ema"),
                            help="with -e / fasttrain eval: score the checkpoint's weights or their --ema average")
    checkpoint_interval: int = opt(0, "--checkpoint-interval", metavar="STEPS",
                                   help="also checkpoint every STEPS train steps, whatever -p is (0 = only at "
                                   "epoch ends)")
    on_nan: str = opt("abort", "--on-nan", choices=("abort", "skip"),
                      help="on a non-finite loss: stop the run, or skip that step's update")
    tensorboard: bool | None = opt(None, "--tensorboard", tristate=True,
                                   help="write TensorBoard events to OUTPUT_DIR/tb/ (auto: on when the tensorboard "
                                   "package imports)")
    profile: str | None = opt(None, "--profile", metavar="A:B",
                              help="torch.profiler over steps A..B-1 (0-based) of the first epoch on rank 0: a "
                              "Chrome/Perfetto trace in OUTPUT_DIR/profile/ and a top-10 ops table")


@dataclass
class DistConfig:
    world_size: int = opt(-1, "--world-size", metavar="N",
                          help="number of nodes (reference flags), or total processes with --dist-url")
    rank: int = opt(-1, "--rank", metavar="N", help="node rank for distributed training (reference flags)")
    dist_url: str | None = opt(None, "--dist-url", metavar="URL",
                               help="url used to set up distributed training, e.g. tcp://HOST:PORT")
    dist_backend: str = opt("auto", "--dist-backend", choices=("auto", "nccl", "gloo"),
                            help="auto = nccl on CUDA, gloo on CPU")
    gpu: int | None = opt(None, "--gpu", metavar="ID", help="GPU id to use (single process)")
    multiprocessing_distributed: bool = opt(False, "--multiprocessing-distributed",
                                            help="spawn one process per GPU (or per --nproc-per-node) as the reference")
    nproc_per_node: int = opt(0, "--nproc-per-node", metavar="N",
                              help="processes per node with --multiprocessing-distributed (default: GPU count)")
    timeout_s: float = opt(600.0, "--dist-timeout", metavar="SEC",
                           help="collective timeout: a dead rank ends the others after this long")


GROUPS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig, "dist": DistConfig}

# The options `fasttrain eval` uses (its --help lists only these): where the val images are and how to read
# them, how to run the model, and how to launch. Arch and image size come from the checkpoint.
EVAL_OPTIONS = {
    "data": ("data", "loader", "workers", "batch_size", "hw_decoder_load", "prefetch", "file_list", "max_bad_files",
             "val_steps", "val_res", "val_crop_ratio"),
    "run": ("device", "amp", "channels_last", "compile", "compile_mode", "cudnn_benchmark", "print_freq", "val_tta",
            "eval_weights"),
    "dist": tuple(f.name for f in dataclasses.fields(DistConfig)),
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> "Config":
        """Rebuild from to_dict() output (as stored in a checkpoint), ignoring fields this version lacks."""
        groups = {}
        for name, klass in GROUPS.items():
            known = {f.name for f in dataclasses.fields(klass)}
            groups[name] = klass(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**groups)


# Options that say the same thing two ways, (plain side, opt-in side): one layer of settings (a recipe, a TOML
# file, the flags) may set only one side of each (cli.py), and config.toml writes only the side in use.
EXCLUSIVE = ((frozenset({("optim", "lr")}), frozenset({("optim", "lr_per_256")})),
             (frozenset({("data", "image_size")}), frozenset({("data", "min_res"), ("data", "max_res")})))


def all_fields():
    """(group name, dataclasses.Field) for every option, in declaration order."""
    for group, klass in GROUPS.items():
        for f in dataclasses.fields(klass):
            yield group, f


def key_index() -> dict[str, tuple[str, str]]:
    """Every accepted TOML key -> (group, field). Keys are field names and long-flag names."""
    index = {}
    for group, f in all_fields():
        index[f.name] = (group, f.name)
        for flag in f.metadata["flags"]:
            if flag.startswith("--"):
                index[flag[2:]] = (group, f.name)
                index[flag[2:].replace("-", "_")] = (group, f.name)
    return index


def load_toml(path: str) -> dict[tuple[str, str], Any]:
    """Read a flat TOML config file into {(group, field): value}. Unknown keys are an error."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    return toml_values(raw, path)


def toml_values(raw: dict[str, Any], path: str) -> dict[tuple[str, str], Any]:
    """Flat TOML keys -> {(group, field): value}. Unknown keys are an error."""
    index = key_index()
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # a [table]: the file is flat, one key per flag
            raise UserError(f"config file {path}: [{key}] is a table, and fasttrain's config has none: one "
                            f"key per long flag name at the top level (e.g. batch-size = 256, lr = 0.1)")
        if key not in index:
            raise UserError(f"config file {path}: unknown key '{key}' (keys are the long flag names, "
                            f"e.g. batch-size, lr, arch)")
        out[index[key]] = value
    return out


def build_config(values: dict[tuple[str, str], Any]) -> Config:
    """Make a Config from {(group, field): value}, checking types and ranges."""
    cfg = Config()
    for (group, name), value in values.items():
        f = next(f for g, f in all_fields() if g == group and f.name == name)
        setattr(getattr(cfg, group), name, _coerce(f, value))
    if cfg.data.dummy:  # the reference's --dummy is the synthetic loader
        cfg.data.loader = "synthetic"
    validate(cfg)
    return cfg


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    flag = next((fl for fl in f.metadata["flags"] if fl.startswith("--")), f.name)
    if value is None:
        return None
    if f.metadata["tristate"]:
        kind = bool
    else:
        kind = type(f.default) if f.default is not None else (int if "int" in str(f.type) else str)
    # Values arrive typed (argparse converted flags; TOML has its own types): check, never convert, so that
    # `batch-size = 1.5` is an error rather than 1. An integer is a fine float (`lr = 1`); a bool is no number.
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(kind, (object,))
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise UserError(f"{flag} must be {names.get(kind, kind.__name__)}, got {value!r}")
    if kind is float:
        value = float(value)
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise UserError(f"{flag} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    return value


def resolve_toggles(run: RunConfig, device_type: str) -> RunConfig:
    """Fill the "auto" performance toggles for this device (returns a new RunConfig)."""
    gpu = device_type == "cuda"
    amp = run.amp
    if amp == "auto":
        import torch
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "none"

    def pick(value, auto):
        return auto if value is None else value
    return dataclasses.replace(run, amp=amp, channels_last=pick(run.channels_last, gpu),
                               compile=pick(run.compile, gpu and not run.evaluate),
                               compile_step=pick(run.compile_step, False) and not run.evaluate,
                               cudnn_benchmark=pick(run.cudnn_benchmark, gpu))


def replace(cfg: Config, **groups: dict[str, Any]) -> Config:
    """A new Config with some fields of some groups changed (`replace(cfg, run={"seed": 1})`); `cfg` and its
    groups are left as they are, so a caller (a test, a notebook, the bench) keeps its own object."""
    return dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **changes)
                                       for g, changes in groups.items()})


def resolve_lr(optim: OptimConfig, global_batch: int) -> OptimConfig:
    """--lr-per-256 x global batch / 256 as --lr (returns a new OptimConfig; unchanged without it)."""
    if not optim.lr_per_256:
        return optim
    return dataclasses.replace(optim, lr=optim.lr_per_256 * global_batch / 256)
