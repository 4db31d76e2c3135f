"""Reproduce the paper's Table 4 grid (methods x noise settings x seeds), then tabulate and plot it.

    python sweep.py --preset digits                      # all methods on digits, 300 and 1,500 steps
    python sweep.py --preset paper --accelerate-config accelerate_config.yaml
                                                         # CIFAR-100, ResNet-44, the paper's recipe
    python sweep.py --preset paper --dry-run             # print the train.py commands only
    python sweep.py --preset digits --seeds 0 -- --lr 0.05   # after --: train.py flags the grid leaves open
    python sweep.py --preset paper --launcher slurm --partition gpu --time 2:00:00   # a Slurm job array (docs/cloud.md)
    python sweep.py --status runs/sweep-paper            # finished, running, requeued, failed runs; the table

Each run is one `accelerate launch train.py ...` (the paper preset; it uses whatever Accelerate is
configured for, one GPU or many) or `python train.py ...` (the digits preset, --launcher python).
Runs go to OUTPUT_ROOT/<dataset>-<noise>-<rate>-<method>[-eps<eps>][-T<steps>]-seed<seed>, their logs to
OUTPUT_ROOT/logs/. A run already finished (its model.safetensors, written last) is skipped,
a killed one continues from its last checkpoint or starts over if it has none (train.py --resume auto).
SIGTERM or Ctrl-C stops the sweep and its running train.py processes (it waits for them); the same
command then continues it. A run folder in use by a live train.py is never touched (train.lock).
At the end: OUTPUT_ROOT/table.md and table.csv (eval.py --table) and OUTPUT_ROOT/dynamics.png
(eval.py --plot: the preset's plot setting, one line per method, first seed, best eps).

Presets:
- paper: CIFAR-100, ResNet-44, 30,000 steps (train.py's defaults = Section 5.1), methods CCE, LS, CP,
  Boot-soft, ProSelfLC, and what came after it: ELR (beta 0.9, lambda 7 for 100 classes) and
  ProSelfLC's later variant proselflc_t (T0 0.5, trust maxp) (add gce sce with --methods),
  asymmetric r = 0.2/0.3/0.4 and symmetric r = 0.2/0.4/0.6; LS, CP and Boot-soft at eps 0.125, 0.25 and 0.5 with the best reported per cell
  (as the paper does); ProSelfLC's exp_base per setting as in the paper (CVPR version): clean 10;
  symmetric 20/40/60%: 14/12/8; asymmetric 20/30/40%: 14/10/8. 78 runs for one seed.
- digits: digits_cnn on scikit-learn's 8x8 digits on the CPU, 40% symmetric noise, every method in
  losses.METHODS (CCE, LS, CP, Boot-soft, Boot-hard, GCE, SCE, ProSelfLC, its later variant and ELR)
  at eps 0.25, seeds 0, 1 and 2, at a short (300 steps) and a long (1,500 steps) budget (--budgets): 60
  runs, two at a time. With several budgets table.md has a test accuracy and a noisy_fit
  (memorisation) column per budget (eval.budget_table).
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import cluster
import config
import losses
import report
import runfolder


class Job(NamedTuple):
    """One train.py run of the grid."""

    name: str
    method: str
    noise: str
    rate: float
    seed: int
    eps: float | None
    output_dir: Path
    args: list[str]  # train.py arguments
    budget: int | None = None  # --max-steps; None: train.py's recipe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; everything after a lone '--' is passed to every train.py run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = runfolder.Parser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset", choices=sorted(config.SWEEP_PRESETS), default="digits", help="the grid to run (default digits)"
    )
    p.add_argument("--methods", nargs="+", help="override the preset's methods (losses.METHODS names)")
    p.add_argument(
        "--settings", nargs="+", metavar="NOISE:RATE", help="override the noise settings, e.g. symmetric:0.4 none:0"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, help="override the training seeds (the noise seed stays --noise-seed 0)"
    )
    p.add_argument(
        "--eps", nargs="+", type=float, help="eps values of ls/cp/bootsoft/boothard (paper preset: 0.125 0.25 0.5)"
    )
    p.add_argument("--budgets", nargs="+", type=int, metavar="STEPS", help="--max-steps of each run (digits: 300 1500)")
    p.add_argument("--output-root", help="where the runs go (default runs/sweep-<preset>)")
    p.add_argument(
        "--launcher",
        choices=("accelerate", "python", "slurm"),
        help="accelerate launch (default for paper) or plain python; slurm: submit a job array (cluster.py)",
    )
    p.add_argument(
        "--accelerate-config", help="accelerate launch --config_file (e.g. accelerate_config.yaml: one GPU, bf16)"
    )
    p.add_argument(
        "--cpu", action=argparse.BooleanOptionalAction, help="pass --cpu to train.py (default: on for digits)"
    )
    p.add_argument(
        "--jobs", type=int, help="runs at once (digits default 2: one CPU thread each); with --gpus, one GPU each"
    )
    p.add_argument("--gpus", help="comma-separated GPU ids to spread --jobs over (CUDA_VISIBLE_DEVICES per run)")
    p.add_argument(
        "--runs-per-gpu",
        type=int,
        default=1,
        help="with --gpus: runs sharing each GPU at once (a ResNet-44 CIFAR run fills a fraction of a large "
        "GPU; BENCHMARKS.md measures the aggregate speed by K); --jobs defaults to GPUs x K",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the commands (--launcher slurm: the batch script) and exit"
    )
    cluster.add_arguments(p)
    args = p.parse_args(argv)
    typed = {k for k, v in vars(args).items() if v is not None and v is not False and v != p.get_default(k)}
    cluster.check_args(p, args, extra)
    preset = config.SWEEP_PRESETS[args.preset]
    args.methods = args.methods or list(preset["methods"])
    args.settings = parse_settings(args.settings) if args.settings else list(preset["settings"])
    args.seeds = args.seeds if args.seeds is not None else list(preset["seeds"])
    args.eps = args.eps or list(preset["eps"])
    args.budgets = args.budgets or list(preset["budgets"])
    args.launcher = args.launcher or preset["launcher"]
    args.cpu = preset["cpu"] if args.cpu is None else args.cpu
    if args.gpus is not None and not all(g.strip().isdigit() for g in args.gpus.split(",")):
        raise ValueError(f"--gpus {args.gpus!r}: give comma-separated GPU ids, e.g. 0,1")
    if args.runs_per_gpu < 1 or (args.runs_per_gpu > 1 and not args.gpus and not args.slurm):
        raise ValueError(f"--runs-per-gpu {args.runs_per_gpu}: give a number >= 1, with --gpus or --launcher slurm")
    if args.jobs is None:
        args.jobs = len(args.gpus.split(",")) * args.runs_per_gpu if args.gpus else preset["jobs"]
    args.output_root = Path(args.output_root or f"runs/sweep-{args.preset}")
    if args.output_root.exists() and not args.output_root.is_dir():
        raise ValueError(f"--output-root {args.output_root} is a file: choose a folder")
    args.train_args, args.extra = list(preset["train_args"]) + extra, extra
    if any(b is not None and b < 1 for b in args.budgets):
        raise ValueError(f"--budgets {' '.join(map(str, args.budgets))}: each is a number of steps >= 1")
    if args.jobs < 1 or not args.seeds or not args.methods:
        raise ValueError("--jobs must be >= 1 and --seeds/--methods must not be empty")
    check_grid_values(args, typed)
    return args


def check_grid_values(args: argparse.Namespace, typed: set[str]) -> None:
    """Every value typed is used once: no grid value twice, no value that no job reads."""
    for key in ("methods", "settings", "seeds", "eps", "budgets"):
        values = getattr(args, key)
        if len(set(values)) < len(values):
            twice = next(v for v in values if values.count(v) > 1)
            raise ValueError(f"--{key} lists {twice!r} twice: each run of the grid runs once")
    if "eps" in typed and not set(args.methods) & set(losses.FIXED_EPS):
        raise ValueError(f"--eps is read only by {', '.join(losses.FIXED_EPS)}, none of which is in --methods: drop it")
    if "jobs" in typed and args.gpus and not args.slurm:
        raise ValueError("--jobs with --gpus: the runs at once are the GPUs x --runs-per-gpu; drop --jobs")
    if "accelerate_config" in typed and args.launcher != "accelerate":
        raise ValueError(
            f"--accelerate-config is read by --launcher accelerate only (these runs start with "
            f"{args.launcher}): drop it"
        )


def check_train_args(jobs: Sequence[Job], args: argparse.Namespace) -> None:
    """Refuse a train.py flag after -- that the grid sets itself (it would override the grid: runs would collide);
    the preset's own train.py flags (train_args) may be overridden."""
    grid = {a for job in jobs for a in job.args[: len(job.args) - len(args.train_args)] if a.startswith("--")}
    grid.add("--resume")
    given = [a.split("=", 1)[0] for a in args.extra if a.startswith("--")]
    clash = [a for a in given if a in grid or a == "--overwrite"]
    if clash:
        raise ValueError(
            f"{clash[0]} after --: the grid sets it for every run (use the sweep's own flags, e.g. "
            "--seeds, --budgets, --output-root); drop it"
        )


