"""Issue 26: a run folder is known by its mark, every file the suite reads is checked whole (regular files only)
before anything is written, a staging folder is the suite's own, Ctrl-C stops as SIGTERM does."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, ROOT, TINY, one_error_line, snapshot, start_train
from safetensors.torch import load_file, save_file

import audit
import config
import eval as ev
import hub
import runfolder
import train

STEP = Path("checkpoints") / "step_000004"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("files") / "run"
    assert train.cli([*TINY, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def killed(finished, tmp_path) -> Path:
    """A copy of the run, killed after its step-4 checkpoint: resumable."""
    run = Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))
    (run / "model.safetensors").unlink()
    return run


def refused_by_train(argv: list[str], capsys, folder: Path, *words: str) -> str:
    """train.py refuses argv with one line holding words, and folder is byte-identical afterwards."""
    before = snapshot(folder)
    assert train.cli(argv) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert snapshot(folder) == before
    return line


def resume(run: Path) -> list[str]:
    return [*TINY, "--output-dir", str(run), "--resume", "latest"]


# ---- 1. a run folder is known by its mark
def test_a_run_folder_holds_the_suites_mark(finished):
    assert json.loads((finished / runfolder.MARK_NAMES["run"]).read_text()) == runfolder.MARK
    assert set(json.loads((finished / "config.json").read_text())) == set(runfolder.RUN_CONFIG)  # the schema is whole


@pytest.mark.parametrize("mode", [[], ["--overwrite"], ["--resume", "auto"], ["--resume", "latest"]])
@pytest.mark.parametrize("mark", [None, '{"suite": "other", "format": 1}', "[]"])
def test_a_users_folder_with_run_file_names_is_never_touched(tmp_path, capsys, mode, mark):
    user = tmp_path / "hf_model"
    (user / "checkpoints").mkdir(parents=True)
    (user / "config.json").write_text('{"architectures": ["Bert"]}')
    (user / "metrics.jsonl").write_text('{"step": 1}\n')
    (user / "model.safetensors").write_bytes(b"weights")
    (user / "checkpoints" / "epoch10.ckpt").write_bytes(b"mine")
    if mark is not None:
        (user / runfolder.MARK_NAMES["run"]).write_text(mark)
    refused_by_train([*TINY, "--output-dir", str(user), *mode], capsys, user, "not a run folder of this suite")
    assert not (user / runfolder.LOCK_NAME).exists()


def test_overwrite_deletes_only_what_the_run_wrote(killed, capsys):
    (killed / "checkpoints" / "epoch10.ckpt").write_bytes(b"mine")
    (killed / "notes.txt").write_text("mine")
    assert train.cli([*TINY, "--output-dir", str(killed), "--overwrite", "--max-steps", "2"]) == 0
    assert (killed / "checkpoints" / "epoch10.ckpt").read_bytes() == b"mine" and (killed / "notes.txt").exists()
    assert runfolder.is_run_folder(killed) and not (killed / STEP).exists()


def test_resume_empty_is_refused(tmp_path, capsys):
    assert train.cli([*TINY, "--output-dir", str(tmp_path / "run"), "--resume", ""]) == 2
    assert "--resume '' names no checkpoint" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---- 2. every file read is checked whole, before anything is written
@pytest.mark.parametrize("step", ['"4"', "4.0", "null", "1e30", str(10**30), "-1", "true", "3", "6", "NaN"])
def test_a_trainer_state_step_that_the_suite_never_writes_is_refused(killed, capsys, step):
    path = killed / STEP / "trainer_state.json"
    path.write_text(path.read_text().replace('"step": 4', f'"step": {step}'))
    refused_by_train(resume(killed), capsys, killed, "trainer_state.json", "'step'")
    assert not (killed / "model.safetensors").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ("[]", "holds a JSON list"),
        ('{"step": 4}', "lacks the field"),
        ("{", "not readable JSON"),
        (
            '{"step": 4, "step": 4, "best_acc": 0, "best_step": 0, "loss_sum": 0, "eps_sum": 0, "n_sum": 0, "scaler": null}',
            "a key appears twice",
        ),
    ],
)
def test_a_trainer_state_of_another_shape_is_refused(killed, capsys, text, words):
    (killed / STEP / "trainer_state.json").write_text(text)
    refused_by_train(resume(killed), capsys, killed, "trainer_state.json", words)


def test_a_trainer_state_with_an_extra_field_is_refused(killed, capsys):
    path = killed / STEP / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"lr": 5.0}))
    refused_by_train(resume(killed), capsys, killed, "trainer_state.json", "has the field 'lr'")


def rewrite(path: Path, tensors=None, **metadata) -> None:
    """Write path again with other tensors and/or metadata fields."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    old = load_file(str(path))
    save_file(old if tensors is None else tensors(old), str(path), metadata={**meta, **metadata} or None)


