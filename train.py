"""Train a classifier on noisily labelled data with ProSelfLC or a baseline target modification.

    python train.py                                   # digits on CPU, about 10 seconds
    accelerate launch train.py --method proselflc --dataset cifar100 --noise symmetric --noise-rate 0.4
    torchrun --nproc_per_node 2 train.py --cpu        # two CPU processes over gloo

Read it top to bottom: parse, build data, build model, build loss, prepare, loop, evaluate, save.
Every default lives in RECIPES below. With no flags beyond the dataset a CIFAR run follows the paper's
recipe (Section 5.1): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256, 30,000 steps, lr / 10 at
50% and 73.3% of the steps; `--recipe imagenet|clothing1m` are the paper's photo experiments, and
`--print-config` shows the resolved values without running.
`--batch-size` is the global batch (all processes and accumulation steps together), so the recipe
is the same on one GPU or many.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import inspect
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, TorchDynamoPlugin, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

import data
import losses
import models
import noise
import runfolder

# The paper's exp_base for CIFAR-100 (CVPR version), by (noise, rate).
PAPER_EXP_BASE = {
    ("none", 0.0): 10.0,
    ("symmetric", 0.2): 14.0, ("symmetric", 0.4): 12.0, ("symmetric", 0.6): 8.0,
    ("asymmetric", 0.2): 14.0, ("asymmetric", 0.3): 10.0, ("asymmetric", 0.4): 8.0,
}
# Every default of a run lives here: a recipe is the value of each flag left out. Keys are flag names.
# milestones are the recipe's steps for its max_steps; another --max-steps scales them (50% and 73.3%).
# None: decided at run time (model by input size, resize/image_size by the data).
COMMON = dict(
    synthetic_size=5_000, synthetic_classes=10, noise="none", noise_rate=0.0, noise_seed=0,
    model=None, weights="none", method="proselflc",  # the loss's own defaults live in losses.py (LOSS_DEFAULTS)
    momentum=0.9, weight_decay=5e-4, lr_schedule="step", poly_power=2.0, gradient_accumulation_steps=1, seed=0,
    keep_checkpoints=2, log_every=20, channels_last=True,
    in_memory="auto", resize=256, image_size=224, augment="paper", max_bad_fraction=0.01,  # photos (decode per batch)
    train_eval_size=None,  # None: the whole map-style split (a stream: 10,000)
    eval_batch_size=None,  # None: the --batch-size (evaluation needs less memory per example than training)
    audit_epochs=None,  # the label audit's early window (TrainingDynamics); None: the run chooses it (window_closes)
)
RECIPES = {
    # Section 5.1 (1): CIFAR-100, ResNet-44 (by input size), pad-4 crop and flip
    "cifar": {**COMMON, "max_steps": 30_000, "batch_size": 256, "lr": 0.1, "milestones": "15000,22000",
              "eval_every": 1_000, "save_every": 5_000,
              # 30 evaluations of all 50,000 + 10,000 test images would be ~8% of the run's forward passes
              # (a training step is ~3 forwards); 10,000 + 10,000 are ~2.6%, and 10,000 random examples
              # still measure the Figure 3 fractions to about +-0.5%
              "train_eval_size": 10_000},
    # the quick start: 300 steps on 8x8 digits in about 10 s on a CPU
    "digits": {**COMMON, "max_steps": 300, "batch_size": 128, "lr": 0.1, "milestones": "150,220",
               "eval_every": 50, "save_every": 100},
    # Section 5.1 (2): ResNet-50, polynomial decay of power 2, warp 256, random crop 224, flip
    "imagenet": {**COMMON, "model": "resnet50", "max_steps": 500_000, "batch_size": 64, "lr": 2e-3,
                 "momentum": 0.95, "weight_decay": 1e-4, "lr_schedule": "poly", "poly_power": 2.0,
                 "milestones": None, "eval_every": 10_000, "save_every": 10_000, "resize": 256, "image_size": 224,
                 # 1.28M examples: scoring all of them at each evaluation would cost more decoding than training,
                 # and the audit's statistics would take 5 GB of device memory
                 "train_eval_size": 50_000},
    # Section 5.3: ResNet-50 from ImageNet weights, Section 5.1 with lr 0.01 and 10k steps
    "clothing1m": {**COMMON, "model": "resnet50", "weights": "imagenet", "max_steps": 10_000, "batch_size": 256,
                   "lr": 0.01, "milestones": "5000,7333", "eval_every": 1_000, "save_every": 1_000,
                   "resize": 256, "image_size": 224},
}
DEFAULT_DATASET = "digits"
# --recipe left out: by dataset name or Hub id (lower case); any other name or path gets "cifar".
RECIPE_BY_DATASET = {"digits": "digits", "synthetic": "cifar", "cifar10": "cifar", "cifar100": "cifar",
                     "uoft-cs/cifar10": "cifar", "uoft-cs/cifar100": "cifar", "imagenet": "imagenet",
                     "ilsvrc/imagenet-1k": "imagenet", "clothing1m": "clothing1m"}
LR_SCHEDULES = ("step", "poly", "cosine")
LOSS_DEFAULTS = {k: p.default for k, p in inspect.signature(losses.TrainingLoss.__init__).parameters.items()}
_NAMED_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "clothing1m": data.CLOTHING1M_CLASSES}
KNOWN_NUM_CLASSES = _NAMED_NUM_CLASSES | {data.HUB_IDS[name].lower(): n for name, n in _NAMED_NUM_CLASSES.items()
                                          if name in data.HUB_IDS}  # and by Hub id (lower case, as typed names are)
PRINT_CONFIG_UNKNOWN = ("num_classes", "in_channels")  # known only once the data is loaded


def by_recipe(key: str) -> str:
    """The recipes' values of one flag for --help, e.g. 'cifar, digits: 0.9; imagenet: 0.95'."""
    groups: dict[str, list[str]] = {}
    for name, recipe in RECIPES.items():
        groups.setdefault("-" if recipe[key] is None else f"{recipe[key]:,}" if isinstance(recipe[key], int)
                          and not isinstance(recipe[key], bool) else str(recipe[key]), []).append(name)
    if len(groups) == 1:
        return f"default {next(iter(groups))}"
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in groups.items())


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The dataset, its columns, the label noise and the input path."""
    d = p.add_argument_group("data and noise")
    d.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="digits, synthetic, cifar10, cifar100, imagenet, clothing1m, a Hub id or a local path")
    d.add_argument("--data-dir", help="local copy: save_to_disk folder, parquet files or CIFAR python-pickle folder")
    d.add_argument("--streaming", action="store_true", help="stream the training split instead of holding it in memory")
    d.add_argument("--image-column")
    d.add_argument("--label-column")
    d.add_argument("--key-column", help="stable example id for the noise; default: a hash of the image bytes")
    d.add_argument("--synthetic-size", type=int, help=f"training examples of --dataset synthetic ({by_recipe('synthetic_size')})")
    d.add_argument("--synthetic-classes", type=int, help=f"({by_recipe('synthetic_classes')})")
    d.add_argument("--noise", help=f"none, symmetric, asymmetric, pairflip or file ({by_recipe('noise')})")
    d.add_argument("--noise-rate", type=float, help=f"({by_recipe('noise_rate')})")
    d.add_argument("--noise-seed", type=int, help=f"seed of the label noise, separate from --seed ({by_recipe('noise_seed')})")
    d.add_argument("--noise-file", help="real noisy labels: CIFAR-N .pt, .npy, .csv or .parquet")
    d.add_argument("--noise-key", help="which labels of --noise-file, e.g. worse_label")
    d.add_argument("--noise-pairs", help="asymmetric pairs 'a:b,b:a,...' or a preset (cifar10, cifar100, synthetic)")
    d.add_argument("--in-memory", choices=("auto", "yes", "no"),
                   help="input path: yes decodes the training split once into memory (one image size), no decodes "
                        "per batch in DataLoader workers; auto: in memory when one size, no larger than "
                        f"--image-size, and under 4 GiB decoded ({by_recipe('in_memory')})")
    d.add_argument("--resize", type=int, help=f"photos (decode per batch): warp to resize x resize ({by_recipe('resize')}; "
                                              "data held in memory keep their own size)")
    d.add_argument("--image-size", type=int, help=f"photos: random (training) or centre (evaluation) crop of this size "
                                                  f"({by_recipe('image_size')})")
    d.add_argument("--augment", choices=("paper", "rrc"),
                   help=f"photos: paper = warp, random crop, flip (Section 5.1); rrc = RandomResizedCrop + flip "
                        f"({by_recipe('augment')})")
    d.add_argument("--num-workers", type=int, help="DataLoader decoding processes per process (default: cores, at most 4)")
    d.add_argument("--max-bad-fraction", type=float,
                   help=f"stop when more than this fraction of the training images is unreadable (they are skipped) "
                        f"({by_recipe('max_bad_fraction')})")
    d.add_argument("--train-eval-size", type=int,
                   help="training examples scored at each evaluation for the clean/noisy-subset metrics and the "
                        f"label audit ({by_recipe('train_eval_size')}; -: all of a map-style split, 10,000 of a "
                        "stream; 0 turns it off)")
    d.add_argument("--audit-epochs", type=float,
                   help="the label audit's early window: the predictions of the first this many epochs are averaged, "
                        "before the network memorises the noisy labels (default: chosen by the run, ending when the "
                        "given labels the network had not fitted start being fitted more often: memorisation; a stream: "
                        f"{TrainingDynamics.STREAM_EPOCHS:g})")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The network, its initial weights, the method and the method's hyperparameters."""
    m = p.add_argument_group("model and loss")
    m.add_argument("--model", help=f"one of {', '.join(models.MODELS)} ({by_recipe('model')}; -: by input size: "
                                   "digits_cnn up to 16 px, resnet44 up to 64 px, resnet50 above)")
    m.add_argument("--weights", help="initial weights: a local safetensors file, 'imagenet' (torchvision's ResNet-18/50 "
                                     f"ImageNet weights, downloaded once) or 'none' ({by_recipe('weights')})")
    m.add_argument("--method", help=f"{', '.join(losses.METHODS)} ({by_recipe('method')})")
    m.add_argument("--eps", type=float, help=f"fixed epsilon of ls, cp, bootsoft, boothard (default {LOSS_DEFAULTS['eps']})")
    m.add_argument("--exp-base", type=float, help="ProSelfLC exp_base (default: the paper's for the setting, else 10)")
    m.add_argument("--transit", type=float, help=f"ProSelfLC: g(t) = 0.5 at t = transit * T (default {LOSS_DEFAULTS['transit']})")
    m.add_argument("--gce-q", type=float, help=f"GCE's q (default {LOSS_DEFAULTS['q']})")
    m.add_argument("--alpha", type=float, help="SCE alpha (10 classes: 0.1, else 6.0)")
    m.add_argument("--beta", type=float, help="SCE beta (10 classes: 1.0, else 0.1)")
    m.add_argument("--detach-target", action="store_true", help="no gradient through p inside the target")
    m.add_argument("--temperature", type=float, help="ProSelfLC's later variant: eps and target from softmax(logits / T0), "
                                                     "detached (proselflc_t default 0.5)")
    m.add_argument("--trust", choices=losses.TRUSTS, help="ProSelfLC's local trust: 1 - H(p)/log C (entropy, proselflc's "
                                                          "default) or max_k p_k (maxp, proselflc_t's default)")
    m.add_argument("--elr-beta", type=float, help="ELR running-target momentum (10 classes: 0.7; 100 or more: 0.9; else 0.7)")
    m.add_argument("--elr-lambda", type=float, help="ELR regulariser weight (10 classes: 3; 100 or more: 7; else 3)")


