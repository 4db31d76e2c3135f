"""cluster.py against a real single-node Slurm (`bash .ci/slurm start`, as .ci/run does): a digits sweep as one job
array, one task preempted mid-run, requeued and finished with the same bytes as the run never stopped; the status
view; the SkyPilot task files loaded by SkyPilot's own loader; the one-line refusals of the new flags."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV, ROOT, one_error_line, start_train

import cluster
import runfolder
import sweep


def slurm_idle() -> bool:
    """Whether sbatch is here and sinfo answers with a usable node."""
    if shutil.which("sbatch") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and bool({"idle", "mix", "alloc"} & set(proc.stdout.split()))


needs_slurm = pytest.mark.skipif(
    not slurm_idle(), reason="no Slurm is up here: start one with `bash .ci/slurm start` (as root; .ci/run does it)"
)
SKY_PYTHON = Path(os.environ.get("PROSELFLC_SKY_PYTHON", ROOT / ".venv-cluster" / "bin" / "python"))
# Six runs: three methods at a short and a long budget; the long ProSelfLC run is the one preempted.
GRID = ["--methods", "cce", "proselflc", "gce", "--seeds", "0", "--budgets", "50", "300"]
TRAIN = ["--", "--eval-every", "50", "--save-every", "25"]
PREEMPTED = "digits-symmetric-0.4-proselflc-T300-seed0"
# SkyPilot's own loader, run in its virtualenv: each task file's run lines, its envs filled in.
SKY_LOADER = r"""
import string, sys, sky
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    lines = string.Template(task.run or "").safe_substitute(task.envs).splitlines()
    print(f"{path} runs:\n" + "\n".join("  " + x.strip() for x in lines if x.strip() and not x.strip().startswith("#")))
"""


def refused_by_sweep(capsys, argv: list[str]) -> str:
    """sweep.py's one error line (exit 2) for argv."""
    assert runfolder.run_cli(lambda: sweep.main(argv)) == 2
    return one_error_line(capsys)


