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
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

import data
import losses
import models
import noise

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
    model=None, weights="none", method="proselflc", eps=0.25, transit=0.5, gce_q=0.7,
    momentum=0.9, weight_decay=5e-4, lr_schedule="step", poly_power=2.0, gradient_accumulation_steps=1, seed=0,
    keep_checkpoints=2, log_every=20, channels_last=True,
    in_memory="auto", resize=256, image_size=224, augment="paper", max_bad_fraction=0.01,  # photos (decode per batch)
    train_eval_size=None,  # None: the whole map-style split (a stream: 10,000)
    eval_batch_size=None,  # None: the --batch-size (evaluation needs less memory per example than training)
    audit_epochs=15.0,  # the label audit's early window (TrainingDynamics), before the network memorises the noise
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every knob of a run is a flag; None means 'the recipe's value' (RECIPES), filled in by fill_defaults."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes (--recipe; every value is still a flag):\n" + "\n".join(
            f"  {name}: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if COMMON.get(k, "?") != v)
            for name, recipe in RECIPES.items())
        + "\n  all: " + ", ".join(f"{k}={v}" for k, v in COMMON.items()))
    p.add_argument("--recipe", help=f"the defaults of every value below: {', '.join(RECIPES)} (default: by --dataset: "
                                    "cifar10/cifar100/synthetic and their Hub ids cifar, digits digits, imagenet "
                                    "imagenet, clothing1m clothing1m, anything else cifar; for your own photos "
                                    "pick imagenet (from scratch) or clothing1m (fine-tune ImageNet weights))")
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
                        f"before the network memorises the noisy labels ({by_recipe('audit_epochs')})")
    m = p.add_argument_group("model and loss")
    m.add_argument("--model", help=f"one of {', '.join(models.MODELS)} ({by_recipe('model')}; -: by input size: "
                                   "digits_cnn up to 16 px, resnet44 up to 64 px, resnet50 above)")
    m.add_argument("--weights", help="initial weights: a local safetensors file, 'imagenet' (torchvision's ResNet-18/50 "
                                     f"ImageNet weights, downloaded once) or 'none' ({by_recipe('weights')})")
    m.add_argument("--method", help=f"{', '.join(losses.METHODS)} ({by_recipe('method')})")
    m.add_argument("--eps", type=float, help=f"fixed epsilon of ls, cp, bootsoft, boothard ({by_recipe('eps')})")
    m.add_argument("--exp-base", type=float, help="ProSelfLC exp_base (default: the paper's for the setting, else 10)")
    m.add_argument("--transit", type=float, help=f"ProSelfLC: g(t) = 0.5 at t = transit * T ({by_recipe('transit')})")
    m.add_argument("--gce-q", type=float, help=f"({by_recipe('gce_q')})")
    m.add_argument("--alpha", type=float, help="SCE alpha (10 classes: 0.1, else 6.0)")
    m.add_argument("--beta", type=float, help="SCE beta (10 classes: 1.0, else 0.1)")
    m.add_argument("--detach-target", action="store_true", help="no gradient through p inside the target")
    m.add_argument("--temperature", type=float, help="ProSelfLC's later variant: eps and target from softmax(logits / T0), "
                                                     "detached (proselflc_t default 0.5)")
    m.add_argument("--trust", choices=losses.TRUSTS, help="ProSelfLC's local trust: 1 - H(p)/log C (entropy, proselflc's "
                                                          "default) or max_k p_k (maxp, proselflc_t's default)")
    m.add_argument("--elr-beta", type=float, help="ELR running-target momentum (10 classes: 0.7; 100 or more: 0.9; else 0.7)")
    m.add_argument("--elr-lambda", type=float, help="ELR regulariser weight (10 classes: 3; 100 or more: 7; else 3)")
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
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/<dataset>-<noise>-<rate>-<method>-seed<seed>")
    r.add_argument("--resume", help="a checkpoint folder, or 'latest' in --output-dir")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    r.add_argument("--eval-every", type=int, help=f"({by_recipe('eval_every')})")
    r.add_argument("--eval-batch-size", type=int, help="global batch of the evaluations (default: the --batch-size)")
    r.add_argument("--save-every", type=int, help=f"({by_recipe('save_every')})")
    r.add_argument("--keep-checkpoints", type=int, help=f"({by_recipe('keep_checkpoints')})")
    r.add_argument("--log-every", type=int, help=f"progress and non-finite loss check interval ({by_recipe('log_every')})")
    r.add_argument("--report-to", help="an Accelerate tracker, e.g. tensorboard")
    r.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    r.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: the accelerate config")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help=f"NHWC memory format (1.3x faster on CPU, tensor cores on GPU; {by_recipe('channels_last')})")
    r.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON (what config.json will hold) and exit without "
                        "loading data; values only the data decides (num_classes, in_channels, and model and "
                        "train_eval_size when the recipe leaves them open) are null, and so is "
                        "mixed_precision when the accelerate config decides it")
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
    if args.exp_base is None:
        paper = PAPER_EXP_BASE.get((args.noise, round(args.noise_rate, 2))) if args.dataset == "cifar100" else None
        args.exp_base = paper or 10.0
    if args.train_eval_size is None and args.streaming:
        args.train_eval_size = 10_000
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.output_dir is None:
        name = args.dataset.rstrip("/").replace("/", "_")
        args.output_dir = f"runs/{name}-{args.noise}-{args.noise_rate:g}-{args.method}-seed{args.seed}"


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """parse_args then fill_defaults: every value of a run from its flags and its recipe."""
    args = parse_args(argv)
    fill_defaults(args)
    return args