def add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Steps, batch, SGD and its learning-rate schedule, seeds."""
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, help=f"optimizer steps T ({by_recipe('max_steps')})")
    o.add_argument("--batch-size", type=int, help=f"global batch size ({by_recipe('batch_size')})")
    o.add_argument("--lr", type=float, help=f"initial learning rate ({by_recipe('lr')})")
    o.add_argument("--momentum", type=float, help=f"SGD momentum ({by_recipe('momentum')})")
    o.add_argument("--weight-decay", type=float, help=f"({by_recipe('weight_decay')})")
    o.add_argument("--lr-schedule", help=f"step (lr / 10 at each milestone), poly (lr (1 - t/T)^power) or cosine "
                                         f"(lr (1 + cos(pi t/T)) / 2) ({by_recipe('lr_schedule')})")
    o.add_argument("--poly-power", type=float, help=f"power of --lr-schedule poly ({by_recipe('poly_power')})")
    o.add_argument("--milestones", help=f"steps where lr /= 10 with --lr-schedule step ({by_recipe('milestones')}; "
                                        "scaled with --max-steps)")
    o.add_argument("--gradient-accumulation-steps", type=int, help=f"({by_recipe('gradient_accumulation_steps')})")
    o.add_argument("--seed", type=int, help=f"training seed: init, order, augmentation ({by_recipe('seed')})")
    o.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run is kept, how often it evaluates and saves, devices, precision, compile, Hub."""
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/<dataset>-<noise>-<rate>-<method>-seed<seed>")
    r.add_argument("--resume", help="a checkpoint folder; latest: the newest in --output-dir; auto: that one if any, a "
                                    "new run if none, nothing (exit 0) if the run finished (one command for every "
                                    "launch of a restart loop)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    r.add_argument("--eval-every", type=int, help=f"({by_recipe('eval_every')})")
    r.add_argument("--eval-batch-size", type=int, help="global batch of the evaluations (default: the --batch-size)")
    r.add_argument("--save-every", type=int, help=f"({by_recipe('save_every')})")
    r.add_argument("--keep-checkpoints", type=int, help=f"({by_recipe('keep_checkpoints')})")
    r.add_argument("--log-every", type=int, help=f"progress and non-finite loss check interval ({by_recipe('log_every')})")
    r.add_argument("--report-to", help="an Accelerate tracker, e.g. tensorboard")
    r.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    r.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: the accelerate config")
    r.add_argument("--compile", action="store_true", help="torch.compile the model and the loss")
    r.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs; default: default)")
    r.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="SyncBatchNorm: BatchNorm statistics over the global batch (default: on with several GPU "
                        "processes, where it is the only way the statistics equal one GPU's)")
    r.add_argument("--push-to-hub", metavar="OWNER/NAME",
                   help="at the end, upload the run with a model card to this Hugging Face Hub model repository")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help=f"NHWC memory format (1.3x faster on CPU, tensor cores on GPU; {by_recipe('channels_last')})")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON (what config.json will hold) and exit without "
                        "loading data; values only the data decides (num_classes, in_channels, and model and "
                        "train_eval_size when the recipe leaves them open) are null, and so is "
                        "mixed_precision when the accelerate config decides it")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every knob of a run is a flag; None means 'the recipe's value' (RECIPES), filled in by fill_defaults."""
    p = runfolder.Parser(
        prog="train.py", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes (--recipe; every value is still a flag):\n" + "\n".join(
            f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if COMMON.get(k, "?") != v)
            for name, recipe in RECIPES.items())
        + "\n  all: " + ", ".join(f"{k}={v}" for k, v in COMMON.items()))
    p.add_argument("--recipe", help=f"the defaults of every value below: {', '.join(RECIPES)} (default: by --dataset: "
                                    "cifar10/cifar100/synthetic and their Hub ids cifar, digits digits, imagenet "
                                    "imagenet, clothing1m clothing1m, anything else cifar; for your own photos "
                                    "pick imagenet (from scratch) or clothing1m (fine-tune ImageNet weights))")
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
        args.train_eval_size = 10_000
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.output_dir is None:
        name = args.dataset.rstrip("/").replace("/", "_")
        args.output_dir = f"runs/{name}-{args.noise}-{args.noise_rate:g}-{args.method}-seed{args.seed}"


