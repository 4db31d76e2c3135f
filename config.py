"""The one configuration layer: the recipe table and every default, the flags train.py reads, and one
`resolve` that checks all a user typed before any file is touched (what --print-config shows, what sweep.py
--dry-run checks for every job). Also the names of methods and settings that tables, plots and cards use.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
from pathlib import Path
from typing import Any

import accelerate
import datasets
import huggingface_hub
import numpy
import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import data
import losses
import models
import noise
import runfolder

SUITE_DIR = Path(__file__).resolve().parent  # where train.py, eval.py and sweep.py live

# The paper's exp_base for CIFAR-100 (CVPR version), by (noise, rate).
PAPER_EXP_BASE = {
    ("none", 0.0): 10.0,
    ("symmetric", 0.2): 14.0,
    ("symmetric", 0.4): 12.0,
    ("symmetric", 0.6): 8.0,
    ("asymmetric", 0.2): 14.0,
    ("asymmetric", 0.3): 10.0,
    ("asymmetric", 0.4): 8.0,
}


# Every default of a run lives here: a recipe is the value of each flag left out. Keys are flag names.
# milestones are the recipe's steps for its max_steps; another --max-steps scales them (50% and 73.3%).
# None: decided at run time (model by input size, resize/image_size by the data).
COMMON = dict(
    synthetic_size=5_000,
    synthetic_classes=10,
    noise="none",
    noise_rate=0.0,
    noise_seed=0,
    model=None,
    weights="none",
    method="proselflc",  # the loss's own defaults live in losses.py (LOSS_DEFAULTS)
    momentum=0.9,
    weight_decay=5e-4,
    lr_schedule="step",
    poly_power=2.0,
    gradient_accumulation_steps=1,
    seed=0,
    keep_checkpoints=2,
    log_every=20,
    channels_last=True,
    in_memory="auto",
    resize=256,
    image_size=224,
    augment="paper",
    max_bad_fraction=0.01,  # photos (decode per batch)
    train_eval_size=None,  # None: the whole map-style split (a stream: 10,000)
    eval_batch_size=None,  # None: the --batch-size (evaluation needs less memory per example than training)
    audit_epochs=None,  # the label audit's early window (audit.TrainingDynamics); None: chosen by the run
)


RECIPES = {
    # Section 5.1 (1): CIFAR-100, ResNet-44 (by input size), pad-4 crop and flip
    "cifar": {
        **COMMON,
        "max_steps": 30_000,
        "batch_size": 256,
        "lr": 0.1,
        "milestones": "15000,22000",
        "eval_every": 1_000,
        "save_every": 5_000,
        # 30 evaluations of all 50,000 + 10,000 test images would be ~8% of the run's forward passes
        # (a training step is ~3 forwards); 10,000 + 10,000 are ~2.6%, and 10,000 random examples
        # still measure the Figure 3 fractions to about +-0.5%
        "train_eval_size": 10_000,
    },
    # the quick start: 300 steps on 8x8 digits in about 10 s on a CPU
    "digits": {
        **COMMON,
        "max_steps": 300,
        "batch_size": 128,
        "lr": 0.1,
        "milestones": "150,220",
        "eval_every": 50,
        "save_every": 100,
    },
    # Section 5.1 (2): ResNet-50, polynomial decay of power 2, warp 256, random crop 224, flip
    "imagenet": {
        **COMMON,
        "model": "resnet50",
        "max_steps": 500_000,
        "batch_size": 64,
        "lr": 2e-3,
        "momentum": 0.95,
        "weight_decay": 1e-4,
        "lr_schedule": "poly",
        "poly_power": 2.0,
        "milestones": None,
        "eval_every": 10_000,
        "save_every": 10_000,
        "resize": 256,
        "image_size": 224,
        # 1.28M examples: scoring all of them at each evaluation would cost more decoding than training,
        # and the audit's statistics would take 5 GB of device memory
        "train_eval_size": 50_000,
    },
    # Section 5.3: ResNet-50 from ImageNet weights, Section 5.1 with lr 0.01 and 10k steps
    "clothing1m": {
        **COMMON,
        "model": "resnet50",
        "weights": "imagenet",
        "max_steps": 10_000,
        "batch_size": 256,
        "lr": 0.01,
        "milestones": "5000,7333",
        "eval_every": 1_000,
        "save_every": 1_000,
        "resize": 256,
        "image_size": 224,
    },
}


DEFAULT_DATASET = "digits"


# --recipe left out: by dataset name or Hub id (lower case); any other name or path gets "cifar".
RECIPE_BY_DATASET = {
    "digits": "digits",
    "synthetic": "cifar",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "uoft-cs/cifar10": "cifar",
    "uoft-cs/cifar100": "cifar",
    "imagenet": "imagenet",
    "ilsvrc/imagenet-1k": "imagenet",
    "clothing1m": "clothing1m",
}


LR_SCHEDULES = ("step", "poly", "cosine")


LOSS_DEFAULTS = losses.TrainingLoss.__init__.__kwdefaults__  # the loss's own defaults live in losses.py
STREAM_TRAIN_EVAL_SIZE = 10_000  # --train-eval-size of a stream when the recipe leaves it open
STREAM_AUDIT_EPOCHS = 15.0  # a stream's audit window when --audit-epochs is not given


_NAMED_NUM_CLASSES = {
    "digits": 10,
    "cifar10": 10,
    "cifar100": 100,
    "imagenet": 1000,
    "clothing1m": data.CLOTHING1M_CLASSES,
}


KNOWN_NUM_CLASSES = _NAMED_NUM_CLASSES | {
    data.HUB_IDS[name].lower(): n for name, n in _NAMED_NUM_CLASSES.items() if name in data.HUB_IDS
}  # and by Hub id (lower case, as typed names are)


PRINT_CONFIG_UNKNOWN = ("num_classes", "in_channels")  # known only once the data is loaded


def by_recipe(key: str) -> str:
    """The recipes' values of one flag for --help, e.g. 'cifar, digits: 0.9; imagenet: 0.95'."""
    groups: dict[str, list[str]] = {}
    for name, recipe in RECIPES.items():
        groups.setdefault(
            "-"
            if recipe[key] is None
            else f"{recipe[key]:,}"
            if isinstance(recipe[key], int) and not isinstance(recipe[key], bool)
            else str(recipe[key]),
            [],
        ).append(name)
    if len(groups) == 1:
        return f"default {next(iter(groups))}"
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in groups.items())


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The dataset, its columns, the label noise and the input path."""
    d = p.add_argument_group("data and noise")
    d.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="digits, synthetic, cifar10, cifar100, imagenet, clothing1m, a Hub id or a local path",
    )
    d.add_argument("--data-dir", help="local copy: save_to_disk folder, parquet files or CIFAR python-pickle folder")
    d.add_argument("--streaming", action="store_true", help="stream the training split instead of holding it in memory")
    d.add_argument("--image-column")
    d.add_argument("--label-column")
    d.add_argument("--key-column", help="stable example id for the noise; default: a hash of the image bytes")
    d.add_argument(
        "--synthetic-size", type=int, help=f"training examples of --dataset synthetic ({by_recipe('synthetic_size')})"
    )
    d.add_argument("--synthetic-classes", type=int, help=f"({by_recipe('synthetic_classes')})")
    d.add_argument("--noise", help=f"none, symmetric, asymmetric, pairflip or file ({by_recipe('noise')})")
    d.add_argument("--noise-rate", type=float, help=f"({by_recipe('noise_rate')})")
    d.add_argument(
        "--noise-seed", type=int, help=f"seed of the label noise, separate from --seed ({by_recipe('noise_seed')})"
    )
    d.add_argument("--noise-file", help="real noisy labels: CIFAR-N .pt, .npy, .csv or .parquet")
    d.add_argument("--noise-key", help="which labels of --noise-file, e.g. worse_label")
    d.add_argument("--noise-pairs", help="asymmetric pairs 'a:b,b:a,...' or a preset (cifar10, cifar100, synthetic)")
    d.add_argument(
        "--in-memory",
        choices=("auto", "yes", "no"),
        help="input path: yes decodes the training split once into memory (one image size), no decodes "
        "per batch in DataLoader workers; auto: in memory when one size, no larger than "
        f"--image-size, and under 4 GiB decoded ({by_recipe('in_memory')})",
    )
    d.add_argument(
        "--resize",
        type=int,
        help=f"photos (decode per batch): warp to resize x resize ({by_recipe('resize')}; "
        "data held in memory keep their own size)",
    )
    d.add_argument(
        "--image-size",
        type=int,
        help=f"photos: random (training) or centre (evaluation) crop of this size ({by_recipe('image_size')})",
    )
    d.add_argument(
        "--augment",
        choices=("paper", "rrc"),
        help=f"photos: paper = warp, random crop, flip (Section 5.1); rrc = RandomResizedCrop + flip "
        f"({by_recipe('augment')})",
    )
    d.add_argument(
        "--num-workers", type=int, help="DataLoader decoding processes per process (default: cores, at most 4)"
    )
    d.add_argument(
        "--max-bad-fraction",
        type=float,
        help=f"stop when more than this fraction of the training images is unreadable (they are skipped) "
        f"({by_recipe('max_bad_fraction')})",
    )
    d.add_argument(
        "--train-eval-size",
        type=int,
        help="training examples scored at each evaluation for the clean/noisy-subset metrics and the "
        f"label audit ({by_recipe('train_eval_size')}; -: all of a map-style split, 10,000 of a "
        "stream; 0 turns it off)",
    )
    d.add_argument(
        "--audit-epochs",
        type=float,
        help="the label audit's early window: the predictions of the first this many epochs are averaged, "
        "before the network memorises the noisy labels (default: chosen by the run, ending when the "
        "given labels the network had not fitted start being fitted more often: memorisation; a stream: "
        f"{STREAM_AUDIT_EPOCHS:g})",
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The network, its initial weights, the method and the method's hyperparameters."""
    m = p.add_argument_group("model and loss")
    m.add_argument(
        "--model",
        help=f"one of {', '.join(models.MODELS)} ({by_recipe('model')}; -: by input size: "
        "digits_cnn up to 16 px, resnet44 up to 64 px, resnet50 above)",
    )
    m.add_argument(
        "--weights",
        help="initial weights: a local safetensors file, 'imagenet' (torchvision's ResNet-18/50 "
        f"ImageNet weights, downloaded once) or 'none' ({by_recipe('weights')})",
    )
    m.add_argument("--method", help=f"{', '.join(losses.METHODS)} ({by_recipe('method')})")
    m.add_argument(
        "--eps", type=float, help=f"fixed epsilon of ls, cp, bootsoft, boothard (default {LOSS_DEFAULTS['eps']})"
    )
    m.add_argument("--exp-base", type=float, help="ProSelfLC exp_base (default: the paper's for the setting, else 10)")
    m.add_argument(
        "--transit", type=float, help=f"ProSelfLC: g(t) = 0.5 at t = transit * T (default {LOSS_DEFAULTS['transit']})"
    )
    m.add_argument("--gce-q", type=float, help=f"GCE's q (default {LOSS_DEFAULTS['q']})")
    m.add_argument("--alpha", type=float, help="SCE alpha (10 classes: 0.1, else 6.0)")
    m.add_argument("--beta", type=float, help="SCE beta (10 classes: 1.0, else 0.1)")
    m.add_argument("--detach-target", action="store_true", help="no gradient through p inside the target")
    m.add_argument(
        "--temperature",
        type=float,
        help="ProSelfLC's later variant: eps and target from softmax(logits / T0), detached (proselflc_t default 0.5)",
    )
    m.add_argument(
        "--trust",
        choices=losses.TRUSTS,
        help="ProSelfLC's local trust: 1 - H(p)/log C (entropy, proselflc's "
        "default) or max_k p_k (maxp, proselflc_t's default)",
    )
    m.add_argument(
        "--elr-beta", type=float, help="ELR running-target momentum (10 classes: 0.7; 100 or more: 0.9; else 0.7)"
    )
    m.add_argument("--elr-lambda", type=float, help="ELR regulariser weight (10 classes: 3; 100 or more: 7; else 3)")