def check_args(args: argparse.Namespace, world_size: int) -> list[int]:
    """Reject inconsistent flags with one line each; return the lr milestones."""
    if args.method not in losses.METHODS:
        raise ValueError(f"unknown method {args.method!r}: choose one of {', '.join(losses.METHODS)}")
    if args.model is not None and args.model not in models.MODELS:
        raise ValueError(f"unknown model {args.model!r}: choose one of {', '.join(models.MODELS)}")
    models.check_weights(args.weights, args.model)
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {args.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if args.lr_schedule == "poly" and not args.poly_power > 0:
        raise ValueError(f"--poly-power must be positive, got {args.poly_power}")
    for flag in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_every", "save_every", "log_every",
                 "keep_checkpoints", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0 or args.weight_decay < 0:
        raise ValueError(f"--momentum must be in [0, 1) and --weight-decay at least 0, got {args.momentum} and "
                         f"{args.weight_decay}")
    if args.resize is not None and args.resize < 1 or args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--resize and --image-size must be at least 1, got {args.resize} and {args.image_size}")
    if args.resize is not None and args.image_size is not None and args.image_size > args.resize:
        raise ValueError(f"--image-size {args.image_size} must not exceed --resize {args.resize}: the crop lies "
                         "inside the warped image")
    if args.method == "elr" and args.streaming and not args.key_column:
        raise ValueError("--method elr with --streaming needs --key-column: an integer id column giving each example's row")
    if not 0.0 <= args.noise_rate < 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1), got {args.noise_rate}")
    if args.noise == "none" and args.noise_rate:
        raise ValueError(f"--noise none with --noise-rate {args.noise_rate}: choose a --noise kind, or drop --noise-rate")
    if args.train_eval_size is not None and args.train_eval_size < 0:
        raise ValueError(f"--train-eval-size must be 0 (off) or more, got {args.train_eval_size}")
    if not args.audit_epochs > 0:
        raise ValueError(f"--audit-epochs must be above 0 (the label audit's early window, in epochs), got {args.audit_epochs}")
    if args.resume and args.overwrite and resume_is_inside(args.resume, Path(args.output_dir)):
        raise ValueError("--resume and --overwrite contradict each other: --overwrite would delete the checkpoint "
                         "to resume from; pass one of them (nothing was changed)")
    try:
        milestones = [int(m) for m in str(args.milestones or "").split(",") if m.strip()]
    except ValueError:
        raise ValueError(f"--milestones must be comma-separated step numbers, got {args.milestones!r}") from None
    if any(not 0 < m <= args.max_steps for m in milestones):
        raise ValueError(f"--milestones {args.milestones} must lie in (0, --max-steps={args.max_steps}]")
    shards = world_size * args.gradient_accumulation_steps
    if args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {shards}")
    return milestones