def typed_values(args: argparse.Namespace) -> set[str]:
    """The flags a user typed: parse_args leaves every other one None (or False for a switch)."""
    return {key for key, value in vars(args).items() if value is not None and value is not False}


# Flags a run may not use, by what decides it: --method (losses.USES), --noise kind, --dataset.
LOSS_FLAGS = {"eps": "eps", "exp_base": "exp_base", "transit": "transit", "gce_q": "q", "alpha": "alpha", "beta": "beta",
              "detach_target": "detach_target", "temperature": "temperature", "trust": "trust", "elr_beta": "elr_beta",
              "elr_lambda": "elr_lambda"}
NOISE_FLAGS = {"noise_rate": ("symmetric", "asymmetric", "pairflip"), "noise_seed": ("symmetric", "asymmetric", "pairflip"),
               "noise_pairs": ("asymmetric",), "noise_file": ("file",), "noise_key": ("file",)}
DATASET_FLAGS = {"synthetic_size": lambda d: d == "synthetic", "synthetic_classes": lambda d: d == "synthetic",
                 "data_dir": lambda d: d not in ("digits", "synthetic")}


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
        raise ValueError(f"--noise none with --noise-rate {args.noise_rate}: choose a --noise kind, or drop --noise-rate")
    for key, kinds in NOISE_FLAGS.items():
        if key in typed and args.noise not in kinds and not (key == "noise_rate" and args.noise_rate == 0):
            raise ValueError(f"{flag(key)} is not used by --noise {args.noise} (only by --noise {' or '.join(kinds)}): "
                             "drop it")
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
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_every", "save_every", "log_every",
                "keep_checkpoints", "eval_batch_size", "synthetic_size", "synthetic_classes"):
        if getattr(args, key, 1) is not None and getattr(args, key, 1) < 1:
            raise ValueError(f"{flag(key)} must be at least 1, got {getattr(args, key)}")
    for key in ("noise_seed", "seed", "num_workers"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise ValueError(f"{flag(key)} must be 0 or more, got {getattr(args, key)}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0 or not 0 <= args.weight_decay < math.inf:
        raise ValueError(f"--momentum must be in [0, 1) and --weight-decay at least 0, got {args.momentum} and "
                         f"{args.weight_decay}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ValueError(f"--max-bad-fraction must be in [0, 1] (a fraction of the training images), got "
                         f"{args.max_bad_fraction}")
    if args.resize is not None and args.resize < 1 or args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--resize and --image-size must be at least 1, got {args.resize} and {args.image_size}")
    if args.resize is not None and args.image_size is not None and args.image_size > args.resize:
        raise ValueError(f"--image-size {args.image_size} must not exceed --resize {args.resize}: the crop lies "
                         "inside the warped image")
    if args.method == "elr" and args.streaming and not args.key_column:
        raise ValueError("--method elr with --streaming needs --key-column: an integer id column giving each example's row")
    if not 0.0 <= args.noise_rate < 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1), got {args.noise_rate}")
    if args.train_eval_size is not None and args.train_eval_size < 0:
        raise ValueError(f"--train-eval-size must be 0 (off) or more, got {args.train_eval_size}")
    if args.audit_epochs is not None and not args.audit_epochs > 0:
        raise ValueError(f"--audit-epochs must be above 0 (the label audit's early window, in epochs), got {args.audit_epochs}")
    milestone_steps(args)


def check_run_flags(args: argparse.Namespace) -> None:
    """The run's own flags: --resume, --overwrite, and the files and folders named."""
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --overwrite would delete the run to resume "
                         "from; pass one of them (nothing was changed)")
    if args.resume not in (None, "latest", "auto") and not Path(args.resume).is_dir():
        raise ValueError(f"--resume {args.resume}: no such checkpoint folder (pass a checkpoint folder, latest or auto)")
    if args.data_dir and not Path(args.data_dir).expanduser().exists():
        raise ValueError(f"--data-dir {args.data_dir}: no such folder or file")
    if args.noise == "file" and not (args.noise_file and Path(args.noise_file).is_file()):
        raise ValueError("--noise file needs --noise-file PATH of an existing CIFAR-N .pt, .npy, .csv or .parquet file "
                         f"(got {args.noise_file!r})")
    noise.parse_pairs(args.noise_pairs)  # raises on a malformed or self-mapping pair list
    if args.push_to_hub:
        import hub  # its model card uses eval.py's plots: imported only by runs that push

        hub.check_can_push(args.push_to_hub)
    runfolder.check_folder_path(Path(args.output_dir))


def known_num_classes(args: argparse.Namespace) -> int | None:
    """The number of classes when the dataset name decides it (before the data is loaded), else None."""
    return args.synthetic_classes if args.dataset == "synthetic" else KNOWN_NUM_CLASSES.get(args.dataset.lower())


def build_loss(args: argparse.Namespace, num_classes: int, num_examples: int | None = None) -> losses.TrainingLoss:
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


def resolve_config(argv: list[str] | None = None) -> argparse.Namespace:
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
    build_loss(args, known_num_classes(args) or 10, None)  # refuses bad loss values now; num_classes fills in later
    if known_num_classes(args) is None:  # defaults that follow the number of classes are decided by the data
        for key in ("alpha", "beta", "elr_beta", "elr_lambda"):
            if key not in typed:
                setattr(args, key, None)
    return args


resolve_args = resolve_config  # the name tests and bench.py use for the resolved configuration


def check_processes(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """What depends on the processes: the global batch splits over them; SyncBatchNorm needs several GPUs."""
    shards = accelerator.num_processes * args.gradient_accumulation_steps
    if args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {shards}")
    gpus = accelerator.num_processes > 1 and accelerator.device.type in ("cuda", "xpu")
    if args.sync_bn and not gpus:
        raise ValueError(f"--sync-bn needs more than one GPU process (this run: {accelerator.num_processes} "
                         f"{accelerator.device.type} process(es)): drop it")
    args.sync_bn = gpus if args.sync_bn is None else args.sync_bn


def planned_config(args: argparse.Namespace) -> dict:
    """What config.json will hold, as far as it is known before the data is loaded (the rest null)."""
    return {**vars(args), **{k: None for k in PRINT_CONFIG_UNKNOWN}}


def ran_precision(accelerator: Accelerator) -> str:
    """The mixed precision that actually runs: Accelerate runs fp16 on a CPU in fp32, so say so and record 'no'."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        if accelerator.is_main_process:
            print(f"note: --mixed-precision fp16 needs a GPU; on {accelerator.device.type} this run is fp32 and "
                  f"config.json records 'no' (use bf16 for mixed precision on a CPU)", file=sys.stderr)
        return "no"
    return accelerator.mixed_precision


def check_trackers(report_to: str | None) -> None:
    """Refuse a --report-to tracker whose package is missing: Accelerate would drop it and the run would log nothing."""
    installed = {getattr(tracker, "value", tracker) for tracker in get_available_trackers()}
    if report_to in LoggerType.list() and report_to != "all" and report_to not in installed:
        raise ValueError(f"--report-to {report_to}: the {report_to} package is not installed "
                         f"(pip install {report_to.replace('_', '-')}), so nothing would be logged")


def run_config(args: argparse.Namespace, info, world_size: int, device: torch.device) -> dict:
    """Every argument plus what the run derived, the library versions and the git commit."""
    import accelerate
    import numpy

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
                "datasets": datasets.__version__, "numpy": numpy.__version__, "platform": platform.platform()}
    return {**vars(args), "device": str(device), "num_classes": info.num_classes, "in_channels": info.channels,
            "image_size": info.image_size,
            "total_steps": args.max_steps, "world_size": world_size, "versions": versions, "git_commit": commit}


def stream_num_rows(train_ds, key_column: str) -> int:
    """1 + the largest integer id in a stream's key column (one pass over that column alone)."""
    ids = [row[key_column] for row in train_ds.select_columns([key_column])]
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"--key-column {key_column} must hold non-negative integer ids for --method elr")
    return max(ids) + 1


