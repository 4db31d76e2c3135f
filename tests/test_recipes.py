"""Recipes: one table holds every default, the paper's ImageNet and Clothing1M values resolve into config.json,
every value stays a flag, the learning-rate schedules follow their formulas, and --weights imagenet fails fast
offline with one line."""

import json
import math
import os

import pytest
from conftest import ENV, UNREACHABLE, read_metrics, run_script

import config
import train

SMALL = [
    "--cpu",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "256",
    "--model",
    "digits_cnn",
    "--weights",
    "none",
    "--batch-size",
    "32",
    "--max-steps",
    "4",
    "--eval-every",
    "2",
    "--resize",
    "32",
    "--image-size",
    "32",
]


def print_config(capsys, monkeypatch, *flags: str) -> dict:
    """train.py --print-config FLAGS as a dict; it must exit 0 without loading data or building an Accelerator."""

    def refuse(*args, **kwargs):
        raise AssertionError("--print-config must not load data or build an Accelerator")

    monkeypatch.setattr(train, "Accelerator", refuse)
    monkeypatch.setattr(train.data, "prepare_data", refuse)
    assert train.cli(["--print-config", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_print_config_shows_the_papers_imagenet_recipe(capsys, monkeypatch, tmp_path):
    config = print_config(capsys, monkeypatch, "--dataset", "imagenet", "--data-dir", str(tmp_path))
    assert {
        k: config[k]
        for k in (
            "recipe",
            "model",
            "weights",
            "lr",
            "momentum",
            "weight_decay",
            "batch_size",
            "max_steps",
            "lr_schedule",
            "poly_power",
            "milestones",
            "resize",
            "image_size",
            "data_dir",
        )
    } == {
        "recipe": "imagenet",
        "model": "resnet50",
        "weights": "none",
        "lr": 2e-3,
        "momentum": 0.95,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "max_steps": 500_000,
        "lr_schedule": "poly",
        "poly_power": 2.0,
        "milestones": None,
        "resize": 256,
        "image_size": 224,
        "data_dir": str(tmp_path),
    }
    assert config["num_classes"] is None and config["in_channels"] is None  # decided by the data
    assert config["train_eval_size"] == 50_000  # not all 1.28M examples at every evaluation


def test_print_config_shows_the_papers_clothing1m_recipe(capsys, monkeypatch, tmp_path):
    config = print_config(capsys, monkeypatch, "--dataset", "clothing1m", "--data-dir", str(tmp_path))
    assert {
        k: config[k]
        for k in (
            "recipe",
            "model",
            "weights",
            "lr",
            "momentum",
            "weight_decay",
            "batch_size",
            "max_steps",
            "lr_schedule",
            "poly_power",
            "milestones",
            "resize",
            "image_size",
            "noise",
        )
    } == {
        "recipe": "clothing1m",
        "model": "resnet50",
        "weights": "imagenet",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 256,
        "max_steps": 10_000,
        "lr_schedule": "step",
        "poly_power": None,
        "milestones": "5000,7333",
        "resize": 256,
        "image_size": 224,
        "noise": "none",
    }


def test_print_config_of_the_quick_start_leaves_the_model_to_the_data(capsys, monkeypatch):
    config = print_config(capsys, monkeypatch)
    assert (config["recipe"], config["max_steps"], config["batch_size"], config["eval_every"]) == (
        "digits",
        300,
        128,
        50,
    )
    assert config["milestones"] == "150,220" and config["model"] is None  # by input size, once the data is loaded
    assert (config["in_memory"], config["resize"], config["image_size"]) == ("auto", 256, 224)  # photos only
    assert "print_config" not in config


@pytest.mark.parametrize(
    "recipe, values, lrs",
    [
        # poly of power 2 at t = 1 and t = 3 of T = 4
        (
            "imagenet",
            {
                "lr": 2e-3,
                "momentum": 0.95,
                "weight_decay": 1e-4,
                "lr_schedule": "poly",
                "poly_power": 2.0,
                "milestones": None,
            },
            [2e-3 * (1 - 1 / 4) ** 2, 2e-3 * (1 - 3 / 4) ** 2],
        ),
        # milestones 5000,7333 of 10k steps scaled to 2,3 of 4 steps
        (
            "clothing1m",
            {
                "lr": 0.01,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "lr_schedule": "step",
                "poly_power": None,
                "milestones": "2,3",
            },
            [0.01, 0.01 * 0.1**2],
        ),
    ],
)
def test_a_tiny_run_of_each_photo_recipe_records_its_values(tmp_path, recipe, values, lrs):
    out = tmp_path / recipe
    assert train.cli([*SMALL, "--recipe", recipe, "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == recipe and {k: config[k] for k in values} == values
    # the flags over the recipe: 32 px images no larger than --image-size 32 stay in memory (no warp: resize 0)
    assert (config["input_path"], config["resize"], config["image_size"], config["weights"]) == (
        "memory",
        0,
        32,
        "none",
    )
    metrics = read_metrics(out)
    assert [m["lr"] for m in metrics] == pytest.approx(lrs, rel=1e-12)  # logged lr: that of the last step, t = step - 1


@pytest.mark.parametrize(
    "dataset, recipe",
    [
        ("digits", "digits"),
        ("synthetic", "cifar"),
        ("cifar10", "cifar"),
        ("CIFAR100", "cifar"),
        ("uoft-cs/cifar100", "cifar"),
        ("imagenet", "imagenet"),
        ("ILSVRC/imagenet-1k", "imagenet"),
        ("clothing1m", "clothing1m"),
        ("./my_photos", "cifar"),
        ("someone/food101n", "cifar"),
    ],
)
def test_the_recipe_is_chosen_by_the_dataset_name(dataset, recipe):
    assert config.resolve(["--dataset", dataset]).recipe == recipe
    assert config.resolve(["--dataset", dataset, "--recipe", "digits"]).recipe == "digits"  # unless given


def other_value(key: str, value):
    """A flag value different from the recipe's `value` for `key`."""
    named = {
        "model": "resnet18",
        "weights": "mine.safetensors",
        "method": "cce",
        "noise": "symmetric",
        "milestones": "1,2",
        "resize": 40,
        "image_size": 36,
        "lr_schedule": "cosine" if value != "cosine" else "step",
        "in_memory": "no",
        "augment": "rrc",
        "train_eval_size": 123 if value != 123 else 124,
        "momentum": 0.5,
        "eval_batch_size": 100,
        "audit_epochs": 20.0,
    }
    if key in named:
        return named[key]
    return value + 1 if isinstance(value, int) and not isinstance(value, bool) else value + 0.125


USED_WITH = {
    "noise": ["--noise-rate", "0.2"],
    "synthetic_size": ["--dataset", "synthetic"],
    "synthetic_classes": ["--dataset", "synthetic"],
    "resize": ["--image-size", "32"],
    "noise_rate": ["--noise", "symmetric"],
    "noise_seed": ["--noise", "symmetric", "--noise-rate", "0.2"],
}


@pytest.mark.parametrize("recipe", list(config.RECIPES))
def test_every_recipe_value_is_a_flag_that_overrides_it(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.safetensors").write_bytes(b"")  # --weights names a file: it must exist
    assert all(getattr(config.parse_args([]), key) is None for key in config.RECIPES[recipe])  # no second default
    for key, value in config.RECIPES[recipe].items():
        if key == "channels_last":
            assert config.resolve(["--recipe", recipe, "--no-channels-last"]).channels_last is False
            continue
        if (
            key == "milestones"
            and value is None
            or key == "poly_power"
            and config.RECIPES[recipe]["lr_schedule"] != "poly"
        ):
            continue  # not used by this recipe's schedule (giving it is an error, tested below)
        new = other_value(key, value)
        uses = USED_WITH.get(key, [])  # a flag the run would not use is refused: give it a run that uses it
        args = config.resolve(["--recipe", recipe, *uses, f"--{key.replace('_', '-')}", str(new)])
        assert getattr(args, key) == new, key


def test_another_max_steps_scales_the_recipes_milestones():
    assert config.resolve(["--dataset", "cifar100", "--max-steps", "3000"]).milestones == "1500,2200"
    assert config.resolve(["--dataset", "cifar100", "--max-steps", "3000", "--milestones", "100"]).milestones == "100"
    args = config.resolve(["--recipe", "imagenet", "--lr-schedule", "step"])
    assert (args.milestones, args.poly_power) == ("", None) and config.milestone_steps(args) == []  # a constant lr
    args = config.resolve(["--recipe", "cifar", "--lr-schedule", "poly"])
    assert (args.milestones, args.poly_power) == (None, 2.0)


def test_poly_and_cosine_learning_rates_follow_their_formulas():
    lr, T = 2e-3, 500_000
    for t, expected in (
        (0, 2e-3),
        (125_000, 2e-3 * 0.75**2),
        (250_000, 5e-4),
        (375_000, 1.25e-4),
        (T - 1, 2e-3 / T**2),
    ):
        assert config.lr_at(t, lr, T, "poly", power=2.0) == pytest.approx(expected, rel=1e-9), t
    assert config.lr_at(250_000, lr, T, "poly", power=1.0) == pytest.approx(1e-3)
    for t, expected in (
        (0, 2e-3),
        (125_000, 1e-3 * (1 + math.sqrt(0.5))),
        (250_000, 1e-3),
        (375_000, 1e-3 * (1 - math.sqrt(0.5))),
    ):
        assert config.lr_at(t, lr, T, "cosine") == pytest.approx(expected, rel=1e-9), t
    steps = [
        config.lr_at(t, 0.1, 30_000, "step", [15_000, 22_000]) for t in (0, 14_999, 15_000, 21_999, 22_000, 29_999)
    ]
    assert steps == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipe", "food101n"], "unknown --recipe 'food101n': choose one of cifar, digits, imagenet, clothing1m"),
        (["--lr-schedule", "linear"], "unknown --lr-schedule 'linear': choose one of step, poly, cosine"),
        (["--lr-schedule", "poly", "--poly-power", "0"], "--poly-power must be positive, got 0.0"),
        (["--recipe", "imagenet", "--poly-power", "-1"], "--poly-power must be positive"),
        (["--recipe", "imagenet", "--milestones", "100"], "--milestones applies to --lr-schedule step only"),
        (["--poly-power", "2"], "--poly-power applies to --lr-schedule poly only"),
        (["--weights", "imagenet"], "--weights imagenet needs --model resnet18 or resnet50"),
        (["--weights", "imagenet", "--model", "resnet44"], "--weights imagenet needs --model resnet18 or resnet50"),
        (["--weights", "/no/such/weights.safetensors"], "no such file"),
        (["--resize", "32", "--image-size", "40"], "--image-size 40 must be between 1 and --resize 32"),
        (["--resize", "0"], "--resize must be at least 1"),
        (["--lr", "0"], "--lr must be positive"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
    ],
)
def test_bad_recipe_input_gives_one_line_and_exit_2(tmp_path, capsys, flags, message):
    for print_only in ([], ["--print-config"]):  # the same check with and without --print-config
        assert train.cli(["--cpu", "--output-dir", str(tmp_path / "bad"), *flags, *print_only]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_imagenet_weights_offline_give_one_line_and_exit_2(tmp_path):
    # An unreachable proxy makes any machine offline for urllib; an empty TORCH_HOME holds no cached weights.
    env = {
        **ENV,
        "TORCH_HOME": str(tmp_path / "torch"),
        "NO_PROXY": "",
        "no_proxy": "",
        **{v: UNREACHABLE for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")},
    }
    proc = run_script(
        "train.py",
        *SMALL,
        "--recipe",
        "clothing1m",
        "--weights",
        "imagenet",
        "--model",
        "resnet50",
        "--output-dir",
        str(tmp_path / "run"),
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --weights imagenet: cannot download https://"), err
    assert "pass a local file: --weights resnet50_imagenet.safetensors" in err[0]
    assert not (tmp_path / "run").exists()  # failed before the output folder and the data


def test_imagenet_weights_load_from_the_torch_hub_cache_with_a_new_classifier(tmp_path, monkeypatch):
    import torch
    import torchvision

    import models

    # what torchvision's weights API downloads, placed in an empty cache: the load path without the network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(url))
    model = models.build_model("resnet18", 14, weights="imagenet")
    assert torch.equal(model.conv1.weight, source.conv1.weight) and torch.equal(
        model.layer4[1].bn2.bias, source.layer4[1].bn2.bias
    )
    assert model.fc.weight.shape == (14, 512)
    same_classes = models.build_model("resnet18", 1000, weights="imagenet")
    assert not torch.equal(same_classes.fc.weight, source.fc.weight)  # the head is new even for 1,000 classes