def groups(path: Path, change) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        value = json.loads(f.metadata()["param_groups"])
    return json.dumps(change(value))


@pytest.mark.parametrize(
    "field, change, words",
    [
        ("param_groups", lambda g: [g[0] | {"momentum": "0.9"}], "'momentum' = '0.9' differs from this run's 0.9"),
        ("param_groups", lambda g: [g[0] | {"momentum": 0.5}], "'momentum' = 0.5 differs"),
        ("param_groups", lambda g: [g[0] | {"weight_decay": 0.1}], "'weight_decay' = 0.1 differs"),
        ("param_groups", lambda g: [g[0] | {"lr": "big"}], "'lr' = 'big'"),
        ("param_groups", lambda g: g * 2, "is not the 1 group(s)"),
        ("param_groups", lambda g: None, "is not the 1 group(s)"),
        ("param_groups", lambda g: g[0], "is not the 1 group(s)"),
        ("param_groups", lambda g: [g[0] | {"extra": 1}], "has the field 'extra'"),
        ("scalars", None, "scalars is not readable JSON"),
    ],
)
def test_optimizer_metadata_the_suite_never_writes_is_refused(killed, capsys, field, change, words):
    path = killed / STEP / "optimizer.safetensors"
    rewrite(path, **{field: groups(path, change) if change else "{"})
    refused_by_train(resume(killed), capsys, killed, "optimizer.safetensors", words)


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("model.safetensors", lambda t: {k: v.to(torch.int8) for k, v in t.items()}, "is int8"),
        ("model.safetensors", lambda t: {k: v.bool() for k, v in t.items()}, "is bool"),
        ("model.safetensors", lambda t: t | {"extra": torch.zeros(1)}, "holds the tensor 'extra'"),
        ("model.safetensors", lambda t: dict(list(t.items())[1:]), "lacks the tensor"),
        (
            "model.safetensors",
            lambda t: {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in t.items()},
            "NaN or infinite",
        ),
        ("model.safetensors", lambda t: {k: v.flatten() for k, v in t.items()}, "this run's is"),
        ("optimizer.safetensors", lambda t: {k: v.half() for k, v in t.items()}, "is float16"),
        ("optimizer.safetensors", lambda t: t | {"99.momentum_buffer": torch.zeros(1)}, "belongs to no parameter"),
        ("optimizer.safetensors", lambda t: {k: v * float("inf") for k, v in t.items()}, "NaN or infinite"),
        (
            "state.safetensors",
            lambda t: {k: v.double() if v.is_floating_point() else v for k, v in t.items()},
            "is float64",
        ),
        ("rng_0.safetensors", lambda t: t | {"numpy": -t["numpy"] - 1}, "outside [0, 2^32)"),
        ("rng_0.safetensors", lambda t: t | {"torch": t["torch"].int()}, "tensor 'torch' is int32"),
    ],
)
def test_tensors_the_run_never_writes_are_refused(killed, capsys, name, change, words):
    rewrite(killed / STEP / name, change)
    refused_by_train(resume(killed), capsys, killed, name, words)


def test_a_checkpoint_config_without_a_dataset_is_refused(killed, capsys):
    path = killed / STEP / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["dataset"]
    path.write_text(json.dumps(cfg))
    refused_by_train(resume(killed), capsys, killed, "config.json", "lacks the field 'dataset'")


