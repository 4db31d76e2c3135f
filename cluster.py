"""Beyond one machine: a sweep as a Slurm job array that survives preemption, its status view, SkyPilot's task files.

    python sweep.py --preset paper --launcher slurm --partition gpu --time 8:00:00 [--dry-run]
        Every run of the grid becomes a task of one Slurm job array (--runs-per-gpu K: K runs share a task and its
        GPU), submitted with --requeue and a USR1 signal before the time limit. A signalled task passes USR1 on to
        train.py, which checkpoints at the step it reached and exits 143; the task then requeues itself and its runs
        continue from their checkpoints (--resume auto). --dry-run prints the batch script instead.
    python sweep.py --status OUTPUT_ROOT
        Which runs finished, are running, were requeued (how often) or failed (with the last error line), from the
        run folders and OUTPUT_ROOT/logs (each run's log and its events: submitted, start, preempted, exit); then
        the Table 4 layout of the finished ones (eval.py --table).

SkyPilot's task files for rented spot GPUs are in sky/ (docs/cloud.md): `sky jobs launch sky/run.yaml` runs what
`sweep.py --dry-run` prints for the same settings, with the run folders on a mounted bucket.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import eval as ev
import runfolder

ROOT = Path(__file__).resolve().parent
SLURM_FLAGS = (
    "partition",
    "time",
    "account",
    "gpus_per_task",
    "cpus_per_task",
    "constraint",
    "sbatch_line",
    "signal_seconds",
)
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")  # minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """sweep.py's flags for --launcher slurm and --status."""
    g = p.add_argument_group("Slurm (--launcher slurm: one job array, one task per run or per --runs-per-gpu runs)")
    g.add_argument("--partition", help="sbatch --partition")
    g.add_argument("--time", help="sbatch --time, the limit of each task, e.g. 8:00:00 or 1-00:00:00")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--gpus-per-task", type=int, help="GPUs of each task (sbatch --gres=gpu:N; default 1, 0 with --cpu)")
    g.add_argument("--cpus-per-task", type=int, help="sbatch --cpus-per-task (also each task's OMP_NUM_THREADS)")
    g.add_argument("--constraint", help="sbatch --constraint, e.g. a100")
    g.add_argument(
        "--sbatch-line",
        action="append",
        metavar="OPTION",
        help="one more #SBATCH line, e.g. --sbatch-line=--qos=high (repeatable)",
    )
    g.add_argument(
        "--signal-seconds",
        type=int,
        help="USR1 this many seconds before the time limit (default 120; Slurm may send it up to 60 s early)",
    )
    p.add_argument(
        "--status",
        metavar="OUTPUT_ROOT",
        help="show the state of the sweep under OUTPUT_ROOT and the table of its finished runs, then exit",
    )


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Refuse a flag that would go unused; set args.slurm (then args.launcher is the preset's, run inside each task)."""
    if args.status is not None:
        others = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k != "status" and v != p.get_default(k)]
        others += ["-- (train.py flags)"] if extra else []
        if others:
            raise ValueError(f"--status reads the folders under {args.status} only: drop {', '.join(others)}")
    args.slurm = args.launcher == "slurm"
    if args.status is not None:
        return
    slurm_only = [f"--{k.replace('_', '-')}" for k in SLURM_FLAGS if getattr(args, k) is not None]
    if slurm_only and not args.slurm:
        raise ValueError(f"{', '.join(slurm_only)}: for --launcher slurm only")
    if not args.slurm:
        return
    if args.gpus is not None:
        raise ValueError("--gpus picks GPUs of this machine; under --launcher slurm give --gpus-per-task instead")
    if args.time is not None and not SLURM_TIME.fullmatch(args.time):
        raise ValueError(f"--time {args.time!r}: write minutes, HH:MM:SS or D-HH:MM:SS, e.g. 8:00:00")
    for flag, least in (("gpus_per_task", 0), ("cpus_per_task", 1), ("signal_seconds", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number >= {least}")
    bad = [line for line in args.sbatch_line or [] if not line.startswith("-")]
    if bad:
        raise ValueError(f"--sbatch-line {bad[0]!r}: give an sbatch option, e.g. --sbatch-line=--qos=high")
    args.launcher = None  # the preset's launcher runs inside each task
    args.array_limit = args.jobs  # --jobs under Slurm: at most this many tasks at once (--array=0-N%jobs)
    if args.output_root:
        args.output_root = str(Path(args.output_root).resolve())  # tasks start in the submission folder; be explicit


# ----------------------------------------------------------------------------- the batch script


def batch_script(runs: Sequence[tuple[str, list[str]]], args: argparse.Namespace) -> str:
    """A Slurm job-array batch script for (run name, command) pairs, args.runs_per_gpu runs per array task."""
    k = args.runs_per_gpu
    tasks = [runs[i : i + k] for i in range(0, len(runs), k)]
    root, logs = Path(args.output_root), Path(args.output_root) / "logs"
    gpus = args.gpus_per_task if args.gpus_per_task is not None else 0 if args.cpu else 1
    seconds = 120 if args.signal_seconds is None else args.signal_seconds
    options = [
        f"--job-name=proselflc-{root.name}",
        f"--array=0-{len(tasks) - 1}" + (f"%{args.array_limit}" if args.array_limit else ""),
        "--requeue",
        f"--signal=B:USR1@{seconds}",
        "--open-mode=append",
        f"--output={logs}/slurm-%A_%a.out",
    ]
    for flag in ("partition", "time", "account", "constraint", "cpus_per_task"):
        if getattr(args, flag) is not None:
            options.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
    options += [f"--gres=gpu:{gpus}"] * bool(gpus) + list(args.sbatch_line or [])
    cases = []
    for i, task in enumerate(tasks):
        lines = [f"run {name} \\\n            {shlex.join(cmd)}" for name, cmd in task]
        cases.append(f"    {i})  " + "\n        ".join(lines) + " ;;")
    return f"""#!/bin/bash
# {len(runs)} runs of a sweep under {root}, {k} per task of this Slurm job array (written by sweep.py --launcher slurm).
# USR1 ({seconds} s before the time limit, or `scancel --signal=USR1 --batch JOB_TASK`): train.py checkpoints at the
# step it reached and exits 143, then the task requeues itself and its runs continue from there (--resume auto).
# Each run's output is appended to logs/NAME.log, its starts and ends to logs/NAME.events (sweep.py --status).
{chr(10).join(f"#SBATCH {o}" for o in options)}

set -u
cd {shlex.quote(str(ROOT))}  # the repository: each run starts there, as sweep.py starts them on one machine
logs={shlex.quote(str(logs))}
task="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}} MKL_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}} PYTHONUNBUFFERED=1
names=() pids=() worst=0

event() {{  # event NAME WHAT...: a line of logs/NAME.events
    local name=$1; shift
    echo "$(date +%FT%T) $* job=$task restart=${{SLURM_RESTART_COUNT:-0}} host=$(hostname)" >> "$logs/$name.events"
}}

run() {{  # run NAME COMMAND...: start one run in the background, its output appended to logs/NAME.log
    local name=$1; shift
    event "$name" start
    echo "# job $task restart ${{SLURM_RESTART_COUNT:-0}} on $(hostname) at $(date +%FT%T): ${{*@Q}}" >> "$logs/$name.log"
    "$@" >> "$logs/$name.log" 2>&1 &
    names+=("$name") pids+=($!)
}}

finish() {{  # wait for the runs still running; the task's exit code is the worst of theirs
    while [ ${{#pids[@]}} -gt 0 ]; do
        wait "${{pids[0]}}"
        local code=$?
        while kill -0 "${{pids[0]}}" 2>/dev/null; do  # a signal to this shell cut the wait short: wait again
            wait "${{pids[0]}}"
            code=$?
        done
        event "${{names[0]}}" exit $code
        [ $code -gt $worst ] && worst=$code
        names=("${{names[@]:1}}") pids=("${{pids[@]:1}}")
    done
}}

preempted() {{  # USR1: every run checkpoints and exits, then this task goes back into the queue
    [ -n "${{stopping:-}}" ] && return  # a second USR1 (scancel --batch also signals the runs) changes nothing
    stopping=1
    for i in "${{!pids[@]}}"; do
        kill -USR1 "${{pids[$i]}}" 2>/dev/null && event "${{names[$i]}}" preempted
    done
    finish
    scontrol requeue "$task"
    exit 0
}}
trap preempted USR1
trap 'finish; exit 143' TERM  # scancel, or preempted by Slurm itself: train.py got SIGTERM too and checkpoints

case "$SLURM_ARRAY_TASK_ID" in
{chr(10).join(cases)}
esac
finish
exit $worst
"""


def submit(runs: Sequence[tuple[str, list[str]]], args: argparse.Namespace) -> int:
    """Write the batch script to OUTPUT_ROOT/logs/slurm-array.sh and submit it (--dry-run: print it instead)."""
    root = Path(args.output_root)
    if not runs:
        print(f"nothing to submit: every run under {root} has finished")
        return 0
    script = batch_script(runs, args)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise ValueError(
            "sbatch not found: --launcher slurm submits with Slurm's sbatch (run it where sbatch works, "
            "e.g. a login node), or add --dry-run to print the batch script"
        )
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "slurm-array.sh"
    path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ValueError(f"sbatch refused {path}: {why}")
    job, stamp = proc.stdout.strip().split(";")[0], time.strftime("%Y-%m-%dT%H:%M:%S")
    for i, (name, _) in enumerate(runs):
        with open(logs / f"{name}.events", "a") as f:
            f.write(f"{stamp} submitted job={job}_{i // args.runs_per_gpu} host={socket.gethostname()}\n")
    tasks = -(-len(runs) // args.runs_per_gpu)
    print(
        f"submitted job array {job}: {len(runs)} runs in {tasks} tasks ({path})\n"
        f"follow it:  squeue -j {job}\n"
        f"            tail -f {logs}/{runs[0][0]}.log\n"
        f"            python sweep.py --status {root}"
    )
    return 0


# ----------------------------------------------------------------------------- the status view


def read_events(path: Path) -> list[dict[str, str]]:
    """logs/NAME.events as dicts: time, what (submitted, start, preempted, exit N) and the key=value fields."""
    events = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        words = line.split()
        fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        events.append({"time": words[0], "what": " ".join(w for w in words[1:] if "=" not in w), **fields})
    return events


def last_error(log: Path) -> str:
    """The last 'error: ...' line of a run's log (else its last line), for the status view."""
    lines = (
        [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    )
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:200]


def run_state(out: Path, log: Path, events: list[dict[str, str]]) -> tuple[str, str]:
    """(state, note) of one run: finished, running, pending, requeued (waiting), stopped or failed."""
    if runfolder.is_finished(out):
        return "finished", ""
    holder = runfolder.read_lock(out / runfolder.LOCK_NAME) if (out / runfolder.LOCK_NAME).exists() else None
    if holder is not None:
        here = holder.get("host") == socket.gethostname()
        if not here or runfolder.pid_alive(int(holder.get("pid", -1))):
            return "running", f"pid {holder.get('pid')} on {holder.get('host')}"
    submitted = [e["job"] for e in events if e["what"] == "submitted"]
    mine = [e for e in events if e["what"] != "submitted" and (not submitted or e.get("job") == submitted[-1])]
    if submitted and not mine:
        return "pending", f"job {submitted[-1]}"
    last = mine[-1]["what"] if mine else ""
    code = int(last.split()[1]) if last.startswith("exit ") else None
    ckpt = runfolder.latest_checkpoint(out)
    at = f"checkpoint {ckpt.name}" if ckpt else "no checkpoint"
    if last == "preempted" or code == 143 and mine[-2:-1] and mine[-2]["what"] == "preempted":
        return "requeued", f"waiting, {at}"
    if code not in (None, 0, 143) or (code is None and log.is_file() and last_error(log).startswith("error:")):
        return "failed", last_error(log)
    if code == 143 or log.is_file() or out.is_dir():
        return "stopped", at
    return "pending", ""


def status_rows(root: Path) -> list[dict[str, Any]]:
    """One row per run under root: from its folder, logs/NAME.log and logs/NAME.events."""
    logs = root / "logs"
    names = {p.stem for p in logs.glob("*.events")} | {p.stem for p in logs.glob("*.log")}
    names |= {
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name != "logs" and (runfolder.is_run_folder(p) or (p / runfolder.LOCK_NAME).exists())
    }
    rows = []
    for name in sorted(names):
        out, log, events = root / name, logs / f"{name}.log", read_events(logs / f"{name}.events")
        state, note = run_state(out, log, events)
        metrics = runfolder.read_metrics(out / "metrics.jsonl")
        total = None
        if (out / "config.json").is_file():
            total = runfolder.read_json(out / "config.json").get("total_steps")
        requeues = max(sum(e["what"] == "start" for e in events) - 1, 0)  # every start after the first
        rows.append(
            {
                "name": name,
                "state": state,
                "note": note,
                "requeues": requeues,
                "dir": out,
                "step": f"{metrics[-1]['step'] if metrics else 0}/{total or '?'}",
            }
        )
    return rows


def show_status(root: Path) -> int:
    """Print the state of every run under root and the table of the finished ones; 1 if a run failed."""
    if not root.is_dir():
        raise ValueError(f"--status {root}: no such folder (give a sweep's --output-root)")
    rows = status_rows(root)
    if not rows:
        raise ValueError(f"--status {root}: no runs there (no run folders, no logs/*.log)")
    counts = {
        s: sum(r["state"] == s for r in rows)
        for s in ("finished", "running", "requeued", "pending", "stopped", "failed")
    }
    requeued = sum(r["requeues"] > 0 for r in rows)
    print(
        f"sweep under {root}: {len(rows)} runs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f"; {requeued} requeued at least once"
    )
    width = max(len(r["name"]) for r in rows)
    print(f"{'run':<{width}}  {'state':<9}  {'step':>13}  requeued  note")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']:<9}  {r['step']:>13}  {r['requeues']:>8}  {r['note']}")
    done = [str(r["dir"]) for r in rows if r["state"] == "finished"]
    if done:
        print()
        runs = runfolder.finished_runs(done)
        best_eps = len({r.config.get("eps") for r in runs if r.config.get("eps") is not None}) > 1
        ev.table_main(argparse.Namespace(runs=done, out=None, csv=None, best_eps=best_eps))
    return 1 if counts["failed"] else 0
