"""Named recipes: every shipped one parses and trains an epoch on the embedded data; `fasttrain recipes` says
what each targets and that fasttrain has not run them on ImageNet; flags override a recipe flag by flag;
BlurPool ResNet-50 keeps its shapes, loads its own checkpoint and trains."""

from __future__ import annotations

import os

import pytest
import torch

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli, recipes
from fasttrain.data.demo import write_demo_dataset
from fasttrain.metrics import read_jsonl

FFCV = ("rn50-16ep", "rn50-24ep", "rn50-32ep", "rn50-40ep", "rn50-88ep", "rn18-16ep", "rn18-88ep")


def parse(*argv):
    return cli.parse_config(cli.build_parser().parse_args(["train", *argv]))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The embedded demo dataset's generator, 10 classes, with 1 train and 1 val image a class."""
    return write_demo_dataset(str(tmp_path_factory.mktemp("demo") / "data"), {"train": 1, "val": 1})


# FFCV's own files, transcribed (libffcv/ffcv-imagenet at 5bab20e: rn50_configs/, rn18_configs/ and the README's
# results table): the oracle the shipped TOMLs are checked against, not the TOMLs themselves.
# name: (arch, epochs, GPUs, batch per GPU, lr, weight decay, start_ramp, end_ramp, top-1, top-5, minutes)
FFCV_FILES = {
    "rn50-16ep": ("resnet50", 16, 8, 512, 1.7, 1e-4, 11, 13, 73.8, 90.8, 14.9),
    "rn50-24ep": ("resnet50", 24, 8, 512, 1.7, 1e-4, 17, 20, 75.6, 92.1, 21.7),
    "rn50-32ep": ("resnet50", 32, 8, 512, 1.7, 1e-4, 23, 27, 76.6, 92.7, 28.7),
    "rn50-40ep": ("resnet50", 40, 8, 512, 1.7, 1e-4, 29, 34, 77.2, 93.2, 35.6),
    "rn50-88ep": ("resnet50", 88, 8, 512, 1.7, 1e-4, 65, 76, 78.4, 94.1, 77.2),
    "rn18-16ep": ("resnet18", 16, 1, 1024, 0.5, 5e-5, 11, 13, 66.9, 86.8, 35.0),
    "rn18-88ep": ("resnet18", 88, 1, 1024, 0.5, 5e-5, 65, 76, 72.4, 90.3, 187.3),
}


@pytest.mark.parametrize("name", FFCV)
def test_each_ffcv_recipe_is_ffcvs_file(name):
    """What FFCV's YAML and train_imagenet.py's defaults say, as fasttrain trains it: the LR FFCV used at its
    global batch, its ramp, and the published result as the recipe's target."""
    arch, epochs, gpus, per_gpu, lr, wd, start, end, top1, top5, minutes = FFCV_FILES[name]
    c = parse("D", "--recipe", name)
    assert (c.model.arch, c.optim.epochs, c.data.batch_size, c.optim.weight_decay) == (arch, epochs, gpus * per_gpu, wd)
    assert c.optim.lr_per_256 * gpus * per_gpu / 256 == pytest.approx(lr, rel=1e-12)
    assert (c.data.min_res, c.data.max_res, c.data.start_ramp, c.data.end_ramp, c.data.val_res) == (160, 192, start,
                                                                                                     end, 256)
    assert (c.optim.lr_schedule, c.optim.lr_peak_epoch, c.optim.momentum, c.optim.label_smoothing) == \
        ("triangular", 2, 0.9, 0.1)  # peak: train_imagenet.py's default, which the YAMLs keep
    assert c.optim.no_bn_wd and c.model.blurpool and c.run.val_tta == "flip" and c.optim.optimizer == "sgd"
    meta = recipes.load(name)[1]
    assert (meta["top1"], meta["top5"], meta["wall_minutes"]) == (top1, top5, minutes)
    assert meta["hardware"] == ("8x A100" if gpus == 8 else "1x A100")


def test_the_issues_recipes_are_shipped_with_their_targets(capsys):
    assert set(recipes.names()) == {*FFCV, "reference"}
    c = parse("D", "--recipe", "reference")  # pytorch/examples imagenet/main.py's defaults, ResNet-50
    assert (c.model.arch, c.optim.epochs, c.optim.lr, c.data.batch_size, c.optim.lr_schedule) == \
        ("resnet50", 90, 0.1, 256, "step")
    assert recipes.load("reference")[1]["top1"] == 76.13  # torchvision's ResNet50_Weights.IMAGENET1K_V1
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "has not itself run these recipes on ImageNet" in out
    for name, top1, minutes in (("rn50-16ep", "73.8", "14.9 min"), ("rn50-88ep", "78.4", "77.2 min"),
                                ("rn18-16ep", "66.9", "35 min"), ("rn18-88ep", "72.4", "187.3 min")):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert top1 in line and minutes in line and "A100" in line and "ffcv" in line.lower(), line