def parse_settings(texts: Sequence[str]) -> list[tuple[str, float]]:
    """'symmetric:0.4' -> ('symmetric', 0.4); 'none' -> ('none', 0.0)."""
    settings = []
    for text in texts:
        noise, _, rate = text.partition(":")
        try:
            settings.append((noise, float(rate or 0.0)))
        except ValueError:
            raise ValueError(f"--settings {text!r}: write NOISE:RATE, e.g. symmetric:0.4") from None
        if (noise == "none") == bool(settings[-1][1]):
            raise ValueError(
                f"--settings {text!r}: "
                + ("'none' takes no rate" if noise == "none" else f"{noise} needs a rate, e.g. {noise}:0.4")
            )
    return settings


def plan(args: argparse.Namespace) -> list[Job]:
    """The grid: one Job per (setting, method, eps, budget, seed), with its train.py arguments."""
    preset = config.SWEEP_PRESETS[args.preset]
    jobs = []
    for noise, rate in args.settings:
        for method in args.methods:
            for eps, budget, seed in itertools.product(
                args.eps if method in losses.FIXED_EPS else [None], args.budgets, args.seeds
            ):
                name = (
                    f"{preset['dataset']}-{noise}-{rate:g}-{method}"
                    + (f"-eps{eps:g}" if eps is not None else "")
                    + (f"-T{budget}" if budget else "")
                    + f"-seed{seed}"
                )
                out = args.output_root / name
                train = [
                    "--dataset",
                    preset["dataset"],
                    "--method",
                    method,
                    "--noise",
                    noise,
                    "--noise-rate",
                    f"{rate:g}",
                    "--seed",
                    str(seed),
                    "--output-dir",
                    str(out),
                ]
                if preset["model"]:
                    train += ["--model", preset["model"]]
                if eps is not None:
                    train += ["--eps", f"{eps:g}"]
                if method == "proselflc" and (noise, round(rate, 2)) in preset["exp_base"]:
                    train += ["--exp-base", f"{preset['exp_base'][(noise, round(rate, 2))]:g}"]
                if budget:
                    train += ["--max-steps", str(budget)]
                if args.cpu:
                    train.append("--cpu")
                jobs.append(Job(name, method, noise, rate, seed, eps, out, train + args.train_args, budget))
    return jobs


