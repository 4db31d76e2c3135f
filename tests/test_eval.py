"""Tests of eval.py and sweep.py: the table and plot on fabricated run folders, model evaluation and the
label audit on the quick-start digits run (trained once per session), and every bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TORCHRUN, assert_one_error_line, data_config, run_script
from PIL import Image
from safetensors.torch import save_file

import eval as ev
import models
import report
import runfolder
import sweep


def fake_run(
    root: Path,
    method: str,
    noise: str,
    rate: float,
    seed: int,
    acc: float,
    eps: float = 0.25,
    steps: int = 100,
    finished: bool = True,
    curve: float = 1.0,
) -> Path:
    """A run folder as train.py writes it: config.json and metrics.jsonl with 5 evaluations ending at `acc`."""
    path = root / f"digits-{noise}-{rate:g}-{method}-eps{eps:g}-seed{seed}"
    path.mkdir(parents=True)
    recorded = {
        "device": "cpu",
        "input_path": "memory",
        "world_size": 1,
        "versions": {},
        "git_commit": None,
        "mixed_precision": "no",
        "sync_bn": False,
    }  # what train.py adds once the run starts
    cfg = (
        {k: v for k, v in data_config().items() if k != "print_config"}
        | recorded
        | {
            "dataset": "digits",
            "noise": noise,
            "noise_rate": rate,
            "method": method,
            "eps": eps,
            "seed": seed,
            "exp_base": 10.0,
            "model": "digits_cnn",
            "num_classes": 10,
            "in_channels": 1,
            "max_steps": steps,
            "total_steps": steps,
            "batch_size": 128,
            "lr": 0.1,
        }
    )
    (path / "config.json").write_text(json.dumps(cfg))
    last = 5 if finished else 3
    lines = []
    for k in range(1, last + 1):
        m = {
            "step": steps * k // 5,
            "lr": 0.1,
            "train_loss": 2.0 / k * curve,
            "test_acc": acc * k / 5 if k < 5 else acc,
            "test_loss": 1.0 / k,
            "epsilon": 0.1 * k * curve,
            "test_examples": 360,
            "process_steps": [steps * k // 5],
            "bad_images": 0,
        }
        if noise != "none":
            m |= {
                "clean_fit": 0.9 * k / 5,
                "noisy_fit": 0.1 * k * curve,
                "noisy_correct": 0.5 * curve,
                "entropy_clean": 0.5 / k,
                "entropy_noisy": 0.6 / k * curve,
            }
        lines.append(json.dumps(m))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:  # train.py writes the final model last: it marks a run finished
        (path / "model.safetensors").write_bytes(b"x")
    return path


@pytest.fixture()
def grid(tmp_path: Path) -> Path:
    """Fabricated Table 4 grid: 3 methods, 3 settings, up to 3 seeds, one unfinished run, one missing cell."""
    root = tmp_path / "runs"
    for seed, acc in enumerate((0.50, 0.52, 0.54)):
        fake_run(root, "cce", "symmetric", 0.4, seed, acc)
    for seed, acc in enumerate((0.60, 0.62)):
        fake_run(root, "proselflc", "symmetric", 0.4, seed, acc)
    fake_run(root, "proselflc", "symmetric", 0.4, 2, 0.10, finished=False)  # not finished: left out
    fake_run(root, "ls", "symmetric", 0.4, 0, 0.58)
    fake_run(root, "cce", "symmetric", 0.2, 0, 0.70)
    fake_run(root, "ls", "symmetric", 0.2, 0, 0.75)
    fake_run(root, "proselflc", "symmetric", 0.2, 0, 0.75)  # a tie at the column best: both bold
    fake_run(root, "cce", "asymmetric", 0.2, 0, 0.66)
    fake_run(root, "proselflc", "asymmetric", 0.2, 0, 0.68)
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Markdown table -> {first cell: other cells}, header included."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_cells_means_stds_and_bold(grid: Path, tmp_path: Path) -> None:
    proc = run_script(
        "eval.py", "--table", str(grid), "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "t.md")
    )
    assert proc.returncode == 0, proc.stderr
    assert "unfinished" in proc.stderr  # the killed run is reported, not tabulated
    rows = table_rows(proc.stdout)
    assert rows["Method"] == ["asymmetric r=0.2", "symmetric r=0.2", "symmetric r=0.4"]  # Table 4 column order
    assert list(rows)[1:] == ["CCE", "LS", "ProSelfLC"]  # Table 4 row order
    assert rows["CCE"] == ["66.0", "70.0", "52.0 ± 2.0"]  # mean and sample std of 50, 52, 54
    assert rows["LS"] == ["–", "**75.0**", "58.0"]
    assert rows["ProSelfLC"] == ["**68.0**", "**75.0**", "**61.0 ± 1.4**"]  # std of 60, 62 = 1.41
    assert (tmp_path / "t.md").read_text() == proc.stdout
    with open(tmp_path / "t.csv") as f:
        cells = {(r["method"], r["noise"], float(r["noise_rate"])): r for r in csv.DictReader(f)}
    assert len(cells) == 8
    c = cells[("proselflc", "symmetric", 0.4)]
    assert (c["n_seeds"], c["seeds"]) == ("2", "0 1")
    assert float(c["mean_acc"]) == pytest.approx(61.0) and float(c["std_acc"]) == pytest.approx(2**0.5, abs=1e-4)


def test_budget_table_shows_accuracy_and_memorisation_per_budget(tmp_path: Path) -> None:
    for steps, acc in ((300, 0.90), (1500, 0.70)):
        for seed in (0, 1):
            fake_run(tmp_path / f"T{steps}", "cce", "symmetric", 0.4, seed, acc + seed / 100, steps=steps)
    rows = table_rows(report.budget_table(runfolder.finished_runs([str(tmp_path)])))
    assert rows["Method"] == [
        "symmetric r=0.4 T=300 test acc",
        "symmetric r=0.4 T=300 noisy_fit",
        "symmetric r=0.4 T=1500 test acc",
        "symmetric r=0.4 T=1500 noisy_fit",
    ]
    assert rows["CCE"] == ["**90.5 ± 0.7**", "50.0 ± 0.0", "**70.5 ± 0.7**", "50.0 ± 0.0"]


def test_table_eps_rows_and_best_eps(tmp_path: Path) -> None:
    for eps, acc in ((0.125, 0.55), (0.5, 0.59)):
        fake_run(tmp_path, "ls", "symmetric", 0.4, 0, acc, eps=eps)
    fake_run(tmp_path, "cce", "symmetric", 0.4, 0, 0.57)
    runs = runfolder.finished_runs([str(tmp_path)])
    rows = table_rows(report.markdown_table(report.collect_cells(runs)))
    assert rows["LS (ε=0.125)"] == ["55.0"] and rows["LS (ε=0.5)"] == ["**59.0**"]
    rows = table_rows(report.markdown_table(report.collect_cells(runs, best_eps=True), best_eps=True))
    assert rows["LS"] == ["**59.0 (ε=0.5)**"] and rows["CCE"] == ["57.0"]


def test_plot_panels_size_and_runs_differ(grid: Path, tmp_path: Path) -> None:
    runs_a = [runfolder.load_run(p) for p in sorted(grid.glob("digits-symmetric-0.4-cce-*"))]
    out_a = tmp_path / "a.png"
    proc = run_script("eval.py", "--plot", *map(str, (r.path for r in runs_a)), "--out", str(out_a))
    assert proc.returncode == 0, proc.stderr
    fig = report.plot_runs(runs_a, tmp_path / "a2.png")
    titles = [ax.get_title() for ax in fig.axes]
    for key in (
        "Generalisation",
        "Memorisation",
        "Correction",
        "clean subset",
        "Entropy: clean",
        "Entropy: noisy",
        "epsilon",
    ):
        assert any(key.lower() in (t + " " + ax.get_ylabel()).lower() for t, ax in zip(titles, fig.axes)), key
    for ax in fig.axes[:7]:
        assert len(ax.get_lines()) == len(runs_a)  # one line per run in every panel
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert labels == {"CCE seed 0", "CCE seed 1", "CCE seed 2"}  # method, plus the seed because it varies
    image_a = np.asarray(Image.open(out_a))
    assert image_a.shape[:2] == (850, 1800)
    assert image_a.std() > 10  # not blank
    other = [fake_run(tmp_path / "other", "proselflc", "symmetric", 0.4, 0, 0.9, curve=0.3)]
    out_b = tmp_path / "b.png"
    report.plot_runs([runfolder.load_run(p) for p in other], out_b)
    image_b = np.asarray(Image.open(out_b))
    assert image_b.shape == image_a.shape and np.abs(image_a.astype(int) - image_b.astype(int)).sum() > 0


def test_ece_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    # bins (15 equal-width): 0.9 -> (13/15, 14/15], 0.8 -> (11/15, 12/15], 0.7 -> (10/15, 11/15], 0.55 -> (8/15, 9/15]
    # each bin holds one example: ECE = (|1-0.9| + |0-0.8| + |1-0.7| + |0-0.55|) / 4
    assert ev.expected_calibration_error(probs, labels) == pytest.approx((0.1 + 0.8 + 0.3 + 0.55) / 4)
    same_bin = torch.tensor([[0.9, 0.1], [0.91, 0.09]])
    assert ev.expected_calibration_error(same_bin, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.905))


def test_sweep_grid_and_skip(tmp_path: Path) -> None:
    jobs = sweep.plan(sweep.parse_args(["--preset", "paper", "--output-root", str(tmp_path)]))
    settings = {(j.noise, j.rate) for j in jobs}
    assert settings == {
        ("asymmetric", 0.2),
        ("asymmetric", 0.3),
        ("asymmetric", 0.4),
        ("symmetric", 0.2),
        ("symmetric", 0.4),
        ("symmetric", 0.6),
    }
    pro = {(j.noise, j.rate): j.args[j.args.index("--exp-base") + 1] for j in jobs if j.method == "proselflc"}
    assert pro == {
        ("asymmetric", 0.2): "14",
        ("asymmetric", 0.3): "10",
        ("asymmetric", 0.4): "8",
        ("symmetric", 0.2): "14",
        ("symmetric", 0.4): "12",
        ("symmetric", 0.6): "8",
    }
    assert all("--dataset" in j.args and "cifar100" in j.args and "resnet44" in j.args for j in jobs)
    job = jobs[0]
    assert sweep.status(job.output_dir) == "new"
    fake_run(tmp_path / "x", "cce", "symmetric", 0.4, 0, 0.5, finished=False).rename(job.output_dir)
    assert sweep.status(job.output_dir) == "started"  # metrics but no model.safetensors
    (job.output_dir / "model.safetensors").write_bytes(b"x")
    assert sweep.status(job.output_dir) == "finished"


# ----------------------------------------------------------------------------- a real digits run


@pytest.fixture(scope="module")
def quick_start_run(noisy_digits_run: tuple[Path, list[str]]) -> tuple[Path, float]:
    """The quick-start run (ProSelfLC, 40% symmetric noise, 300 steps) and the final accuracy it printed."""
    out, lines = noisy_digits_run
    printed = re.search(r"final test_acc=([0-9.]+)", lines[-1])
    assert printed, lines[-20:]
    return out, float(printed.group(1))


def test_eval_reproduces_the_printed_accuracy(quick_start_run: tuple[Path, float]) -> None:
    run, printed = quick_start_run
    proc = run_script("eval.py", str(run), "--json", "--cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # same weights, same fp32 forward on the same test set: the same accuracy to the printed digit
    assert f"{result['test_acc']:.4f}" == f"{printed:.4f}"
    assert result["n"] == 360 and printed > 0.8
    assert 0 < result["test_loss"] < 3 and 0 < result["entropy"] < 1 and 0 <= result["ece"] < 0.5


def test_eval_on_two_processes_counts_every_example_once(quick_start_run: tuple[Path, float]) -> None:
    run, printed = quick_start_run
    # batch 7: 360 = 51 * 7 + 3, so the last global batch is padded by Accelerate and must be trimmed
    proc = run_script(*TORCHRUN, "eval.py", str(run), "--json", "--cpu", "--batch-size", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # printed by the main process only
    assert results[0]["processes"] == 2 and results[0]["n"] == 360
    assert abs(results[0]["test_acc"] - printed) <= 1 / 360 + 5e-5


def test_audit_finds_the_flipped_labels(quick_start_run: tuple[Path, float], tmp_path: Path) -> None:
    run, _ = quick_start_run
    out = tmp_path / "issues.csv"
    proc = run_script("eval.py", "--audit", str(run), "--out", str(out), "--cpu")
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"rate ([0-9.]+)\): precision=([0-9.]+) recall=([0-9.]+)", proc.stdout)
    assert found, proc.stdout
    rate, precision, recall = map(float, found.groups())
    assert 0.3 < rate < 0.5 and precision > rate + 0.3 and recall > 0.5
    with open(out) as f:
        rows = list(csv.DictReader(f))
    flagged = [r for r in rows if r["is_label_issue"] == "1"]
    assert all(r["given_label"] != r["predicted_label"] for r in flagged)
    assert {"corrected_label", "eps", "clean_label", "is_noisy", "key", "label_quality"} <= set(rows[0])
    # the printed precision is the CSV's fraction of real flips among the flagged rows
    assert sum(r["is_noisy"] == "1" for r in flagged) / len(flagged) == pytest.approx(precision, abs=1e-3)
    # at the end of training (g(T) ~ 1) a confident contradiction moves ProSelfLC's target to the prediction
    confident = [
        r
        for r in rows
        if float(r["final_label_quality"]) < 0.05
        and r["final_predicted_label"] != r["given_label"]
        and float(r["eps"]) > 0.9
    ]
    assert confident and all(r["corrected_label"] == r["final_predicted_label"] for r in confident)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(grid: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(run_script("eval.py", "--table"), "no run folders")
    assert_one_error_line(run_script("eval.py", "--table", str(empty)), "no metrics.jsonl")
    no_model = next(grid.glob("*cce*"))
    assert_one_error_line(run_script("eval.py", str(no_model)), "model.safetensors")
    no_metrics = tmp_path / "no_metrics"
    no_metrics.mkdir()
    (no_metrics / "config.json").write_text((no_model / "config.json").read_text())
    assert_one_error_line(run_script("eval.py", "--plot", str(no_metrics)), "metrics.jsonl")
    # a 7-class model evaluated on the 10-class digits
    seven = tmp_path / "seven"
    seven.mkdir()
    cfg = json.loads((no_model / "config.json").read_text()) | {"num_classes": 7}
    (seven / "config.json").write_text(json.dumps(cfg))
    save_file(models.build_model("digits_cnn", 7, 1).state_dict(), str(seven / "model.safetensors"))
    assert_one_error_line(run_script("eval.py", str(seven)), "7 classes", "10")