def sync_running_targets(accelerator: Accelerator, loss_fn: losses.TrainingLoss, rows: torch.Tensor) -> None:
    """ELR: every process writes the rows its step updated into every copy, so all processes hold the same targets."""
    if accelerator.num_processes > 1:
        loss_fn.elr_targets[accelerator.gather(rows)] = accelerator.gather(loss_fn.elr_targets[rows])


class TrainingDynamics:
    """Per-row sums of the predictions on the training split, the label audit's input (eval.py).

    early_prob_sum[i] = sum of softmax(z_i) over the training steps of the early window whose batch held row i,
    early_count[i] their number: z_i is the training forward pass, before that step's update, so example i was
    last fitted an epoch earlier, and the network fits clean labels before it memorises the noisy ones (Arpit
    et al. 2017). The window is --audit-epochs epochs, or by default chosen by the run (window_closes): per
    epoch e, of the rows whose previous prediction missed their given label, the share now predicted as it,
    m_e = hits_e / misses_e. Learning drives m_e down; once the network memorises the labels it has not
    fitted, m_e rises again; the window closes at the start of the epoch where that rise is significant.
    Extra state for it: last_pred (int32 per row: 5 MB for ImageNet's 1.28M rows, against 5 GB of sums) and
    two counts per epoch. A stream's batches carry no row of the scored subset, so there the early sums come
    from the evaluations within --audit-epochs epochs (STREAM_EPOCHS if not given; at least the first
    evaluation; its length unknown, an epoch counts as the subset's size).
    margin_sum[i] = sum over evaluations of z_y - max_{k != y} z_k of the un-augmented image (the area under
    the margin, Pleiss et al. 2020), count[i] = evaluations of row i, over the whole run. y = the given
    (noisy) label; rows are the training split's rows (a stream: positions in the evaluated subset). Every
    process holds the same sums and counts, on the device, so every process closes the window at the same step.
    """

    STREAM_EPOCHS = 15.0  # a stream's window when --audit-epochs is not given
    SMOOTH = 5  # epochs pooled on each side of the test in window_closes
    Z = 3.0  # one-sided z of the two-proportion test in window_closes

    def __init__(self, labels: torch.Tensor, num_classes: int, device: torch.device, audit_epochs: float | None,
                 from_batches: bool, total_images: int = 0):
        self.label = labels.to(device)
        self.from_batches, self.auto = from_batches, audit_epochs is None and from_batches
        fixed = audit_epochs if audit_epochs is not None else self.STREAM_EPOCHS
        self.end = torch.tensor(math.inf if self.auto else float(fixed), dtype=torch.float64, device=device)
        self._window_end = float(self.end)  # in epochs; inf: still open
        self.margin_sum = torch.zeros(len(labels), device=device)
        self.count = torch.zeros(len(labels), dtype=torch.int64, device=device)
        self.early_prob_sum = torch.zeros(len(labels), num_classes, device=device)
        self.early_count = torch.zeros(len(labels), dtype=torch.int64, device=device)
        self.last_pred = torch.full((len(labels),), -1, dtype=torch.int32, device=device)
        epochs = math.ceil(total_images / max(len(labels), 1)) + 1 if self.auto else 0  # of the whole run
        self.misses = torch.zeros(epochs, dtype=torch.int64, device=device)
        self.hits = torch.zeros_like(self.misses)
        self.epoch = 0

    @property
    def window_end(self) -> float:
        """The window's end in epochs (inf: open) as last read from the device (refresh), or as set."""
        return self._window_end

    @window_end.setter
    def window_end(self, value: float) -> None:
        self._window_end = float(value)
        self.end.fill_(float(value))

    def refresh(self) -> None:
        """Read the window's end from the device (one host sync: train.py calls it on --log-every steps)."""
        self._window_end = float(self.end)

    @classmethod
    def window_closes(cls, hits, misses) -> torch.Tensor:
        """Whether the window ends after these completed epochs (a bool tensor on their device, no host sync):
        some m_e = sum(hits) / sum(misses) over epochs e-SMOOTH+1..e exceeds the lowest m of the epochs before it
        (m0 over n0 misses) by Z sqrt(m0 (1 - m0) (1/n + 1/n0)), for e >= 2 SMOOTH - 1."""
        hits, misses = torch.as_tensor(hits, dtype=torch.float64), torch.as_tensor(misses, dtype=torch.float64)
        k, last = cls.SMOOTH, len(misses)
        if last < 2 * k:
            return torch.zeros((), dtype=torch.bool, device=misses.device)
        pooled = lambda x: (c := torch.cat([x.new_zeros(1), x.cumsum(0)]))[k:] - c[:-k]  # noqa: E731 - e = k-1 .. last-1
        n, h = pooled(misses), pooled(hits)
        valid = n > 0
        m = torch.where(valid, h / n.clamp(min=1), torch.inf)
        low, where = torch.cummin(m, 0)  # the lowest m up to each epoch
        m0 = torch.cat([m.new_full((1,), torch.inf), low[:-1]])  # ... before it
        n0 = n[torch.cat([where.new_zeros(1), where[:-1]])]
        e = torch.arange(k - 1, last, device=misses.device)
        spread = cls.Z * torch.sqrt((m0 * (1 - m0)).clamp(min=0) * (1 / n.clamp(min=1) + 1 / n0.clamp(min=1)))
        return (valid & (e >= 2 * k - 1) & torch.isfinite(m0) & (m - m0 > spread)).any()

    def observes_step(self, t: int, global_batch: int) -> bool:
        """Whether training step t (0-based) adds its batch to the early sums: epoch t * B / N < the window's end.
        An open window is tested on the device at the first step of each epoch; the host reads the outcome on
        --log-every steps (refresh), and observe() masks the steps in between, so no step syncs for it."""
        if not self.from_batches:
            return False
        epoch = t * global_batch // len(self.label)
        if self.auto and epoch > self.epoch and math.isinf(self._window_end) and epoch < len(self.misses):
            closes = self.window_closes(self.hits[:epoch], self.misses[:epoch]) & self.end.isinf()
            self.end.copy_(torch.where(closes, float(epoch), self.end))
        self.epoch = epoch
        return t * global_batch < self._window_end * len(self.label)

    def observes_evaluation(self, step: int, global_batch: int, eval_every: int) -> bool:
        """Whether the evaluation after `step` adds to the early sums (streams): the first one, or within the window."""
        return not self.from_batches and (step <= eval_every or step * global_batch <= self.window_end * len(self.label))

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Add softmax(logits) at `rows` to the early sums and, while the window is chosen, count this epoch's hits
        and misses (every process passes the gathered batch; no host sync)."""
        inside = self.epoch < self.end  # on the device: the window may have closed since the host last read it
        self.early_prob_sum.index_add_(0, rows, logits.float().softmax(1) * inside)
        self.early_count.index_add_(0, rows, torch.ones_like(rows) * inside)
        if self.auto and self.from_batches and self.epoch < len(self.misses):
            pred, given, last = logits.argmax(1), self.label[rows], self.last_pred[rows]
            missed = (last >= 0) & (last != given) & inside
            self.misses[self.epoch] += missed.sum()
            self.hits[self.epoch] += (missed & (pred == given)).sum()
            self.last_pred[rows] = torch.where(inside, pred.to(torch.int32), last)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, early: bool) -> None:
        """Add one evaluation's margins (and, for a stream in the early window, probabilities) at `rows`."""
        z = logits.float()
        given = z.gather(1, labels[:, None]).squeeze(1)
        other = z.scatter(1, labels[:, None], float("-inf")).amax(1)
        self.margin_sum.index_add_(0, rows, given - other)
        self.count.index_add_(0, rows, torch.ones_like(rows))
        if early:
            self.observe(z, rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"margin_sum": self.margin_sum, "count": self.count, "early_prob_sum": self.early_prob_sum,
                "early_count": self.early_count, "last_pred": self.last_pred, "misses": self.misses,
                "hits": self.hits, "window_end": self.end}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if name == "window_end":
                self.window_end = float(value)
            else:
                getattr(self, name).copy_(value)

    def window_text(self) -> str:
        """The early window as saved and printed, e.g. 'epochs [0, 21) chosen by the run'."""
        self.refresh()
        end = self.window_end if math.isfinite(self.window_end) else self.epoch + 1
        how = "--audit-epochs" if not self.auto else ("chosen by the run" if math.isfinite(self.window_end) else
                                                        "chosen by the run: never closed, the whole run")
        if not self.from_batches:
            how = "evaluations of a stream within " + how.replace("chosen by the run", "the default")
        return f"epochs [0, {end:g}) ({how})"

    def save(self, path: Path, keys: list[str] | None) -> None:
        """dynamics.safetensors: the sums, count and given label per row; the window and a stream's subset keys in the metadata."""
        tensors = {k: v.cpu().contiguous() for k, v in (self.state_dict() | {"label": self.label}).items()
                   if k in ("margin_sum", "count", "early_prob_sum", "early_count", "label")}
        meta = {"rows": "split"} if keys is None else {"rows": "stream_subset", "keys": json.dumps(keys)}
        self.refresh()
        end = self.window_end
        meta |= {"early": "training_batches" if self.from_batches else "evaluations",
                 "audit_epochs": f"{end:g}" if math.isfinite(end) else f"{self.epoch + 1:g}",
                 "window": "auto" if self.auto else "fixed", "window_text": self.window_text()}
        runfolder.save_tensors_atomic(tensors, path, meta)