def planned_config(args: argparse.Namespace) -> dict:
    """What config.json will hold, as far as it is known before the data is loaded (the rest null)."""
    return {**vars(args), **{k: None for k in PRINT_CONFIG_UNKNOWN}}


LOCK_NAME = "train.lock"
_held_locks: list[Path] = []  # locks this process took; cli() releases them when main() ends, also on error


def resume_is_inside(resume: str, out: Path) -> bool:
    """Whether --resume names a checkpoint in the run folder itself ('latest' or a path under out)."""
    return resume == "latest" or Path(resume).resolve().is_relative_to(out.resolve())


def check_folder_path(out: Path) -> None:
    """Refuse an --output-dir that is a file or lies under one."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies under the file {path}"
            raise ValueError(f"--output-dir {out} {where}: choose a folder")
        if path.exists():
            return


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_lock(lock: Path) -> dict:
    """The lock file's {'pid', 'host'}; {} when it is empty or torn."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_run_folder(out: Path) -> Path:
    """Create out and take out/train.lock atomically (O_CREAT|O_EXCL) with our pid and host; a lock left by a
    dead process on this host is taken over with a notice, a live one is refused with one line naming it."""
    check_folder_path(out)
    lock, me = out / LOCK_NAME, {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(lock)
                torn = not holder and time.time() - lock.stat().st_mtime > 10  # killed between create and write
                if torn or (holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))):
                    print(f"note: {out} was locked by pid {holder.get('pid')} on {holder.get('host')}, which is gone; "
                          f"taking the lock over", file=sys.stderr)
                    lock.unlink(missing_ok=True)
                    continue
                raise ValueError(f"{out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                                 f"see {lock}): wait for it to end, or choose another --output-dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _held_locks.append(lock)
            return lock
    except OSError as e:
        raise ValueError(f"cannot write to --output-dir {out} ({e.strerror or e}): choose a writable folder") from None
    raise ValueError(f"{out}: another run keeps taking {lock}; choose another --output-dir")


def release_run_folder_locks() -> None:
    """Remove the run-folder locks this process holds."""
    while _held_locks:
        lock = _held_locks.pop()
        if read_lock(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


atexit.register(release_run_folder_locks)  # also when main() is called without cli()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (one with trainer_state.json) in out/checkpoints, or None."""
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def folder_contents(out: Path) -> str:
    """'config.json, metrics.jsonl, ...': what a run folder holds besides the lock and the checkpoints, for messages."""
    names = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, "checkpoints")) if out.is_dir() else []
    return ", ".join(names)


def clear_run_folder(out: Path) -> None:
    """Delete everything in out except our lock (--overwrite)."""
    for child in out.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """Lock the run folder, then refuse to clobber a run unless --overwrite; a killed run is continued only with --resume."""
    out = Path(args.output_dir)
    refused = [None]
    if accelerator.is_main_process:
        try:
            lock_run_folder(out)
        except ValueError as e:
            refused = [str(e)]
    broadcast_object_list(refused)  # every process stops when the main one could not take the folder
    if refused[0]:
        raise ValueError(refused[0])
    finished, started = (out / "model.safetensors").exists(), (out / "config.json").exists()
    if args.overwrite:
        if accelerator.is_main_process:
            clear_run_folder(out)
    elif finished:
        raise ValueError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output-dir")
    elif started and not args.resume:
        last = latest_checkpoint(out)
        if last is not None:
            raise ValueError(f"{out} holds an unfinished run (last checkpoint {last.name}): pass --resume latest to "
                             f"continue it, or --overwrite to start it over")
        raise ValueError(f"{out} holds a run stopped before its first checkpoint ({folder_contents(out)}): nothing to "
                         f"resume; pass --overwrite to start it over, or choose another --output-dir")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def find_checkpoint(resume: str, out: Path) -> Path:
    """The checkpoint folder to resume from: 'latest' complete one in out/checkpoints, or the path given."""
    if resume == "latest":
        last = latest_checkpoint(out)
        if last is None:
            contents = folder_contents(out)
            advice = (f"the folder holds {contents}: nothing to resume; start it over with --overwrite instead of "
                      f"--resume latest" if contents else "the folder holds no run yet: start without --resume")
            raise ValueError(f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; {advice}")
        return last
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint folder")
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"--resume {resume}: not a complete checkpoint (trainer_state.json missing)")
    return path


