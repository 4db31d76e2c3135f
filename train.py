"""Train a classifier on noisily labelled data with ProSelfLC or a baseline target modification.

    python train.py                                   # digits on CPU, about 10 seconds
    accelerate launch train.py --method proselflc --dataset cifar100 --noise symmetric --noise-rate 0.4
    torchrun --nproc_per_node 2 train.py --cpu        # two CPU processes over gloo

Read it top to bottom: parse, build data, build model, build loss, prepare, loop, evaluate, save.
With no flags beyond the dataset it runs the paper's recipe (Section 5.1): SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 256, 30,000 steps, lr / 10 at 50% and 73.3% of the steps.
`--batch-size` is the global batch (all processes and accumulation steps together), so the recipe
is the same on one GPU or many.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
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
# Defaults by dataset; CIFAR and everything else gets the paper's recipe.
RECIPES = {
    "paper": dict(max_steps=30_000, batch_size=256, lr=0.1, eval_every=1_000, save_every=5_000),
    "digits": dict(max_steps=300, batch_size=128, lr=0.1, eval_every=50, save_every=100),
}
MILESTONE_FRACTIONS = (15_000 / 30_000, 22_000 / 30_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every knob of a run is a flag; None means 'the recipe's value for this dataset'."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = p.add_argument_group("data and noise")
    d.add_argument("--dataset", default="digits", help="digits, synthetic, cifar10, cifar100, a Hub id or a local path")
    d.add_argument("--data-dir", help="local copy: save_to_disk folder, parquet files or CIFAR python-pickle folder")
    d.add_argument("--streaming", action="store_true", help="stream the training split instead of holding it in memory")
    d.add_argument("--image-column")
    d.add_argument("--label-column")
    d.add_argument("--key-column", help="stable example id for the noise; default: a hash of the image bytes")
    d.add_argument("--synthetic-size", type=int, default=5_000)
    d.add_argument("--synthetic-classes", type=int, default=10)
    d.add_argument("--noise", default="none", help="none, symmetric, asymmetric, pairflip or file")
    d.add_argument("--noise-rate", type=float, default=0.0)
    d.add_argument("--noise-seed", type=int, default=0, help="seed of the label noise, separate from --seed")
    d.add_argument("--noise-file", help="real noisy labels: CIFAR-N .pt, .npy, .csv or .parquet")
    d.add_argument("--noise-key", help="which labels of --noise-file, e.g. worse_label")
    d.add_argument("--noise-pairs", help="asymmetric pairs 'a:b,b:a,...' or a preset (cifar10, cifar100, synthetic)")
    d.add_argument("--in-memory", choices=("auto", "yes", "no"), default="auto",
                   help="input path: yes decodes the training split once into memory (one image size), no decodes "
                        "per batch in DataLoader workers; auto: in memory when one size, no larger than "
                        "--image-size, and under 4 GiB decoded")
    d.add_argument("--resize", type=int, default=256, help="photos (decode per batch): warp to resize x resize")
    d.add_argument("--image-size", type=int, default=224, help="photos: random (training) or centre crop of this size")
    d.add_argument("--augment", choices=("paper", "rrc"), default="paper",
                   help="photos: paper = warp, random crop, flip (Section 5.1); rrc = RandomResizedCrop + flip")
    d.add_argument("--num-workers", type=int, help="DataLoader decoding processes per process (default: cores, at most 4)")
    d.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop when more than this fraction of the training images is unreadable (they are skipped)")
    d.add_argument("--train-eval-size", type=int,
                   help="training examples scored at each evaluation for the clean/noisy-subset metrics "
                        "(default: all of a map-style split, 10,000 of a stream; 0 turns it off)")
    m = p.add_argument_group("model and loss")
    m.add_argument("--model", help=f"one of {', '.join(models.MODELS)}; default by input size")
    m.add_argument("--weights", help="initial weights, a local safetensors file (e.g. ImageNet ResNet-50)")
    m.add_argument("--method", default="proselflc", help=", ".join(losses.METHODS))
    m.add_argument("--eps", type=float, help="fixed epsilon of ls, cp, bootsoft, boothard (default 0.25)")
    m.add_argument("--exp-base", type=float, help="ProSelfLC exp_base (default: the paper's for the setting, else 10)")
    m.add_argument("--transit", type=float, default=0.5, help="ProSelfLC: g(t) = 0.5 at t = transit * T")
    m.add_argument("--gce-q", type=float, default=0.7)
    m.add_argument("--alpha", type=float, help="SCE alpha (CIFAR-10: 0.1, else 6.0)")
    m.add_argument("--beta", type=float, help="SCE beta (CIFAR-10: 1.0, else 0.1)")
    m.add_argument("--detach-target", action="store_true", help="no gradient through p inside the target")
    m.add_argument("--temperature", type=float, help="ProSelfLC variant: eps and target from softmax(logits / T0), detached")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, help="optimizer steps T (paper: 30000)")
    o.add_argument("--batch-size", type=int, help="global batch size (paper: 256)")
    o.add_argument("--lr", type=float, help="initial learning rate (paper: 0.1)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--milestones", help="steps where lr /= 10, e.g. 15000,22000 (default: 50%% and 73.3%% of T)")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1)
    o.add_argument("--seed", type=int, default=0, help="training seed: init, order, augmentation")
    o.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", help="default: runs/<dataset>-<noise>-<rate>-<method>-seed<seed>")
    r.add_argument("--resume", help="a checkpoint folder, or 'latest' in --output-dir")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    r.add_argument("--eval-every", type=int)
    r.add_argument("--save-every", type=int)
    r.add_argument("--keep-checkpoints", type=int, default=2)
    r.add_argument("--log-every", type=int, default=20, help="progress and non-finite loss check interval")
    r.add_argument("--report-to", help="an Accelerate tracker, e.g. tensorboard")
    r.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    r.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="default: the accelerate config")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (default on: 1.3x faster on CPU, tensor cores on GPU)")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace) -> None:
    """Resolve every None to the recipe's value, so config.json records what actually ran."""
    recipe = RECIPES["digits" if args.dataset == "digits" else "paper"]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.milestones is None:
        args.milestones = ",".join(str(round(f * args.max_steps)) for f in MILESTONE_FRACTIONS)
    if args.exp_base is None:
        paper = PAPER_EXP_BASE.get((args.noise, round(args.noise_rate, 2))) if args.dataset == "cifar100" else None
        args.exp_base = paper or 10.0
    if args.alpha is None or args.beta is None:
        alpha, beta = (0.1, 1.0) if args.dataset == "cifar10" else (6.0, 0.1)
        args.alpha = alpha if args.alpha is None else args.alpha
        args.beta = beta if args.beta is None else args.beta
    if args.eps is None:
        args.eps = 0.25
    if args.train_eval_size is None and args.streaming:
        args.train_eval_size = 10_000
    if args.output_dir is None:
        name = args.dataset.rstrip("/").replace("/", "_")
        args.output_dir = f"runs/{name}-{args.noise}-{args.noise_rate:g}-{args.method}-seed{args.seed}"