def evaluate(model, test_batches: data.EvalBatches, train_eval_batches: data.EvalBatches | None, accelerator, info,
             channels_last: bool, dynamics: TrainingDynamics | None = None, known_noise: bool = True,
             early: bool = True) -> dict:
    """Clean test accuracy/loss, the training dynamics and, with known noise, the paper's Figure 3 metrics."""
    logits, labels = data.predict(model, test_batches, info, channels_last, accelerator.gather), test_batches.label
    metrics = {"test_acc": (logits.argmax(1) == labels).float().mean().item(),
               "test_loss": F.cross_entropy(logits, labels).item(),
               "test_examples": len(labels)}
    if train_eval_batches is not None:
        logits = data.predict(model, train_eval_batches, info, channels_last, accelerator.gather)
        b = train_eval_batches
        label, clean, noisy, rows = b.label, b.clean_label, b.is_noisy, b.index
        if dynamics is not None:
            dynamics.update(logits, label, rows, early)
        if not known_noise:
            return metrics
        pred, ent = logits.argmax(1), losses.normalized_entropy(logits.float().softmax(1))
        mean = lambda x, mask: x[mask].float().mean().item() if mask.any() else float("nan")  # noqa: E731
        metrics |= {"clean_fit": mean(pred == label, ~noisy), "noisy_fit": mean(pred == label, noisy),
                    "noisy_correct": mean(pred == clean, noisy), "entropy_clean": mean(ent, ~noisy),
                    "entropy_noisy": mean(ent, noisy)}
    return metrics


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "step", milestones: list[int] = (),
          power: float | None = None) -> float:
    """lr at optimizer step t of T: step: lr 0.1^(milestones passed); poly: lr (1 - t/T)^power; cosine: lr (1 + cos(pi t/T)) / 2."""
    if schedule == "poly":
        return base_lr * (1.0 - step / total_steps) ** power
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    return base_lr * 0.1 ** sum(step >= m for m in milestones)


# ----------------------------------------------------------------------------- the run folder (runfolder.py)


class Finished(Exception):
    """--resume auto on a finished run: nothing to do, exit 0 with one line."""


class Stopped(Exception):
    """SIGTERM or SIGUSR1 (preemption) during training: a checkpoint was written at the step reached; exit 143."""


EXIT_STOPPED = 128 + signal.SIGTERM
STOP = {"signal": 0, "training": False}  # set by on_stop_signal; the loop checks it between steps


def on_stop_signal(signum: int, frame) -> None:
    """During training: ask the loop to checkpoint and stop. Before it (start-up): leave at once, lock released."""
    if STOP["training"]:
        STOP["signal"] = signum
        return
    runfolder.release_locks()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped by {signal.Signals(signum).name} during start-up: no checkpoint was written", file=sys.stderr)
    os._exit(EXIT_STOPPED)


def stop_requested(accelerator: Accelerator, sync_step: bool) -> bool:
    """Whether a stop signal reached any process: one process reads its flag each step (no device value); several
    agree on the steps that sync anyway (log steps), so they all stop at the same step."""
    if accelerator.num_processes == 1:
        return STOP["signal"] != 0
    if not sync_step:
        return False
    return accelerator.gather(torch.tensor([STOP["signal"]], device=accelerator.device)).max().item() != 0


def agree(accelerator: Accelerator, error: str | None) -> None:
    """Raise the first process's error on every process (so all stop together); nothing when none failed."""
    errors = [e for e in gather_object([error]) if e] if accelerator.num_processes > 1 else [error] if error else []
    if errors:
        raise AgreedError(errors[0])


class AgreedError(ValueError):
    """An error every process raises together (after agree): only rank 0 prints it."""


def open_run_folder(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Path, Path | None, bool]:
    """Lock the run folder and decide what the run does with it, touching nothing else: (folder, checkpoint to
    resume or None, whether the run files must be cleared once the data and model are built)."""
    out = Path(args.output_dir)
    refused = [None]
    if accelerator.is_main_process:
        try:
            runfolder.lock(out)
        except ValueError as e:
            refused = [str(e)]
    broadcast_object_list(refused)  # every process stops when the main one could not take the folder
    if refused[0]:
        raise AgreedError(refused[0])
    last, started = runfolder.latest_checkpoint(out), runfolder.is_run_folder(out)
    if args.resume == "auto":
        if runfolder.is_finished(out):
            raise Finished(f"{out} already holds a finished run: nothing to do (--resume auto)")
        if last is None and started:
            accelerator.print(f"note: {out} holds a run stopped before its first checkpoint: starting it over")
        ckpt, clear = last, last is None and started
    elif args.resume:
        if runfolder.is_finished(out):
            raise ValueError(f"{out} already holds a finished run: nothing to resume; choose another --output-dir")
        ckpt, clear = find_checkpoint(args.resume, out, last), False
    else:
        ckpt, clear = None, args.overwrite
        check_fresh_folder(out, args.overwrite, last)
    if ckpt is not None:
        known = {k: v for k, v in planned_config(args).items() if k not in DATA_DECIDED}
        check_checkpoint(ckpt, known, accelerator.process_index)
    return out, ckpt, clear