def add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Steps, batch, SGD and its learning-rate schedule, seeds."""
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, help=f"optimizer steps T ({by_recipe('max_steps')})")
    o.add_argument("--batch-size", type=int, help=f"global batch size ({by_recipe('batch_size')})")
    o.add_argument("--lr", type=float, help=f"initial learning rate ({by_recipe('lr')})")
    o.add_argument("--momentum", type=float, help=f"SGD momentum ({by_recipe('momentum')})")
    o.add_argument("--weight-decay", type=float, help=f"({by_recipe('weight_decay')})")
    o.add_argument(
        "--lr-schedule",
        help=f"step (lr / 10 at each milestone), poly (lr (1 - t/T)^power) or cosine "
        f"(lr (1 + cos(pi t/T)) / 2) ({by_recipe('lr_schedule')})",
    )
    o.add_argument("--poly-power", type=float, help=f"power of --lr-schedule poly ({by_recipe('poly_power')})")
    o.add_argument(
        "--milestones",
        help=f"steps where lr /= 10 with --lr-schedule step ({by_recipe('milestones')}; scaled with --max-steps)",
    )
    o.add_argument("--gradient-accumulation-steps", type=int, help=f"({by_recipe('gradient_accumulation_steps')})")
    o.add_argument("--seed", type=int, help=f"training seed: init, order, augmentation ({by_recipe('seed')})")
    o.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run is kept, how often it evaluates and saves, devices, precision, compile, Hub."""
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/<dataset>-<noise>-<rate>-<method>-seed<seed>")
    r.add_argument(
        "--resume",
        help="a checkpoint folder; latest: the newest in --output-dir; auto: that one if any, a "
        "new run if none, nothing (exit 0) if the run finished (one command for every "
        "launch of a restart loop)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    r.add_argument("--eval-every", type=int, help=f"({by_recipe('eval_every')})")
    r.add_argument("--eval-batch-size", type=int, help="global batch of the evaluations (default: the --batch-size)")
    r.add_argument("--save-every", type=int, help=f"({by_recipe('save_every')})")
    r.add_argument("--keep-checkpoints", type=int, help=f"({by_recipe('keep_checkpoints')})")
    r.add_argument(
        "--log-every", type=int, help=f"progress and non-finite loss check interval ({by_recipe('log_every')})"
    )
    r.add_argument("--report-to", help="an Accelerate tracker, e.g. tensorboard")
    r.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    r.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: the accelerate config")
    r.add_argument("--compile", action="store_true", help="torch.compile the model and the loss")
    r.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs; default: default)",
    )
    r.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        help="SyncBatchNorm: BatchNorm statistics over the global batch (default: on with several GPU "
        "processes, where it is the only way the statistics equal one GPU's)",
    )
    r.add_argument(
        "--push-to-hub",
        metavar="OWNER/NAME",
        help="at the end, upload the run with a model card to this Hugging Face Hub model repository",
    )
    r.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help=f"NHWC memory format (1.3x faster on CPU, tensor cores on GPU; {by_recipe('channels_last')})",
    )
    r.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON (what config.json will hold) and exit without "
        "loading data; values only the data decides (num_classes, in_channels, and model and "
        "train_eval_size when the recipe leaves them open) are null, and so is "
        "mixed_precision when the accelerate config decides it",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every knob of a run is a flag; None means 'the recipe's value' (RECIPES), filled in by fill_defaults."""
    p = runfolder.Parser(
        prog="train.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes (--recipe; every value is still a flag):\n"
        + "\n".join(
            f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if COMMON.get(k, "?") != v)
            for name, recipe in RECIPES.items()
        )
        + "\n  all: "
        + ", ".join(f"{k}={v}" for k, v in COMMON.items()),
    )
    p.add_argument(
        "--recipe",
        help=f"the defaults of every value below: {', '.join(RECIPES)} (default: by --dataset: "
        "cifar10/cifar100/synthetic and their Hub ids cifar, digits digits, imagenet "
        "imagenet, clothing1m clothing1m, anything else cifar; for your own photos "
        "pick imagenet (from scratch) or clothing1m (fine-tune ImageNet weights))",
    )
    add_data_flags(p)
    add_model_flags(p)
    add_optimisation_flags(p)
    add_run_flags(p)
    return p.parse_args(argv)