@needs_slurm
def test_a_preempted_array_task_requeues_and_ends_as_if_never_stopped(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["--launcher", "slurm", *GRID, "--output-root", str(root), *TRAIN]
    submitted = subprocess.run(
        [sys.executable, "sweep.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job array (\d+): 6 runs in 6 tasks", submitted.stdout).group(1)
    assert f"squeue -j {job_id}" in submitted.stdout and "sweep.py --status" in submitted.stdout
    jobs = sweep.plan(sweep.parse_args(argv))
    task = [j.name for j in jobs].index(PREEMPTED)
    out = root / PREEMPTED
    # the same run, never stopped, beside the array
    reference = tmp_path / "reference"
    args = [str(reference) if a == str(out) else a for a in jobs[task].args]
    direct = start_train(args)
    try:
        deadline = time.time() + 150
        while runfolder.latest_checkpoint(out) is None and time.time() < deadline:
            time.sleep(0.05)
        assert runfolder.latest_checkpoint(out) is not None, "the run wrote no checkpoint in 150 s"
        assert {r["name"]: r["state"] for r in cluster.status_rows(root)}[PREEMPTED] == "running"
        subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job_id}_{task}"], check=True, timeout=30)
        while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
            assert time.time() < deadline + 60, (
                "the array did not end in time:\n"
                + subprocess.run(["squeue", "-j", job_id], capture_output=True, text=True).stdout
            )
            time.sleep(0.5)
        assert direct.wait(timeout=120) == 0, direct.stderr.read()
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
        direct.kill()
    assert all(runfolder.is_finished(j.output_dir) for j in jobs), (root / "logs").iterdir()
    log = (root / "logs" / f"{PREEMPTED}.log").read_text()
    assert "stopped by SIGUSR1 at step" in log and log.count("restart 1 on") == 1
    events = cluster.read_events(root / "logs" / f"{PREEMPTED}.events")
    whats = [e["what"] for e in events]  # sweep.py writes "submitted" just after sbatch: the task may start first
    assert sorted(whats[:2]) == ["start", "submitted"] and whats[2:4] == ["preempted", "exit 143"]
    # Under load, the requeued task was seen to get USR1 once more as it started (Slurm requeues the task while its
    # script is still exiting): it is requeued again, from the same checkpoint. The run still ends as one that
    # never stopped.
    assert whats[-2:] == ["start", "exit 0"] and set(whats[4:-2]) <= {"start", "preempted", "exit 138", "exit 143"}
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    status = subprocess.run(
        [sys.executable, "sweep.py", "--status", str(root)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "6 runs: 6 finished; 1 requeued at least once" in status.stdout
    assert re.search(rf"{PREEMPTED} +finished +300/300 +{whats.count('start') - 1} ", status.stdout)  # 1, or more
    assert "| ProSelfLC |" in status.stdout and "T=300 test acc" in status.stdout  # the table of the finished runs


def test_dry_run_prints_a_batch_script_with_the_runs_packed_per_task(tmp_path, capsys):
    argv = [
        "--launcher",
        "slurm",
        *GRID,
        "--output-root",
        str(tmp_path / "s"),
        "--runs-per-gpu",
        "2",
        "--dry-run",
        "--partition",
        "gpu",
        "--time",
        "1-00:00:00",
        "--account",
        "lab",
        "--gpus-per-task",
        "1",
        "--jobs",
        "2",
        "--cpus-per-task",
        "4",
        "--constraint",
        "a100",
        "--sbatch-line=--qos=high",
        "--signal-seconds",
        "300",
    ]
    assert sweep.main(argv + TRAIN) == 0
    script = capsys.readouterr().out
    for line in (
        "--array=0-2%2",
        "--requeue",
        "--signal=B:USR1@300",
        "--partition=gpu",
        "--time=1-00:00:00",
        "--account=lab",
        "--gres=gpu:1",
        "--cpus-per-task=4",
        "--constraint=a100",
        "--qos=high",
        f"--output={tmp_path / 's' / 'logs'}/slurm-%A_%a.out",
    ):
        assert f"#SBATCH {line}\n" in script
    assert len(re.findall(r"--resume auto( ;;)?$", script, re.M)) == 6 and re.findall(r"^    (\d)\)", script, re.M) == [
        "0",
        "1",
        "2",
    ]
    assert 'scontrol requeue "$task"' in script and "trap preempted USR1" in script
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--partition", "gpu"], "--partition: for --launcher slurm only"),
        (["--sbatch-line=--qos=high", "--time", "1:00:00"], "--time, --sbatch-line: for --launcher slurm only"),
        (["--launcher", "slurm", "--gpus", "0"], "--gpus picks GPUs of this machine"),
        (["--launcher", "slurm", "--time", "8h"], "--time '8h': write minutes"),
        (["--launcher", "slurm", "--sbatch-line", "qos=high"], "--sbatch-line 'qos=high': give an sbatch option"),
        (["--launcher", "slurm", "--cpus-per-task", "0"], "--cpus-per-task 0: give a number >= 1"),
        (["--status", "R", "--preset", "paper"], "--status reads the folders under R only: drop --preset"),
        (["--status", "R", "--", "--lr", "0.1"], "drop -- (train.py flags)"),
    ],
)
def test_new_flags_are_used_or_refused_in_one_line(tmp_path, capsys, flags, words):
    assert words in refused_by_sweep(capsys, ["--output-root", str(tmp_path)] * ("--status" not in flags) + flags)


def test_status_of_a_failed_run_and_of_no_sweep(tmp_path, capsys):
    assert "no such folder" in refused_by_sweep(capsys, ["--status", str(tmp_path / "nothing")])
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run-a.log").write_text(
        "# job 5_0 restart 0 on vm: python train.py\nerror: --eps 2: give a value in [0, 1]\n"
    )
    (logs / "run-a.events").write_text(
        "2026-01-01T00:00:00 submitted job=5_0 host=vm\n"
        "2026-01-01T00:00:01 start job=5_0 restart=0 host=vm\n"
        "2026-01-01T00:00:02 exit 2 job=5_0 restart=0 host=vm\n"
    )
    (logs / "run-b.events").write_text("2026-01-01T00:00:00 submitted job=5_1 host=vm\n")
    (logs / "run-c.log").write_text("# job 5_2 restart 1 on vm: python train.py\nerror: out of memory\n")
    (logs / "run-c.events").write_text(  # a second USR1 as the requeued task started: every start is counted
        "2026-01-01T00:00:00 submitted job=5_2 host=vm\n"
        "2026-01-01T00:00:01 start job=5_2 restart=0 host=vm\n"
        "2026-01-01T00:00:02 preempted job=5_2 restart=0 host=vm\n"
        "2026-01-01T00:00:03 exit 143 job=5_2 restart=0 host=vm\n"
        "2026-01-01T00:00:04 start job=5_2 restart=1 host=vm\n"
        "2026-01-01T00:00:05 exit 138 job=5_2 restart=1 host=vm\n"
        "2026-01-01T00:00:06 start job=5_2 restart=2 host=vm\n"
        "2026-01-01T00:00:07 exit 1 job=5_2 restart=2 host=vm\n"
    )
    assert cluster.show_status(tmp_path) == 1
    out = capsys.readouterr().out
    assert "3 runs: 1 pending, 2 failed; 1 requeued at least once" in out
    assert re.search(r"run-c +failed +0/\? +2 +.*error: out of memory", out), out
    assert re.search(r"run-a +failed .*error: --eps 2: give a value in \[0, 1\]", out)
    assert re.search(r"run-b +pending .*job 5_1", out)


def test_submitting_without_slurm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    assert "sbatch not found" in refused_by_sweep(
        capsys, ["--launcher", "slurm", *GRID, "--output-root", str(tmp_path / "s")]
    )


@pytest.mark.skipif(
    not SKY_PYTHON.is_file(),
    reason=f"no SkyPilot virtualenv at {SKY_PYTHON} (.ci/run makes it: "
    "python3 -m venv .venv-cluster && .venv-cluster/bin/pip install "
    "-r requirements-cluster.txt; or set PROSELFLC_SKY_PYTHON)",
)
def test_skypilot_task_files_load_and_run_what_sweep_dry_run_prints(capsys):
    proc = subprocess.run(
        [str(SKY_PYTHON), "-c", SKY_LOADER, "sky/run.yaml", "sky/sweep.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    run_lines, sweep_lines = [
        [line.strip() for line in block.splitlines()[1:]] for block in proc.stdout.split("sky/sweep.yaml runs:")
    ]
    train = shlex.split([line for line in run_lines if " train.py " in line][0])
    sweep_argv = shlex.split([line for line in sweep_lines if line.startswith("python sweep.py")][0])[2:]
    assert sweep.main(["--dry-run", *sweep_argv]) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines()[1:]]
    printed = [["python", *cmd[1:]] for cmd in printed]
    printed = [["train.py" if a == str(ROOT / "train.py") else a for a in cmd] for cmd in printed]
    assert len(printed) == 78 and train in printed  # the one run's command is the sweep's line for that run
    assert all(
        cmd[-2:] == ["--resume", "auto"] and "/runs/table4/" in cmd[cmd.index("--output-dir") + 1] for cmd in printed
    )