def check_fresh_folder(out: Path, overwrite: bool, last: Path | None) -> None:
    """A new run may go into an empty folder or, with --overwrite, replace a run; never over anything else."""
    if overwrite:
        if runfolder.foreign_files(out) and not runfolder.is_run_folder(out):
            raise ValueError(f"--overwrite: {out} holds files that are not a train.py run's "
                             f"({', '.join(runfolder.foreign_files(out)[:4])}): it replaces only a run; choose "
                             "another --output-dir (nothing was deleted)")
    elif runfolder.is_finished(out):
        raise ValueError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output-dir")
    elif runfolder.is_run_folder(out):
        if last is not None:
            raise ValueError(f"{out} holds an unfinished run (last checkpoint {last.name}): pass --resume latest (or "
                             f"auto) to continue it, or --overwrite to start it over")
        raise ValueError(f"{out} holds a run stopped before its first checkpoint ({runfolder.contents(out)}): nothing "
                         f"to resume; pass --overwrite to start it over, or choose another --output-dir")


def find_checkpoint(resume: str, out: Path, last: Path | None) -> Path:
    """The checkpoint to resume from: the latest complete one in out/checkpoints, or the folder given."""
    if resume == "latest":
        if last is None:
            contents = runfolder.contents(out)
            advice = (f"the folder holds {contents}: nothing to resume; start it over with --overwrite instead of "
                      f"--resume latest" if contents else "the folder holds no run yet: start without --resume")
            raise ValueError(f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; {advice}")
        return last
    path = Path(resume)
    if not runfolder.is_complete(path):
        raise ValueError(f"--resume {resume}: not a complete checkpoint (a step_N folder with trainer_state.json)")
    return path


# Flags that may change between a run and its resumption; every other one must match the checkpoint's config.json.
# The folder's own location (output_dir) is no hyperparameter: a run folder may be moved, copied or spelled otherwise.
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "report_to", "log_every", "eval_every", "save_every",
                     "keep_checkpoints", "compile", "compile_mode", "world_size", "device", "versions", "git_commit",
                     "push_to_hub", "num_workers", "eval_batch_size")


# Values the data decides (recorded after it loads): compared with a checkpoint's only once the data is loaded.
DATA_DECIDED = ("input_path", "resize", "image_size", "model", "num_classes", "in_channels", "alpha", "beta",
                "elr_beta", "elr_lambda")


def check_checkpoint(ckpt: Path, config: dict, rank: int) -> None:
    """Before anything loads: only files this suite writes, each readable, this process's RNG state loadable, and
    the same run (every hyperparameter known so far equal to the checkpoint's own config.json)."""
    runfolder.check_checkpoint_files(ckpt)
    try:
        for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
            runfolder.check_header(ckpt / name)
        runfolder.read_json(ckpt / "trainer_state.json")
        rng = ckpt / f"rng_{rank}.safetensors"
        if rng.exists():
            runfolder.check_rng_state(*runfolder.read_tensors(rng))
    except ValueError as e:
        raise ValueError(f"checkpoint {ckpt} is damaged: {e}; resume from another one or start over with "
                         f"--overwrite (nothing was loaded)") from None
    check_same_run(ckpt, config)


def check_same_run(ckpt: Path, config: dict) -> None:
    """A resumed run must be the same run: refuse changed hyperparameters with one line naming them."""
    saved = runfolder.read_json(ckpt / "config.json")
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and config[k] is not None
               and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{flag(k)} {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise ValueError(f"--resume: {ckpt} comes from a run started with other settings ({diffs}); "
                         f"use the same flags, or another --output-dir")


def start_run_folder(out: Path, config: dict, record: dict, clear: bool, ckpt: Path | None,
                     accelerator: Accelerator) -> None:
    """After every check: clear the old run's files (--overwrite, or an auto restart), then write config.json and
    noise.json; a resume keeps the metrics lines up to its step."""
    accelerator.wait_for_everyone()  # every process has read the folder before the main one changes it
    if accelerator.is_main_process:
        if clear:
            runfolder.clear_run_files(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        runfolder.write_atomic(out / "config.json", json.dumps(config, indent=2))
        runfolder.write_atomic(out / "noise.json", json.dumps(record, indent=2))
        if ckpt is not None:
            runfolder.truncate_metrics(out / "metrics.jsonl", runfolder.read_json(ckpt / "trainer_state.json")["step"])
    accelerator.wait_for_everyone()


def storage_error(e: OSError | str, out: Path, what: str) -> str:
    """One line for a failed write (disk full, read-only): what failed and which checkpoint can still be resumed."""
    last = runfolder.latest_checkpoint(out)
    usable = (f"{last} is complete and still usable: free space or fix the folder, then run again with --resume latest"
              if last is not None else "no checkpoint was completed yet")
    why = e if isinstance(e, str) else (e.strerror or str(e))
    return f"cannot write the {what} in {out} ({why}); {usable}"


# ----------------------------------------------------------------------------- the run's pieces


@dataclass
class Run:
    """What the stages of main() pass on: the configuration, the folder, the data, the model and its training state."""

    args: argparse.Namespace
    accelerator: Accelerator
    out: Path
    info: Any = None
    train_ds: Any = None
    test_batches: Any = None
    train_eval_batches: Any = None
    dynamics: TrainingDynamics | None = None
    eval_keys: list[str] | None = None
    model: Any = None
    optimizer: Any = None
    loss_module: losses.TrainingLoss | None = None  # the uncompiled loss: its state (ELR's targets) is checkpointed
    loss_fn: Any = None
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=lambda: {"step": 0, "best_acc": -1.0, "best_step": 0, "loss_sum": 0.0,
                                                 "eps_sum": 0.0, "n_sum": 0})


def build_data(run: Run) -> None:
    """The test split clean and map-style; the training split noisy; the subset scored at evaluations and the
    label audit's statistics over it."""
    args, accelerator = run.args, run.accelerator
    run.train_ds, test_ds, run.info = data.prepare_data(vars(args))
    info = run.info
    args.input_path, args.resize, args.image_size = info.input_path, info.resize, info.image_size  # into config.json
    workers, rank, world = args.num_workers, accelerator.process_index, accelerator.num_processes
    eval_batch = max(1, args.eval_batch_size // world)  # per process, as the training batch
    run.test_batches = data.EvalBatches(test_ds, info, accelerator.device, eval_batch, rank=rank, world=world,
                                       workers=workers)
    eval_ds, rows = data.train_eval_subset(run.train_ds, args.train_eval_size)  # for the Figure 3 metrics
    if rows is not None:  # also without synthetic noise: the audit is for labels whose noise is unknown
        if info.clean_subset:
            accelerator.print(f"clean_fit/noisy_fit are measured on the {len(rows)} training examples with a known "
                              "clean label (clean_label_kv.txt)")
        run.train_eval_batches = data.EvalBatches(eval_ds, info, accelerator.device, eval_batch, rows, rank, world,
                                                 workers)
        run.dynamics = TrainingDynamics(data.label_tensors(eval_ds)["label"], info.num_classes, accelerator.device,
                                        args.audit_epochs, from_batches=not args.streaming,  # a stream's rows differ
                                        total_images=args.max_steps * args.batch_size)
        run.eval_keys = list(eval_ds["example_key"]) if args.streaming else None  # a stream's subset by key


def build_model(run: Run) -> None:
    """Model (SyncBatchNorm over several GPUs), SGD and the --method loss, prepared by Accelerate."""
    args, accelerator, info = run.args, run.accelerator, run.info
    set_seed(args.seed)
    args.model = args.model or models.default_model(args.dataset, info.image_size)
    model = models.build_model(args.model, info.num_classes, info.channels, weights=args.weights)
    if args.sync_bn:  # BatchNorm statistics over the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    num_examples = None
    if args.method == "elr":  # ELR's rows: the map-style split's rows, or a stream's --key-column ids
        num_examples = stream_num_rows(run.train_ds, args.key_column) if args.streaming else len(run.train_ds)
    run.loss_module = build_loss(args, info.num_classes, num_examples).to(accelerator.device)
    # the model is compiled by prepare (the accelerator's dynamo plugin); the loss is compiled here
    run.loss_fn = torch.compile(run.loss_module, mode=args.compile_mode) if args.compile else run.loss_module
    run.model, run.optimizer = accelerator.prepare(model, optimizer)  # evaluation batches are this process's own


# ----------------------------------------------------------------------------- checkpoints: safetensors and JSON


def own_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The run's own state beyond model and optimizer: the audit's sums and the loss's (ELR's running targets)."""
    tensors = {f"loss.{k}": v for k, v in run.loss_module.state_dict().items()}
    if run.dynamics is not None:
        tensors |= {f"dynamics.{k}": v for k, v in run.dynamics.state_dict().items()}
    return tensors


def write_checkpoint(run: Run, tmp: Path) -> None:
    """The main process's files of a checkpoint, trainer_state.json last (it marks the checkpoint complete)."""
    model = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
    runfolder.save_tensors(model.state_dict(), tmp / "model.safetensors")
    tensors, meta = runfolder.flatten_optimizer(run.optimizer.state_dict())
    runfolder.save_tensors(tensors, tmp / "optimizer.safetensors", meta)
    runfolder.save_tensors(own_tensors(run), tmp / "state.safetensors")
    (tmp / "config.json").write_text(json.dumps(run.config, indent=2))  # the checkpoint's own record (resume check)
    scaler = run.accelerator.scaler.state_dict() if run.accelerator.scaler is not None else None
    (tmp / "trainer_state.json").write_text(json.dumps(run.state | {"scaler": scaler}))


def save_checkpoint(run: Run, step: int) -> None:
    """Every process writes its RNG state and the main one the rest into tmp_step_N, renamed to step_N once whole,
    then older ones are pruned: a kill or a full disk at any point leaves the last complete checkpoint usable. A
    failure on any process stops every process with its message."""
    accelerator, folder = run.accelerator, run.out / "checkpoints"
    final, tmp = folder / f"step_{step:06d}", folder / f"tmp_step_{step:06d}"

    def attempt(write) -> str | None:
        try:
            write()
        except OSError as e:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes space
            return storage_error(e, run.out, f"checkpoint {final.name}")
        return None

    if accelerator.is_main_process:
        agree(accelerator, attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True))))
    else:
        agree(accelerator, None)
    agree(accelerator, attempt(lambda: runfolder.save_rng_state(tmp / f"rng_{accelerator.process_index}.safetensors")))
    if accelerator.is_main_process:
        agree(accelerator, attempt(lambda: (write_checkpoint(run, tmp), runfolder.replace_checkpoint(tmp, final),
                                            runfolder.prune_checkpoints(run.out, run.args.keep_checkpoints))))
    else:
        agree(accelerator, None)