def check_args(args: argparse.Namespace, world_size: int) -> list[int]:
    """Reject inconsistent flags with one line each; return the lr milestones."""
    if args.method not in losses.METHODS:
        raise ValueError(f"unknown method {args.method!r}: choose one of {', '.join(losses.METHODS)}")
    if args.model is not None and args.model not in models.MODELS:
        raise ValueError(f"unknown model {args.model!r}: choose one of {', '.join(models.MODELS)}")
    for flag in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_every", "save_every", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0.0 <= args.noise_rate < 1.0:
        raise ValueError(f"--noise-rate must be in [0, 1), got {args.noise_rate}")
    try:
        milestones = [int(m) for m in str(args.milestones).split(",") if m.strip()]
    except ValueError:
        raise ValueError(f"--milestones must be comma-separated step numbers, got {args.milestones!r}") from None
    if any(not 0 < m <= args.max_steps for m in milestones):
        raise ValueError(f"--milestones {args.milestones} must lie in (0, --max-steps={args.max_steps}]")
    shards = world_size * args.gradient_accumulation_steps
    if args.batch_size % shards:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {shards}")
    return milestones


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """Refuse to clobber a run unless --overwrite; a killed run is continued only with --resume."""
    out = Path(args.output_dir)
    finished, started = (out / "model.safetensors").exists(), (out / "config.json").exists()
    if args.overwrite:
        if accelerator.is_main_process and out.exists():
            shutil.rmtree(out)
    elif finished:
        raise ValueError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output-dir")
    elif started and not args.resume:
        raise ValueError(f"{out} holds an unfinished run: pass --resume latest to continue it, or --overwrite")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def find_checkpoint(resume: str, out: Path) -> Path:
    """The checkpoint folder to resume from: 'latest' complete one in out/checkpoints, or the path given."""
    if resume == "latest":
        done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists())
        if not done:
            raise ValueError(f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; start without --resume")
        return done[-1]
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint folder")
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"--resume {resume}: not a complete checkpoint (trainer_state.json missing)")
    return path


