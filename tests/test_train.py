"""End-to-end tests of train.py: it learns, writes its files, scales to two processes, resumes exactly, and
refuses bad input with one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC, TORCHRUN, kill_once_written, read_metrics, run_script
from safetensors.torch import load_file

import data
import losses
import models
import train


def test_clean_digits_learns_and_writes_every_file(clean_digits_run):
    out, lines = clean_digits_run
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [100, 200, 300]
    assert metrics[-1]["test_acc"] > 0.9  # chance is 0.1
    assert metrics[-1]["test_examples"] == 360  # the whole clean test split, once
    for key in ("step", "lr", "train_loss", "test_acc", "test_loss", "epsilon"):
        assert key in metrics[-1]
    config = json.loads((out / "config.json").read_text())
    for key in (
        "method",
        "max_steps",
        "batch_size",
        "lr",
        "milestones",
        "seed",
        "noise_seed",
        "exp_base",
        "num_classes",
        "in_channels",
        "total_steps",
        "versions",
        "git_commit",
    ):
        assert key in config
    assert config["milestones"] == "150,220" and config["versions"]["torch"] == torch.__version__
    assert json.loads((out / "noise.json").read_text())
    assert (out / "checkpoints" / "step_000150" / "trainer_state.json").exists()
    final = lines[-1]
    assert final.startswith(f"final test_acc={metrics[-1]['test_acc']:.4f} best_test_acc=")


def test_saved_model_reproduces_the_reported_accuracy(clean_digits_run):
    out, _ = clean_digits_run
    config = json.loads((out / "config.json").read_text())
    model = models.build_model(config["model"], config["num_classes"], config["in_channels"])
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    _, test_ds, info = data.prepare_data(config)
    test = data.to_tensors(test_ds)
    with torch.no_grad():
        pred = model.eval()(data.normalize(test["image"], info.mean, info.std)).argmax(1)
    acc = (pred == test["label"]).float().mean().item()
    assert acc == pytest.approx(read_metrics(out)[-1]["test_acc"], abs=1e-6)


@pytest.mark.parametrize("method", losses.METHODS)
def test_every_method_trains_on_noisy_synthetic_data(tmp_path, method):
    out = tmp_path / method
    rc = train.cli(
        [
            "--cpu",
            *SYNTHETIC,
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--method",
            method,
            "--noise",
            "symmetric",
            "--noise-rate",
            "0.4",
            "--gradient-accumulation-steps",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    last = read_metrics(out)[-1]
    assert last["step"] == 6 and last["process_steps"] == [6]
    for key in ("clean_fit", "noisy_fit", "noisy_correct", "entropy_clean", "entropy_noisy"):
        assert 0.0 <= last[key] <= 1.0, key
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    if method == "proselflc":
        assert 0.0 < last["epsilon"] < 1.0  # eps_i = g(t) l(p_i), averaged over the steps since the last evaluation
    elif method in ("ls", "cp", "bootsoft", "boothard"):
        assert last["epsilon"] == pytest.approx(0.25)


def test_streaming_run_learns_the_same_task(tmp_path):
    """A streamed training split with label noise learns: accuracy on the (map-style) clean test split far above
    chance after 40 steps (about 0.75 here), every test example counted once."""
    out = tmp_path / "stream"
    rc = train.cli(
        [
            "--cpu",
            *SYNTHETIC,
            "--streaming",
            "--max-steps",
            "40",
            "--eval-every",
            "20",
            "--noise",
            "symmetric",
            "--noise-rate",
            "0.2",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [20, 40]
    assert metrics[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert metrics[-1]["test_examples"] == 51  # the synthetic test split (a fifth of --synthetic-size), each once


def test_two_cpu_processes_share_t_and_count_every_test_example_once(tmp_path):
    out = tmp_path / "ddp"
    proc = run_script(
        *TORCHRUN,
        "train.py",
        "--cpu",
        "--max-steps",
        "40",
        "--eval-every",
        "20",
        "--save-every",
        "20",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.2",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["process_steps"] for m in metrics] == [[20, 20], [40, 40]]
    assert all(m["test_examples"] == 360 for m in metrics)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints" / "step_000020").glob("rng_*")) == [
        "rng_0.safetensors",
        "rng_1.safetensors",
    ]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    flags = [
        "train.py",
        "--cpu",
        "--deterministic",
        "--max-steps",
        "600",
        "--eval-every",
        "100",
        "--save-every",
        "100",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
    ]
    whole = tmp_path / "whole"
    assert run_script(*flags, "--output-dir", str(whole)).returncode == 0

    cut = tmp_path / "cut"
    kill_once_written([*flags, "--output-dir", str(cut)], cut / "checkpoints" / "step_000200" / "trainer_state.json")
    assert not (cut / "model.safetensors").exists(), "the run finished before it could be killed"

    resumed = run_script(*flags, "--output-dir", str(cut), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step " in resumed.stdout
    assert read_metrics(cut) == read_metrics(whole)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latest_without_a_complete_checkpoint_is_an_error(tmp_path, capsys):
    rc = train.cli(["--cpu", "--resume", "latest", "--output-dir", str(tmp_path / "empty")])
    assert rc == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train.cli(
            [
                "--cpu",
                *SYNTHETIC,
                "--max-steps",
                "4",
                "--save-every",
                "2",
                "--eval-every",
                "4",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    ckpt = out / "checkpoints" / "step_000002"
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    rc = train.cli(
        [
            "--cpu",
            *SYNTHETIC,
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--eval-every",
            "4",
            "--output-dir",
            str(out),
            "--resume",
            str(ckpt),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "corrupt" in err[0]


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, capsys):
    rc = train.cli(
        [
            "--cpu",
            *SYNTHETIC,
            "--method",
            "cce",
            "--lr",
            "1e30",
            "--max-steps",
            "40",
            "--log-every",
            "5",
            "--output-dir",
            str(tmp_path / "nan"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: loss is not finite at step ")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "focal"], "unknown method 'focal'"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--dataset", "no_such_dataset_dir/x.parquet"], "no_such_dataset_dir"),
        (["--noise", "symmetric", "--noise-rate", "1.5"], "--noise-rate"),
        (["--noise", "asymmetric", "--noise-rate", "0.2"], "pairs"),
        (["--milestones", "100,5000"], "--milestones"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--resume", "/nonexistent/ckpt"], "no such checkpoint"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, flags, message):
    rc = train.cli(["--cpu", "--output-dir", str(tmp_path / "bad"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_finished_run_is_not_overwritten_without_overwrite(clean_digits_run, capsys):
    out, _ = clean_digits_run
    before = (out / "metrics.jsonl").read_text()
    assert train.cli(["--cpu", "--output-dir", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_the_command_line_prints_one_line_for_bad_input():
    proc = run_script("train.py", "--method", "focal", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown method 'focal': choose one of {', '.join(losses.METHODS)}"
    ]


def test_resume_with_other_hyperparameters_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [
        "--cpu",
        *SYNTHETIC,
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--output-dir",
        str(out),
    ]
    assert train.cli(flags) == 0
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert train.cli([*flags, "--resume", "latest", "--method", "cce"]) == 2
    err = capsys.readouterr().err
    assert "started with other settings" in err and "--method 'proselflc' -> 'cce'" in err


def elr_targets_of(checkpoint: Path) -> torch.Tensor:
    """The running targets in a checkpoint's own state (state.safetensors, 'loss.elr_targets')."""
    return load_file(str(checkpoint / "state.safetensors"))["loss.elr_targets"]