def load_checkpoint(run: Run, ckpt: Path) -> None:
    """Model, optimizer, the run's own tensors, this process's RNG state and the step counters from a checkpoint
    that check_checkpoint accepted."""
    accelerator, rank = run.accelerator, run.accelerator.process_index
    try:
        state = runfolder.read_json(ckpt / "trainer_state.json")
        model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
        model.load_state_dict(runfolder.read_tensors(ckpt / "model.safetensors")[0])
        run.optimizer.load_state_dict(runfolder.unflatten_optimizer(*runfolder.read_tensors(ckpt / "optimizer.safetensors")))
        own = runfolder.read_tensors(ckpt / "state.safetensors")[0]
        run.loss_module.load_state_dict({k[5:]: v for k, v in own.items() if k.startswith("loss.")})
        if run.dynamics is not None:
            run.dynamics.load_state_dict({k[9:]: v for k, v in own.items() if k.startswith("dynamics.")})
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        saved_world = runfolder.read_json(ckpt / "config.json").get("world_size", accelerator.num_processes)
        if saved_world == accelerator.num_processes:
            runfolder.load_rng_state(ckpt / f"rng_{rank}.safetensors")
        else:
            accelerator.print(f"note: {ckpt} was written by {saved_world} processes, this run has "
                              f"{accelerator.num_processes}: the data order and RNG differ from an uninterrupted run")
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ValueError(f"checkpoint {ckpt} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"resume from another one or start over with --overwrite") from None
    run.state = {k: v for k, v in state.items() if k != "scaler"}
    accelerator.print(f"resumed from {ckpt} at step {run.state['step']}")


# ----------------------------------------------------------------------------- the loop


def stop_if_diverged(run: Run, bad_step: torch.Tensor, step: int) -> None:
    """Raise FloatingPointError when any process saw a non-finite loss or the weights are no longer finite
    (one host sync), pointing to the last checkpoint (all are finite) with advice by what ran."""
    args, accelerator = run.args, run.accelerator
    weights_ok = torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()
    bad = torch.where(weights_ok | (bad_step >= 0), bad_step, step - 1)
    bad = accelerator.gather(bad.view(1)).max().item()
    if bad < 0:
        return
    last = runfolder.latest_checkpoint(run.out)
    advice = ("use --mixed-precision bf16 (fp16 overflows), or lower --lr" if args.mixed_precision == "fp16"
              else f"lower --lr (this run used {args.lr:g})")
    resume = f"the last checkpoint, {last}, is finite" if last else "no checkpoint was saved before it"
    error = FloatingPointError(f"loss is not finite at step {bad} (training diverged): {advice}; {resume}; "
                               f"nothing after it was saved or logged")
    error.agreed = True  # every process raises it
    raise error


def evaluate_and_log(run: Run, step: int, lr: float, sums: torch.Tensor, batches) -> dict:
    """One line of metrics.jsonl: the training averages since the last one, then evaluate()."""
    args, accelerator, state = run.args, run.accelerator, run.state
    n = max(state["n_sum"], 1)
    loss_sum, eps_sum = sums.tolist()
    metrics = {"step": step, "lr": lr, "train_loss": loss_sum / n, "epsilon": eps_sum / n}
    early = run.dynamics is not None and run.dynamics.observes_evaluation(step, args.batch_size, args.eval_every)
    metrics |= evaluate(run.model, run.test_batches, run.train_eval_batches, accelerator, run.info, args.channels_last,
                        run.dynamics, known_noise=args.noise != "none" or run.info.clean_subset, early=early)
    metrics["process_steps"] = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    metrics["bad_images"] = len(set(gather_object(sorted(batches.bad_files))))
    sums.zero_()
    state["n_sum"] = 0
    if metrics["test_acc"] > state["best_acc"]:
        state["best_acc"], state["best_step"] = metrics["test_acc"], step
    if accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    accelerator.log(metrics, step=step)
    accelerator.print(f"step {step}/{args.max_steps} " + " ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def train_step(run: Run, batch: dict, t: int, sums: torch.Tensor, bad_step: torch.Tensor) -> torch.Tensor:
    """Optimizer step t on this process's batch (micro-batches under gradient accumulation): no device value is read."""
    args, accelerator, info = run.args, run.accelerator, run.info
    accum = args.gradient_accumulation_steps
    micro = data.process_batch(args.batch_size, accelerator.num_processes, accum)
    x = data.normalize(batch["image"], info.mean, info.std)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for xs, ys, rows in zip(x.split(micro), batch["label"].split(micro), batch["index"].split(micro)):
        with accelerator.accumulate(run.model):
            logits = run.model(xs)
            loss = run.loss_fn(logits, ys, step=t, index=rows)
            if run.dynamics is not None and run.dynamics.observes_step(t, args.batch_size):
                run.dynamics.observe(*accelerator.gather((logits.detach(), rows)))
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        eps = run.loss_module.last_epsilon
        sums[0] += loss.detach().float() / accum
        sums[1] += (eps.float().mean() if torch.is_tensor(eps) else eps) / accum
        bad_step = torch.where(torch.isfinite(loss.detach()) | (bad_step >= 0), bad_step, t)
    if args.method == "elr":
        sync_running_targets(accelerator, run.loss_module, batch["index"])
    return bad_step


def train_loop(run: Run) -> dict:
    """Steps t = state['step'] .. T-1 (t = ProSelfLC's optimizer steps taken); evaluation, checkpoints, progress,
    and a checkpoint at the step reached when SIGTERM/SIGUSR1 arrives. Returns the last metrics."""
    args, accelerator, state = run.args, run.accelerator, run.state
    device, milestones = accelerator.device, milestone_steps(args)
    batches = data.TrainBatches(run.train_ds, run.info, args.batch_size, args.seed, accelerator.process_index,
                                accelerator.num_processes, state["step"], device, num_workers=args.num_workers,
                                max_bad_fraction=args.max_bad_fraction, key_column=args.key_column)
    batch_iter = iter(batches)
    sums = torch.tensor([state["loss_sum"], state["eps_sum"]], device=device)  # train loss and eps since the last log
    bad_step, metrics = torch.tensor(-1, device=device), {}
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=None if accelerator.is_local_main_process else True)
    tick, tick_step = time.perf_counter(), state["step"]
    run.model.train()
    for t in range(state["step"], args.max_steps):
        lr = lr_at(t, args.lr, args.max_steps, args.lr_schedule, milestones, args.poly_power)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        bad_step = train_step(run, next(batch_iter), t, sums, bad_step)
        state["n_sum"] += 1
        step = t + 1
        log_step = step % args.log_every == 0 or step == args.max_steps
        stop = stop_requested(accelerator, log_step) and step < args.max_steps
        if stop or step == args.max_steps or any(step % every == 0 for every in (args.log_every, args.eval_every,
                                                                                 args.save_every)):
            stop_if_diverged(run, bad_step, step)  # before anything is logged or saved
        if log_step:
            if run.dynamics is not None:
                run.dynamics.refresh()  # the audit window's end, decided on the device
            now = time.perf_counter()
            n, (loss_sum, eps_sum) = max(state["n_sum"], 1), sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", eps=f"{eps_sum / n:.3f}", lr=f"{lr:.3g}",
                            img_s=f"{(step - tick_step) * args.batch_size / (now - tick):.0f}")
            bar.update(step - bar.n)
            tick, tick_step = now, step
        if step % args.eval_every == 0 or step == args.max_steps:
            metrics = evaluate_and_log(run, step, lr, sums, batches)
        if (step % args.save_every == 0 or stop) and step < args.max_steps:
            state |= dict(zip(("loss_sum", "eps_sum"), sums.tolist()), step=step)
            save_checkpoint(run, step)
        if stop:
            name = signal.Signals(STOP["signal"] or signal.SIGTERM).name
            raise Stopped(f"stopped by {name} at step {step}: checkpoint {run.out / 'checkpoints' / f'step_{step:06d}'} "
                          "written; run the same command with --resume latest (or --resume auto) to continue")
    bar.close()
    return metrics