def test_recipe_values_and_flags_over_them(tmp_path):
    c = parse("D", "--recipe", "rn50-16ep")
    assert (c.model.arch, c.model.blurpool, c.optim.epochs, c.optim.lr_schedule, c.optim.lr_peak_epoch) == \
        ("resnet50", True, 16, "triangular", 2)
    assert (c.data.min_res, c.data.max_res, c.data.start_ramp, c.data.end_ramp, c.data.val_res) == (160, 192, 11, 13, 256)
    assert c.run.val_tta == "flip" and c.optim.no_bn_wd and c.optim.label_smoothing == 0.1
    assert c.optim.lr_per_256 == pytest.approx(1.7 * 256 / 4096) and c.data.batch_size == 4096
    # one flag at a time wins; the rest of the recipe stays
    c = parse("D", "--recipe", "rn50-16ep", "--epochs", "20", "--lr", "0.3", "--image-size", "128")
    assert (c.optim.epochs, c.optim.lr, c.optim.lr_per_256, c.data.image_size, c.data.min_res) == (20, 0.3, 0, 128, 0)
    assert c.model.blurpool and c.data.val_res == 256
    # a --config file sits between the recipe and the flags
    f = tmp_path / "c.toml"
    f.write_text("lr-per-256 = 0.2\nblurpool = false\nmin-res = 128\nmax-res = 160\n")
    c = parse("D", "--recipe", "rn18-16ep", "--config", str(f), "--max-res", "192")
    assert (c.optim.lr_per_256, c.model.blurpool, c.data.min_res, c.data.max_res) == (0.2, False, 128, 192)