# Flags that may change between a run and its resumption; every other one must match the checkpoint's config.json.
# The folder's own location (output_dir) is no hyperparameter: a run folder may be moved, copied or spelled otherwise.
RESUMABLE_CHANGES = ("resume", "overwrite", "output_dir", "report_to", "log_every", "eval_every", "save_every",
                     "keep_checkpoints", "compile", "world_size", "device", "versions", "git_commit")


def check_resume_config(ckpt: Path, out: Path, config: dict) -> None:
    """A resumed run must be the same run: compare with the checkpoint's own config.json (older checkpoints:
    the run folder's) and refuse changed hyperparameters with one line naming them."""
    saved_path = next((p for p in (ckpt / "config.json", out / "config.json") if p.exists()), None)
    if saved_path is None:
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        raise ValueError(f"{saved_path} is not valid JSON: the run folder is damaged; resume from another checkpoint "
                         f"or start over with --overwrite") from None
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise ValueError(f"--resume: {ckpt} comes from a run started with other settings ({diffs}); "
                         f"use the same flags, or another --output-dir")


def storage_error(e: OSError, out: Path, what: str) -> ValueError:
    """One line for a failed write (disk full, read-only): what failed and which checkpoint can still be resumed."""
    last = latest_checkpoint(out)
    usable = (f"{last} is complete and still usable: free space or fix the folder, then run again with --resume latest"
              if last is not None else "no checkpoint was completed yet")
    return ValueError(f"cannot write the {what} in {out} ({e.strerror or e}); {usable}")


def save_checkpoint(accelerator: Accelerator, out: Path, state: dict, keep: int, config: dict) -> None:
    """save_state and the run's config.json into a temporary folder, then rename: a kill or a full disk during the
    write leaves the last one usable."""
    final = out / "checkpoints" / f"step_{state['step']:06d}"
    tmp = out / "checkpoints" / f"tmp_step_{state['step']:06d}"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))  # the checkpoint's own record (resume check)
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
                shutil.rmtree(old)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes space
        raise storage_error(e, out, f"checkpoint {final.name}") from None
    accelerator.wait_for_everyone()


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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to step; a line torn by a kill during its append is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def stop_if_diverged(bad_step: torch.Tensor, step: int, model, accelerator: Accelerator, args: argparse.Namespace,
                     out: Path) -> None:
    """Raise FloatingPointError when any process saw a non-finite loss or the weights are no longer finite
    (one host sync), pointing to the last checkpoint (all are finite) with advice by what ran."""
    weights_ok = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    bad = torch.where(weights_ok | (bad_step >= 0), bad_step, step - 1)
    bad = accelerator.gather(bad.view(1)).max().item()
    if bad < 0:
        return
    accelerator.end_training()
    last = latest_checkpoint(out)
    advice = ("use --mixed-precision bf16 (fp16 overflows), or lower --lr" if args.mixed_precision == "fp16"
              else f"lower --lr (this run used {args.lr:g})")
    resume = f"the last checkpoint, {last}, is finite" if last else "no checkpoint was saved before it"
    raise FloatingPointError(f"loss is not finite at step {bad} (training diverged): {advice}; {resume}; "
                             f"nothing after it was saved or logged")


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


