"""Trust and preemption: a shared checkpoint never runs code, a mistyped command never deletes a file or is
silently ignored, a stop signal loses nothing, and one failing process ends the others."""

import os
import pickle
import shutil
import signal
import time

import pytest
import torch
from conftest import ROOT, TINY, TORCHRUN, Evil, one_error_line, run_script, snapshot, start_train
from safetensors.torch import save_file

import runfolder
import train


# ---- 1. a checkpoint never unpickles
@pytest.mark.parametrize(
    "name, how",
    [
        ("custom_checkpoint_0.pkl", "torch"),
        ("custom_checkpoint_0.pkl", "raw"),
        ("random_states_0.pkl", "torch"),
        ("optimizer.bin", "torch"),
        ("pytorch_model.bin", "raw"),
        ("optimizer.safetensors", "raw"),
        ("state.safetensors", "torch"),
        ("model.safetensors", "torch"),
        ("rng_0.safetensors", "raw"),
        ("trainer_state.json", "raw"),
    ],
)
def test_a_crafted_pickle_in_a_checkpoint_never_runs(killed_copy, tmp_path, capsys, name, how):
    run = killed_copy
    marker = tmp_path / "pwned"
    planted = run / "checkpoints" / "step_000004" / name
    if how == "torch":
        torch.save({"x": Evil(marker)}, planted)
    else:
        planted.write_bytes(pickle.dumps(Evil(marker)))
    before = snapshot(run)
    assert train.cli([*TINY, "--output-dir", str(run), "--resume", "latest"]) == 2
    line = one_error_line(capsys)
    assert "step_000004" in line and ("never writes" in line or "damaged" in line), line
    assert not marker.exists()
    assert snapshot(run) == before
    # the same checkpoint resumed into a fresh folder: refused before anything is written there
    fresh = tmp_path / "fresh"
    assert train.cli([*TINY, "--output-dir", str(fresh), "--resume", str(planted.parent)]) == 2
    one_error_line(capsys)
    assert not marker.exists() and not any(fresh.iterdir())


def test_an_rng_state_that_does_not_load_is_refused_before_anything_runs(killed_copy, tmp_path, capsys):
    run = killed_copy
    rng = run / "checkpoints" / "step_000004" / "rng_0.safetensors"
    save_file(
        {"torch": torch.zeros(3, dtype=torch.uint8), "numpy": torch.zeros(2, dtype=torch.int64)},
        str(rng),
        metadata={"numpy": "[]", "python": "[]"},
    )
    assert train.cli([*TINY, "--output-dir", str(run), "--resume", "latest"]) == 2
    line = one_error_line(capsys)
    assert "rng_0.safetensors" in line and "tensor 'torch' is uint8 [3]" in line, line
    assert not (run / "model.safetensors").exists()


def test_a_checkpoint_is_only_safetensors_and_json(killed_run):
    ckpt = killed_run / "checkpoints" / "step_000004"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*runfolder.CHECKPOINT_FILES, "rng_0.safetensors"])


def test_a_half_pruned_checkpoint_is_never_complete(killed_copy, tmp_path, capsys):
    """A kill during pruning leaves tmp_pruned_step_N (never complete, removed later); a checkpoint missing files
    (cut some other way) gets one line."""
    run = killed_copy
    ckpts = run / "checkpoints"
    os.replace(ckpts / "step_000002", ckpts / "tmp_pruned_step_000002")
    (ckpts / "tmp_pruned_step_000002" / "model.safetensors").unlink()
    assert runfolder.latest_checkpoint(run) == ckpts / "step_000004"
    (ckpts / "step_000004" / "optimizer.safetensors").unlink()
    assert train.cli([*TINY, "--output-dir", str(run), "--resume", str(ckpts / "step_000004")]) == 2
    assert "is incomplete (missing optimizer.safetensors)" in one_error_line(capsys)