def test_elr_on_two_cpu_processes_keeps_one_set_of_running_targets(tmp_path):
    """Each process updates its own rows; after every step all copies hold every process's rows."""
    out = tmp_path / "elr-ddp"
    proc = run_script(
        *TORCHRUN,
        "train.py",
        "--cpu",
        "--method",
        "elr",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.2",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["elr_beta"], config["elr_lambda"]) == (0.7, 3.0)  # 10 classes
    targets = elr_targets_of(out / "checkpoints" / "step_000002")  # process 0's copy
    seen = torch.zeros(len(targets), dtype=torch.bool)
    for step in range(2):  # both processes' halves of the first two global batches
        for rank in range(2):
            seen[data.step_rows(len(targets), config["batch_size"], config["seed"], step, rank, 2)] = True
    assert torch.equal(targets.sum(1) > 0, seen)
    assert torch.allclose(targets[seen].sum(1), torch.tensor(0.3), atol=1e-6)  # one update each: (1 - beta)


def test_elr_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """The running targets are restored with the checkpoint: the resumed run ends byte-identical."""
    flags = [
        "--cpu",
        "--deterministic",
        *SYNTHETIC,
        "--method",
        "elr",
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--save-every",
        "4",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.cli([*flags, "--output-dir", str(whole)]) == 0
    assert elr_targets_of(whole / "checkpoints" / "step_000004").sum() > 0
    # the state a kill right after the step-4 checkpoint leaves behind
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_000004", cut / "checkpoints" / "step_000004")
    shutil.copy(whole / "proselflc-run.json", cut)  # the suite's mark: a folder without it is never a run
    config = json.loads((whole / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**config, "output_dir": str(cut)}))
    (cut / "metrics.jsonl").write_text((whole / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    assert train.cli([*flags, "--output-dir", str(cut), "--resume", "latest"]) == 0
    assert read_metrics(cut) == read_metrics(whole)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_elr_streaming_without_a_key_column_is_an_error(tmp_path, capsys):
    rc = train.cli(["--cpu", *SYNTHETIC, "--streaming", "--method", "elr", "--output-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--method elr with --streaming needs --key-column" in err[0], err