def build_loss(args: argparse.Namespace, num_classes: int, num_examples: int | None) -> losses.TrainingLoss:
    """The --method loss; the values it resolved (by method and number of classes) go back into args for config.json."""
    loss_fn = losses.build_loss(args.method, num_classes, total_steps=args.max_steps, eps=args.eps, exp_base=args.exp_base,
                                transit=args.transit, q=args.gce_q, alpha=args.alpha, beta=args.beta,
                                detach_target=args.detach_target, temperature=args.temperature, trust=args.trust,
                                elr_beta=args.elr_beta, elr_lambda=args.elr_lambda,
                                num_examples=num_examples)
    for key in ("alpha", "beta", "temperature", "trust", "elr_beta", "elr_lambda"):
        setattr(args, key, getattr(loss_fn, key))
    return loss_fn


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

    early_prob_sum[i] = sum of softmax(z_i) over the training steps of the first --audit-epochs epochs whose
    batch held row i, early_count[i] their number: z_i is the training forward pass, before that step's
    update, so example i was last fitted an epoch earlier, and the network fits clean labels before it
    memorises the noisy ones (Arpit et al. 2017). A stream's batches carry no row of the scored subset, so
    there the early sums come from the evaluations within the window instead (at least the first one; its
    length unknown, an epoch counts as the subset's size).
    margin_sum[i] = sum over evaluations of z_y - max_{k != y} z_k of the un-augmented image (the area under
    the margin, Pleiss et al. 2020), count[i] = evaluations of row i, over the whole run. y = the given
    (noisy) label; rows are the training split's rows (a stream: positions in the evaluated subset). Every
    process holds the same sums, on the device.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, device: torch.device, audit_epochs: float,
                 from_batches: bool):
        self.label = labels.to(device)
        self.audit_epochs, self.from_batches = audit_epochs, from_batches
        self.margin_sum = torch.zeros(len(labels), device=device)
        self.count = torch.zeros(len(labels), dtype=torch.int64, device=device)
        self.early_prob_sum = torch.zeros(len(labels), num_classes, device=device)
        self.early_count = torch.zeros(len(labels), dtype=torch.int64, device=device)

    def observes_step(self, t: int, global_batch: int) -> bool:
        """Whether training step t (0-based) adds its batch to the early sums: epoch t * B / N < audit_epochs."""
        return self.from_batches and t * global_batch < self.audit_epochs * len(self.label)

    def observes_evaluation(self, step: int, global_batch: int, eval_every: int) -> bool:
        """Whether the evaluation after `step` adds to the early sums (streams): the first one, or within the window."""
        return not self.from_batches and (step <= eval_every or step * global_batch <= self.audit_epochs * len(self.label))

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Add softmax(logits) at `rows` to the early sums (every process passes the gathered batch; no host sync)."""
        self.early_prob_sum.index_add_(0, rows, logits.float().softmax(1))
        self.early_count.index_add_(0, rows, torch.ones_like(rows))

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
                "early_count": self.early_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def save(self, path: Path, keys: list[str] | None) -> None:
        """dynamics.safetensors: the sums, count and given label per row; the window and a stream's subset keys in the metadata."""
        tensors = {k: v.cpu().contiguous() for k, v in (self.state_dict() | {"label": self.label}).items()}
        meta = {"rows": "split"} if keys is None else {"rows": "stream_subset", "keys": json.dumps(keys)}
        meta |= {"early": "training_batches" if self.from_batches else "evaluations", "audit_epochs": str(self.audit_epochs)}
        save_file(tensors, str(path), metadata=meta)


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