# ---- 2. nothing deleted that the suite did not write, and only after every check
def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("chapter 1")
    (folder / "sub" / "data.bin").write_bytes(b"\0" * 10)
    before = snapshot(folder)
    assert train.cli([*TINY, "--output-dir", str(folder), "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "not a train.py run's (sub, thesis.tex)" in line and "nothing was deleted" in line
    assert snapshot(folder) == before and not (folder / runfolder.LOCK_NAME).exists()


def test_overwrite_with_a_bad_value_keeps_the_finished_run(killed_copy, tmp_path, capsys):
    run = killed_copy
    shutil.copy(run / "checkpoints" / "step_000004" / "model.safetensors", run / "model.safetensors")
    before = snapshot(run)
    assert train.cli([*TINY, "--output-dir", str(run), "--overwrite", "--method", "ls", "--eps", "7"]) == 2
    assert "eps=7.0 must be" in one_error_line(capsys)
    assert snapshot(run) == before


def test_overwrite_replaces_only_the_run_files(killed_copy, tmp_path):
    run = killed_copy
    (run / "notes.txt").write_text("mine")
    assert train.cli([*TINY, "--output-dir", str(run), "--overwrite", "--max-steps", "2"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []  # the old run's checkpoints are gone


# ---- 3. every typed value is used or refused, before anything is touched
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--method", "cce", "--eps", "0.9"], "--eps is not used by --method cce (only by ls, cp, bootsoft, boothard)"),
        (["--method", "cce", "--temperature", "0.5"], "--temperature is not used by --method cce"),
        (["--method", "cce", "--exp-base", "12"], "--exp-base is not used by --method cce"),
        (["--method", "proselflc", "--gce-q", "0.3"], "--gce-q is not used by --method proselflc (only by gce)"),
        (["--method", "cce", "--elr-beta", "0.5"], "--elr-beta is not used by --method cce (only by elr)"),
        (["--method", "ls", "--detach-target"], "--detach-target is not used by --method ls"),
        (
            ["--noise", "symmetric", "--noise-rate", "0.2", "--noise-pairs", "3:5,5:3"],
            "--noise-pairs is not used by --noise symmetric (only by --noise asymmetric)",
        ),
        (
            ["--noise", "symmetric", "--noise-rate", "0.2", "--noise-file", "f.npy"],
            "--noise-file is not used by --noise symmetric",
        ),
        (["--noise", "asymmetric", "--noise-rate", "0.2", "--noise-pairs", "3:3"], "maps class 3 to itself"),
        (["--noise-seed", "3"], "--noise-seed is not used by --noise none"),
        (["--noise", "symmetric", "--noise-rate", "0.2", "--noise-seed", "-1"], "--noise-seed must be 0 or more"),
        (["--num-workers", "-1"], "--num-workers must be 0 or more"),
        (["--max-bad-fraction", "2"], "--max-bad-fraction must be in [0, 1]"),
        (["--max-bad-fraction", "nan"], "--max-bad-fraction must be in [0, 1]"),
        (["--method", "sce", "--alpha", "0", "--beta", "0"], "zero loss"),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--resume", "auto", "--overwrite"], "contradict"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode is not used without --compile"),
        (["--sync-bn"], "--sync-bn needs more than one GPU process"),
    ],
)
def test_a_value_the_run_would_not_use_is_refused(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    assert train.cli([*TINY, "--output-dir", str(out), *flags]) == 2
    assert words in one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--data-dir", "/nonexistent"], "--data-dir is not used by --dataset digits"),
        (["--synthetic-size", "50"], "--synthetic-size is not used by --dataset digits"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir /nonexistent: no such folder"),
        (["--method", "ls", "--eps", "5"], "eps=5.0 must be"),
    ],
)
def test_print_config_checks_what_a_run_checks(capsys, flags, words):
    assert train.cli(["--print-config", *flags]) == 2
    assert words in one_error_line(capsys)


def test_push_to_hub_is_checked_before_the_run(tmp_path, capsys):
    # conftest keeps the caller's HF_TOKEN, HF_HUB_OFFLINE and stored token away: no token here
    for repo, words in (("not a repo id", "is not a Hub repository id"), ("owner/name", "no Hugging Face token")):
        assert train.cli([*TINY, "--output-dir", str(tmp_path / "run"), "--push-to-hub", repo]) == 2
        assert words in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_label_file_giving_one_key_two_labels_is_refused():
    import numpy as np

    import noise

    file_keys = np.array(["00000000000000aa", "00000000000000bb", "00000000000000aa"], dtype=object)
    keys = np.array([0xAA, 0xBB], dtype=np.uint64)
    with pytest.raises(ValueError, match="key '00000000000000aa' twice with different labels \\(1 and 3\\)"):
        noise.labels_by_key(file_keys, np.array([1, 2, 3]), keys, None, "labels.csv")
    same = noise.labels_by_key(file_keys, np.array([1, 2, 1]), keys, None, "labels.csv")  # a repeated row is fine
    assert same.tolist() == [1, 2]


# ---- 4. preemption: a stop signal checkpoints the step reached; --resume auto; a restart is exact
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_the_step_reached_and_the_restart_is_exact(tmp_path, stop_signal):
    flags = [*TINY, "--max-steps", "100", "--save-every", "1000", "--eval-every", "5", "--log-every", "5"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert start_train([*flags, "--output-dir", str(whole)]).wait(timeout=300) == 0  # one thread, as the cut run below
    proc = start_train([*flags, "--output-dir", str(cut), "--resume", "auto"])
    deadline = time.time() + 300  # a guard against a run that never starts, not a speed check
    while not (cut / "metrics.jsonl").exists():  # training has begun
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(stop_signal)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = int(err.split("stopped by ")[1].split(" at step ")[1].split(":")[0])
    assert 0 < step < 100 and f"{stop_signal.name} at step {step}: checkpoint" in err
    assert runfolder.latest_checkpoint(cut).name == f"step_{step:06d}" and not (cut / runfolder.LOCK_NAME).exists()
    assert (
        start_train([*flags, "--output-dir", str(cut), "--resume", "auto"]).wait(timeout=300) == 0
    )  # the same command
    assert (cut / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert runfolder.read_metrics(cut / "metrics.jsonl") == runfolder.read_metrics(whole / "metrics.jsonl")


def test_resume_auto_starts_continues_and_leaves_a_finished_run_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "auto"]) == 0  # nothing there: a new run
    finished = snapshot(out)
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "auto"]) == 0
    assert "already holds a finished run: nothing to do" in capsys.readouterr().err
    assert snapshot(out) == finished
    (out / "model.safetensors").unlink()  # killed after its last checkpoint: continued
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    shutil.rmtree(out / "checkpoints")  # killed before its first checkpoint: started over
    (out / "model.safetensors").unlink()
    assert train.cli([*TINY, "--output-dir", str(out), "--resume", "auto"]) == 0
    assert (out / "model.safetensors").read_bytes() == finished["model.safetensors"]


