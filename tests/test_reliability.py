"""Nothing lost, nothing silent: each case a hostile user found ends with nothing lost and either a correct run or
one `error:` line and exit 2."""

import contextlib
import errno
import importlib.util
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ENV, ROOT, TINY, TORCHRUN, Evil, one_error_line, run_script, snapshot
from safetensors.torch import load_file

import config
import eval as ev
import losses
import runfolder
import sweep
import train


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def lock_holder(lock: Path, proc: subprocess.Popen, seconds: float = 120) -> int:
    """The pid in a run's lock, once written (the lock file is created empty, then filled)."""
    wait_for(lock, proc, seconds)
    deadline = time.time() + seconds
    while "pid" not in (holder := runfolder.read_lock(lock)):
        assert proc.poll() is None and time.time() < deadline, f"{lock} stayed empty"
        time.sleep(0.05)
    return int(holder["pid"])


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: chmod 555, or for root (who ignores modes) a read-only tmpfs mount."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    mounted = False
    if os.access(folder, os.W_OK):  # root
        mounted = (
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True).returncode
            == 0
        )
        if not mounted:
            folder.chmod(0o755)
            pytest.skip("cannot make a read-only folder as root here")
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    folder.chmod(0o755)


# ---- 1. --resume latest --overwrite
def test_resume_with_overwrite_is_refused_before_touching_anything(killed_copy, capsys):
    out = killed_copy
    before = snapshot(out)
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "latest", "--overwrite"]) == 2
    assert "contradict" in one_error_line(capsys)
    assert snapshot(out) == before


# ---- 2. two runs into one folder: the lock
def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            "--max-steps",
            "100000",
            "--eval-every",
            "100000",
            "--save-every",
            "100000",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(out / "noise.json", first)  # written after config.json
        before = snapshot(out)
        assert train.cli([*TINY, "--output-dir", str(out), "--overwrite"]) == 2  # not even --overwrite
        line = one_error_line(capsys)
        assert f"in use by another run (pid {first.pid} on " in line
        after = snapshot(out)
        assert set(before) <= set(after) and after["config.json"] == before["config.json"]
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert not (out / runfolder.LOCK_NAME).exists(), "SIGTERM must unwind and release the lock"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / runfolder.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert train.cli([*TINY, "--output-dir", str(out), "--overwrite"]) == 0
    assert f"locked by pid {int(dead.stdout)}" in capsys.readouterr().err
    assert not (out / runfolder.LOCK_NAME).exists()


# ---- 3. sweep.py forwards SIGTERM and waits for its runs
def test_a_terminated_sweep_leaves_no_train_py_running(tmp_path):
    root = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            sys.executable,
            "sweep.py",
            "--methods",
            "cce",
            "--settings",
            "symmetric:0.2",
            "--seeds",
            "0",
            "1",
            "--budgets",
            "100000",
            "--jobs",
            "2",
            "--output-root",
            str(root),
            "--",
            "--batch-size",
            "32",
            "--eval-every",
            "100000",
            "--save-every",
            "100000",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    locks = [root / f"digits-symmetric-0.2-cce-T100000-seed{s}" / runfolder.LOCK_NAME for s in (0, 1)]
    children = []
    spawned = psutil.Process(proc.pid)
    try:
        children = [lock_holder(lock, proc) for lock in locks]
        assert all(runfolder.pid_alive(pid) for pid in children)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        survivors = [pid for pid in children if runfolder.pid_alive(pid)]
    finally:  # leave nothing behind when the test fails, also before the runs took their locks
        leftovers = spawned.children(recursive=True) if proc.poll() is None else []
        proc.kill()
        for child in leftovers:
            with contextlib.suppress(psutil.Error):
                child.kill()
        for pid in children:
            if runfolder.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM and "sweep stopped by SIGTERM" in err
    assert survivors == []
    assert not any(lock.exists() for lock in locks)


# ---- 4. a .npy noise file of floats
def test_a_noise_file_of_fractional_labels_is_refused(tmp_path, capsys):
    floats = tmp_path / "labels.npy"
    np.save(floats, np.full(200, 0.7))
    assert (
        train.cli([*TINY, "--output-dir", str(tmp_path / "run"), "--noise", "file", "--noise-file", str(floats)]) == 2
    )
    line = one_error_line(capsys)
    assert str(floats) in line and "non-integer labels" in line and "0.7" in line
    assert floats.exists()
    np.save(tmp_path / "integral.npy", np.array([3.0, 1.0, 0.0]))  # integral floats are labels
    assert train.noise.load_noise_file(str(tmp_path / "integral.npy"))[0].tolist() == [3, 1, 0]


