"""Benchmarks, written to BENCHMARKS.md: every speed figure is a ratio to a baseline measured in the same run.

    python bench.py                      # all CPU sections (about 10 minutes on 2 cores)
    python bench.py --quick              # short repeats, for a smoke run
    python bench.py --only losses,input  # some sections: losses, input, train, eval, gpu
    python bench.py --only photo         # photos: decode per batch (generates JPEGs in /tmp once)
    python bench.py --only gpu,gpu_photo # on a CUDA machine: ResNet-44 and ResNet-50 bf16 training throughput

Sections:
- losses: forward+backward of every method, eager and compiled, as a fraction of a ResNet-44 batch-256
  training step on CPU (logits (256, 100)).
- input: training-input images/s (load, noise, decode, batch, augment, normalise) vs an upper bound.
- train: train.py's Accelerate loop vs a plain PyTorch loop; ResNet-44 step at batch 256 on CPU.
- eval: the evaluation input (data.EvalBatches) vs slicing the same device tensor, and the per-example
  DataLoader collation it replaced; eval.py's evaluation (data.predict) vs a bare forward loop.
- audit (not in the default run; needs requirements-bench.txt; 20 min on 2 idle cores): precision,
  recall and F1 of eval.py --audit with the window the run chooses, for CCE, ProSelfLC, GCE and ELR runs at
  300 and 1,500 steps, on digits with symmetric 0.2/0.4/0.6, pair-flip 0.4, two partial pair sets at
  0.2 and 0.4 and a three-class cycle at 0.4 (AUDIT_NOISES), against the best of seven cleanlab 5-fold
  classifiers per noise; whether the audit's one-line warning fired; and the audit's cost: a run that keeps
  its statistics and linear probe vs the same run with --train-eval-size 0 (audit off).
- photo: generated 500x375 JPEGs on the decode-per-batch path: the paper's transform per core vs a bare
  PIL decode + resize, PIL's JPEG draft mode, 1 -> 2 DataLoader workers, peak memory on 2,000 vs 20,000 files.
- gpu: images/s of the whole ResNet-44 bf16 training step with the on-device pipeline, eager and
  compiled (CUDA only; the paper's 30,000 x 256 run takes 7.68M images), and every loss's
  forward+backward (bf16 logits, eager and compiled) as a fraction of the eager step.
- gpu_photo (CUDA only): the ResNet-50 224 bf16 channels_last step, eager and compiled, against the
  images/s of the CPU decode-per-batch loader with up to 16 workers (does decoding keep up?), and
  torchvision.io.decode_jpeg on the GPU against PIL on one core.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import audit
import config
import data
import eval as ev
import losses
import models
import noise
import runfolder


def median_time(
    fn: Callable[[], object], repeats: int, inner: int = 1, sync: Callable[[], None] = lambda: None
) -> float:
    """Median over `repeats` blocks of the seconds per call of fn (each block `inner` calls)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- losses