def test_a_stop_signal_during_start_up_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start_train([*TINY, "--output-dir", str(out)])
    deadline = time.time() + 300  # a guard against a run that never starts, not a speed check
    while not (out / runfolder.LOCK_NAME).exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "during start-up" in err and "Exception ignored" not in err, err
    assert not (out / runfolder.LOCK_NAME).exists() and not (out / "model.safetensors").exists()


# ---- 5. one failing process ends every process, with its own message
FAIL_ON_RANK_1 = """
import errno, os, sys
sys.path.insert(0, {root!r})
import data, runfolder, train
if os.environ["RANK"] == "1":
    if {where!r} == "checkpoint":
        def full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        runfolder.save_rng_state = full
    else:
        real = data.TrainBatches.__iter__
        def bad_images(self):
            for i, batch in enumerate(real(self)):
                if i == 3:
                    raise ValueError("more than 1% of the training images are unreadable on this process (rank 1)")
                yield batch
        data.TrainBatches.__iter__ = bad_images
runfolder.leave(train.cli())
"""


@pytest.mark.parametrize("where", ["checkpoint", "batches"])
def test_an_error_on_rank_1_alone_ends_both_processes_with_its_line(tmp_path, where):
    script, out = tmp_path / "fail.py", tmp_path / "run"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT), where=where))
    # timeout: a process left waiting on its failed peer would wait for the process group's 30-minute timeout
    proc = run_script(*TORCHRUN, str(script), *TINY, "--max-steps", "20", "--save-every", "4", "--output-dir", str(out))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert ("No space left on device" if where == "checkpoint" else "unreadable on this process (rank 1)") in errors[0]
    assert not (out / runfolder.LOCK_NAME).exists()
    ours = [f'File "{ROOT / name}' for name in ("train.py", "runfolder.py", "data.py", str(script))]
    assert not any(frame in proc.stderr for frame in ours)  # torchrun reports the failed child; no traceback of ours


# ---- eval.py and sweep.py: the same contract
def eval_script(argv: list[str]) -> tuple[int, list[str]]:
    proc = run_script("eval.py", *argv)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def test_eval_refuses_flags_of_another_use_and_unwritable_outputs(killed_copy, tmp_path):
    run = killed_copy
    (tmp_path / "a_folder").mkdir()
    cases = [
        ([str(run), "--relabel", "r.csv"], "--relabel is not used by evaluation (only by --audit)"),
        ([str(run), "--csv", "c.csv"], "--csv is not used by evaluation (only by --table)"),
        (["--plot", str(run), "--out", str(tmp_path / "a_folder")], "is a folder: name a file in it"),
        (["--audit", str(run), "--drop", str(tmp_path / "a_folder")], "--drop"),
        (["--table", str(run), "--csv", str(tmp_path / "nowhere" / "t.csv")], "no folder"),
        (["--plot", str(run), "--json"], "--json is not used by --plot"),
    ]
    before = snapshot(run)
    for argv, words in cases:
        code, lines = eval_script(argv)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, lines)
    assert snapshot(run) == before and not (tmp_path / "a_folder.png").exists()


def test_eval_refuses_a_metrics_line_that_is_not_an_object(killed_copy, tmp_path):
    run = killed_copy
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n7\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 4 holds a JSON list"):
        runfolder.load_run(run)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--settings", "symmetric:1.5"], "--noise-rate must be in [0, 1), got 1.5"),
        (["--seeds", "-1"], "--seed must be 0"),
        (["--budgets", "0"], "--budgets 0: each is a number of steps >= 1"),
        (["--eps", "-1"], "eps=-1.0 must be"),
        (["--gpus", "abc"], "--gpus 'abc'"),
        (["--output-root", "FILE"], "is a file"),
        (["--", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--methods", "cce", "--", "--eps", "0.3"], "--eps is not used by --method cce"),
        (["--runs-per-gpu", "2"], "with --gpus"),
    ],
)
def test_sweep_dry_run_checks_every_run_as_train_py_would(tmp_path, flags, words):
    (tmp_path / "FILE").write_text("x")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    root = ["--output-root", str(tmp_path / "sweep")] if "--output-root" not in flags else []
    before = flags.index("--") if "--" in flags else len(flags)
    proc = run_script("sweep.py", "--dry-run", *root, *flags[:before], *flags[before:], timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (proc.stdout[-500:], lines)
    assert not proc.stdout.strip()