def status(output_dir: Path) -> str:
    """'finished', 'resumable' (a complete checkpoint), 'started' (something there, nothing to resume) or 'new'."""
    if runfolder.is_finished(output_dir):
        return "finished"
    if runfolder.latest_checkpoint(output_dir) is not None:
        return "resumable"
    return "started" if output_dir.is_dir() and any(output_dir.iterdir()) else "new"


def check_jobs(jobs: Sequence[Job]) -> None:
    """Every run's train.py arguments resolved and checked as train.py will (no data loaded): a bad value fails
    the sweep before it starts, naming the run."""
    for job in jobs:
        try:
            config.resolve([*job.args, "--resume", "auto"])
        except ValueError as e:
            raise ValueError(f"run {job.name} would fail: {e}") from None


def command(job: Job, args: argparse.Namespace) -> list[str]:
    """The process to start for a job: accelerate launch or plain python, with --resume auto."""
    train = [
        *job.args,
        "--resume",
        "auto",
    ]  # a new run, a killed one continued, or one killed before its first checkpoint
    if args.launcher == "python":
        return [sys.executable, str(config.SUITE_DIR / "train.py"), *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        launch += ["--config_file", args.accelerate_config]
    return [*launch, str(config.SUITE_DIR / "train.py"), *train]


_children: set[subprocess.Popen] = set()  # the train.py processes running now
_children_lock = threading.Lock()  # taken by the job threads, and by the signal handler in the main thread
_stopped_by: list[int] = []  # the signal that stopped the sweep, once one came


def stop_children(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT handler: start no further run and pass the signal on to every running train.py."""
    with _children_lock:
        _stopped_by.append(signum)
        for child in _children:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                pass


def wait_for_group(group: int, seconds: float = 60.0) -> None:
    """Wait until no process of the group is left (accelerate launch exits before its workers), then kill stragglers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_job(job: Job, args: argparse.Namespace, slots: queue.Queue, number: str) -> tuple[Job, int, float]:
    """Run one job in a free slot (a GPU id or a CPU thread), its output into logs/<name>.log; return its exit code."""
    slot = slots.get()
    try:
        env = dict(os.environ)
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = slot
        elif args.cpu and args.jobs > 1:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"  # jobs share the cores instead of fighting over them
        log = args.output_root / "logs" / f"{job.name}.log"
        cmd = command(job, args)
        print(f"{number} start {job.name}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write(shlex.join(cmd) + "\n")
            f.flush()
            with _children_lock:
                if _stopped_by:  # the sweep was stopped while this job waited for its slot
                    return job, 128 + _stopped_by[0], 0.0
                # its own process group: a signal reaches the launcher and the train.py processes it starts
                child = subprocess.Popen(
                    cmd, cwd=config.SUITE_DIR, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
                _children.add(child)
            try:
                code = child.wait()
                if _stopped_by:
                    wait_for_group(child.pid)
            finally:
                with _children_lock:
                    _children.discard(child)
        seconds = time.perf_counter() - start
        last = log.read_text().strip().splitlines()[-1:] or [""]
        print(
            f"{number} {'done' if code == 0 else 'stopped' if _stopped_by else 'FAILED'} {job.name} in {seconds:.0f} s: {last[0][-160:]}",
            flush=True,
        )
        return job, code, seconds
    finally:
        slots.put(slot)


def plot_runs_of(jobs: Sequence[Job], setting: tuple[str, float], seed: int) -> list[runfolder.RunRecord]:
    """Runs for the dynamics plot: the setting, one seed, per method the eps with the best final accuracy."""
    best: dict[str, runfolder.RunRecord] = {}
    for job in jobs:
        if (job.noise, job.rate) != setting or job.seed != seed or status(job.output_dir) != "finished":
            continue
        run = runfolder.load_run(job.output_dir)
        if job.method not in best or run.metrics[-1]["test_acc"] > best[job.method].metrics[-1]["test_acc"]:
            best[job.method] = run
    order = {m: i for i, m in enumerate(report.METHOD_ORDER)}
    return [best[m] for m in sorted(best, key=lambda m: order.get(m, len(order)))]


def summarise(jobs: Sequence[Job], args: argparse.Namespace) -> None:
    """Write table.md, table.csv and dynamics.png under the output root, and print the table."""
    done = [str(j.output_dir) for j in jobs if status(j.output_dir) == "finished"]
    if not done:
        raise ValueError(f"no finished run under {args.output_root}: see the logs in {args.output_root / 'logs'}")
    best_eps = len(args.eps) > 1
    if len(args.budgets) > 1:  # one accuracy and memorisation column per budget
        text = report.budget_table(runfolder.finished_runs(done))
    else:
        cells = report.collect_cells(runfolder.finished_runs(done), best_eps=best_eps)
        text = report.markdown_table(cells, best_eps=best_eps)
        report.write_table_csv(cells, args.output_root / "table.csv")
    (args.output_root / "table.md").write_text(text)
    print(text, end="")
    setting = config.SWEEP_PRESETS[args.preset]["plot_setting"]
    setting = setting if setting in args.settings else args.settings[-1]
    longest = max(args.budgets, key=lambda b: b or 0)
    runs = plot_runs_of([j for j in jobs if j.budget == longest], setting, args.seeds[0])
    if runs:
        report.plot_runs(runs, args.output_root / "dynamics.png")
    print(
        f"wrote {args.output_root / 'table.md'}"
        + (", table.csv" if len(args.budgets) == 1 else "")
        + (", dynamics.png" if runs else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid (skipping finished runs), then tabulate and plot; exit code 1 if a run failed."""
    args = parse_args(argv)
    if args.status is not None:
        return cluster.show_status(Path(args.status))
    jobs = plan(args)
    check_train_args(jobs, args)
    check_jobs(jobs)
    todo = [j for j in jobs if status(j.output_dir) != "finished"]
    if args.slurm:
        return cluster.submit([(j.name, command(j, args)) for j in todo], args)
    print(
        f"sweep {args.preset}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run "
        f"({args.jobs} at a time) under {args.output_root}",
        flush=True,
    )
    if args.dry_run:
        for job in todo:
            print(shlex.join(command(job, args)))
        return 0
    (args.output_root / "logs").mkdir(parents=True, exist_ok=True)
    slots: queue.Queue = queue.Queue()
    for i in range(args.jobs):  # with --gpus, K = --runs-per-gpu slots per GPU
        slots.put(args.gpus.split(",")[i % len(args.gpus.split(","))].strip() if args.gpus else str(i))
    start = time.perf_counter()
    handlers = {s: signal.signal(s, stop_children) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # leaving the block waits for every running job
            results = list(
                pool.map(lambda kj: run_job(kj[1], args, slots, f"[{kj[0] + 1}/{len(todo)}]"), enumerate(todo))
            )
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if _stopped_by:
        name = signal.Signals(_stopped_by[0]).name
        print(
            f"sweep stopped by {name}: its running train.py processes were stopped and have exited; "
            f"the same command continues the sweep",
            file=sys.stderr,
        )
        return 128 + _stopped_by[0]
    failed = [job.name for job, code, _ in results if code != 0]
    print(
        f"ran {len(todo)} runs in {time.perf_counter() - start:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    summarise(jobs, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(runfolder.run_cli(main))