# Flags that may change between a run and its resumption; every other one must match config.json.
RESUMABLE_CHANGES = ("resume", "overwrite", "report_to", "log_every", "eval_every", "save_every", "keep_checkpoints",
                     "compile", "world_size", "device", "versions", "git_commit")


def check_resume_config(out: Path, config: dict) -> None:
    """A resumed run must be the same run: refuse changed hyperparameters with one line naming them."""
    saved_path = out / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    changed = [k for k in config if k not in RESUMABLE_CHANGES and k in saved and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {config[k]!r}" for k in changed[:4])
        raise ValueError(f"--resume: this run was started with other settings ({diffs}); "
                         f"use the same flags, or another --output-dir")


def save_checkpoint(accelerator: Accelerator, out: Path, state: dict, keep: int) -> None:
    """save_state into a temporary folder, then rename: a kill during the write leaves the last one usable."""
    final = out / "checkpoints" / f"step_{state['step']:06d}"
    tmp = out / "checkpoints" / f"tmp_step_{state['step']:06d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted((out / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


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


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p) / log C per example."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


@torch.no_grad()
def predict(model, loader, accelerator: Accelerator, info, channels_last: bool) -> list[torch.Tensor]:
    """Logits (fp32) and the loader's other columns for every example exactly once, gathered over processes."""
    model.eval()
    outs = []
    for image, *rest in loader:
        x = data.normalize(image, info.mean, info.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs.append(accelerator.gather_for_metrics((model(x).float(), *rest)))
    model.train()
    return [torch.cat(cols) for cols in zip(*outs)]


def evaluate(model, test_loader, train_eval_loader, accelerator, info, channels_last: bool) -> dict:
    """Clean test accuracy/loss and, with noise, the paper's Figure 3 metrics on the training subset."""
    logits, labels = predict(model, test_loader, accelerator, info, channels_last)
    metrics = {"test_acc": (logits.argmax(1) == labels).float().mean().item(),
               "test_loss": F.cross_entropy(logits, labels).item(),
               "test_examples": len(labels)}
    if train_eval_loader is not None:
        logits, label, clean, noisy, _ = predict(model, train_eval_loader, accelerator, info, channels_last)
        pred, ent = logits.argmax(1), normalized_entropy(logits)
        mean = lambda x, mask: x[mask].float().mean().item() if mask.any() else float("nan")  # noqa: E731
        metrics |= {"clean_fit": mean(pred == label, ~noisy), "noisy_fit": mean(pred == label, noisy),
                    "noisy_correct": mean(pred == clean, noisy), "entropy_clean": mean(ent, ~noisy),
                    "entropy_noisy": mean(ent, noisy)}
    return metrics


def lr_at(step: int, base_lr: float, milestones: list[int]) -> float:
    """Step decay: base_lr / 10 per milestone passed."""
    return base_lr * 0.1 ** sum(step >= m for m in milestones)


def main(argv: list[str] | None = None) -> None:
    # ---- parse
    args = parse_args(argv)
    fill_defaults(args)
    datasets.disable_progress_bars()  # the noise maps take a second; our own bar shows training
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to, project_dir=args.output_dir,
                              dynamo_backend="inductor" if args.compile else None)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    args.mixed_precision = accelerator.mixed_precision  # what runs, also when it came from the accelerate config
    milestones = check_args(args, world)
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
    test_loader = data.eval_loader(data.eval_dataset(test_ds, info), info, workers)
    eval_ds, rows = data.train_eval_subset(train_ds, args.train_eval_size)  # for the Figure 3 metrics
    train_eval_loader = None
    if rows is not None and (args.noise != "none" or info.clean_subset):
        if info.clean_subset:
            accelerator.print(f"clean_fit/noisy_fit are measured on the {len(rows)} training examples with a known "
                              "clean label (clean_label_kv.txt)")
        columns = ("image", "label", "clean_label", "is_noisy", "index")
        train_eval_loader = data.eval_loader(data.eval_dataset(eval_ds, info, rows, columns), info, workers)

    # ---- model, optimizer, loss
    set_seed(args.seed)
    args.model = args.model or models.default_model(args.dataset, info.image_size)
    model = models.build_model(args.model, info.num_classes, info.channels, weights=args.weights)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    loss_fn = losses.build_loss(args.method, info.num_classes, total_steps=args.max_steps, eps=args.eps,
                                exp_base=args.exp_base, transit=args.transit, q=args.gce_q, alpha=args.alpha,
                                beta=args.beta, detach_target=args.detach_target, temperature=args.temperature)
    model, optimizer, test_loader, train_eval_loader = accelerator.prepare(model, optimizer, test_loader, train_eval_loader)

    config = run_config(args, info, world, device)
    if ckpt is not None:
        check_resume_config(out, config)
    accelerator.wait_for_everyone()  # every process has read config.json before the main one rewrites it
    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(config, indent=2))
        record = noise.noise_record(train_ds, args.noise, args.noise_rate, args.noise_seed, info.num_classes,
                                    pairs=noise.parse_pairs(args.noise_pairs) or info.pairs_preset,
                                    noise_file=args.noise_file, noise_key=args.noise_key, key_column=args.key_column)
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
            kept = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                    if line and json.loads(line)["step"] <= state["step"]] if (out / "metrics.jsonl").exists() else []
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
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
        lr = lr_at(t, args.lr, milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batch_iter)  # this process's augmented batch of step t
        x, labels = data.normalize(batch["image"], info.mean, info.std), batch["label"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for xs, ys in zip(x.split(micro), labels.split(micro)):
            with accelerator.accumulate(model):
                loss = loss_fn(model(xs), ys, step=t)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / accum
            eps = loss_fn.last_epsilon
            eps_sum += (eps.float().mean() if torch.is_tensor(eps) else eps) / accum
            bad_step = torch.where(torch.isfinite(loss.detach()) | (bad_step >= 0), bad_step, t)
        state["n_sum"] += 1
        step = t + 1

        if step % args.log_every == 0 or step == args.max_steps:
            if bad_step.item() >= 0:  # the one host sync per log interval
                accelerator.end_training()
                raise FloatingPointError(f"loss is not finite at step {bad_step.item()}: lower --lr, or use "
                                         f"--mixed-precision bf16 instead of fp16; checkpoints so far are in {out / 'checkpoints'}")
            now = time.perf_counter()
            speed = (step - tick_step) * args.batch_size / (now - tick)
            tick, tick_step = now, step
            bar.set_postfix(loss=f"{loss_sum.item() / max(state['n_sum'], 1):.3f}",
                            eps=f"{eps_sum.item() / max(state['n_sum'], 1):.3f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}")
            bar.update(step - bar.n)

        if step % args.eval_every == 0 or step == args.max_steps:
            n = max(state["n_sum"], 1)
            metrics = {"step": step, "lr": lr, "train_loss": loss_sum.item() / n, "epsilon": eps_sum.item() / n}
            metrics |= evaluate(model, test_loader, train_eval_loader, accelerator, info, channels_last)
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
            save_checkpoint(accelerator, out, state, args.keep_checkpoints)
    bar.close()

    # ---- save: the final model (the paper reports the final model, not the best one)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
                   for k, v in accelerator.unwrap_model(model, keep_torch_compile=False).state_dict().items()}
        save_file(weights, str(out / "model.safetensors"))
    accelerator.end_training()
    accelerator.print(f"final test_acc={metrics['test_acc']:.4f} best_test_acc={state['best_acc']:.4f} "
                      f"(step {state['best_step']}) output_dir={out}")


def cli(argv: list[str] | None = None) -> int:
    """Run main(); bad input becomes one 'error: ...' line and exit code 2 (PROSELFLC_DEBUG=1 shows the traceback)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("PROSELFLC_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