@pytest.mark.parametrize("argv,needle", [
    (["--recipe", "rn50-1ep"], "unknown recipe 'rn50-1ep'"),
    (["--lr", "0.1", "--lr-per-256", "0.1"], "give one of them"),
    (["--min-res", "160"], "needs both --min-res and --max-res"),
    (["--min-res", "192", "--max-res", "160"], "at most --max-res"),
    (["--lr-schedule", "triangular", "--warmup-epochs", "2"], "drop --warmup-epochs"),
    (["--lr-schedule", "triangular", "--epochs", "2", "--lr-peak-epoch", "2"], "below --epochs"),
    (["--ema", "1.5"], "--ema is a decay"),
    (["--opt", "adam"], "invalid choice"),
])
def test_bad_recipe_options_are_one_line(argv, needle, capsys):
    assert cli.main(["train", "D", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttrain: error:") and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(recipes.names()))
def test_every_recipe_trains_an_epoch(name, demo_data, tmp_path, capsys):
    """The recipe as shipped, on the embedded data, with only its scale cut down: batch 4, one step, tiny
    images, and only its last epoch run (--start-epoch), so the LR schedule is the recipe's own. The longer
    ResNet-50 recipes differ from rn50-16ep only in their epochs and ramp: they run on a ResNet-18, to keep
    the suite short on a 2-core machine; rn50-16ep and reference run their ResNet-50."""
    values = recipes.load(name)[0]
    epochs = values[("optim", "epochs")]
    small = ["--min-res", "24", "--max-res", "32", "--val-res", "40"] if ("data", "min_res") in values \
        else ["--image-size", "32"]
    if name.startswith("rn50") and name != "rn50-16ep":
        small += ["-a", "resnet18"]
    out = tmp_path / "r"
    assert cli.main(["train", demo_data, "--recipe", name, "--device", "cpu", "-j", "0", "-b", "4", "--seed", "1",
                     "--steps-per-epoch", "1", "--start-epoch", str(epochs - 1), *small,
                     "--output-dir", str(out)]) == 0
    (row,) = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert row["epoch"] == epochs - 1 and row["train_samples"] == 4 and row["val_samples"] == 10
    assert (row["image_size"], row["val_image_size"]) == ((32, 40) if "--min-res" in small else (32, 32))
    if name != "rn50-16ep":
        return
    # BlurPool ResNet-50 loads its own checkpoint: `fasttrain eval` rebuilds it (blurpool, 40 px, flip TTA,
    # all read from the checkpoint) and scores what the run recorded.
    capsys.readouterr()
    assert cli.main(["eval", demo_data, "--checkpoint", str(out / ckpt_io.LATEST), "--device", "cpu", "-j", "0",
                     "-b", "4"]) == 0
    assert f"Acc@1 {row['val_top1']:.3f} " in capsys.readouterr().out


def test_blurpool_resnet50_shapes_checkpoint_and_training():
    """BlurPool on ResNet-50: the six strided convs with 16+ input channels blur first (FFCV's rule; not the
    stem), outputs keep their shape, the state_dict is torchvision's (so it loads into a plain ResNet-50 and
    back), and a few SGD steps on one batch lower its loss."""
    from fasttrain.blurpool import BlurConv2d
    from fasttrain.config import ModelConfig
    from fasttrain.model import build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50", blurpool=True), 5)
    plain = build_model(ModelConfig(arch="resnet50"), 5)
    blurred = sorted(n for n, m in model.named_modules() if isinstance(m, BlurConv2d))
    assert blurred == sorted(f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0"))
    x = torch.randn(4, 3, 64, 64)  # 2x2 px in layer4: BatchNorm's batch statistics need more than 1x1
    assert model(x).shape == plain(x).shape == (4, 5)
    # conv(blur(x)): the binomial filter [1 2 1] x [1 2 1] / 16, per channel, at stride 1
    conv = model.layer2[0].conv2
    h = torch.randn(1, conv.in_channels, 8, 8)
    k = torch.tensor([1.0, 2.0, 1.0])
    blur = (k[:, None] * k[None, :] / 16).expand(conv.in_channels, 1, 3, 3)
    ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(h, blur, padding=1, groups=conv.in_channels),
                                     conv.weight, stride=2, padding=1)
    torch.testing.assert_close(conv(h), ref)
    state = model.state_dict()
    assert set(state) == set(plain.state_dict())  # no blur filters or wrapper prefixes saved
    plain.load_state_dict(state)
    again = build_model(ModelConfig(arch="resnet50", blurpool=True), 5)
    again.load_state_dict(state)
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    y = torch.tensor([0, 3, 1, 4])
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bench_recipe_section(tiny_data):
    """`fasttrain bench --sections recipe`: fixed size (the reference), progressive and BlurPool entries,
    each through fasttrain's torchvision loader and train step, with sane numbers."""
    from fasttrain.bench.loaders import BenchData
    from fasttrain.bench.recipe import recipe_section
    from fasttrain.bench.report import add_ratios
    from fasttrain.bench.suite import Plan
    plan = Plan(torch.device("cpu"), ["resnet18"], 0, 4, 4, model_image_size=64, num_classes=4, e2e_steps=(1, 2))
    entries = recipe_section(plan, BenchData.scan(tiny_data), "resnet18")
    add_ratios(entries)
    assert [e["name"] for e in entries] == ["recipe/resnet18/fixed 64", "recipe/resnet18/progressive 48->56",
                                            "recipe/resnet18/blurpool 64"]
    assert [e["reference"] for e in entries] == [True, False, False]
    assert entries[1]["epoch_sizes"] == [48, 48, 56, 56] and entries[2]["blurpool"]
    for e in entries:
        assert e["images_per_sec"] > 0 and e["ratio_to_reference"] > 0 and e["timed_images"] == 4 * 2 * 4


def test_another_epochs_scales_the_recipes_epoch_knobs(demo_data, tmp_path, capsys):
    """A quick try of a recipe, `--recipe rn18-16ep --epochs 1`, runs: the LR peak and the resizing ramp move
    in proportion (FFCV's peak at epoch 2 of 16 -> 0.125 of 1; ramp 11-13 -> 1-1), said in one line; what a
    flag or --config sets is kept; the recipe's own epochs change nothing."""
    c = parse("D", "--recipe", "rn18-16ep", "--epochs", "1")
    assert (c.optim.lr_peak_epoch, c.data.start_ramp, c.data.end_ramp) == (0.125, 1, 1)
    assert "--lr-peak-epoch 2 -> 0.125, --start-ramp 11 -> 1, --end-ramp 13 -> 1" in capsys.readouterr().out
    c = parse("D", "--recipe", "rn50-16ep", "--epochs", "32")  # twice as long: rn50-32ep's shape, nearly
    assert (c.optim.lr_peak_epoch, c.data.start_ramp, c.data.end_ramp) == (4.0, 22, 26)
    c = parse("D", "--recipe", "rn18-16ep", "--epochs", "8", "--lr-peak-epoch", "1.5", "--end-ramp", "7")
    assert (c.optim.lr_peak_epoch, c.data.start_ramp, c.data.end_ramp) == (1.5, 6, 7)
    f = tmp_path / "c.toml"
    f.write_text("epochs = 4\nstart-ramp = 0\n")
    c = parse("D", "--recipe", "rn18-16ep", "--config", str(f))
    assert (c.optim.epochs, c.optim.lr_peak_epoch, c.data.start_ramp, c.data.end_ramp) == (4, 0.5, 0, 3)
    capsys.readouterr()
    c = parse("D", "--recipe", "rn18-16ep", "--epochs", "16")
    assert (c.optim.lr_peak_epoch, c.data.start_ramp, c.data.end_ramp) == (2.0, 11, 13)
    assert "scale" not in capsys.readouterr().out
    # and the quick try trains, at a scale this machine affords (its shape as the README shows it)
    out = tmp_path / "try"
    assert cli.main(["train", demo_data, "--recipe", "rn18-16ep", "--epochs", "1", "--device", "cpu", "-j", "0",
                     "-b", "4", "--min-res", "24", "--max-res", "32", "--val-res", "40",
                     "--output-dir", str(out)]) == 0
    (row,) = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert row["epoch"] == 0 and row["image_size"] == 24
