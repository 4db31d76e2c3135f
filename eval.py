"""Evaluate, plot, tabulate and audit the run folders that train.py writes.

Four uses, and two with the Hub (hub.py):

    python eval.py RUN_DIR [--dataset D --data-dir DIR] [--json]
        Load config.json + model.safetensors (no optimizer, no training code), evaluate in fp32 on
        the clean test split: accuracy, loss, mean prediction entropy / log C and the expected
        calibration error. `accelerate launch eval.py RUN_DIR` spreads it over several processes.
    python eval.py --plot RUN_DIR... [--out dynamics.png]
        The paper's Figure 3 panels from metrics.jsonl against the step, one line per run.
    python eval.py --table RUN_DIR_OR_PARENT... [--out table.md] [--csv table.csv] [--best-eps]
        The paper's Table 4 layout: rows = methods, columns = noise kind and rate, cells = final
        test accuracy (%) as mean +- std over seeds, best cell per column in bold.
    python eval.py --audit RUN_DIR [--out label_issues.csv] [--relabel PATH] [--drop PATH] [--score final]
        Which training labels are wrong: every training example ranked by label_quality from the
        training dynamics train.py kept (dynamics.safetensors), worst first, with is_label_issue;
        --relabel / --drop write a label file for `train.py --noise file --noise-file PATH`.
    python eval.py --push-to-hub RUN_DIR --repo-id owner/name [--dry-run] [--stage-dir DIR]
        Upload a finished run and a generated model card to a Hub model repository (hub.push_run).
    python eval.py hf://owner/name
        Download a pushed run into the Hugging Face cache and evaluate it as above.

Definitions (all on softmax outputs p, C classes):
- entropy: mean over examples of H(p) / log C, in [0, 1].
- ECE (Guo et al. 2017): 15 equal-width bins over the confidence max_k p_k, bin b = (b/15, (b+1)/15];
  ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|.
- audit score (training dynamics; the early-learning effect, Arpit et al. 2017; Northcutt et al. 2021;
  Patrini et al. 2017): train.py adds softmax(z_i) of every training step of the early window that held
  example i, from the forward pass before that step's update, so i was last fitted an epoch earlier and the
  network has not memorised the noisy labels yet (a stream: its evaluations in that window). The window is
  --audit-epochs, or chosen by the run (train.py's TrainingDynamics.window_closes: it closes once the labels
  the network had missed start being fitted significantly more often, i.e. memorisation starts); the audit
  prints it. p_bar_i = their mean fits the noisy labels, p_bar ~ q T, with q the clean-label posterior
  and T[i, j] = P(given j | true i). T comes from cleanlab's confident joint C of p_bar (C[j, k]: examples
  given j with p_bar_k >= the mean p_bar_k of the examples given k; rows scaled to the label counts), keeping
  off the diagonal only the pairs whose count is significantly above an even spread of all off-diagonal
  mass (significant_pairs: a class the data shows clean keeps the identity row), and
  q_i = max(p_bar_i T^-1, 0) normalised; T is then re-estimated from the counts of (given label, argmax q)
  until argmax q stops changing (hard EM; a round that would flag half of some label's examples is refused).
  label_quality_i = q_i[y_i] (y = the given label),
  predicted_label_i = argmax_k q_i[k], is_label_issue_i = predicted_label_i != y_i: the threshold needs no
  clean labels. aum_i = mean over all evaluations of z_i[y_i] - max_{k != y_i} z_i[k] (the area under
  the margin, Pleiss et al. 2020) is a column. With --score final, or a run without dynamics.safetensors,
  the final model's softmax p replaces q (final_* columns always hold it); a model that memorised the
  noise agrees with it there. corrected_label and eps are ProSelfLC's target class and eps_i at t = T
  from the final model.
- label files (--relabel / --drop): CSV `key,label` for every training example, keyed by
  example_key (noise.py), so row order does not matter; flagged examples get predicted_label, or
  -1, which drops the example from the training set.
- table std: the sample standard deviation (ddof=1) over the seeds of a cell; a single seed shows
  its value alone. Bold marks every cell whose mean, rounded to the printed 0.1, is the column best.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import datasets
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import audit
import config
import data
import hub
import losses
import runfolder

# Table 4 order: the baselines reported from SL first, then the paper's own trained results.
# ELR (later work) and ProSelfLC's later variant follow it.
METHOD_ORDER = ("boothard", "gce", "sce", "cce", "ls", "cp", "bootsoft", "proselflc", "elr", "proselflc_t")
METHOD_COLORS = {  # ProSelfLC stands out in red; the other methods keep their colour in every plot
    "proselflc": "tab:red", "cce": "black", "ls": "tab:blue", "cp": "tab:orange", "bootsoft": "tab:green",
    "boothard": "tab:purple", "gce": "tab:brown", "sce": "tab:pink", "elr": "tab:olive", "proselflc_t": "darkred",
}
EPS_METHODS = losses.FIXED_EPS  # methods whose fixed eps the paper tunes
NOISE_ORDER = ("none", "asymmetric", "symmetric", "pairflip", "file")  # Table 4: asymmetric first
PANELS = (  # (metrics.jsonl key, panel title, y label) in the order of the paper's Figure 3
    ("test_acc", "(a) Generalisation: clean test set", "accuracy"),
    ("noisy_fit", "(b) Memorisation: noisy subset", "fraction fit to the noisy label"),
    ("noisy_correct", "(c) Correction: noisy subset", "fraction predicted as clean label"),
    ("clean_fit", "(d) Fitting: clean subset", "fraction fit to the label"),
    ("entropy_clean", "(e) Entropy: clean subset", "mean H(p) / log C"),
    ("entropy_noisy", "(f) Entropy: noisy subset", "mean H(p) / log C"),
    ("epsilon", "(g) Trust in predictions", "mean epsilon"),
    ("train_loss", "(h) Training loss", "loss"),
)
ECE_BINS = 15


def setting_sort_key(setting: tuple[str, str, float]) -> tuple:
    """Sort columns by dataset, then Table 4's noise order, then rate."""
    dataset, noise, rate = setting
    order = NOISE_ORDER.index(noise) if noise in NOISE_ORDER else len(NOISE_ORDER)
    return (dataset, order, noise, rate)