def test_a_metrics_line_that_is_not_an_object_is_refused_before_the_resume_cuts_it(killed, capsys):
    with open(killed / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    refused_by_train(resume(killed), capsys, killed, "metrics.jsonl line 4", "holds a JSON list")


@pytest.mark.parametrize("target", ["fifo", "link_to_fifo", "link_out", "folder"])
def test_a_checkpoint_file_that_is_not_a_regular_file_inside_it_is_refused_without_waiting(killed, tmp_path, target):
    rng = killed / STEP / "rng_0.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(rng, outside)
    rng.unlink()
    if target == "fifo":
        os.mkfifo(rng)
    elif target == "link_to_fifo":
        os.mkfifo(tmp_path / "fifo")
        rng.symlink_to(tmp_path / "fifo")
    elif target == "link_out":
        rng.symlink_to(outside)
    else:
        rng.mkdir()
    proc = subprocess.run(
        [sys.executable, "train.py", *resume(killed)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )  # a FIFO opened for reading would block forever
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert proc.returncode == 2 and len(lines) == 1 and "rng_0.safetensors" in lines[0], proc.stderr
    assert ("link leading out" if target == "link_out" else "not a regular file") in lines[0]
    assert not (killed / "model.safetensors").exists()


# ---- eval.py: the same readers
def eval_refusal(argv: list[str], capsys) -> tuple[int, str | None]:
    code = runfolder.run_cli(lambda: ev.main(argv))
    return code, (one_error_line(capsys) if code else None)


@pytest.mark.parametrize("use", ["--plot", "--table"])
def test_eval_refuses_a_metrics_line_that_is_not_an_object(finished, tmp_path, capsys, use):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("7\n")
    code, line = eval_refusal([use, str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "metrics.jsonl line 4" in line and "holds a JSON int" in line
    assert not (tmp_path / "out").exists()


def test_eval_drops_only_a_last_line_cut_short(finished, tmp_path):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lr"')
    assert [m["step"] for m in runfolder.load_run(run).metrics] == [2, 4, 6]


def dynamics_case(path: Path, change: str) -> None:
    t, n = load_file(str(path)), None
    n = len(t["label"])
    edits = {
        "classes": lambda: t | {"early_prob_sum": torch.zeros(n, 3)},
        "negative_labels": lambda: t | {"label": -t["label"] - 1},
        "2d_counts": lambda: t | {"count": t["count"][:, None]},
        "zero_counts": lambda: t | {"count": torch.zeros_like(t["count"])},
        "nan": lambda: t | {"margin_sum": t["margin_sum"] * float("nan")},
        "inf": lambda: t | {"early_prob_sum": t["early_prob_sum"] + float("inf")},
        "float_labels": lambda: t | {"label": t["label"].float()},
        "extra": lambda: t | {"extra": torch.zeros(1)},
    }
    if change == "integer_keys":
        rewrite(path, rows="stream_subset", keys=json.dumps(list(range(n))))
    elif change == "meta":
        rewrite(path, other="1")
    else:
        save_file(edits[change](), str(path), metadata=dict(json.loads(json.dumps(_meta(path)))))


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize(
    "change",
    [
        "classes",
        "negative_labels",
        "2d_counts",
        "zero_counts",
        "nan",
        "inf",
        "float_labels",
        "extra",
        "integer_keys",
        "meta",
    ],
)
def test_crafted_audit_statistics_are_refused(finished, tmp_path, change):
    path = Path(shutil.copy(finished / "dynamics.safetensors", tmp_path / "dynamics.safetensors"))
    audit.read_dynamics_file(path, 10)  # as written: accepted
    dynamics_case(path, change)
    with pytest.raises(ValueError, match="dynamics.safetensors"):
        audit.read_dynamics_file(path, 10)


def test_eval_audit_refuses_crafted_statistics_in_one_line(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    dynamics_case(run / "dynamics.safetensors", "negative_labels")
    before = snapshot(run)
    code, line = eval_refusal(["--audit", str(run), "--cpu"], capsys)
    assert code == 2 and "dynamics.safetensors: field 'label'" in line
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "file, edit, words",
    [
        (
            "config.json",
            lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "dataset"}),
            "lacks the field 'dataset'",
        ),
        (
            "metrics.jsonl",
            lambda t: "".join(
                json.dumps({k: v for k, v in json.loads(line).items() if k != "test_acc"}) + "\n"
                for line in t.splitlines()
            ),
            "lacks the field 'test_acc'",
        ),
        ("noise.json", lambda t: json.dumps(json.loads(t) | {"num_classes": "10"}), "'num_classes'"),
    ],
)
def test_push_refuses_a_run_file_the_suite_never_wrote(finished, tmp_path, capsys, file, edit, words):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / file).write_text(edit((run / file).read_text()))
    code, line = eval_refusal(["--push-to-hub", str(run), "--repo-id", "me/run", "--dry-run"], capsys)
    assert code == 2 and file in line and words in line, line
    assert not (tmp_path / "run-hub").exists()


# ---- the staging folder of a push is the suite's own
def test_a_staging_folder_is_the_suites_own(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    push = ["--push-to-hub", str(run), "--repo-id", "me/run", "--dry-run"]
    default = tmp_path / "run-hub"
    default.mkdir()
    (default / "README.md").write_text("my notes")
    code, line = eval_refusal(push, capsys)
    assert code == 2 and "was not staged by this suite" in line and (default / "README.md").read_text() == "my notes"
    other = Path(shutil.copytree(finished, tmp_path / "other"))  # another run's files, not staged here
    code, line = eval_refusal([*push, "--stage-dir", str(other)], capsys)
    assert code == 2 and "was not staged by this suite" in line and runfolder.is_run_folder(other)
    stage = tmp_path / "stage"
    for _ in range(2):  # new, then staged again over its own staging
        assert eval_refusal([*push, "--stage-dir", str(stage)], capsys) == (0, None)
        assert runfolder.has_mark(stage, "stage") and hub.STAGE_MARK not in capsys.readouterr().out
    (stage / "mine.txt").write_text("mine")
    code, line = eval_refusal([*push, "--stage-dir", str(stage)], capsys)
    assert code == 2 and "did not stage (mine.txt)" in line and (stage / "mine.txt").exists()
    assert (stage / "model.safetensors").exists()  # refused before anything was removed


# ---- 3. --resume auto on a finished run
def test_resume_auto_on_a_finished_run_compares_the_settings(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    refused_by_train(
        [*TINY, "--output-dir", str(run), "--resume", "auto", "--lr", "0.5"], capsys, run, "--lr 0.1 -> 0.5"
    )
    refused_by_train([*TINY, "--output-dir", str(run), "--resume", "auto", "--method", "cce"], capsys, run, "--method")


def test_resume_auto_retries_a_push_that_failed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    pushed = []

    def fail(stage_dir, repo_id, private):
        raise ValueError("cannot push to the Hub as me/run (offline)")

    monkeypatch.setattr(hub, "upload", fail)
    out = tmp_path / "run"
    argv = [*TINY, "--output-dir", str(out), "--resume", "auto", "--push-to-hub", "me/run"]
    assert train.cli(argv) == 2 and "cannot push" in one_error_line(capsys)
    assert runfolder.is_finished(out) and not (out / runfolder.PUSH_RECORD).exists()
    monkeypatch.setattr(hub, "upload", lambda stage_dir, repo_id, private: pushed.append(repo_id) or "url")
    assert train.cli(argv) == 0 and pushed == ["me/run"]
    assert json.loads((out / runfolder.PUSH_RECORD).read_text()) == {"repo_id": "me/run"}
    assert train.cli(argv) == 0 and pushed == ["me/run"]  # pushed once: nothing to do
    assert "nothing to do" in capsys.readouterr().err


# ---- 4. Ctrl-C stops as SIGTERM does; a second signal adds no line
@pytest.mark.parametrize("signals, code", [((signal.SIGINT,), 130), ((signal.SIGTERM, signal.SIGTERM), 143)])
def test_ctrl_c_and_a_second_signal(tmp_path, signals, code):
    out = tmp_path / "run"
    proc = start_train(
        [
            *TINY,
            "--max-steps",
            "100",
            "--save-every",
            "1000",
            "--eval-every",
            "5",
            "--log-every",
            "5",
            "--output-dir",
            str(out),
        ]
    )
    deadline = time.time() + 300  # a guard against a run that never starts
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    for s in signals:
        proc.send_signal(s)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and "at step" in lines[0], err
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    assert runfolder.latest_checkpoint(out).name == f"step_{step:06d}"


# ---- 5. resolve refuses what train.py would refuse later, and values nothing reads
@pytest.mark.parametrize(
    "flags, env, words",
    [
        (["--noise", "symmetric"], {}, "--noise symmetric needs --noise-rate above 0"),
        (["--noise", "pairflip", "--noise-rate", "0"], {}, "--noise pairflip needs --noise-rate above 0"),
        (["--compile", "--compile-mode", "reduce-overhead"], {}, "reduce-overhead records CUDA graphs"),
        (["--num-workers", "2"], {}, "--num-workers is not used by --dataset synthetic"),
        ([], {"WORLD_SIZE": "3"}, "--batch-size 32 must be divisible by processes x accumulation steps = 3"),
        (["--sync-bn"], {}, "--sync-bn needs more than one GPU process"),
    ],
)
def test_resolve_refuses_before_anything_runs(tmp_path, capsys, monkeypatch, flags, env, words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=None) as e:
        config.resolve([*TINY, "--output-dir", str(tmp_path / "run"), *flags])
    assert words in str(e.value)
    assert not (tmp_path / "run").exists()


def test_resolve_refuses_a_tracker_that_is_not_installed(monkeypatch):
    monkeypatch.setattr(config, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="--report-to tensorboard: the tensorboard package is not installed"):
        config.resolve([*TINY, "--report-to", "tensorboard"])