# ---- 5. --keep-checkpoints below 1
@pytest.mark.parametrize("keep", ["-1", "0"])
def test_keep_checkpoints_below_one_is_refused(tmp_path, capsys, keep):
    assert train.cli([*TINY, "--output-dir", str(tmp_path / "run"), "--keep-checkpoints", keep]) == 2
    assert "--keep-checkpoints must be at least 1" in one_error_line(capsys)


# ---- 6. fp16 on a CPU runs fp32 (Accelerate's behaviour): one notice, and config.json says what ran
def test_fp16_on_cpu_says_so_and_records_what_ran(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli([*TINY, "--max-steps", "2", "--output-dir", str(out), "--mixed-precision", "fp16"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "fp16 needs a GPU" in notes[0] and "bf16" in notes[0]
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "no"


# ---- 7. divergence: nothing non-finite saved or logged, the last finite checkpoint named, advice by what ran
def test_after_a_divergence_nothing_is_saved_or_logged_and_the_last_checkpoint_is_named(tmp_path, capsys, monkeypatch):
    real = losses.build_loss

    def poisoned(*args, **kwargs):  # the loss turns NaN from step t = 5 on; the check runs only every 10 steps
        fn = real(*args, **kwargs)
        forward = fn.forward
        fn.forward = lambda logits, labels, step=0, **kw: (
            forward(logits, labels, step=step, **kw) * (math.nan if step >= 5 else 1.0)
        )
        return fn

    monkeypatch.setattr(losses, "build_loss", poisoned)
    out = tmp_path / "run"
    assert (
        train.cli(
            [*TINY, "--max-steps", "20", "--log-every", "10", "--keep-checkpoints", "5", "--output-dir", str(out)]
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "not finite at step 5" in line and str(out / "checkpoints" / "step_000004") in line
    assert "lower --lr" in line and "fp16" not in line  # an fp32 run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    for ckpt in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in lines] == [2, 4] and "NaN" not in "".join(lines)


# ---- 8. a torn last line in metrics.jsonl
def test_a_torn_metrics_line_is_dropped_on_resume(killed_copy):
    out = killed_copy
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text().splitlines()
    with open(metrics, "r+") as f:
        f.truncate(len(metrics.read_bytes()) - 20)  # a kill during the append of the step-6 line
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "latest"]) == 0
    lines = metrics.read_text().splitlines()
    assert [json.loads(m)["step"] for m in lines] == [2, 4, 6] and lines[:2] == whole[:2]


# ---- 9. a moved run folder, spelled relative
def test_a_moved_run_folder_resumes(killed_copy, monkeypatch):
    monkeypatch.chdir(killed_copy.parent)
    assert train.cli([*TINY, "--output-dir", killed_copy.name, "--resume", "latest"]) == 0
    assert (killed_copy / "model.safetensors").exists()


# ---- 10. another run's checkpoint into a fresh folder: checked against the checkpoint's own record
def test_resuming_another_runs_checkpoint_with_another_lr_is_refused(killed_run, tmp_path, capsys):
    ckpt = killed_run / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "config.json").read_text())["lr"] == 0.1
    assert train.cli([*TINY, "--output-dir", str(tmp_path / "fresh"), "--resume", str(ckpt), "--lr", "0.5"]) == 2
    assert "--lr 0.1 -> 0.5" in one_error_line(capsys)
    assert not (tmp_path / "fresh" / "config.json").exists()


# ---- tracebacks that became one line
def test_unwritable_output_folders_give_one_line(read_only_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, words in (
        (read_only_dir, "cannot write to --output-dir"),
        (read_only_dir / "run", "cannot write to"),
        (a_file, "is a file"),
        (a_file / "run", "lies under the file"),
    ):
        assert train.cli([*TINY, "--output-dir", str(out)]) == 2
        assert words in one_error_line(capsys)
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("when", ["checkpoint", "final save"])
def test_a_full_disk_names_the_checkpoint_still_usable(tmp_path, capsys, monkeypatch, when):
    real, calls = runfolder.save_tensors, []

    def fails_at_the_second_checkpoint_or_the_final_save(tensors, path, metadata=None):
        calls.append(path.name)
        if (when == "checkpoint" and calls.count("model.safetensors") == 2) or path.name == "model.safetensors.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata)

    monkeypatch.setattr(runfolder, "save_tensors", fails_at_the_second_checkpoint_or_the_final_save)
    out = tmp_path / "run"
    assert train.cli([*TINY, "--output-dir", str(out)]) == 2
    line = one_error_line(capsys)
    usable = out / "checkpoints" / ("step_000004" if when == "final save" else "step_000002")
    assert "No space left on device" in line and f"{usable} is complete and still usable" in line
    assert not (out / "model.safetensors").exists() and not list((out / "checkpoints").glob("tmp_*"))
    assert not list(out.glob("*.tmp"))


def test_a_file_size_limit_gives_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    """A real write failure (ulimit -f: 'File too large', raised inside safetensors) at the first checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 40; exec {sys.executable} train.py {' '.join(TINY)} --output-dir {out}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot write the checkpoint step_000002") and "File too large" in lines[0]
    assert "no checkpoint was completed yet" in lines[0]
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "model.safetensors").exists()


def test_bad_data_and_label_files_give_one_line(tmp_path, capsys):
    torch.save({"noisy_label": Evil(tmp_path / "pwned")}, tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file" * 8)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(pickle.dumps({b"data": Evil(tmp_path / "pwned"), b"labels": [0]}))
    script = tmp_path / "scripted"
    script.mkdir()
    (script / "scripted.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    cases = [
        (["--noise", "file", "--noise-file", str(tmp_path / "evil.pt")], "asks to run code"),
        (["--noise", "file", "--noise-file", str(tmp_path / "garbage.pt")], "not a torch file"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path)], "not a CIFAR python batch"),
        (["--dataset", "scripted", "--data-dir", str(script)], "loading script"),
    ]
    for flags, words in cases:
        tiny = TINY[:1] + TINY[5:] if "--dataset" in flags else TINY  # --synthetic-size is for --dataset synthetic
        assert train.cli([*tiny, "--output-dir", str(tmp_path / "run"), *flags]) == 2
        assert words in one_error_line(capsys)
    assert not (tmp_path / "pwned").exists()


def test_eval_refuses_a_config_that_is_not_an_object_and_an_unwritable_plot(killed_copy, read_only_dir, tmp_path):
    run = killed_copy
    with pytest.raises(ValueError, match="dynamics.png cannot be written"):
        ev.main(["--plot", str(run), "--out", str(read_only_dir / "dynamics.png")])
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not the object"):
        ev.main(["--plot", str(run), "--out", str(tmp_path / "d.png")])


def test_under_torchrun_one_process_prints_the_error(tmp_path):
    proc = run_script(*TORCHRUN, "train.py", *TINY, "--keep-checkpoints", "0", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: --keep-checkpoints must be at least 1, got 0"
    ]


# ---- silently accepted input that now gets one line
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--noise", "none", "--noise-rate", "0.4"], "--noise none with --noise-rate 0.4"),
        (["--train-eval-size", "-1"], "--train-eval-size must be 0 (off) or more"),
        (["--audit-epochs", "0"], "--audit-epochs must be above 0"),
        (["--audit-epochs", "nan"], "--audit-epochs must be above 0"),
        (["--report-to", "wandb"], "the wandb package is not installed"),
    ],
)
def test_silently_accepted_flags_are_refused(tmp_path, capsys, flags, words):
    if flags[-1] == "wandb" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    assert train.cli([*TINY, "--output-dir", str(tmp_path / "run"), *flags]) == 2
    assert words in one_error_line(capsys)
    if flags[-1] == "wandb" and importlib.util.find_spec("tensorboard"):
        config.check_trackers("tensorboard")  # an installed tracker passes


@pytest.mark.parametrize(
    "flags, words", [(["--jobs", "0"], "--jobs must be >= 1"), (["--settings", "symmetric"], "symmetric needs a rate")]
)
def test_sweep_refuses_a_zero_jobs_and_a_rateless_setting(tmp_path, flags, words):
    with pytest.raises(ValueError, match=words):
        sweep.parse_args(["--output-root", str(tmp_path), *flags])


def test_a_run_killed_before_its_first_checkpoint_is_explained(killed_copy, capsys):
    out = killed_copy
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert train.cli([*TINY, "--output-dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert "stopped before its first checkpoint (config.json, dynamics.safetensors, metrics.jsonl, noise.json)" in line
    assert "--overwrite" in line and "--resume" not in line
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "latest"]) == 2
    line = one_error_line(capsys)
    assert "no complete checkpoint" in line and "--overwrite" in line and "start without --resume" not in line
    assert snapshot(out) == before