def method_sort_key(row: tuple[str, float | None]) -> tuple:
    """Sort rows in Table 4's order, unknown methods last, then by eps."""
    method, eps = row
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (order, method, -1.0 if eps is None else eps)


# ----------------------------------------------------------------------------- table


class Cell(NamedTuple):
    """One table cell: final test accuracies (%) of the seeds of a (method, setting)."""

    values: list[float]
    seeds: list[int]
    eps: float | None  # the eps of the cell's runs (EPS_METHODS), else None
    runs: list[str]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample std (ddof=1) over seeds; None for one seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def collect_cells(runs: Sequence[runfolder.RunRecord], best_eps: bool = False) -> dict[tuple, Cell]:
    """Group finished runs into cells keyed by ((method, eps), setting); pool seeds.

    Rows split by eps only for the methods that have runs with several eps values. With
    `best_eps` they do not split: each cell keeps the eps with the best mean (the paper's Table 4
    reports LS, CP and Boot-soft at their best of eps 0.125, 0.25, 0.5).
    """
    eps_values: dict[str, set[float]] = {}
    for r in runs:
        if r.config.get("method") in EPS_METHODS:
            eps_values.setdefault(r.config["method"], set()).add(float(r.config.get("eps", 0.0)))
    groups: dict[tuple, list[runfolder.RunRecord]] = {}
    for r in runs:
        method = str(r.config.get("method", "?"))
        eps = float(r.config.get("eps", 0.0)) if method in EPS_METHODS else None
        groups.setdefault((method, eps, config.setting_of(r.config)), []).append(r)
    cells: dict[tuple, Cell] = {}
    for (method, eps, setting), group in groups.items():
        warn_if_mixed(group)
        cell = Cell(
            [100.0 * float(r.metrics[-1]["test_acc"]) for r in group],
            [int(r.config.get("seed", 0)) for r in group], eps, [str(r.path) for r in group],
        )
        split = eps is not None and len(eps_values.get(method, ())) > 1
        row = (method, eps if split and not best_eps else None)
        if row + (setting,) in cells and cells[row + (setting,)].mean >= cell.mean:
            continue  # best_eps: keep the better eps
        cells[row + (setting,)] = cell
    return {((k[0], k[1]), k[2]): v for k, v in cells.items()}