def save_final(run: Run, metrics: dict) -> None:
    """The final model (the paper reports the final model, not the best one) and the audit's statistics, each
    written to a temporary file and renamed: model.safetensors, written last, marks the run finished."""
    accelerator, out = run.accelerator, run.out
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
        weights = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        try:
            if run.dynamics is not None:
                run.dynamics.save(out / "dynamics.safetensors", run.eval_keys)
            runfolder.save_tensors_atomic(weights, out / "model.safetensors")
        except OSError as e:
            error = storage_error(e, out, "final model.safetensors")
    agree(accelerator, error)
    if run.args.push_to_hub and accelerator.is_main_process:
        import hub

        hub.push_run(out, run.args.push_to_hub)
    accelerator.end_training()
    accelerator.print(f"final test_acc={metrics['test_acc']:.4f} best_test_acc={run.state['best_acc']:.4f} "
                      f"(step {run.state['best_step']}) output_dir={out}")


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerate's view of the devices and processes; the values it decides go back into args."""
    dynamo = TorchDynamoPlugin(backend="inductor", mode=args.compile_mode or "default") if args.compile else None
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to, project_dir=args.output_dir, dynamo_plugin=dynamo)
    args.mixed_precision = ran_precision(accelerator)  # what runs, also when it came from the accelerate config
    check_processes(args, accelerator)
    if args.num_workers is None:
        args.num_workers = data.default_workers(accelerator.num_processes)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator


def main(argv: list[str] | None = None) -> None:
    # ---- config: every value resolved and checked; nothing touched yet
    args = resolve_config(argv)
    if vars(args).pop("print_config"):  # what a recipe means, before paying for it: no data, no Accelerator
        print(json.dumps(planned_config(args), indent=2))
        return
    datasets.disable_progress_bars()  # the noise maps take a second; our own bar shows training
    check_trackers(args.report_to)
    accelerator = make_accelerator(args)
    if args.weights == "imagenet":  # download (once) or fail with one line before the data is loaded
        with accelerator.main_process_first():
            models.imagenet_state_dict(args.model)
    # ---- folder: locked; what to resume and whether to replace a run decided, nothing deleted yet
    out, ckpt, clear = open_run_folder(args, accelerator)
    run = Run(args, accelerator, out)
    # ---- data, model, loss
    build_data(run)
    build_model(run)
    run.config = run_config(args, run.info, accelerator.num_processes, accelerator.device)
    if ckpt is not None:
        check_same_run(ckpt, run.config)
    record = noise.noise_record(run.train_ds, run.info.noise, key_column=args.key_column) \
        if accelerator.is_main_process else {}
    start_run_folder(out, run.config, record, clear, ckpt, accelerator)  # the first write, after every check
    if args.report_to:
        accelerator.init_trackers("proselflc", config={k: v for k, v in run.config.items()
                                                       if isinstance(v, (int, float, str, bool))})
    if ckpt is not None:
        load_checkpoint(run, ckpt)
    # ---- loop, save
    STOP["training"] = True
    metrics = train_loop(run)
    save_final(run, metrics)


def peer_failed(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run exited (its own error line says why)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(e, torch.distributed.DistError) or "closed by peer" in str(e) or "remote worker" in str(e))


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input becomes one 'error: ...' line and exit code 2 (PROSELFLC_DEBUG=1 shows the traceback).
    Under torchrun, an error every process raises is printed by rank 0 only, an error of one process during training
    by that process (the others stop when it does); a stop signal exits 143. The folder's lock is released in any case."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        main(argv)
    except Finished as e:
        if rank == 0:
            print(e, file=sys.stderr)
    except Stopped as e:
        if rank == 0:
            print(e, file=sys.stderr)
        return EXIT_STOPPED
    except RuntimeError as e:
        if not peer_failed(e) or os.environ.get("PROSELFLC_DEBUG"):
            raise
        return 2  # another process failed and printed why; this one stops without a second line
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        if os.environ.get("PROSELFLC_DEBUG"):
            raise
        if rank == 0 or (STOP["training"] and not getattr(e, "agreed", False) and not isinstance(e, AgreedError)):
            print(f"error: {runfolder.error_line(e)}", file=sys.stderr)
        return 2
    finally:
        STOP["training"] = False
        runfolder.release_locks()
    return 0


def leave(code: int) -> NoReturn:
    """Exit with code; a process of several exits without finalising the interpreter (see the comment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The process group's C++ threads can outlive it and take the GIL while the interpreter finalises, which
        # aborts a finished run now and then (SIGABRT, "terminate called without an active exception"): the run's
        # files are closed and its lock released, so leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


atexit.register(runfolder.release_locks)  # also when main() is called without cli()

if __name__ == "__main__":
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):  # preemption: checkpoint, then exit 143 (on_stop_signal)
        signal.signal(stop_signal, on_stop_signal)
    leave(cli())