def loss_calls(
    c: int, n: int, device: torch.device, compiled: bool
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Every method's loss as fn(logits, labels) at ProSelfLC's t = T/2 (ELR on random rows of 50,000), eager or compiled."""
    total, rows = 30_000, torch.randperm(50_000, device=device)[:n]
    calls = {}
    for m in losses.METHODS:
        fn = losses.build_loss(m, c, total_steps=total, num_examples=50_000 if m == "elr" else None).to(device)
        fn = torch.compile(fn, fullgraph=True) if compiled else fn
        calls[m] = lambda z, y, fn=fn: fn(z, y, step=total // 2, index=rows)
    return calls


def loss_fraction_rows(
    step_time: float,
    device: torch.device,
    quick: bool,
    sync: Callable[[], None],
    logits_dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Each method's forward+backward on logits (256, 100), eager and compiled, as a fraction of step_time."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (3.0 * torch.randn(256, 100, generator=gen, device=device)).to(logits_dtype).requires_grad_()
    labels = torch.randint(0, 100, (256,), generator=gen, device=device)
    repeats, calls = (3, 20) if quick else (7, 50)
    rows = []
    for compiled in (False, True):
        for name, loss in loss_calls(100, 256, device, compiled).items():
            torch._dynamo.reset()  # the methods share TrainingLoss.forward: each gets its own compile budget
            for _ in range(5):  # warm-up, compilation included
                torch.autograd.grad(loss(logits, labels), logits)
            t = median_time(lambda f=loss: torch.autograd.grad(f(logits, labels), logits), repeats, calls, sync=sync)
            rows.append(
                {
                    "name": f"{name}, {'torch.compile' if compiled else 'eager'}, logits (256, 100) "
                    f"{str(logits_dtype).removeprefix('torch.')}, {device.type}",
                    "value": 100 * t / step_time,
                    "unit": "% of a step",
                    "ratio": None,
                    "note": f"{t * 1e6:,.0f} us per call; goal < 1% of a ResNet-44 batch-256 training step",
                }
            )
    return rows


def resnet44_cpu_step_time(quick: bool) -> float:
    """Seconds per ResNet-44 (100 classes) fp32 channels_last training step at batch 256 on CPU, with F.cross_entropy."""
    torch.manual_seed(0)
    model = models.build_model("resnet44", 100).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(256, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (256,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return median_time(step, repeats=3 if quick else 5)


def bench_losses(quick: bool) -> list[dict]:
    """Every method's forward+backward on CPU, eager and torch.compile, as a fraction of a ResNet-44 batch-256 step."""
    step_time = resnet44_cpu_step_time(quick)
    rows = [
        {
            "name": "ResNet-44 training step, batch 256, CPU, fp32 channels_last (the baseline)",
            "value": step_time * 1e3,
            "unit": "ms/step",
            "ratio": 1.0,
            "note": "F.cross_entropy inside",
        }
    ]
    return rows + loss_fraction_rows(step_time, torch.device("cpu"), quick, sync=lambda: None)


# ----------------------------------------------------------------------------------------------- input

INPUT_BATCH = 128


def bench_parquet(n: int) -> str:
    """A folder laid out like the Hub's uoft-cs/cifar10 (img PNG, label) with n train images; cached in /tmp."""
    import datasets

    folder = os.path.join(tempfile.gettempdir(), f"proselflc-bench-cifar-{n}-rg1000")
    if os.path.isfile(os.path.join(folder, "test-00000-of-00001.parquet")):
        return folder
    os.makedirs(folder, exist_ok=True)
    features = datasets.Features(img=datasets.Image(), label=datasets.ClassLabel(names=list(noise.CIFAR10_CLASSES)))
    for split, size, seed in (("train", n, 1), ("test", max(10, n // 5), 2)):
        images, labels = data.synthetic_images(size, 10, seed)
        ds = datasets.Dataset.from_dict({"img": list(images), "label": labels}, features=features)
        ds.to_parquet(os.path.join(folder, f"{split}-00000-of-00001.parquet"), batch_size=1000)
    return folder


def epoch_rate(images: torch.Tensor, augment: bool, info: data.DatasetInfo, seed: int) -> float:
    """images/s of one epoch: random permutation, index batches, (augment), normalise."""
    g = torch.Generator().manual_seed(seed)
    n = len(images)
    start = time.perf_counter()
    order = torch.randperm(n, generator=g)
    for i in range(0, n - INPUT_BATCH + 1, INPUT_BATCH):
        x = images[order[i : i + INPUT_BATCH]]
        if augment:
            x = data.augment_batch(x, info.pad, True, g)
        data.normalize(x, info.mean, info.std)
    return (n // INPUT_BATCH * INPUT_BATCH) / (time.perf_counter() - start)


def bench_input(quick: bool) -> list[dict]:
    """Training-input images/s, map-style and streaming, vs indexing a uint8 tensor and normalising.

    One torch thread in the main process: on 2 cores two intra-op threads make these small per-batch
    ops slower, and the streaming DataLoader workers use one thread each.
    """
    import datasets

    datasets.disable_progress_bars()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, repeats = (10_000, 2) if quick else (50_000, 3)
        cfg = vars(
            config.resolve(
                ["--dataset", "cifar10", "--data-dir", bench_parquet(n), "--noise", "symmetric", "--noise-rate", "0.4"]
            )
        )
        start = time.perf_counter()
        train_ds, _, info = data.prepare_data(cfg)
        images = data.to_tensors(train_ds)["image"]
        prepare_s = time.perf_counter() - start
        bound = mapped = 0.0
        for s in range(2 * repeats):  # interleaved, best of each: a busy neighbour hits both alike
            bound = max(bound, epoch_rate(images, False, info, s))
            mapped = max(mapped, epoch_rate(images, True, info, s))
        stream_train, _, _ = data.prepare_data({**cfg, "streaming": True})
        stream = 0.0
        for epoch in range(repeats):
            g = torch.Generator().manual_seed(epoch)
            count, start = 0, time.perf_counter()
            for batch in data.stream_batches(
                stream_train, INPUT_BATCH, seed=0, epoch=epoch, process_index=0, num_processes=1
            ):
                data.normalize(data.augment_batch(batch["image"], info.pad, True, g), info.mean, info.std)
                count += len(batch["label"])
            stream = max(stream, count / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return [
        {
            "name": f"bound: uint8 tensor, random batches of {INPUT_BATCH}, normalise (N={n})",
            "value": bound,
            "unit": "images/s",
            "ratio": 1.0,
            "note": "baseline",
        },
        {
            "name": "map-style epoch: index, augment (pad 4, crop, flip), normalise",
            "value": mapped,
            "unit": "images/s",
            "ratio": mapped / bound,
            "note": "goal ratio >= 0.5",
        },
        {
            "name": "map-style one-off: load parquet, symmetric noise, decode PNG to one tensor",
            "value": n / prepare_s,
            "unit": "images/s",
            "ratio": None,
            "note": f"{prepare_s:.1f} s once per run (cached by datasets after)",
        },
        {
            "name": f"streaming epoch: noise, reshard+split, shuffle, PNG decode in {data.default_workers(1)} workers, "
            "augment, normalise",
            "value": stream,
            "unit": "images/s",
            "ratio": stream / bound,
            "note": "goal >= 20,000 images/s on 2 cores",
        },
    ]


# ----------------------------------------------------------------------------------------------- train


def plain_loop_step_time(steps: int, batch: int) -> float:
    """Seconds per step of a plain PyTorch loop: same data, model, augmentation and loss as the train.py run."""
    train_ds, _, info = data.prepare_data(vars(config.resolve(["--dataset", "synthetic", "--synthetic-size", "2048"])))
    tensors = data.to_tensors(train_ds)
    images, labels = tensors["image"], tensors["label"]
    torch.manual_seed(0)
    model = models.build_model("resnet20", info.num_classes, info.channels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x = data.normalize(data.augment_batch(images[idx], info.pad, info.flip, generator=g), info.mean, info.std)
        F.cross_entropy(model(x), labels[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    return median_time(step, repeats=5, inner=max(steps // 5, 1))


def train_py_step_time(steps: int, batch: int, tmp: str) -> float:
    """Seconds per step of train.py's own loop: (wall(T2) - wall(T1)) / (T2 - T1) cancels start-up and evaluation."""

    def wall(total: int) -> float:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(config.SUITE_DIR / "train.py"),
                "--cpu",
                "--dataset",
                "synthetic",
                "--synthetic-size",
                "2048",
                "--model",
                "resnet20",
                "--method",
                "cce",
                "--batch-size",
                str(batch),
                "--max-steps",
                str(total),
                "--eval-every",
                str(total),
                "--save-every",
                str(10 * total),
                "--train-eval-size",
                "0",
                "--no-channels-last",
                "--overwrite",
                "--output-dir",
                f"{tmp}/run{total}",
            ],
            check=True,
            capture_output=True,
            cwd=config.SUITE_DIR,
        )
        return time.perf_counter() - start

    short, long = steps // 4, steps + steps // 4
    return (wall(long) - wall(short)) / (long - short)


def bench_train(quick: bool) -> list[dict]:
    """train.py's Accelerate loop vs a plain loop (ResNet-20, batch 64); ResNet-44 batch-256 steps on CPU."""
    steps, batch, repeats = (40, 64, 1) if quick else (160, 64, 3)
    loop_times, plain_times = [], []
    for _ in range(repeats):  # interleaved, medians: run-to-run noise on 2 shared cores is several percent
        with tempfile.TemporaryDirectory() as tmp:
            loop_times.append(train_py_step_time(steps, batch, tmp))
        plain_times.append(plain_loop_step_time(steps, batch))
    accelerate_loop, plain = statistics.median(loop_times), statistics.median(plain_times)
    rows = [
        {
            "name": f"plain PyTorch loop, ResNet-20, batch {batch}, CPU",
            "value": 1 / plain,
            "unit": "steps/s",
            "ratio": 1.0,
            "note": "baseline",
        },
        {
            "name": f"train.py (Accelerate) loop, ResNet-20, batch {batch}, CPU",
            "value": 1 / accelerate_loop,
            "unit": "steps/s",
            "ratio": plain / accelerate_loop,
            "note": "goal: within 5% (ratio >= 0.95)",
        },
    ]
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 100, (256,))
    base = None
    for name, fmt, bf16 in (
        ("fp32", torch.contiguous_format, False),
        ("fp32 channels_last", torch.channels_last, False),
        ("bf16 autocast channels_last", torch.channels_last, True),
    ):
        torch.manual_seed(0)  # a fresh model and optimizer per format: momentum buffers follow the weights' layout
        m = models.build_model("resnet44", 100).to(memory_format=fmt)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        xi = x.contiguous(memory_format=fmt)

        def step(m=m, opt=opt, xi=xi, bf16=bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(xi), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t = median_time(step, repeats=2 if quick else 3)
        base = base or t
        rows.append(
            {
                "name": f"ResNet-44 training step, batch 256, CPU, {name}",
                "value": t * 1000,
                "unit": "ms/step",
                "ratio": base / t,
                "note": f"{256 / t:.0f} images/s; ratio = speed-up over fp32",
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ eval


def eval_input_rates(
    paths: dict[str, Callable[[], object]], n: int, info: data.DatasetInfo, rounds: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """images/s of each path (a callable giving its uint8 image batches, or tuples led by one) with normalisation,
    per round: the paths run one after another in each round, so a ratio within a round sees one load."""
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, batches in paths.items():
            sync()
            start = time.perf_counter()
            for x in batches():
                data.normalize(x[0] if isinstance(x, (tuple, list)) else x, info.mean, info.std)
            sync()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def bench_eval(quick: bool) -> list[dict]:
    """Evaluation: its input path (data.EvalBatches) vs slicing the same uint8 tensor; predict vs a bare forward loop."""
    from accelerate import Accelerator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, batch = (10_000 if quick else 50_000), 256
    images, labels = data.synthetic_images(n, 100, 1)
    ds = data.pixel_dataset(images, labels, [f"class{c}" for c in range(100)])
    info = data.DatasetInfo("bench", 100, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4, True, None)
    start = time.perf_counter()
    batches = data.EvalBatches(ds, info, device, batch)
    decode_s = time.perf_counter() - start
    tensor = data.nchw(images).to(device)
    collated = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tensor.cpu()), batch_size=1024)
    rates = eval_input_rates(
        {"sliced": lambda: tensor.split(batch), "ours": lambda: batches, "before": lambda: collated},
        n,
        info,
        2 if quick else 8,
        sync,
    )
    ratio = {k: statistics.median(r / s for r, s in zip(rates[k], rates["sliced"])) for k in rates}  # median per round
    sliced, ours, before = (statistics.median(rates[k]) for k in ("sliced", "ours", "before"))  # before: replaced path
    rows = [
        {
            "name": f"bound: slice a uint8 [N,3,32,32] tensor on the {device.type} in batches of {batch}, normalise (N={n:,})",
            "value": sliced,
            "unit": "images/s",
            "ratio": 1.0,
            "note": "baseline",
        },
        {
            "name": "data.EvalBatches (train.py's and eval.py's evaluation input), normalise",
            "value": ours,
            "unit": "images/s",
            "ratio": ratio["ours"],
            "note": f"goal ratio near 1; plus {decode_s:.2f} s once to decode the split onto the device",
        },
        {
            "name": "before: TensorDataset + DataLoader, batch 1,024 (per-example collation), normalise",
            "value": before,
            "unit": "images/s",
            "ratio": ratio["before"],
            "note": "the replaced path; values: medians of 8 rounds, ratios: median of each round's ratio",
        },
    ]
    m = 1_000 if quick else (10_000 if device.type == "cuda" else 2_000)
    small = data.pixel_dataset(images[:m], labels[:m], [f"class{c}" for c in range(100)])
    model = models.build_model("resnet44", 100, 3).eval().to(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")

    def bare() -> None:
        with torch.no_grad():
            for chunk in tensor[:m].split(500):
                model(data.normalize(chunk, info.mean, info.std)).float().cpu()

    ev.split_logits(
        model, data.pixel_dataset(images[:500], labels[:500], [str(c) for c in range(100)]), info, accelerator, 500
    )  # warm-up at the batch shape
    t_eval = t_bare = math.inf
    for _ in range(3):  # interleaved, best of each
        t_eval = min(t_eval, median_time(lambda: ev.split_logits(model, small, info, accelerator, 500), 1, sync=sync))
        t_bare = min(t_bare, median_time(bare, 1, sync=sync))
    return rows + [
        {
            "name": f"eval.py split_logits (data.predict), ResNet-44 fp32, {device.type}, {m:,} images",
            "value": m / t_eval,
            "unit": "images/s",
            "ratio": t_bare / t_eval,
            "note": "ratio = bare forward loop time / eval.py time (which also decodes the split once)",
        }
    ]


# ----------------------------------------------------------------------------------------------- audit


AUDIT_NOISES = (  # (name, train.py noise flags): the grid of bench_audit
    ("symmetric 0.2", ("--noise", "symmetric", "--noise-rate", "0.2")),
    ("symmetric 0.4", ("--noise", "symmetric", "--noise-rate", "0.4")),
    ("symmetric 0.6", ("--noise", "symmetric", "--noise-rate", "0.6")),
    ("pair-flip 0.4", ("--noise", "pairflip", "--noise-rate", "0.4")),
    ("pairs A 0.2", ("--noise", "asymmetric", "--noise-pairs", "3:5,5:3,7:1,1:7,8:9,9:8", "--noise-rate", "0.2")),
    ("pairs A 0.4", ("--noise", "asymmetric", "--noise-pairs", "3:5,5:3,7:1,1:7,8:9,9:8", "--noise-rate", "0.4")),
    ("pairs B 0.2", ("--noise", "asymmetric", "--noise-pairs", "4:9,2:7,6:0,3:8", "--noise-rate", "0.2")),
    ("pairs B 0.4", ("--noise", "asymmetric", "--noise-pairs", "4:9,2:7,6:0,3:8", "--noise-rate", "0.4")),
    ("cycle 0.4", ("--noise", "asymmetric", "--noise-pairs", "4:9,9:7,7:4", "--noise-rate", "0.4")),  # 4 -> 9 -> 7 -> 4
)
AUDIT_METHODS = ("cce", "proselflc", "gce", "elr")


def audit_digits_run(
    out: Path, noise_flags: tuple[str, ...], method: str, steps: int, extra: tuple[str, ...] = ()
) -> float:
    """Train one digits run (seconds of wall time); the run folder holds dynamics.safetensors."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(config.SUITE_DIR / "train.py"),
            "--cpu",
            *noise_flags,
            "--method",
            method,
            "--max-steps",
            str(steps),
            "--eval-every",
            "50",
            "--save-every",
            str(10 * steps),
            "--overwrite",
            "--output-dir",
            str(out),
            *extra,
        ],
        check=True,
        capture_output=True,
        cwd=config.SUITE_DIR,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return time.perf_counter() - start


def audit_scores(run: Path, score: str = "dynamics") -> tuple[float, float, str, bool]:
    """(precision, recall, early window, whether it warned) that `eval.py --audit --score SCORE` prints against the
    real flips."""
    import re

    proc = subprocess.run(
        [
            sys.executable,
            str(config.SUITE_DIR / "eval.py"),
            "--audit",
            str(run),
            "--cpu",
            "--score",
            score,
            "--top",
            "0",
            "--out",
            str(run / f"issues-{score}.csv"),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=config.SUITE_DIR,
    )
    found = re.search(r"precision=([0-9.]+) recall=([0-9.]+)", proc.stdout)
    window = re.search(r"early window: epochs \[0, ([0-9.]+)\)", proc.stdout)
    warned = any(line.startswith("warning: ") for line in proc.stdout.splitlines())
    return float(found.group(1)), float(found.group(2)), window.group(1) if window else "-", warned


def pixel_classifiers() -> list[tuple[str, Any]]:
    """The seven sklearn classifiers of the cleanlab baseline: more regularisation (smaller C, more neighbours) helps
    against pair-flip noise; the best one per cell is reported (picking it needs the real flips, which a user lacks)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    classifiers: list[tuple[str, Any]] = [
        (f"SVC rbf C={c}", SVC(C=c, probability=True, random_state=0)) for c in (0.1, 0.3, 1.0)
    ]
    classifiers += [(f"kNN k={k}", KNeighborsClassifier(k)) for k in (15, 30, 50)]
    return classifiers + [("logistic regression", LogisticRegression(max_iter=2000))]


def cleanlab_scores(
    noise_flags: tuple[str, ...], fold_seed: int = 0, only: str | None = None
) -> dict[str, tuple[float, float]]:
    """(precision, recall) of cleanlab.filter.find_label_issues on 5-fold out-of-sample probabilities of the sklearn
    classifiers (or the one named `only`) on digits pixels, folds shuffled by fold_seed."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    train_ds, _, _ = data.prepare_data(vars(config.resolve(list(noise_flags))))
    t = data.to_tensors(train_ds)
    x, y, noisy = (
        t["image"].reshape(len(t["label"]), -1).float().numpy() / 16,
        t["label"].numpy(),
        t["is_noisy"].numpy(),
    )
    out = {}
    for name, clf in pixel_classifiers():
        if only not in (None, name):
            continue
        folds = StratifiedKFold(5, shuffle=True, random_state=fold_seed)
        flagged = find_label_issues(y, cross_val_predict(clf, x, y, cv=folds, method="predict_proba"))
        hit = int((flagged & noisy).sum())
        out[name] = (hit / max(int(flagged.sum()), 1), hit / int(noisy.sum()))
    return out


def cleanlab_same_network(tmp: str, noise: tuple[str, tuple[str, ...]], steps: int = 300) -> tuple[float, float]:
    """(precision, recall) of cleanlab.filter.find_label_issues on 5-fold out-of-sample softmax of the grid's own
    network: 5 cce trainings of `steps` steps, each with one fold's labels dropped (label -1 in a --noise file), the
    fold scored by that run's final model (the K extra trainings the audit saves)."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    train_ds, _, info = data.prepare_data(vars(config.resolve(list(noise[1]))))
    t = data.label_tensors(train_ds)
    y, noisy, keys = t["label"], t["is_noisy"].bool(), [str(k) for k in train_ds["example_key"]]
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(y.numpy(), y.numpy()))

    def held_out_probs(k: int) -> torch.Tensor:
        run = Path(tmp) / f"{noise[0].replace(' ', '-')}-fold{k}"
        held = torch.zeros(len(y), dtype=torch.bool).index_fill_(0, torch.from_numpy(folds[k][1]), True)
        run.mkdir(parents=True)
        audit.write_label_file(run / "labels.csv", keys, y, held, None)  # the held-out fold's labels -1: dropped
        flags = ("--noise", "file", "--noise-file", str(run / "labels.csv"), "--train-eval-size", "0")
        audit_digits_run(run / "run", flags, "cce", steps)
        model = runfolder.load_final_model(run / "run", runfolder.read_run_config(run / "run"), info)
        logits = data.predict(model, data.EvalBatches(train_ds, info, torch.device("cpu"), 512), info)
        return logits.softmax(1) * held[:, None]

    with ThreadPoolExecutor(2) as pool:  # two single-thread runs at a time
        probs = sum(pool.map(held_out_probs, range(5)))
    flagged = torch.from_numpy(find_label_issues(y.numpy(), probs.numpy()))
    hit = int((flagged & noisy).sum())
    return hit / max(int(flagged.sum()), 1), hit / int(noisy.sum())


def f1(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall."""
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def audit_cell(tmp: str, noise: tuple[str, tuple[str, ...]], method: str, steps: int) -> tuple[float, float, str, bool]:
    """Train one run of the grid and audit it: (precision, recall, window end, whether the audit warned)."""
    run = Path(tmp) / f"{noise[0].replace(' ', '-')}-{method}-{steps}"
    audit_digits_run(run, noise[1], method, steps)
    return audit_scores(run)


def bench_audit(quick: bool) -> list[dict]:
    """Label audit on digits: F1 of eval.py --audit per noise, method and budget vs cleanlab (best of 7 on pixels; own CNN).

    The pixel baseline: the best of seven sklearn 5-fold classifiers, and that classifier's range over fold seeds; the
    own-network baseline: 5 trainings of the grid's CNN (cce, 300 steps), each fold scored by a run that never saw it."""
    budgets = (300,) if quick else (300, 1500)
    noises = AUDIT_NOISES[1:2] + AUDIT_NOISES[5:6] if quick else AUDIT_NOISES
    fold_seeds = range(1, 2 if quick else 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:  # two single-thread runs at a time
        cells = {
            (n[0], m, s): pool.submit(audit_cell, tmp, n, m, s) for n in noises for m in AUDIT_METHODS for s in budgets
        }
        for noise_case in noises:
            name, flags = noise_case
            scores = cleanlab_scores(flags)
            best = max(scores, key=lambda k: f1(*scores[k]))
            bp, br = scores[best]
            spread = [f1(*cleanlab_scores(flags, seed, best)[best]) for seed in fold_seeds] + [f1(bp, br)]
            rows.append(
                {
                    "name": f"cleanlab find_label_issues, 5-fold, best of 7: {best}, {name}",
                    "value": f1(bp, br),
                    "unit": "F1",
                    "ratio": None,
                    "note": f"precision {bp:.3f}, recall {br:.3f}; {best} over fold seeds 0-{len(spread) - 1}: "
                    f"{min(spread):.3f}-{max(spread):.3f}; "
                    + ", ".join(f"{k} {f1(*v):.3f}" for k, v in scores.items()),
                    "spread": (min(spread), max(spread)),
                }
            )
            sp, sr = cleanlab_same_network(tmp, noise_case)
            rows.append(
                {
                    "name": f"cleanlab find_label_issues, 5 trainings of the grid's network (cce T=300), {name}",
                    "value": f1(sp, sr),
                    "unit": "F1",
                    "ratio": None,
                    "note": f"precision {sp:.3f}, recall {sr:.3f}; each fold scored by the final model of a run "
                    "trained on the other four",
                }
            )
            for method in AUDIT_METHODS:
                for steps in budgets:
                    p, r, window, warned = cells[(name, method, steps)].result()
                    rows.append(
                        {
                            "name": f"eval.py --audit, {method} T={steps}, {name}",
                            "value": f1(p, r),
                            "unit": "F1",
                            "ratio": f1(p, r) - f1(bp, br),
                            "note": f"precision {p:.3f}, recall {r:.3f}, window "
                            f"[0, {window}) epochs{', warned' if warned else ''}; ratio = F1 - best cleanlab F1",
                            "warned": warned,
                            "same_network": f1(sp, sr),
                            "spread": (min(spread), max(spread)),
                        }
                    )
            print(f"  {name} done", flush=True)
    return rows + audit_outcome(rows) + audit_cost(quick)


def audit_outcome(rows: list[dict]) -> list[dict]:
    """The grid in two rows: the cells at or above cleanlab's best on pixels or warned (the goal; a miss with the
    best classifier's range over fold seeds), and the cells at or above cleanlab on the grid's own network."""
    cells = [r for r in rows if "warned" in r]
    ok = [r for r in cells if r["ratio"] >= 0 or r["warned"]]
    missed = [
        f"{r['name'].removeprefix('eval.py --audit, ')} ({r['ratio']:+.3f}; cleanlab's best over fold seeds "
        f"{r['spread'][0]:.3f}-{r['spread'][1]:.3f})"
        for r in cells
        if r not in ok
    ]
    low = [r for r in cells if r["value"] < 0.8 and not r["warned"]]
    below = [r["name"].removeprefix("eval.py --audit, ") for r in cells if r["value"] < r["same_network"]]
    return [
        {
            "name": "label audit: cells at or above the best cleanlab F1 or warned",
            "value": len(ok),
            "unit": f"of {len(cells)} cells",
            "ratio": None,
            "note": f"warned {sum(r['warned'] for r in cells)}; below 0.80 without a warning {len(low)}; "
            f"missed: {'; '.join(missed) or 'none'}",
        },
        {
            "name": "label audit: cells at or above cleanlab on 5 trainings of the grid's network",
            "value": len(cells) - len(below),
            "unit": f"of {len(cells)} cells",
            "ratio": None,
            "note": f"below: {'; '.join(below) or 'none'}",
        },
    ]


def audit_cost(quick: bool) -> list[dict]:
    """The audit's extra work (its statistics, the linear probe, the training-split evaluations) as a fraction of a
    digits run: the run as the grid trains it vs the same run with --train-eval-size 0, interleaved, medians."""
    steps, repeats = (300, 1) if quick else (1500, 5)
    rows = []
    for method in ("cce", "elr"):  # elr: its window never closes at 1,500 steps, so the probe fits every step
        times: dict[bool, list[float]] = {True: [], False: []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                for audit in (True, False):
                    extra = () if audit else ("--train-eval-size", "0")
                    times[audit].append(audit_digits_run(Path(tmp) / "run", AUDIT_NOISES[7][1], method, steps, extra))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rows.append(
            {
                "name": f"label audit's cost, {method} T={steps}, pairs B 0.4, digits, CPU",
                "value": 100 * (on - off) / off,
                "unit": "% of the run",
                "ratio": None,
                "note": f"run with the audit {on:.1f} s, without (--train-eval-size 0) {off:.1f} s, medians of "
                f"{repeats}; goal: under 10%",
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------- gpu


def idealised_gpu_step_time(quick: bool, compiled: bool) -> float:
    """The bound: a bare bf16 ResNet-44 step on CUDA, data on the device, indices drawn there, no Accelerate."""
    device, batch = torch.device("cuda"), 256
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (50_000,), device=device)
    mean, std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    loss_fn = losses.build_loss("proselflc", 100, total_steps=30_000)
    model = models.build_model("resnet44", 100).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if compiled else model
    g = torch.Generator(device=device).manual_seed(0)
    step_t = torch.zeros((), device=device)

    def step() -> None:
        idx = torch.randint(0, 50_000, (batch,), device=device, generator=g)
        x = data.normalize(data.augment_batch(images[idx], 4, True, generator=g), mean, std)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss_fn(logits, labels[idx], step=step_t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(30):  # warm-up, compilation included
        step()
    return median_time(step, repeats=5, inner=20 if quick else 100, sync=torch.cuda.synchronize)


def cifar_gpu_runs_step_time(steps: int, runs: int, tmp: str, extra: tuple[str, ...] = ()) -> float:
    """Seconds per step of `runs` concurrent train.py runs on one GPU (CIFAR-shaped synthetic data, ResNet-44, bf16,
    batch 256, ProSelfLC): (wall(T2) - wall(T1)) / (T2 - T1) cancels start-up, compilation and the final evaluation."""

    def wall(total: int) -> float:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(config.SUITE_DIR / "train.py"),
                    "--dataset",
                    "synthetic",
                    "--synthetic-size",
                    "50000",
                    "--synthetic-classes",
                    "100",
                    "--model",
                    "resnet44",
                    "--method",
                    "proselflc",
                    "--mixed-precision",
                    "bf16",
                    "--batch-size",
                    "256",
                    "--max-steps",
                    str(total),
                    "--eval-every",
                    str(total),
                    "--save-every",
                    str(10 * total),
                    "--train-eval-size",
                    "0",
                    "--output-dir",
                    f"{tmp}/k{runs}-{total}-{i}",
                    *extra,
                ],
                cwd=config.SUITE_DIR,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(runs)
        ]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
        return time.perf_counter() - start

    short, long = steps // 4, steps + steps // 4
    return (wall(long) - wall(short)) / (long - short)


def bench_gpu(quick: bool) -> list[dict]:
    """train.py's own ResNet-44 bf16 CIFAR step on CUDA (eager, compiled, CUDA graphs) against a bare loop (the bound),
    and K runs sharing the GPU (sweep.py --runs-per-gpu K): the paper's 30k-step run and Table 4's 78 runs, projected."""
    steps, rows = (200 if quick else 800), []
    with tempfile.TemporaryDirectory() as tmp:
        bound = idealised_gpu_step_time(quick, compiled=True)
        rows.append(
            {
                "name": "bare loop (no Accelerate, indices on the device), torch.compile",
                "value": 256 / bound,
                "unit": "images/s",
                "ratio": 1.0,
                "note": "the bound",
            }
        )
        best = math.inf
        for label, extra in (
            ("eager", ()),
            ("--compile", ("--compile",)),
            ("--compile --compile-mode reduce-overhead", ("--compile", "--compile-mode", "reduce-overhead")),
        ):
            t = cifar_gpu_runs_step_time(steps, 1, tmp, extra)
            best = min(best, t)
            rows.append(
                {
                    "name": f"train.py {label}, {torch.cuda.get_device_name()}",
                    "value": 256 / t,
                    "unit": "images/s",
                    "ratio": bound / t,
                    "note": f"30,000 x 256 run: {30_000 * t / 60:.1f} min of steps (evaluations not counted)",
                }
            )
        fastest = min(rows[1:], key=lambda r: -r["value"])["name"].split("train.py ")[1].split(",")[0]
        extra = tuple(fastest.split()) if fastest != "eager" else ()
        aggregate = {}
        for k in (1, 2, 4, 8):
            t = cifar_gpu_runs_step_time(steps, k, tmp, extra)
            aggregate[k] = k * 256 / t
            rows.append(
                {
                    "name": f"{k} concurrent train.py runs ({fastest}), aggregate",
                    "value": aggregate[k],
                    "unit": "images/s",
                    "ratio": aggregate[k] / aggregate[1],
                    "note": f"Table 4's 78 runs: {78 * 30_000 * 256 / aggregate[k] / 3600:.2f} h of steps",
                }
            )
    best_k = max(aggregate, key=aggregate.get)
    rows.append(
        {
            "name": f"best K = {best_k}",
            "value": aggregate[best_k],
            "unit": "images/s",
            "ratio": None,
            "note": f"sweep.py --preset paper --gpus 0 --runs-per-gpu {best_k}: about "
            f"{78 * 30_000 * 256 / aggregate[best_k] / 3600:.2f} h of steps for 78 runs",
        }
    )
    return rows + loss_fraction_rows(
        bound, torch.device("cuda"), quick, sync=torch.cuda.synchronize, logits_dtype=torch.bfloat16
    )


GPU_SECTIONS = ("gpu", "gpu_photo")  # need CUDA: without it they are skipped and BENCHMARKS.md keeps their figures


# ----------------------------------------------------------------------------------------------- photo


def bench_photo_folder(n: int, size: tuple[int, int] = (500, 375), distinct: int = 2_000) -> str:
    """An image folder of n JPEGs of `size` (train/, 2 classes, + test/ of 100) in /tmp, made once; beyond
    `distinct` files the images are hard links of the first ones (the content does not matter for memory)."""
    from PIL import Image, ImageDraw

    folder = os.path.join(tempfile.gettempdir(), f"proselflc-bench-photos-{n}-{size[0]}x{size[1]}")
    done = os.path.join(folder, "done")
    if os.path.isfile(done):
        return folder
    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("test", 100)):
        for i in range(count):
            path = os.path.join(folder, split, f"class{i % 2}", f"{i:06d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if i >= distinct:
                os.link(os.path.join(folder, split, f"class{i % 2}", f"{i % distinct:06d}.jpg"), path)
                continue
            # smooth photo-like content (gradient, shapes, mild noise) compresses like a photo, ~30 KB
            c = torch.randint(0, 256, (6,), generator=rng).tolist()
            im = Image.linear_gradient("L").resize(size).convert("RGB")
            im = Image.merge("RGB", [band.point(lambda v, a=a: (v + a) % 256) for band, a in zip(im.split(), c[:3])])
            draw = ImageDraw.Draw(im)
            for _ in range(6):
                x, y = (
                    torch.randint(0, size[0], (1,), generator=rng).item(),
                    torch.randint(0, size[1], (1,), generator=rng).item(),
                )
                draw.ellipse((x, y, x + size[0] // 4, y + size[1] // 4), fill=tuple(c[3:]))
            im = Image.blend(im, Image.effect_noise(size, 20).convert("RGB"), 0.15)
            im.save(path, quality=90)
    Path(done).write_text("ok")
    return folder


def bare_decode_rate(paths: list[str]) -> float:
    """images/s of the bound: PIL open + decode + resize to 256x256 + to array, one process."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR))
    return len(paths) / (time.perf_counter() - start)


def transform_rate(table, info: data.DatasetInfo, batch: int) -> float:
    """images/s of photo_batch (decode, warp, crop, flip, to uint8 NCHW) over an arrow table, one process."""
    import numpy as np

    start = time.perf_counter()
    for i in range(0, len(table) - batch + 1, batch):
        data.photo_batch(table.slice(i, batch), np.arange(i, i + batch), info, seed=0, key=(i,))
    return (len(table) // batch * batch) / (time.perf_counter() - start)


def loader_rate(train, info: data.DatasetInfo, workers: int, steps: int, batch: int) -> float:
    """images/s of the decode-per-batch training source with `workers` DataLoader workers (after a warm-up batch)."""
    it = iter(data.TrainBatches(train, info, batch, 0, 0, 1, 0, torch.device("cpu"), num_workers=workers))
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def peak_rss_of_run(folder: str, tmp: str) -> float:
    """Peak memory (MiB) of train.py and its DataLoader workers together: the sum of their proportional set
    sizes (pages shared by the forked workers counted once), sampled every 50 ms."""
    import psutil

    cmd = [
        sys.executable,
        "train.py",
        "--cpu",
        "--dataset",
        folder,
        "--model",
        "digits_cnn",
        "--resize",
        "128",
        "--image-size",
        "112",
        "--batch-size",
        "32",
        "--max-steps",
        "20",
        "--eval-every",
        "20",
        "--num-workers",
        "2",
        "--train-eval-size",
        "0",
        "--output-dir",
        os.path.join(tmp, "run"),
        "--overwrite",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": os.path.join(tmp, "hf")}
    proc = subprocess.Popen(
        cmd, cwd=config.SUITE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed: {proc.stderr.read()[-2000:]}")
    return peak / 2**20


def bench_photo(quick: bool) -> list[dict]:
    """Photos on the decode-per-batch path: the paper's training transform per core vs a bare PIL decode + resize.

    Generated JPEGs of ImageNet-like size (500x375) and, for PIL's JPEG draft mode, of 1000x750.
    One torch thread; the figures were taken on a loaded, shared 2-core machine.
    """
    import datasets

    datasets.disable_progress_bars()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        n = 400 if quick else 2_000
        small, large = bench_photo_folder(2_000), bench_photo_folder(200, (1000, 750), 200)
        cfg = vars(config.resolve(["--dataset", small, "--resize", "256", "--image-size", "224"]))
        train_ds, _, info = data.prepare_data(cfg)
        table = train_ds.select(range(n)).with_format("arrow")[:]
        paths = table.column("image").combine_chunks().field("path").to_pylist()
        bound = paper = rrc = 0.0
        for _ in range(2):  # interleaved, best of each: a busy neighbour hits all alike
            bound = max(bound, bare_decode_rate(paths))
            paper = max(paper, transform_rate(table, info, 64))
            rrc = max(rrc, transform_rate(table, info._replace(augment="rrc"), 64))
        rows += [
            {
                "name": f"bound: PIL open + decode + resize to 256x256, 500x375 JPEGs (N={n})",
                "value": bound,
                "unit": "images/s/core",
                "ratio": 1.0,
                "note": "baseline",
            },
            {
                "name": "paper transform: decode, warp 256, random crop 224, flip, uint8 NCHW",
                "value": paper,
                "unit": "images/s/core",
                "ratio": paper / bound,
                "note": "goal ratio >= 0.8; resizes only the crop box (PIL box=), less work than the bound",
            },
            {
                "name": "--augment rrc: decode, RandomResizedCrop 224, flip, uint8 NCHW",
                "value": rrc,
                "unit": "images/s/core",
                "ratio": rrc / bound,
                "note": "",
            },
        ]
        big, _, big_info = data.prepare_data({**cfg, "dataset": large})
        big_table = big.with_format("arrow")[:]
        draft = full = 0.0
        for _ in range(2):
            data.JPEG_DRAFT = False
            full = max(full, transform_rate(big_table, big_info, 50))
            data.JPEG_DRAFT = True
            draft = max(draft, transform_rate(big_table, big_info, 50))
        rows += [
            {
                "name": "paper transform, 1000x750 JPEGs, full-size decode (JPEG_DRAFT = False)",
                "value": full,
                "unit": "images/s/core",
                "ratio": 1.0,
                "note": "baseline",
            },
            {
                "name": "paper transform, 1000x750 JPEGs, PIL draft mode (DCT-scaled decode, the default)",
                "value": draft,
                "unit": "images/s/core",
                "ratio": draft / full,
                "note": "why JPEG_DRAFT is on",
            },
        ]
        steps = 5 if quick else 20
        one = loader_rate(train_ds, info, 1, steps, 64)
        two = loader_rate(train_ds, info, 2, steps, 64)
        rows += [
            {
                "name": "decode-per-batch training source, 1 DataLoader worker, batch 64",
                "value": one,
                "unit": "images/s",
                "ratio": 1.0,
                "note": "baseline",
            },
            {
                "name": "decode-per-batch training source, 2 DataLoader workers",
                "value": two,
                "unit": "images/s",
                "ratio": two / one,
                "note": f"goal near 2 on 2 idle cores; load average {os.getloadavg()[0]:.1f} here",
            },
        ]
        with tempfile.TemporaryDirectory() as tmp:
            counts = (2_000,) if quick else (2_000, 20_000)
            peaks = [peak_rss_of_run(bench_photo_folder(c), tmp) for c in counts]
        for c, peak in zip(counts, peaks):
            rows.append(
                {
                    "name": f"peak memory (PSS), train.py + 2 workers, 20 steps on {c:,} JPEGs",
                    "value": peak,
                    "unit": "MiB",
                    "ratio": peak / peaks[0],
                    "note": "goal: flat in the dataset size",
                }
            )
    finally:
        data.JPEG_DRAFT = True
        torch.set_num_threads(threads)
    return rows


def resnet50_step_rate(
    device: torch.device, compiled: bool, batch: int, size: int, steps: int, sync: Callable[[], None]
) -> float:
    """images/s of a ResNet-50 training step (bf16 autocast, channels_last, uint8 input normalised on the device)."""
    model = models.build_model("resnet50", 14, 3).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model) if compiled else model
    loss_fn = losses.build_loss("proselflc", 14, total_steps=10_000)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 14, (batch,), device=device)

    def step() -> None:
        x = data.normalize(images, data.IMAGENET_STATS[0], data.IMAGENET_STATS[1])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(x.contiguous(memory_format=torch.channels_last))
        loss_fn(logits, labels, step=5_000).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up, compilation included
        step()
    return batch / median_time(step, repeats=3, inner=steps, sync=sync)


def jpeg_decode_rates(paths: list[str], device: torch.device, sync: Callable[[], None]) -> tuple[float, float]:
    """images/s of torchvision.io.decode_jpeg on `device` (batched, file bytes read once) and of PIL on one core."""
    from torchvision.io import decode_jpeg, read_file

    blobs = [read_file(p) for p in paths]
    decode_jpeg(blobs[:8], device=device)  # warm-up (CUDA context, nvJPEG handles)
    sync()
    start = time.perf_counter()
    for i in range(0, len(blobs), 64):
        decode_jpeg(blobs[i : i + 64], device=device)
    sync()
    on_device = len(blobs) / (time.perf_counter() - start)
    return on_device, bare_decode_rate(paths)


def bench_gpu_photo(quick: bool) -> list[dict]:
    """ResNet-50 224 bf16 step on CUDA (eager, compiled) vs the CPU decode-per-batch loader and GPU JPEG decoding."""
    if not torch.cuda.is_available():
        return [
            {
                "name": "GPU photo section",
                "value": float("nan"),
                "unit": "-",
                "ratio": None,
                "note": "skipped: no CUDA device on this machine",
            }
        ]
    device, sync, batch = torch.device("cuda"), torch.cuda.synchronize, 256
    torch.backends.cudnn.benchmark = True
    rows, base = [], None
    for compiled in (False, True):
        rate = resnet50_step_rate(device, compiled, batch, 224, 5 if quick else 20, sync)
        base = base or rate
        rows.append(
            {
                "name": f"ResNet-50 224 bf16 channels_last step, batch {batch}, {torch.cuda.get_device_name()}, "
                f"{'torch.compile' if compiled else 'eager'}",
                "value": rate,
                "unit": "images/s",
                "ratio": rate / base,
                "note": "what the GPU consumes",
            }
        )
    folder = bench_photo_folder(2_000)
    cfg = vars(config.resolve(["--dataset", folder, "--resize", "256", "--image-size", "224"]))
    train_ds, _, info = data.prepare_data(cfg)
    workers = min(16, os.cpu_count() or 1)
    loader = loader_rate(train_ds, info, workers, 10 if quick else 30, 256)
    rows.append(
        {
            "name": f"decode-per-batch loader, {workers} DataLoader workers, 500x375 JPEGs, batch 256",
            "value": loader,
            "unit": "images/s",
            "ratio": loader / max(r["value"] for r in rows),
            "note": "ratio >= 1: the CPU decode keeps up with the fastest step above",
        }
    )
    paths = [str(p) for p in sorted(Path(folder, "train").rglob("*.jpg"))][: 256 if quick else 1_024]
    gpu, cpu = jpeg_decode_rates(paths, device, sync)
    rows += [
        {
            "name": "PIL decode + resize 256, one CPU core",
            "value": cpu,
            "unit": "images/s",
            "ratio": 1.0,
            "note": "baseline",
        },
        {
            "name": "torchvision.io.decode_jpeg(device='cuda'), batches of 64",
            "value": gpu,
            "unit": "images/s",
            "ratio": gpu / cpu,
            "note": "decode only, no resize",
        },
    ]
    return rows


# ------------------------------------------------------------------------------------------------ main

SECTIONS = {
    "losses": bench_losses,
    "input": bench_input,
    "train": bench_train,
    "eval": bench_eval,
    "gpu": bench_gpu,
    "photo": bench_photo,
    "gpu_photo": bench_gpu_photo,
    "audit": bench_audit,
}


def row_figures(r: dict) -> tuple[str, str]:
    """(value, ratio) of a result row as printed and tabled: F1 and % to 3 decimals, counts whole, others to 1 (ratio 2)."""
    ratio = "" if r["ratio"] is None else (f"{r['ratio']:+.3f}" if r["unit"] == "F1" else f"{r['ratio']:.2f}")
    value = f"{r['value']:,.3f}" if r["unit"] == "F1" or r["unit"].startswith("%") else f"{r['value']:,.1f}"
    return (str(r["value"]) if r["unit"].startswith("of ") else value), ratio  # a count of cells


def markdown(results: dict[str, list[dict]], command: str, seconds: float) -> str:
    """BENCHMARKS.md: the command, the machine and library versions, and one table per section."""
    import accelerate
    import datasets

    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {datetime.date.today()} in {seconds / 60:.1f} min.",
        "",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"load average at the end {os.getloadavg()[0]:.1f}, CUDA: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"- python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}, "
        f"datasets {datasets.__version__}",
        "- every ratio compares against a baseline measured in the same run (medians of repeats); "
        "no timing is asserted in the tests.",
        "",
    ]
    for section, rows in results.items():
        lines += [
            f"## {section}",
            "",
            SECTIONS[section].__doc__.strip().splitlines()[0],
            "",
            "| what | value | unit | ratio | note |",
            "|---|---:|---|---:|---|",
        ]
        for r in rows:
            value, ratio = row_figures(r)
            lines.append(f"| {r['name']} | {value} | {r['unit']} | {ratio} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def merge_sections(old: str, new: str, command: str) -> str:
    """`old` BENCHMARKS.md with the sections of `new` replaced or appended (each marked with the command and
    date that produced it); the other sections and the header stay as they were."""

    def split(text: str) -> tuple[str, dict[str, str]]:
        head, *parts = text.split("\n## ")
        return head, {p.split("\n", 1)[0]: "## " + p for p in parts}

    head, kept = split(old)
    _, fresh = split(new)
    for name, body in fresh.items():
        title, rest = body.split("\n", 1)
        kept[name] = (
            f"{title}\n\nProduced by `{command}` on {datetime.date.today()}, {os.cpu_count()} CPU cores, "
            f"load average {os.getloadavg()[0]:.1f} at the end (above 2: a loaded machine).\n{rest}"
        )
    return "\n".join([head.rstrip("\n") + "\n", *(body.rstrip("\n") + "\n" for body in kept.values())])


def main() -> None:
    p = argparse.ArgumentParser(description="Benchmarks, written to BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier figures)")
    p.add_argument("--only", default="losses,input,train,eval,gpu", help="comma-separated sections")
    p.add_argument("--out", default="BENCHMARKS.md")
    args = p.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        sys.exit(f"error: unknown section {unknown[0]!r}: choose among {', '.join(SECTIONS)}")
    if not torch.cuda.is_available() and set(sections) & set(GPU_SECTIONS):
        print(
            f"bench.py: {', '.join(s for s in sections if s in GPU_SECTIONS)} need a CUDA device, which this machine "
            f"does not have: skipped, and {args.out} keeps the figures it has"
        )
        sections = [s for s in sections if s not in GPU_SECTIONS]
        if not sections:
            return
    start, results = time.perf_counter(), {}
    for section in sections:
        print(f"[bench] {section} ...", flush=True)
        results[section] = SECTIONS[section](args.quick)
        for r in results[section]:
            value, ratio = row_figures(r)
            print(f"  {r['name']}: {value} {r['unit']}{f'  ratio {ratio}' if ratio else ''}", flush=True)
    command = "python bench.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = markdown(results, command, time.perf_counter() - start)
    out = Path(args.out)
    if out.exists() and set(sections) != set(SECTIONS):
        text = merge_sections(out.read_text(), text, command)
    out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