def warn_if_mixed(group: Sequence[runfolder.RunRecord]) -> None:
    """Warn when the runs pooled into one cell differ in more than their seeds."""
    for key in ("model", "max_steps", "batch_size", "lr", "exp_base", "gce_q", "alpha", "beta", "temperature"):
        values = {json.dumps(r.config.get(key)) for r in group}
        if len(values) > 1:
            print(f"warning: pooling runs with different {key} ({', '.join(sorted(values))}): "
                  f"{', '.join(str(r.path) for r in group)}", file=sys.stderr)


def format_cell(cell: Cell, show_eps: bool) -> str:
    """'66.6 ± 0.3' for several seeds, '66.6' for one; '(ε=0.25)' appended under --best-eps."""
    text = f"{cell.mean:.1f}" if cell.std is None else f"{cell.mean:.1f} ± {cell.std:.1f}"
    return f"{text} (ε={cell.eps:g})" if show_eps and cell.eps is not None else text


def markdown_table(cells: dict[tuple, Cell], best_eps: bool = False) -> str:
    """Table 4 layout in Markdown: rows = methods, columns = settings, column best in bold."""
    rows = sorted({k[0] for k in cells}, key=method_sort_key)
    settings = sorted({k[1] for k in cells}, key=setting_sort_key)
    several_datasets = len({s[0] for s in settings}) > 1
    titles = [(f"{s[0]} " if several_datasets else "") + config.noise_label(s[1], s[2]) for s in settings]
    best = {s: max(round(c.mean, 1) for k, c in cells.items() if k[1] == s) for s in settings}
    datasets = ", ".join(sorted({s[0] for s in settings}))
    lines = [
        f"Final test accuracy (%) on the clean {datasets} test set: mean ± sample std over seeds "
        f"(n per cell: {n_summary(cells)}); best per column in bold.",
        "",
        "| Method | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for row in rows:
        texts = []
        for s in settings:
            cell = cells.get((row, s))
            if cell is None:
                texts.append("–")
                continue
            text = format_cell(cell, best_eps)
            texts.append(f"**{text}**" if round(cell.mean, 1) == best[s] else text)
        lines.append(f"| {config.method_label(*row)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def n_summary(cells: dict[tuple, Cell]) -> str:
    """The seed counts of the cells, e.g. '3' or '1-3'."""
    counts = sorted({len(c.values) for c in cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def write_table_csv(cells: dict[tuple, Cell], path: Path) -> None:
    """One CSV row per cell: method, eps, dataset, noise, rate, n, mean, std, seeds, values, runs."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "eps", "dataset", "noise", "noise_rate", "n_seeds", "mean_acc", "std_acc",
                    "seeds", "accuracies", "runs"])
        for (row, s), c in sorted(cells.items(), key=lambda kv: (method_sort_key(kv[0][0]), setting_sort_key(kv[0][1]))):
            w.writerow([row[0], "" if c.eps is None else c.eps, *s, len(c.values), f"{c.mean:.4f}",
                        "" if c.std is None else f"{c.std:.4f}", " ".join(map(str, c.seeds)),
                        " ".join(f"{v:.4f}" for v in c.values), " ".join(c.runs)])


def mean_std_text(values: Sequence[float]) -> str:
    """'66.6 ± 0.3' (sample std) for several values, '66.6' for one."""
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def budget_table(runs: Sequence[runfolder.RunRecord]) -> str:
    """Rows = methods; per (setting, budget T): final test accuracy and noisy_fit (memorisation), % over seeds."""
    groups: dict[tuple, list[runfolder.RunRecord]] = {}
    for r in runs:
        key = (str(r.config.get("method", "?")), config.setting_of(r.config), int(r.config.get("max_steps", 0)))
        groups.setdefault(key, []).append(r)
    columns = sorted({k[1:] for k in groups}, key=lambda c: (setting_sort_key(c[0]), c[1]))
    methods = sorted({k[0] for k in groups}, key=lambda m: method_sort_key((m, None)))
    acc = {k: [100.0 * float(r.metrics[-1]["test_acc"]) for r in g] for k, g in groups.items()}
    fit = {k: [100.0 * float(r.metrics[-1]["noisy_fit"]) for r in g if r.metrics[-1].get("noisy_fit") is not None]
           for k, g in groups.items()}
    best = {c: max(round(statistics.fmean(v), 1) for k, v in acc.items() if k[1:] == c) for c in columns}
    seeds = sorted({len(g) for g in groups.values()})
    lines = [f"Final clean test accuracy (%) and noisy_fit (% of the flipped training labels the final model "
             f"predicts, i.e. memorised) after T steps: mean ± sample std over {'-'.join(map(str, seeds))} seeds; "
             "best accuracy per column in bold.", "",
             "| Method | " + " | ".join(f"{config.noise_label(*c[0][1:])} T={c[1]} {what}" for c in columns
                                       for what in ("test acc", "noisy_fit")) + " |",
             "|---|" + "---:|" * (2 * len(columns))]
    for m in methods:
        texts = []
        for c in columns:
            k = (m, *c)
            if k not in acc:
                texts += ["–", "–"]
                continue
            text = mean_std_text(acc[k])
            texts += [f"**{text}**" if round(statistics.fmean(acc[k]), 1) == best[c] else text,
                      mean_std_text(fit[k]) if fit[k] else "–"]
        lines.append(f"| {config.method_label(m)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def table_main(args: argparse.Namespace) -> None:
    """--table: print the Markdown table, optionally write it (--out) and a CSV (--csv)."""
    runs = runfolder.finished_runs(args.runs)
    if len({r.config.get("max_steps") for r in runs}) > 1:  # several budgets: one column pair per budget
        text = budget_table(runs)
        print(text, end="")
        if args.out:
            runfolder.write_or_explain(lambda: Path(args.out).write_text(text), args.out)
        return
    cells = collect_cells(runs, best_eps=args.best_eps)
    text = markdown_table(cells, best_eps=args.best_eps)
    print(text, end="")
    if args.out:
        runfolder.write_or_explain(lambda: Path(args.out).write_text(text), args.out)
    if args.csv:
        runfolder.write_or_explain(lambda: write_table_csv(cells, Path(args.csv)), args.csv)


# ----------------------------------------------------------------------------- plot


def run_labels(runs: Sequence[runfolder.RunRecord]) -> list[str]:
    """Legend labels: the method, plus whatever else varies among the runs (eps, setting, seed)."""
    def varies(fn) -> bool:
        return len({json.dumps(fn(r)) for r in runs}) > 1

    labels = []
    for r in runs:
        c = r.config
        parts = [config.METHOD_LABELS.get(c.get("method"), str(c.get("method")))]
        if c.get("method") in EPS_METHODS and varies(lambda r: r.config.get("eps")):
            parts.append(f"ε={c.get('eps'):g}")
        if varies(lambda r: config.setting_of(r.config)):
            dataset, noise, rate = config.setting_of(c)
            parts.append((f"{dataset} " if varies(lambda r: r.config.get("dataset")) else "") + config.noise_label(noise, rate))
        if varies(lambda r: r.config.get("seed")):
            parts.append(f"seed {c.get('seed')}")
        labels.append(" ".join(parts))
    return labels


def plot_runs(runs: Sequence[runfolder.RunRecord], out: Path, title: str | None = None) -> plt.Figure:
    """Write one PNG with the Figure 3 panels (metrics against step), one line per run; return the figure."""
    labels = run_labels(runs)
    spare = iter(("tab:cyan", "tab:olive", "tab:gray") * 10)  # for methods this file does not know
    colors = {m: METHOD_COLORS.get(m) or next(spare) for m in dict.fromkeys(str(r.config.get("method")) for r in runs)}
    styles = ("-", "--", ":", "-.")
    seen_per_method: dict[str, int] = {}
    looks = []  # colour by method (as in Figure 3), line style tells runs of one method apart
    for r in runs:
        method = str(r.config.get("method"))
        k = seen_per_method.get(method, 0)
        seen_per_method[method] = k + 1
        looks.append((colors[method], styles[k % len(styles)]))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5), dpi=100)
    for ax, (key, panel_title, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for r, label, (color, style) in zip(runs, labels, looks):
            points = [(m["step"], m[key]) for m in r.metrics if m.get(key) is not None]
            if points:
                ax.plot(*zip(*points), color=color, linestyle=style, linewidth=1.6, label=label)
                drawn = True
        if not drawn:  # e.g. the noisy-subset panels of runs without noise
            ax.text(0.5, 0.5, f"no '{key}' in these runs", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, names = [], []
    for ax in axes.flat:  # one shared legend: every run once
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=10, frameon=False)
    fig.suptitle(title or default_plot_title(runs), fontsize=13)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(names) / 6), 1, 0.96))
    fig.savefig(out)
    plt.close(fig)  # frees the canvas; the returned figure can still be inspected
    return fig


def default_plot_title(runs: Sequence[runfolder.RunRecord]) -> str:
    """'Learning dynamics: digits, symmetric r=0.4' when all runs share a setting."""
    settings = {config.setting_of(r.config) for r in runs}
    if len(settings) == 1:
        dataset, noise, rate = settings.pop()
        return f"Learning dynamics: {dataset}, {config.noise_label(noise, rate)}"
    return "Learning dynamics"


def plot_main(args: argparse.Namespace) -> None:
    """--plot: write the PNG to --out (default dynamics.png)."""
    runs = [runfolder.load_run(p) for p in runfolder.find_run_dirs(args.runs)]
    out = Path(args.out or "dynamics.png")
    check_writable(out, "the plot")
    try:
        plot_runs(runs, out)
    except OSError as e:
        raise ValueError(f"cannot write the plot to {out} ({e.strerror or e}): choose a writable --out") from None
    print(f"wrote {out} ({len(runs)} runs)")


# ----------------------------------------------------------------------------- model evaluation


def split_logits(model: torch.nn.Module, ds: Any, info: data.DatasetInfo, accelerator: Accelerator,
                 batch_size: int) -> torch.Tensor:
    """fp32 logits [N, C] of every example of split `ds`, in split order, on CPU, on every process: data.predict
    over data.EvalBatches (each process its part, batch_size per process)."""
    batches = data.EvalBatches(ds, info, accelerator.device, batch_size, rank=accelerator.process_index,
                               world=accelerator.num_processes, workers=data.default_workers(accelerator.num_processes))
    return data.predict(model.to(accelerator.device), batches, info, gather=accelerator.gather).cpu()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)| over equal-width confidence bins (b/n, (b+1)/n]."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    bins = (torch.ceil(conf.double() * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64)
    gap.index_add_(0, bins, correct - conf.double())  # per bin: sum(correct) - sum(conf) = |B|(acc - conf)
    return float(gap.abs().sum() / len(labels))


def test_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """test_acc (argmax = label) and test_loss (mean cross entropy) from logits, in fp32."""
    logits = logits.float()
    return {"test_acc": float((logits.argmax(dim=1) == labels).float().mean()),
            "test_loss": float(F.cross_entropy(logits, labels))}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """test_metrics, entropy (mean H(p)/log C) and ece from fp32 logits."""
    probs = F.softmax(logits.float(), dim=1)
    return {**test_metrics(logits, labels), "entropy": float(losses.normalized_entropy(probs).mean()),
            "ece": expected_calibration_error(probs, labels), "n": int(len(labels))}


def config_with_overrides(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The run's config.json with the command line's data overrides applied."""
    cfg = runfolder.read_run_config(run_dir)
    for key in ("model", "num_classes", *data.CFG_KEYS):
        if key not in cfg:
            raise ValueError(f"{run_dir / 'config.json'} has no {key!r}: not written by train.py")
    if args.dataset:
        cfg["dataset"] = args.dataset
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    return cfg


def single_run_dir(runs: Sequence[str], what: str, hint: str = "") -> Path:
    """The one existing run folder that evaluation or --audit takes."""
    if len(runs) != 1:
        raise ValueError(f"{what} takes one run folder, got {len(runs)}{hint}")
    run_dir = Path(runs[0])
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: pass a train.py run folder")
    return run_dir


def evaluate_main(args: argparse.Namespace) -> None:
    """RUN_DIR: evaluate the saved model on the clean test split and print (or --json) the metrics."""
    run_dir = single_run_dir(args.runs, "evaluation", hint=": use --table for several")
    cfg = config_with_overrides(run_dir, args)
    if not (run_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors: the run has not finished (evaluate a finished run)")
    # The test split never carries noise; skipping it avoids needing e.g. the run's noise file here.
    _, test_ds, info = data.prepare_data({**cfg, "noise": "none"})
    model = runfolder.load_final_model(run_dir, cfg, info)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision="no")  # evaluation is always fp32
    test = data.label_tensors(test_ds)
    logits = split_logits(model, test_ds, info, accelerator, args.batch_size)
    result = {"run": str(run_dir), "method": cfg.get("method"), "dataset": info.name,
              **classification_metrics(logits, test["label"]), "processes": accelerator.num_processes}
    recorded = recorded_test_acc(run_dir)
    if recorded is not None:
        result["recorded_test_acc"] = recorded
    if accelerator.is_main_process:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"run {run_dir}: {cfg.get('method')} on {info.name}, {result['n']} clean test examples")
            print(f"test_acc={result['test_acc']:.4f} test_loss={result['test_loss']:.4f} "
                  f"entropy={result['entropy']:.4f} ece={result['ece']:.4f}"
                  + (f" (train.py recorded test_acc={recorded:.4f})" if recorded is not None else ""))
    accelerator.end_training()


def recorded_test_acc(run_dir: Path) -> float | None:
    """The final test_acc in metrics.jsonl, if any, for comparison."""
    try:
        return float(runfolder.load_run(run_dir).metrics[-1]["test_acc"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------- label audit


def audit_main(args: argparse.Namespace) -> None:
    """--audit RUN_DIR: rank the training labels by the training dynamics (or the final model); write the CSVs."""
    run_dir = single_run_dir(args.runs, "--audit")
    cfg = config_with_overrides(run_dir, args)
    out = Path(args.out) if args.out else run_dir / "label_issues.csv"
    check_writable(out, "the audit's CSV")  # before the prediction pass
    # Map-style even for a streamed run: the audit needs every training example once, in a stable order.
    train_ds, _, info = data.prepare_data({**cfg, "streaming": False})
    model = runfolder.load_final_model(run_dir, cfg, info)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision="no")
    logits = split_logits(model, train_ds, info, accelerator, args.batch_size)
    found = audit.audit_labels(run_dir, cfg, train_ds, logits, args.score)
    if accelerator.is_main_process:
        audit.write_audit(found, train_ds, info, cfg, out, args.top, args.relabel, args.drop)
    accelerator.end_training()


# ----------------------------------------------------------------------------- command line


# The flags of one use only: typed with another, they would be ignored, so they are refused.
FLAG_USES = {"csv": ("table",), "best_eps": ("table",), "relabel": ("audit",), "drop": ("audit",), "top": ("audit",),
             "score": ("audit",), "json": ("evaluate",), "dataset": ("evaluate", "audit"),
             "data_dir": ("evaluate", "audit"), "batch_size": ("evaluate", "audit"), "cpu": ("evaluate", "audit"),
             "out": ("plot", "table", "audit"), "repo_id": ("push",), "dry_run": ("push",), "stage_dir": ("push",)}
OUTPUT_FLAGS = ("out", "csv", "relabel", "drop")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: RUN_DIR... and one of --plot / --table / --audit (none: evaluate the model); every flag typed is
    one the use reads, and every file to be written can be, before any work starts."""
    p = runfolder.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="train.py run folders (--table/--plot: or a parent folder)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plot", action="store_true", help="plot the learning dynamics of the runs to --out (PNG)")
    mode.add_argument("--table", action="store_true", help="print the Table 4 style Markdown table of final accuracies")
    mode.add_argument("--audit", action="store_true", help="rank the training labels by the training dynamics; write label_issues.csv")
    p.add_argument("--out", help="output file: the PNG (--plot, default dynamics.png), the Markdown (--table), "
                                 "the CSV (--audit, default RUN_DIR/label_issues.csv)")
    p.add_argument("--csv", help="--table: also write the cells as CSV to this file")
    p.add_argument("--best-eps", action="store_true", help="--table: one row per method, each cell at its best eps (as Table 4)")
    p.add_argument("--json", action="store_true", help="evaluation: print one JSON object")
    p.add_argument("--dataset", help="evaluation/--audit: override the run's dataset (a Hub id or local path of the same data)")
    p.add_argument("--data-dir", help="evaluation/--audit: a local copy of the data (see train.py --data-dir)")
    p.add_argument("--batch-size", type=int, help="evaluation/--audit batch size per process (default 500)")
    p.add_argument("--top", type=int, help="--audit: how many ranked examples to print (default 10)")
    p.add_argument("--score", choices=("dynamics", "final"),
                   help="--audit: rank by the training dynamics (default) or by the final model's predictions")
    p.add_argument("--relabel", metavar="PATH", help="--audit: write a label file with the flagged labels set to the predicted class")
    p.add_argument("--drop", metavar="PATH", help="--audit: write a label file without the flagged examples (label -1)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    mode.add_argument("--push-to-hub", metavar="RUN_DIR", help="upload a finished run with a model card to --repo-id (hub.py)")
    p.add_argument("--repo-id", help="--push-to-hub: the Hub model repository, owner/name")
    p.add_argument("--dry-run", action="store_true", help="--push-to-hub: stage the files and list them, no network")
    p.add_argument("--stage-dir", help="--push-to-hub: where to stage the files (default: RUN_DIR-hub beside the run)")
    args = p.parse_args(argv)
    use = "push" if args.push_to_hub else "plot" if args.plot else "table" if args.table else "audit" if args.audit else "evaluate"
    for key, uses in FLAG_USES.items():
        if getattr(args, key) not in (None, False) and use not in uses:
            raise ValueError(f"--{key.replace('_', '-')} is not used by {'evaluation' if use == 'evaluate' else '--' + use.replace('push', 'push-to-hub')} "
                             f"(only by {', '.join('evaluation' if u == 'evaluate' else '--' + u.replace('push', 'push-to-hub') for u in uses)}): drop it")
    args.batch_size = 500 if args.batch_size is None else args.batch_size
    args.top = 10 if args.top is None else args.top
    args.score = args.score or "dynamics"
    if use == "push":
        return check_push_args(args)
    if not args.runs:
        raise ValueError("no run folders given: pass train.py run folders (or, for --table/--plot, a folder holding them)")
    if args.batch_size < 1 or args.top < 0:
        raise ValueError(f"--batch-size must be >= 1 and --top >= 0, got {args.batch_size} and {args.top}")
    for key in OUTPUT_FLAGS:
        if getattr(args, key):
            check_writable(Path(getattr(args, key)), f"--{key}")
    return args


def check_writable(path: Path, what: str) -> None:
    """Refuse an output path that is a folder, lies in no folder, or cannot be written (before any work starts)."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: name a file in it")
    if not path.parent.is_dir():
        raise ValueError(f"{what} {path}: no folder {path.parent} to write it in")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {path} cannot be written (read-only): choose a writable place")


def check_push_args(args: argparse.Namespace) -> argparse.Namespace:
    """--push-to-hub RUN_DIR needs --repo-id and takes no other run folder; --repo-id, --dry-run, --stage-dir need it."""
    if not args.push_to_hub:
        raise ValueError("--repo-id, --dry-run and --stage-dir go with --push-to-hub RUN_DIR")
    if not args.repo_id:
        raise ValueError("--push-to-hub needs --repo-id owner/name: the Hub model repository to upload to")
    if args.runs:
        raise ValueError(f"--push-to-hub takes its one run folder, got {len(args.runs)} more: {' '.join(args.runs)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch to the chosen use."""
    args = parse_args(argv)
    datasets.disable_progress_bars()  # the splits are small or cached; keep stderr for warnings and errors
    if args.push_to_hub:
        hub.push_run(Path(args.push_to_hub), args.repo_id, plot_runs, dry_run=args.dry_run,
                     stage_dir=Path(args.stage_dir) if args.stage_dir else None)
        return
    if args.audit and not args.out and hub.is_hub_run(args.runs[0]):
        # a downloaded run lives in the Hugging Face cache, whose files are shared links: write beside the user
        args.out = args.runs[0][len(hub.HF_PREFIX):].replace("/", "--") + "-label_issues.csv"
    args.runs = [str(hub.download_run(r)) if hub.is_hub_run(r) else r for r in args.runs]
    if args.table:
        table_main(args)
    elif args.plot:
        plot_main(args)
    elif args.audit:
        audit_main(args)
    else:
        evaluate_main(args)


if __name__ == "__main__":
    sys.exit(runfolder.run_cli(main))