def recipe_for(dataset: str) -> str:
    """The recipe of a dataset name or Hub id when --recipe is left out: RECIPE_BY_DATASET, else cifar."""
    return RECIPE_BY_DATASET.get(dataset.lower(), "cifar")


def scaled_milestones(milestones: str, recipe_steps: int, max_steps: int) -> str | None:
    """The recipe's milestones at the same fractions of another --max-steps: round(m * T / T_recipe)."""
    return ",".join(str(round(int(m) * max_steps / recipe_steps)) for m in milestones.split(",") if m)


def fill_defaults(args: argparse.Namespace) -> None:
    """Resolve every None to the recipe's value, so config.json records what actually ran."""
    args.recipe = args.recipe or recipe_for(args.dataset)
    if args.recipe not in RECIPES:
        raise ValueError(f"unknown --recipe {args.recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[args.recipe]
    schedule = args.lr_schedule or recipe["lr_schedule"]
    if args.milestones is not None and schedule != "step":
        raise ValueError(f"--milestones applies to --lr-schedule step only (this run uses {schedule}): drop it")
    if args.poly_power is not None and schedule != "poly":
        raise ValueError(f"--poly-power applies to --lr-schedule poly only (this run uses {schedule}): drop it")
    if args.milestones is None and schedule == "step":  # the recipe's, at the same fractions of --max-steps
        steps = args.max_steps or recipe["max_steps"]
        args.milestones = scaled_milestones(recipe["milestones"] or "", recipe["max_steps"], steps)
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr_schedule != "step":
        args.milestones = None
    if args.lr_schedule != "poly":
        args.poly_power = None
    if args.exp_base is None and args.method.startswith("proselflc"):
        paper = PAPER_EXP_BASE.get((args.noise, round(args.noise_rate, 2))) if args.dataset == "cifar100" else None
        args.exp_base = paper or LOSS_DEFAULTS["exp_base"]
    if args.train_eval_size is None and args.streaming:
        args.train_eval_size = STREAM_TRAIN_EVAL_SIZE
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.output_dir is None:
        name = args.dataset.rstrip("/").replace("/", "_")
        args.output_dir = f"runs/{name}-{args.noise}-{args.noise_rate:g}-{args.method}-seed{args.seed}"


def typed_values(args: argparse.Namespace) -> set[str]:
    """The flags a user typed: parse_args leaves every other one None (or False for a switch)."""
    return {key for key, value in vars(args).items() if value is not None and value is not False}


# Flags a run may not use, by what decides it: --method (losses.USES), --noise kind, --dataset.
LOSS_FLAGS = {
    "eps": "eps",
    "exp_base": "exp_base",
    "transit": "transit",
    "gce_q": "q",
    "alpha": "alpha",
    "beta": "beta",
    "detach_target": "detach_target",
    "temperature": "temperature",
    "trust": "trust",
    "elr_beta": "elr_beta",
    "elr_lambda": "elr_lambda",
}


NOISE_FLAGS = {
    "noise_rate": ("symmetric", "asymmetric", "pairflip"),
    "noise_seed": ("symmetric", "asymmetric", "pairflip"),
    "noise_pairs": ("asymmetric",),
    "noise_file": ("file",),
    "noise_key": ("file",),
}


DATASET_FLAGS = {
    "synthetic_size": lambda d: d == "synthetic",
    "synthetic_classes": lambda d: d == "synthetic",
    "data_dir": lambda d: d not in ("digits", "synthetic"),
}


def flag(key: str) -> str:
    """'--noise-rate' from 'noise_rate'."""
    return "--" + key.replace("_", "-")


def check_used(args: argparse.Namespace, typed: set[str]) -> None:
    """Refuse a typed value this run would not use, naming what uses it (every value typed is used or refused)."""
    for key, hparam in LOSS_FLAGS.items():
        if key in typed and hparam not in losses.USES[args.method]:
            users = ", ".join(m for m in losses.METHODS if hparam in losses.USES[m])
            raise ValueError(f"{flag(key)} is not used by --method {args.method} (only by {users}): drop it")
    if args.noise == "none" and args.noise_rate:
        raise ValueError(
            f"--noise none with --noise-rate {args.noise_rate}: choose a --noise kind, or drop --noise-rate"
        )
    if args.noise in NOISE_FLAGS["noise_rate"] and not args.noise_rate > 0:
        raise ValueError(
            f"--noise {args.noise} needs --noise-rate above 0 (at {args.noise_rate:g} the labels stay "
            "clean): give a rate, or --noise none"
        )
    held = args.in_memory == "yes" or (args.in_memory == "auto" and args.dataset in ("digits", "synthetic"))
    if "num_workers" in typed and held and not args.streaming:
        raise ValueError(
            f"--num-workers is not used by --dataset {args.dataset} with --in-memory {args.in_memory} "
            "(the split is held in memory; workers decode photos per batch or a stream): drop it"
        )
    for key, kinds in NOISE_FLAGS.items():
        if key in typed and args.noise not in kinds and not (key == "noise_rate" and args.noise_rate == 0):
            raise ValueError(
                f"{flag(key)} is not used by --noise {args.noise} (only by --noise {' or '.join(kinds)}): drop it"
            )
    for key, uses in DATASET_FLAGS.items():
        if key in typed and not uses(args.dataset):
            raise ValueError(f"{flag(key)} is not used by --dataset {args.dataset}: drop it")
    if "audit_epochs" in typed and args.train_eval_size == 0:
        raise ValueError("--audit-epochs is not used with --train-eval-size 0 (the label audit is off): drop one")


def milestone_steps(args: argparse.Namespace) -> list[int]:
    """--milestones as step numbers in (0, --max-steps]."""
    try:
        milestones = [int(m) for m in str(args.milestones or "").split(",") if m.strip()]
    except ValueError:
        raise ValueError(f"--milestones must be comma-separated step numbers, got {args.milestones!r}") from None
    if any(not 0 < m <= args.max_steps for m in milestones):
        raise ValueError(f"--milestones {args.milestones} must lie in (0, --max-steps={args.max_steps}]")
    return milestones


def check_numbers(args: argparse.Namespace) -> None:
    """Reject out-of-range values with one line each."""
    if args.method not in losses.METHODS:
        raise ValueError(f"unknown method {args.method!r}: choose one of {', '.join(losses.METHODS)}")
    if args.model is not None and args.model not in models.MODELS:
        raise ValueError(f"unknown model {args.model!r}: choose one of {', '.join(models.MODELS)}")
    models.check_weights(args.weights, args.model)
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {args.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if args.lr_schedule == "poly" and not args.poly_power > 0:
        raise ValueError(f"--poly-power must be positive, got {args.poly_power}")
    for key in (
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "eval_every",
        "save_every",
        "log_every",
        "keep_checkpoints",
        "eval_batch_size",
        "synthetic_size",
        "synthetic_classes",
    ):
        if getattr(args, key, 1) is not None and getattr(args, key, 1) < 1:
            raise ValueError(f"{flag(key)} must be at least 1, got {getattr(args, key)}")
    for key in ("noise_seed", "seed", "num_workers"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise ValueError(f"{flag(key)} must be 0 or more, got {getattr(args, key)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0 or not 0 <= args.weight_decay < math.inf:
        raise ValueError(
            f"--momentum must be in [0, 1) and --weight-decay at least 0, got {args.momentum} and {args.weight_decay}"
        )
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ValueError(
            f"--max-bad-fraction must be in [0, 1] (a fraction of the training images), got {args.max_bad_fraction}"
        )
    if args.resize < 1:
        raise ValueError(f"--resize must be at least 1, got {args.resize}")
    if args.method == "elr" and args.streaming and not args.key_column:
        raise ValueError(
            "--method elr with --streaming needs --key-column: an integer id column giving each example's row"
        )
    noise.check_noise_args(
        args.noise, args.noise_rate, args.noise_pairs or data.pairs_preset(args.dataset), args.noise_file
    )
    data.data_settings(vars(args))  # the input path's values: --in-memory, --augment, --image-size within --resize
    if args.train_eval_size is not None and args.train_eval_size < 0:
        raise ValueError(f"--train-eval-size must be 0 (off) or more, got {args.train_eval_size}")
    if args.audit_epochs is not None and not args.audit_epochs > 0:
        raise ValueError(
            f"--audit-epochs must be above 0 (the label audit's early window, in epochs), got {args.audit_epochs}"
        )
    milestone_steps(args)


def check_run_flags(args: argparse.Namespace) -> None:
    """The run's own flags: --resume, --overwrite, and the files and folders named."""
    if args.resume and args.overwrite:
        raise ValueError(
            "--resume and --overwrite contradict each other: --overwrite would delete the run to resume "
            "from; pass one of them (nothing was changed)"
        )
    if args.resume == "":
        raise ValueError("--resume '' names no checkpoint: pass a checkpoint folder, latest or auto")
    if args.resume not in (None, "latest", "auto") and not Path(args.resume).is_dir():
        raise ValueError(
            f"--resume {args.resume}: no such checkpoint folder (pass a checkpoint folder, latest or auto)"
        )
    if args.data_dir and not Path(args.data_dir).expanduser().exists():
        raise ValueError(f"--data-dir {args.data_dir}: no such folder or file")
    noise.parse_pairs(args.noise_pairs)  # raises on a malformed or self-mapping pair list
    if args.push_to_hub:
        check_can_push(args.push_to_hub)
    runfolder.check_folder_path(Path(args.output_dir))


def known_num_classes(args: argparse.Namespace) -> int | None:
    """The number of classes when the dataset name decides it (before the data is loaded), else None."""
    return args.synthetic_classes if args.dataset == "synthetic" else KNOWN_NUM_CLASSES.get(args.dataset.lower())


def loss_from_args(args: argparse.Namespace, num_classes: int, num_examples: int | None = None) -> losses.TrainingLoss:
    """The --method loss from the hyperparameters it uses (losses.USES); what it resolved (defaults by method and
    number of classes) goes back into args for config.json, the rest is null."""
    hparams = {hp: getattr(args, key) for key, hp in LOSS_FLAGS.items() if hp in losses.USES[args.method]}
    hparams["detach_target"] = hparams.get("detach_target") or None
    if "num_examples" in losses.USES[args.method]:
        hparams["num_examples"] = num_examples or 1  # 1: a stand-in when only the values are checked
    loss_fn = losses.build_loss(args.method, num_classes, total_steps=args.max_steps, **hparams)
    for key, hp in LOSS_FLAGS.items():
        setattr(args, key, getattr(loss_fn, hp) if hp in losses.USES[args.method] else None)
    return loss_fn


def resolve(argv: list[str] | None = None) -> argparse.Namespace:
    """Every value of a run from its flags and its recipe, checked whole (numbers, unused flags, files named, the
    loss) before any file is touched or any data is loaded: what --print-config shows and sweep --dry-run checks."""
    args = parse_args(argv)
    typed = typed_values(args)
    fill_defaults(args)
    check_numbers(args)
    check_used(args, typed)
    check_run_flags(args)
    if args.compile_mode is not None and not args.compile:
        raise ValueError("--compile-mode is not used without --compile: add --compile or drop it")
    device_type = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if args.compile_mode == "reduce-overhead" and device_type == "cpu":
        raise ValueError(
            "--compile-mode reduce-overhead records CUDA graphs, and this run is on the CPU: use default "
            "or max-autotune"
        )
    # as accelerate launch and torchrun set it for each process; a plain python run is one process
    check_processes(args, int(os.environ.get("WORLD_SIZE", "1")), device_type)
    check_trackers(args.report_to)
    loss_from_args(args, known_num_classes(args) or 10, None)  # refuses bad loss values now; num_classes fills in later
    if known_num_classes(args) is None:  # defaults that follow the number of classes are decided by the data
        for key in ("alpha", "beta", "elr_beta", "elr_lambda"):
            if key not in typed:
                setattr(args, key, None)
    return args


def check_processes(args: argparse.Namespace, num_processes: int, device_type: str) -> bool:
    """What depends on the processes: the global batch splits over them; SyncBatchNorm needs several GPUs. Whether
    SyncBatchNorm runs (--sync-bn, or by default with several GPU processes)."""
    shards = num_processes * args.gradient_accumulation_steps
    if args.batch_size % shards:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {shards}"
        )
    gpus = num_processes > 1 and device_type in ("cuda", "xpu")
    if args.sync_bn and not gpus:
        raise ValueError(
            f"--sync-bn needs more than one GPU process (this run: {num_processes} {device_type} process(es)): drop it"
        )
    return gpus if args.sync_bn is None else args.sync_bn


def planned_config(args: argparse.Namespace) -> dict:
    """What config.json will hold, as far as it is known before the data is loaded (the rest null)."""
    return {**vars(args), **{k: None for k in PRINT_CONFIG_UNKNOWN}}


def check_trackers(report_to: str | None) -> None:
    """Refuse a --report-to tracker whose package is missing: Accelerate would drop it and the run would log nothing."""
    installed = {getattr(tracker, "value", tracker) for tracker in get_available_trackers()}
    if report_to in LoggerType.list() and report_to != "all" and report_to not in installed:
        raise ValueError(
            f"--report-to {report_to}: the {report_to} package is not installed "
            f"(pip install {report_to.replace('_', '-')}), so nothing would be logged"
        )


def recorded_config(args: argparse.Namespace, info: data.DatasetInfo, world_size: int, device: torch.device) -> dict:
    """config.json: every argument plus what the run derived, the library versions and the git commit."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=SUITE_DIR, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    return {
        **vars(args),
        "device": str(device),
        "num_classes": info.num_classes,
        "in_channels": info.channels,
        "image_size": info.image_size,
        "total_steps": args.max_steps,
        "world_size": world_size,
        "versions": versions,
        "git_commit": commit,
    }


# Flags that may change between a run and its resumption; every other one must match the checkpoint's config.json.
# The folder's own location (output_dir) is no hyperparameter: a run folder may be moved, copied or spelled otherwise.
RESUMABLE_CHANGES = (
    "resume",
    "overwrite",
    "output_dir",
    "report_to",
    "log_every",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "compile",
    "compile_mode",
    "world_size",
    "device",
    "versions",
    "git_commit",
    "push_to_hub",
    "num_workers",
    "eval_batch_size",
)


# Values the data decides (recorded after it loads): compared with a checkpoint's only once the data is loaded.
DATA_DECIDED = (
    "input_path",
    "resize",
    "image_size",
    "model",
    "num_classes",
    "in_channels",
    "alpha",
    "beta",
    "elr_beta",
    "elr_lambda",
)


# Flags of train.py that say where and how a run is kept, not what it computes: left out of the command.
NOT_REPRODUCED = (
    "dataset",
    "recipe",
    "output_dir",
    "resume",
    "overwrite",
    "print_config",
    "push_to_hub",
    "num_workers",
    "sync_bn",
)  # the last two: decided by the machine that ran it


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid 'owner/name' model repository id, else a one-line ValueError."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repository id ({str(e).splitlines()[0]}): use owner/name") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: use owner/name")
    return repo_id


def method_keys(method: str) -> list[str]:
    """config.json keys of the hyperparameters `method` reads (losses.USES, named as train.py's flags)."""
    return [{"q": "gce_q"}.get(k, k) for k in losses.USES.get(method, ()) if k != "num_examples"]


def reproduce_command(config: dict[str, Any]) -> str:
    """`python train.py ...` with every flag whose value in config.json differs from its recipe's default.

    Left out: where the run was kept (NOT_REPRODUCED), the hyperparameters of other methods, and the image
    size of data held in memory (config.json records its native size; the flags apply to photos)."""
    base = vars(resolve(["--dataset", str(config["dataset"]), "--recipe", str(config["recipe"])]))
    other_methods = {k for m in losses.METHODS for k in method_keys(m)} - set(method_keys(str(config["method"])))
    skip = {
        *NOT_REPRODUCED,
        *other_methods,
        *(("resize", "image_size") if config.get("input_path") == "memory" else ()),
    }
    argv = ["--dataset", str(config["dataset"])]
    if config["recipe"] != recipe_for(str(config["dataset"])):
        argv += ["--recipe", str(config["recipe"])]
    for key, default in base.items():
        value = config.get(key)
        if key in skip or value is None or value == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):  # store_true flags, and --no-X for the BooleanOptionalAction ones
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    world = int(config.get("world_size") or 1)
    launcher = ["accelerate", "launch", "--num_processes", str(world)] if world > 1 else ["python"]
    return shlex.join([*launcher, "train.py", *argv])


def check_can_push(repo_id: str) -> None:
    """Before a run that ends with a push (train.py --push-to-hub): a valid id, a token and no offline mode."""
    check_repo_id(repo_id)
    if hub_constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so the run could not be pushed at its end; "
            "unset it, or push later with eval.py --push-to-hub"
        )
    if huggingface_hub.get_token() is None:
        raise ValueError(
            f"--push-to-hub {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN), so the "
            "run could not be pushed at its end; nothing was run"
        )


def check_same_run(ckpt: Path, config: dict) -> None:
    """A resumed run must be the same run: refuse changed hyperparameters with one line naming them."""
    saved = runfolder.read_config(ckpt / "config.json")
    changed = [
        k
        for k in config
        if k not in RESUMABLE_CHANGES and k in saved and config[k] is not None and saved[k] != config[k]
    ]
    if changed:
        diffs = ", ".join(f"{flag(k)} {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise ValueError(
            f"--resume: {ckpt} comes from a run started with other settings ({diffs}); "
            f"use the same flags, or another --output-dir"
        )


# The grids of sweep.py (--preset): Table 4 on CIFAR-100, and every method on digits on a CPU.
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        dataset="cifar100",
        model="resnet44",
        methods=("cce", "ls", "cp", "bootsoft", "proselflc", "elr", "proselflc_t"),
        settings=(
            ("asymmetric", 0.2),
            ("asymmetric", 0.3),
            ("asymmetric", 0.4),
            ("symmetric", 0.2),
            ("symmetric", 0.4),
            ("symmetric", 0.6),
        ),
        seeds=(0,),
        eps=(0.125, 0.25, 0.5),
        exp_base=PAPER_EXP_BASE,
        train_args=(),
        budgets=(None,),
        launcher="accelerate",
        cpu=False,
        jobs=1,
        plot_setting=("asymmetric", 0.4),
    ),
    "digits": dict(
        dataset="digits",
        model=None,
        methods=("cce", "ls", "cp", "bootsoft", "boothard", "gce", "sce", "proselflc", "proselflc_t", "elr"),
        settings=(("symmetric", 0.4),),
        budgets=(300, 1500),
        seeds=(0, 1, 2),
        eps=(0.25,),
        exp_base={},
        train_args=("--eval-every", "50"),
        launcher="python",
        cpu=True,
        jobs=2,
        plot_setting=("symmetric", 0.4),
    ),
}


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    schedule: str = "step",
    milestones: list[int] = (),
    power: float | None = None,
) -> float:
    """lr at optimizer step t of T: step: lr 0.1^(milestones passed); poly: lr (1 - t/T)^power; cosine: lr (1 + cos(pi t/T)) / 2."""
    if schedule == "poly":
        return base_lr * (1.0 - step / total_steps) ** power
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return base_lr * 0.1 ** sum(step >= m for m in milestones)