def main(argv: list[str] | None = None) -> None:
    # ---- parse
    args = resolve_args(argv)
    if vars(args).pop("print_config"):  # what a recipe means, before paying for it: no data, no Accelerator
        check_args(args, world_size=1)
        print(json.dumps(planned_config(args), indent=2))
        return
    datasets.disable_progress_bars()  # the noise maps take a second; our own bar shows training
    check_trackers(args.report_to)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to, project_dir=args.output_dir,
                              dynamo_backend="inductor" if args.compile else None)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    args.mixed_precision = ran_precision(accelerator)  # what runs, also when it came from the accelerate config
    milestones = check_args(args, world)
    if args.weights == "imagenet":  # download (once) or fail with one line before the data is loaded
        with accelerator.main_process_first():
            models.imagenet_state_dict(args.model)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = args.channels_last
    out = prepare_output_dir(args, accelerator)
    ckpt = find_checkpoint(args.resume, out) if args.resume else None

    # ---- data: the test split clean and map-style; the training split noisy, served by one batch source
    train_ds, test_ds, info = data.prepare_data(vars(args))
    args.input_path, args.resize, args.image_size = info.input_path, info.resize, info.image_size  # into config.json
    workers = data.default_workers(world) if args.num_workers is None else args.num_workers
    eval_batch = max(1, args.eval_batch_size // world)  # per process, as the training batch
    test_batches = data.EvalBatches(test_ds, info, device, eval_batch, rank=rank, world=world, workers=workers)
    eval_ds, rows = data.train_eval_subset(train_ds, args.train_eval_size)  # for the Figure 3 metrics
    train_eval_batches = dynamics = eval_keys = None
    if rows is not None:  # also without synthetic noise: the audit is for labels whose noise is unknown
        if info.clean_subset:
            accelerator.print(f"clean_fit/noisy_fit are measured on the {len(rows)} training examples with a known "
                              "clean label (clean_label_kv.txt)")
        train_eval_batches = data.EvalBatches(eval_ds, info, device, eval_batch, rows, rank, world, workers)
        dynamics = TrainingDynamics(data.label_tensors(eval_ds)["label"], info.num_classes, device, args.audit_epochs,
                                    from_batches=not args.streaming)  # a stream's batch rows are not the subset's
        accelerator.register_for_checkpointing(dynamics)
        eval_keys = list(eval_ds["example_key"]) if args.streaming else None  # a stream's subset is audited by key

    # ---- model, optimizer, loss
    set_seed(args.seed)
    args.model = args.model or models.default_model(args.dataset, info.image_size)
    model = models.build_model(args.model, info.num_classes, info.channels, weights=args.weights)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    num_examples = None
    if args.method == "elr":  # ELR's rows: the map-style split's rows, or a stream's --key-column ids
        num_examples = stream_num_rows(train_ds, args.key_column) if args.streaming else len(train_ds)
    loss_fn = build_loss(args, info.num_classes, num_examples).to(device)
    if args.method == "elr":  # the running targets are training state: save_state/load_state carry them
        accelerator.register_for_checkpointing(loss_fn)
    if args.compile:  # the model is compiled by prepare (dynamo_backend); the loss is compiled here
        loss_fn = torch.compile(loss_fn)
    model, optimizer = accelerator.prepare(model, optimizer)

    config = run_config(args, info, world, device)
    if ckpt is not None:
        check_resume_config(ckpt, out, config)
    accelerator.wait_for_everyone()  # every process has read config.json before the main one rewrites it
    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(config, indent=2))
        record = noise.noise_record(train_ds, info.noise, key_column=args.key_column)
        (out / "noise.json").write_text(json.dumps(record, indent=2))
    if args.report_to:
        accelerator.init_trackers("proselflc", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})

    # ---- resume: model, optimizer, RNG, our own step counter and running sums
    state = {"step": 0, "best_acc": -1.0, "best_step": 0, "loss_sum": 0.0, "eps_sum": 0.0, "n_sum": 0}
    if ckpt is not None:
        try:
            accelerator.load_state(str(ckpt))
            state = json.loads((ckpt / "trainer_state.json").read_text())
        except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
            raise ValueError(f"checkpoint {ckpt} is corrupt or incomplete ({type(e).__name__}: {e}); "
                             f"resume from another one or start over with --overwrite") from None
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", state["step"])
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")

    # ---- loop: t counts optimizer steps (ProSelfLC's t); T = --max-steps
    accum, micro = args.gradient_accumulation_steps, args.batch_size // (world * args.gradient_accumulation_steps)
    batches = data.TrainBatches(train_ds, info, args.batch_size, args.seed, rank, world, state["step"], device,
                                num_workers=workers, max_bad_fraction=args.max_bad_fraction,
                                key_column=args.key_column)
    batch_iter = iter(batches)
    loss_sum = torch.tensor(state["loss_sum"], device=device)
    eps_sum = torch.tensor(state["eps_sum"], device=device)
    bad_step = torch.tensor(-1, device=device)
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=None if accelerator.is_local_main_process else True)
    tick, tick_step = time.perf_counter(), state["step"]
    model.train()
    for t in range(state["step"], args.max_steps):
        lr = lr_at(t, args.lr, args.max_steps, args.lr_schedule, milestones, args.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batch_iter)  # this process's augmented batch of step t
        x, labels, idx = data.normalize(batch["image"], info.mean, info.std), batch["label"], batch["index"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for xs, ys, rows in zip(x.split(micro), labels.split(micro), idx.split(micro)):
            with accelerator.accumulate(model):
                logits = model(xs)
                loss = loss_fn(logits, ys, step=t, index=rows)
                if dynamics is not None and dynamics.observes_step(t, args.batch_size):
                    dynamics.observe(*accelerator.gather((logits.detach(), rows)))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / accum
            eps = loss_fn.last_epsilon
            eps_sum += (eps.float().mean() if torch.is_tensor(eps) else eps) / accum
            bad_step = torch.where(torch.isfinite(loss.detach()) | (bad_step >= 0), bad_step, t)
        if args.method == "elr":
            sync_running_targets(accelerator, loss_fn, idx)
        state["n_sum"] += 1
        step = t + 1

        if step == args.max_steps or any(step % every == 0 for every in (args.log_every, args.eval_every, args.save_every)):
            stop_if_diverged(bad_step, step, model, accelerator, args, out)  # before anything is logged or saved
        if step % args.log_every == 0 or step == args.max_steps:
            now = time.perf_counter()
            speed = (step - tick_step) * args.batch_size / (now - tick)
            tick, tick_step = now, step
            bar.set_postfix(loss=f"{loss_sum.item() / max(state['n_sum'], 1):.3f}",
                            eps=f"{eps_sum.item() / max(state['n_sum'], 1):.3f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}")
            bar.update(step - bar.n)

        if step % args.eval_every == 0 or step == args.max_steps:
            n = max(state["n_sum"], 1)
            metrics = {"step": step, "lr": lr, "train_loss": loss_sum.item() / n, "epsilon": eps_sum.item() / n}
            metrics |= evaluate(model, test_batches, train_eval_batches, accelerator, info, channels_last,
                                dynamics, known_noise=args.noise != "none" or info.clean_subset,
                                early=dynamics is not None and dynamics.observes_evaluation(step, args.batch_size,
                                                                                            args.eval_every))
            metrics["process_steps"] = accelerator.gather(torch.tensor([step], device=device)).tolist()
            metrics["bad_images"] = len(set(gather_object(sorted(batches.bad_files))))
            loss_sum.zero_(), eps_sum.zero_()
            state["n_sum"] = 0
            if metrics["test_acc"] > state["best_acc"]:
                state["best_acc"], state["best_step"] = metrics["test_acc"], step
            if accelerator.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step}/{args.max_steps} " + " ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

        if step % args.save_every == 0 and step < args.max_steps:
            state |= {"step": step, "loss_sum": loss_sum.item(), "eps_sum": eps_sum.item()}
            save_checkpoint(accelerator, out, state, args.keep_checkpoints, config)
    bar.close()

    # ---- save: the final model (the paper reports the final model, not the best one)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
                   for k, v in accelerator.unwrap_model(model, keep_torch_compile=False).state_dict().items()}
        try:
            if dynamics is not None:  # before the model, whose file marks the run finished
                dynamics.save(out / "dynamics.safetensors", eval_keys)
            save_file(weights, str(out / "model.safetensors"))
        except OSError as e:
            (out / "model.safetensors").unlink(missing_ok=True)  # a partial file would look like a finished run
            raise storage_error(e, out, "final model.safetensors") from None
    accelerator.end_training()
    accelerator.print(f"final test_acc={metrics['test_acc']:.4f} best_test_acc={state['best_acc']:.4f} "
                      f"(step {state['best_step']}) output_dir={out}")


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input becomes one 'error: ...' line and exit code 2 (PROSELFLC_DEBUG=1 shows the traceback).
    Under torchrun the line is printed by the process of rank 0 only; the run folder's lock is released in any case."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        if os.environ.get("PROSELFLC_DEBUG"):
            raise
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # a write refused by the system
            e = f"{e.strerror or e}: {e.filename or 'a file of the run'}; check the folder's permissions and free space"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        release_run_folder_locks()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: cli() releases the lock
    sys.exit(cli())
