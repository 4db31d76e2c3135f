"""The label audit from training dynamics: the statistics train.py keeps (shape, once per example on two
processes, exact on resume), the audit that still finds the flips after the model memorised them, the
label files it writes for the retrain, and its bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, TORCHRUN, data_config, run_script
from safetensors import safe_open
from safetensors.torch import load_file

import audit
import data
import noise
import train

SYNTHETIC_160 = [*SYNTHETIC, "--synthetic-size", "160"]  # the later --synthetic-size wins: 160 images


def precision_recall(stdout: str) -> tuple[float, float]:
    found = re.search(r"precision=([0-9.]+) recall=([0-9.]+)", stdout)
    assert found, stdout
    return float(found.group(1)), float(found.group(2))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 training and 120 test digits as a local save_to_disk folder: small enough to memorise 40% noise fast."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    names = [str(d) for d in range(10)]
    folder = tmp_path_factory.mktemp("data") / "small_digits"
    datasets.DatasetDict(
        {
            "train": data.pixel_dataset(images[:400], digits.target[:400], names),
            "test": data.pixel_dataset(images[1500:1620], digits.target[1500:1620], names),
        }
    ).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def long_run(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CCE, 40% symmetric noise, trained long enough (96 epochs) to memorise most flipped labels.

    On 400 examples at batch 32 the network needs about 25 epochs to learn the clean labels (the digits
    recipe: under 15; a fixed 15-epoch window gives precision 0.72 here): the window is the run's own choice."""
    out = tmp_path_factory.mktemp("long") / "run"
    proc = run_script(
        "train.py",
        "--cpu",
        "--dataset",
        str(small_digits),
        "--method",
        "cce",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
        "--batch-size",
        "32",
        "--max-steps",
        "1200",
        "--eval-every",
        "25",
        "--save-every",
        "100000",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def f1(flagged: torch.Tensor, flip: torch.Tensor) -> float:
    """F1 of the flagged examples against the real flips (bool tensors)."""
    return float(2 * (flagged & flip).sum() / (flagged.sum() + flip.sum()))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the statistics in train.py


def test_dynamics_of_a_clean_run_and_its_audit(tmp_path: Path) -> None:
    out = tmp_path / "clean"
    assert (
        train.cli(["--cpu", *SYNTHETIC_160, "--max-steps", "20", "--eval-every", "10", "--output-dir", str(out)]) == 0
    )
    dyn = load_file(str(out / "dynamics.safetensors"))
    n = len(data.to_tensors(data.prepare_data(data_config(dataset="synthetic", synthetic_size=160))[0])["label"])
    assert dyn["margin_sum"].shape == (n,) and dyn["early_prob_sum"].shape == (n, 10)
    assert torch.equal(dyn["count"], torch.full((n,), 2))  # two evaluations
    # 20 steps of 32 = 4 epochs, all in the early window: each example's training batch, once per epoch
    assert torch.equal(dyn["early_count"], torch.full((n,), 4))
    assert torch.allclose(dyn["early_prob_sum"].sum(1), torch.full((n,), 4.0))  # four softmax rows per example
    with safe_open(str(out / "dynamics.safetensors"), framework="pt") as f:
        meta = f.metadata()
    # 4 epochs are too few to test for memorisation (window_closes pools 5 epochs twice): the window stays open
    assert meta["window"] == "auto" and meta["audit_epochs"] == "4", meta
    # without synthetic noise the audit still ranks the labels, with nothing known to compare against
    proc = run_script("eval.py", "--audit", str(out), "--cpu")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert "precision=" not in proc.stdout and len(read_rows(out / "label_issues.csv")) == n
    assert "early window: epochs [0, 4) (chosen by the run: never closed, the whole run)" in proc.stdout


def test_a_streamed_run_is_audited_by_example_key(tmp_path: Path) -> None:
    out = tmp_path / "stream"
    assert (
        train.cli(
            [
                "--cpu",
                *SYNTHETIC_160,
                "--streaming",
                "--max-steps",
                "10",
                "--eval-every",
                "5",
                "--noise",
                "symmetric",
                "--noise-rate",
                "0.4",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    proc = run_script("eval.py", "--audit", str(out), "--cpu")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    rows = read_rows(out / "label_issues.csv")
    assert len(rows) == 160 and len({r["key"] for r in rows}) == 160  # the whole (small) stream, each example once


def test_two_processes_gather_every_example_once(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_script(
        *TORCHRUN,
        "train.py",
        "--cpu",
        *SYNTHETIC_160,
        "--max-steps",
        "20",
        "--eval-every",
        "10",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dyn = load_file(str(out / "dynamics.safetensors"))
    assert torch.equal(dyn["count"], torch.full((160,), 2))  # 160 rows over 2 processes: none twice, none lost
    assert torch.equal(dyn["early_count"], torch.full((160,), 4))  # each training batch gathered: once per epoch


def test_resume_restores_the_statistics_exactly(tmp_path: Path) -> None:
    flags = [
        "--cpu",
        "--deterministic",
        *SYNTHETIC_160,
        "--max-steps",
        "40",
        "--eval-every",
        "10",
        "--save-every",
        "20",
        "--noise",
        "symmetric",
        "--noise-rate",
        "0.4",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.cli([*flags, "--output-dir", str(whole)]) == 0
    shutil.copytree(whole, cut)
    for name in ("model.safetensors", "dynamics.safetensors"):
        (cut / name).unlink()  # as if killed after the checkpoint at step 20
    config = json.loads((cut / "config.json").read_text()) | {"output_dir": str(cut)}
    (cut / "config.json").write_text(json.dumps(config))
    assert train.cli([*flags, "--output-dir", str(cut), "--resume", "latest"]) == 0
    a, b = load_file(str(whole / "dynamics.safetensors")), load_file(str(cut / "dynamics.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(b["count"][0]) == 4  # two evaluations before the checkpoint, two after


def test_the_probe_changes_no_training_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["--cpu", "--deterministic", *SYNTHETIC_160, "--max-steps", "30", "--eval-every", "10"]
    flags += ["--noise", "symmetric", "--noise-rate", "0.4"]
    assert train.cli([*flags, "--output-dir", str(tmp_path / "probe")]) == 0
    monkeypatch.setattr(audit, "LinearProbe", lambda *args, **kwargs: None)  # the same run without a probe
    monkeypatch.setattr(audit.TrainingDynamics, "keep_probe", lambda self: None)
    assert train.cli([*flags, "--output-dir", str(tmp_path / "none")]) == 0
    model = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("probe", "none")]
    assert model[0] == model[1]
    with_probe, without = (load_file(str(tmp_path / run / "dynamics.safetensors")) for run in ("probe", "none"))
    assert "probe_prob_sum" not in without and torch.equal(with_probe["early_prob_sum"], without["early_prob_sum"])
    # one softmax row per early-window visit, as the head's
    assert torch.allclose(with_probe["probe_prob_sum"].sum(1), with_probe["early_count"].float())


def test_the_probe_fits_the_features_of_the_last_linear_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    probe = audit.LinearProbe(model, 3, torch.device("cpu"))
    x, y = torch.randn(600, 4, generator=gen), torch.randint(3, (600,), generator=gen)
    model(x)
    assert torch.equal(probe.features, torch.relu(model[0](x)).detach())  # the last Linear layer's input
    features = torch.randn(600, 8, generator=gen) + 3 * torch.nn.functional.one_hot(y, 8).float()
    first = probe.fit(features, y)
    assert torch.equal(first, torch.zeros(600, 3))  # it starts at zero: no random numbers drawn
    for _ in range(30):
        last = probe.fit(features, y)
    assert (last.argmax(1) == y).float().mean() > 0.95
    state = {k: v.clone() for k, v in probe.state_dict().items()}
    other = audit.LinearProbe(model, 3, torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(other.fit(features, y), probe.fit(features, y))


def views_dyn(head: torch.Tensor, probe: torch.Tensor, given: torch.Tensor) -> dict[str, torch.Tensor]:
    """dynamics.safetensors' tensors of one early visit per row, the head's and the probe's softmax given."""
    n = len(given)
    return {
        "early_prob_sum": head,
        "probe_prob_sum": probe,
        "early_count": torch.ones(n, dtype=torch.int64),
        "label": given,
        "margin_sum": torch.zeros(n),
        "count": torch.ones(n, dtype=torch.int64),
    }


def test_the_warning_fires_when_the_two_views_disagree() -> None:
    gen = torch.Generator().manual_seed(0)
    n, c, rate = 4000, 10, 0.3
    true = torch.randint(c, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < rate
    given = torch.where(flip, (true + 1) % c, true)
    fit = lambda cls: (
        torch.softmax(  # noqa: E731 - a fit of the noisy labels around class `cls`
            4 * torch.nn.functional.one_hot(cls, c).float() + torch.randn(n, c, generator=gen), dim=1
        )
        @ pairflip_transition(c, rate)
    )
    head, probe, scored = fit(true), fit(true), torch.ones(n, dtype=torch.bool)
    columns, view, warning = audit.audit_view(views_dyn(head, probe, given), scored, given)
    assert view == "head" and warning is None  # two views that agree: the head's, as before the probe
    assert torch.equal(
        columns["predicted_label"], audit.dynamics_columns(views_dyn(head, probe, given), scored)["predicted_label"]
    )
    other = torch.where(torch.rand(n, generator=gen) < 0.5, true, (true + 5) % c)  # a head half about other classes
    columns, view, warning = audit.audit_view(views_dyn(fit(other), probe, given), scored, given)
    assert view == "probe" and warning and warning.startswith("warning: ") and "\n" not in warning
    assert f1(columns["predicted_label"] != given, flip) > 0.8  # the probe's list, which finds the flips
    no_probe = {k: v for k, v in views_dyn(fit(other), probe, given).items() if k != "probe_prob_sum"}
    _, view, warning = audit.audit_view(no_probe, scored, given)  # a run that kept no probe: the head's list, and
    assert view == "head" and "views" not in warning and "near the limit" in warning  # the only check left warns


def test_a_head_that_puts_a_label_elsewhere_is_not_trusted() -> None:
    given = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert audit.fits_labels(given, torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 2]), 3) is None
    assert audit.fits_labels(given, torch.tensor([0, 0, 1, 2, 2, 1, 2, 2, 2]), 3) == 1  # label 1 mostly predicted 2
    assert audit.fits_labels(given[:6], given[:6], 3) is None  # a class nobody is given breaks nothing
    gen = torch.Generator().manual_seed(0)
    n, c = 4000, 10
    true = torch.randint(c, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.45  # many flags, so one broken class leaves the views' overlap high
    given = torch.where(flip, (true + torch.randint(1, c, (n,), generator=gen)) % c, true)
    fit = lambda cls: torch.softmax(6 * torch.nn.functional.one_hot(cls, c).float(), dim=1)  # noqa: E731
    head = fit(torch.where((true == 3) & (torch.rand(n, generator=gen) < 0.7), torch.full_like(true, 4), true))
    scored = torch.ones(n, dtype=torch.bool)
    columns, view, warning = audit.audit_view(views_dyn(head, fit(true), given), scored, given)
    assert view == "probe" and "head puts most examples given label 3 in another class" in warning
    assert f1(columns["predicted_label"] != given, flip) > 0.95


@pytest.mark.parametrize(
    ("transition", "warns"), [("pairflip 0.4", True), ("pairflip 0.2", False), ("symmetric 0.6", False)]
)
def test_the_warning_fires_when_the_noise_transition_is_nearly_singular(transition: str, warns: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n, c = 6000, 10
    kind, rate = transition.split()[0], float(transition.split()[1])
    t = pairflip_transition(c, float(rate)) if kind == "pairflip" else (1 - rate) * torch.eye(c) + rate / c
    true = torch.randint(c, (n,), generator=gen)
    given = torch.multinomial(t[true], 1, generator=gen).squeeze(1)
    fit = torch.softmax(4 * torch.nn.functional.one_hot(true, c).float() + torch.randn(n, c, generator=gen), 1) @ t
    scored = torch.ones(n, dtype=torch.bool)
    columns, view, warning = audit.audit_view(views_dyn(fit, fit, given), scored, given)
    assert view == "head" and (warning is not None) == warns, warning
    if warns:
        assert warning.startswith("warning: the estimated noise is near the limit") and "\n" not in warning
    rates = audit.noise_rates(given, columns["predicted_label"] != given, c)
    assert torch.allclose(rates, torch.bincount(given[given != true], minlength=c) / torch.bincount(given), atol=0.05)


def test_a_short_window_stops_adding_the_training_batches(tmp_path: Path) -> None:
    out = tmp_path / "window"
    assert (
        train.cli(
            [
                "--cpu",
                *SYNTHETIC_160,
                "--max-steps",
                "20",
                "--eval-every",
                "10",
                "--audit-epochs",
                "1.5",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    # steps t = 0..7 start before epoch 1.5 (t * 32 < 240): every example once, 96 of them twice
    counts = torch.bincount(load_file(str(out / "dynamics.safetensors"))["early_count"])
    assert counts.tolist() == [0, 64, 96]
    with safe_open(str(out / "dynamics.safetensors"), framework="pt") as f:
        assert f.metadata()["window"] == "fixed" and f.metadata()["audit_epochs"] == "1.5"
    proc = run_script("eval.py", "--audit", str(out), "--cpu")
    assert "early window: epochs [0, 1.5) (--audit-epochs)" in proc.stdout, proc.stdout


def test_the_window_closes_when_the_missed_labels_start_being_fitted() -> None:
    closes = audit.TrainingDynamics.window_closes
    misses = [0] + [200] * 30
    learn = [60, 40, 30, 20, 15, 10, 10, 10, 10, 10, 10, 10]  # m falls to 0.05 and stays: learnt, nothing memorised
    assert not closes([0, *learn], misses[: len(learn) + 1])
    assert not closes([0, *learn, 12, 11, 12], misses[: len(learn) + 4])  # a rise within the sampling noise
    assert closes([0, *learn, 30, 35, 40, 45, 50], misses[: len(learn) + 6])  # m rises to 0.2: memorisation
    # a network that learns slowly (GCE) has m going down for long: the window stays open while it falls
    slow = [40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12]
    assert not closes([0, *slow], misses[: len(slow) + 1])


def test_the_run_chooses_and_resumes_its_window(tmp_path: Path) -> None:
    dyn = audit.TrainingDynamics(torch.tensor([0, 1, 1, 0]), 2, torch.device("cpu"), None, True, total_images=40)
    state = dyn.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and math.isinf(float(state["window_end"]))
    dyn.window_end = 7.0
    dyn.hits[2] = 3
    again = audit.TrainingDynamics(torch.tensor([0, 1, 1, 0]), 2, torch.device("cpu"), None, True, total_images=40)
    again.load_state_dict(dyn.state_dict())
    assert again.window_end == 7.0 and again.hits.tolist() == dyn.hits.tolist()
    assert again.observes_step(6, 4) and not again.observes_step(7, 4)  # epoch 6 is inside [0, 7), epoch 7 is not


# ----------------------------------------------------------------------------- the score's formulas


def test_confident_joint_by_hand() -> None:

    probs = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    # thresholds: class 0 (0.9 + 0.6) / 2 = 0.75, class 1 (0.7 + 0.3) / 2 = 0.5, class 2 0.8
    # row 0: {0} -> 0; row 1: {} -> not counted; row 2: {1} -> 1; row 3: {} -> not counted; row 4: {2} -> 2
    # rows scaled to the label counts: label 0 has 2 examples and 1 confident one
    assert torch.equal(audit.confident_joint(probs, labels), torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 1]]))
    probs[3] = torch.tensor([0.8, 0.1, 0.1])  # given 1, confidently 0; thresholds now 0.75, 0.4, 0.8
    # so row 1 (0.4 >= 0.4) now counts as confidently 1 too
    assert torch.equal(audit.confident_joint(probs, labels), torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))


def pairflip_transition(num_classes: int, rate: float) -> torch.Tensor:
    """T[i, j] = P(given j | true i): 1 - rate on the diagonal, rate to the next class."""
    return (1 - rate) * torch.eye(num_classes) + rate * torch.eye(num_classes).roll(1, dims=1)


def test_clean_posterior_undoes_the_noise_the_fit_learnt() -> None:

    t = pairflip_transition(3, 0.4)
    q = torch.tensor([[0.55, 0.45, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    p = q @ t  # a perfect fit to the noisy labels
    assert p[0].argmax() == 1  # 0.55 * 0.4 + 0.45 * 0.6 = 0.49 beats 0.55 * 0.6 = 0.33: the fit prefers the flip
    assert torch.allclose(audit.clean_posterior(p, t), q, atol=1e-6)
    assert torch.equal(audit.clean_posterior(p, torch.eye(3)), p)  # no noise: nothing to undo
    assert torch.equal(
        audit.noise_transition(torch.tensor([[50.0, 0], [20, 0]])), torch.tensor([[5 / 7, 2 / 7], [0, 1]])
    )
    assert torch.equal(
        audit.noise_transition(torch.tensor([[50.0, 0], [2, 0]])), torch.eye(2)
    )  # 2 is scatter, not noise


def test_the_audit_score_finds_pairflip_noise_in_a_noisy_fit() -> None:

    gen = torch.Generator().manual_seed(0)
    n, c, rate = 5000, 10, 0.4
    true = torch.randint(c, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < rate
    given = torch.where(flip, (true + 1) % c, true)
    # a network's fit: mostly the noisy posterior q T, blurred, with 10% of the given labels memorised
    q = torch.softmax(3 * torch.nn.functional.one_hot(true, c).float() + torch.randn(n, c, generator=gen), dim=1)
    p = 0.9 * q @ pairflip_transition(c, rate) + 0.1 * torch.nn.functional.one_hot(given, c).float()
    dyn = {
        "early_prob_sum": 2 * p,
        "early_count": torch.full((n,), 2),
        "label": given,
        "margin_sum": torch.zeros(n),
        "count": torch.ones(n, dtype=torch.int64),
    }
    flagged = audit.dynamics_columns(dyn, torch.ones(n, dtype=torch.bool))["predicted_label"] != given
    argmax_flagged = p.argmax(1) != given
    assert (
        f1(flagged, flip) > 0.85 and f1(argmax_flagged, flip) < 0.75
    )  # the argmax of the fit misses the flips it half learnt


def test_the_transition_keeps_clean_classes_as_identity_under_partial_pair_noise() -> None:

    gen = torch.Generator().manual_seed(0)
    n, c = 6000, 10
    true = torch.randint(c, (n,), generator=gen)
    pairs = {3: 5, 5: 3, 7: 1}  # noise in some pairs only; 0, 2, 4, 6, 8 and 9 are clean
    t = torch.eye(c)
    for i, j in pairs.items():
        t[i, i], t[i, j] = 0.6, 0.4
    given = torch.multinomial(t[true], 1, generator=gen).squeeze(1)
    flip = given != true
    # a fit with the model's own scattered errors: every class is sometimes confused with any other
    q = torch.softmax(3 * torch.nn.functional.one_hot(true, c).float() + torch.randn(n, c, generator=gen), dim=1)
    p = 0.9 * q @ t + 0.1 * torch.nn.functional.one_hot(given, c).float()
    estimate = audit.noise_transition(audit.confident_joint(p, given))
    clean = [k for k in range(c) if k not in pairs]
    assert torch.equal(estimate[clean], torch.eye(c)[clean])  # a clean class keeps its labels
    for i, j in pairs.items():
        assert estimate[i, j] > 0.2 and (estimate[i] > 0).sum() == 2  # the pair and nothing else
    counts = audit.confident_joint(p, given).T  # what the test pruned: the confident joint's scatter in clean rows
    assert sum(float(counts[k].sum() - counts[k, k]) for k in clean) > 0
    assert (
        f1(audit.audit_posterior(p, given).argmax(1) != given, flip) > f1(p.argmax(1) != given, flip) + 0.05
    )  # 0.67 vs 0.58


def test_top_confusions_count_the_flagged_pairs() -> None:

    labels, predicted = torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.tensor([1, 1, 2, 2, 1, 0, 2])
    flagged = labels != predicted
    assert audit.top_confusions(labels, predicted, flagged, None) == "0 -> 1 (2), 1 -> 2 (2), 2 -> 0 (1)"
    assert audit.top_confusions(labels, predicted, flagged, ["cat", "dog", "fox"], k=1) == "cat -> dog (2)"
    assert audit.top_confusions(labels, predicted, torch.zeros(7, dtype=torch.bool), None) == "none"


# ----------------------------------------------------------------------------- the audit after memorisation


def test_audit_finds_the_flips_the_final_model_has_memorised(long_run: Path, tmp_path: Path) -> None:
    final = run_script(
        "eval.py", "--audit", str(long_run), "--cpu", "--score", "final", "--out", str(tmp_path / "f.csv")
    )
    assert final.returncode == 0, final.stderr
    _, final_recall = precision_recall(final.stdout)
    assert final_recall < 0.5  # the final model fits most flipped labels: it cannot see them any more
    proc = run_script("eval.py", "--audit", str(long_run), "--cpu")
    assert proc.returncode == 0, proc.stderr
    precision, recall = precision_recall(proc.stdout)
    assert precision >= 0.9 and recall >= 0.9, proc.stdout  # 40% of the labels are flips; the run chose the window
    window = re.search(r"early window: epochs \[0, ([0-9.]+)\) \(chosen by the run\)", proc.stdout)
    assert window and 15 < float(window.group(1)) < 60, proc.stdout  # past the learning, before the lr drop at 48
    # the noise estimate: the flagged share against the real rate printed below it; no warning on symmetric noise
    estimate = re.search(r"estimated noise rate: ([0-9.]+) of 400 labels; per given label: (.*)", proc.stdout)
    real = re.search(r"noisy, rate ([0-9.]+)\)", proc.stdout)
    assert estimate and real and abs(float(estimate.group(1)) - float(real.group(1))) < 0.05, proc.stdout
    assert len(estimate.group(2).split(", ")) == 5 and "warning" not in proc.stdout
    rows = read_rows(long_run / "label_issues.csv")
    assert len(rows) == 400 and [int(r["rank"]) for r in rows] == list(range(1, 401))
    quality = [float(r["label_quality"]) for r in rows]
    assert quality == sorted(quality)  # worst first
    assert all((r["is_label_issue"] == "1") == (r["given_label"] != r["predicted_label"]) for r in rows)
    assert {
        "key",
        "given_label",
        "predicted_label",
        "is_label_issue",
        "label_quality",
        "corrected_label",
        "eps",
        "aum",
        "final_label_quality",
    } <= set(rows[0])


def test_relabel_and_drop_files_feed_train_py(long_run: Path, small_digits: Path, tmp_path: Path) -> None:
    relabel, drop = tmp_path / "relabel.csv", tmp_path / "drop.csv"
    proc = run_script("eval.py", "--audit", str(long_run), "--cpu", "--relabel", str(relabel), "--drop", str(drop))
    assert proc.returncode == 0, proc.stderr
    issues = {r["key"]: r for r in read_rows(long_run / "label_issues.csv")}
    flagged = {k: int(r["predicted_label"]) for k, r in issues.items() if r["is_label_issue"] == "1"}
    cfg = data_config(dataset=str(small_digits), noise="symmetric", noise_rate=0.4)
    before, _, _ = data.prepare_data(cfg)
    keys, given = list(before["example_key"]), list(before["label"])
    # rows shuffled: the file is keyed by the example key, not by its order
    lines = relabel.read_text().splitlines()
    relabel.write_text("\n".join([lines[0], *np.random.default_rng(0).permutation(lines[1:])]) + "\n")
    after, _, _ = data.prepare_data({**cfg, "noise": "file", "noise_file": str(relabel)})
    assert list(after["example_key"]) == keys
    changed = {k for k, a, b in zip(keys, given, after["label"]) if a != b}
    assert flagged and changed == {k for k in flagged if flagged[k] != int(issues[k]["given_label"])}
    assert all(lab == flagged.get(k, g) for k, g, lab in zip(keys, given, after["label"]))
    kept, _, _ = data.prepare_data({**cfg, "noise": "file", "noise_file": str(drop)})
    assert sorted(kept["example_key"]) == sorted(k for k in keys if k not in flagged)
    out = tmp_path / "retrain"
    proc = run_script(
        "train.py",
        "--cpu",
        "--dataset",
        str(small_digits),
        "--noise",
        "file",
        "--noise-file",
        str(drop),
        "--batch-size",
        "32",
        "--max-steps",
        "4",
        "--eval-every",
        "4",
        "--output-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_file(str(out / "dynamics.safetensors"))["label"].shape == (len(keys) - len(flagged),)


def test_a_label_file_missing_examples_is_refused(small_digits: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("key,label\n0123456789abcdef,3\n")
    with pytest.raises(ValueError, match="no row for 400 of the 400"):
        data.prepare_data(data_config(dataset=str(small_digits), noise="file", noise_file=str(bad)))
    assert noise.load_noise_file(str(bad))[2].tolist() == ["0123456789abcdef"]  # hex keys stay strings


# ----------------------------------------------------------------------------- bad input


def test_audit_without_statistics_falls_back_with_one_notice(long_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(long_run, old, ignore=shutil.ignore_patterns("dynamics.safetensors", "checkpoints"))
    proc = run_script("eval.py", "--audit", str(old), "--cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("notice: ") and "final model" in lines[0], proc.stderr
    assert "by the final model" in proc.stdout


def test_audit_of_a_missing_run_is_one_error_line(tmp_path: Path) -> None:
    proc = run_script("eval.py", "--audit", str(tmp_path / "nope"), "--cpu")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], (
        proc.stderr
    )
