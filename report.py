"""Tables and plots of finished runs: the paper's Table 4 layout (rows = methods, columns = noise settings, cells =
final clean test accuracy, mean +- sample std over seeds) and its Figure 3 panels (metrics.jsonl against the step).
eval.py --table / --plot and sweep.py write them; hub.py puts the plot and the names on a model card.

- table std: the sample standard deviation (ddof=1) over the seeds of a cell; a single seed shows its value alone.
  Bold marks every cell whose mean, rounded to the printed 0.1, is the column best.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

import losses
import runfolder

METHOD_LABELS = {
    "cce": "CCE",
    "ls": "LS",
    "cp": "CP",
    "bootsoft": "Boot-soft",
    "boothard": "Boot-hard",
    "gce": "GCE",
    "sce": "SL (SCE)",
    "proselflc": "ProSelfLC",
    "elr": "ELR",
    "proselflc_t": "ProSelfLC (later, T0)",
}


def noise_label(noise: str, rate: float) -> str:
    """Column title of a noise setting, e.g. 'symmetric r=0.4' or 'clean'."""
    return "clean" if noise == "none" else f"{noise} r={rate:g}"


def method_label(method: str, eps: float | None = None) -> str:
    """Row title: the paper's name of the method, with its eps when several eps values are tabulated."""
    name = METHOD_LABELS.get(method, method)
    return name if eps is None else f"{name} (ε={eps:g})"


def setting_of(cfg: dict[str, Any]) -> tuple[str, str, float]:
    """(dataset, noise kind, rate) of a run; a clean run has rate 0."""
    noise = cfg.get("noise") or "none"
    return (str(cfg.get("dataset", "?")), noise, 0.0 if noise == "none" else float(cfg.get("noise_rate") or 0.0))


# Table 4 order: the baselines reported from SL first, then the paper's own trained results.
# ELR (later work) and ProSelfLC's later variant follow it.
METHOD_ORDER = ("boothard", "gce", "sce", "cce", "ls", "cp", "bootsoft", "proselflc", "elr", "proselflc_t")


METHOD_COLORS = {  # ProSelfLC stands out in red; the other methods keep their colour in every plot
    "proselflc": "tab:red",
    "cce": "black",
    "ls": "tab:blue",
    "cp": "tab:orange",
    "bootsoft": "tab:green",
    "boothard": "tab:purple",
    "gce": "tab:brown",
    "sce": "tab:pink",
    "elr": "tab:olive",
    "proselflc_t": "darkred",
}


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


class Cell(NamedTuple):
    """One table cell: final test accuracies (%) of the seeds of a (method, setting)."""

    values: list[float]
    seeds: list[int]
    eps: float | None  # the eps of the cell's runs (losses.FIXED_EPS), else None
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
        if r.config.get("method") in losses.FIXED_EPS:
            eps_values.setdefault(r.config["method"], set()).add(float(r.config.get("eps", 0.0)))
    groups: dict[tuple, list[runfolder.RunRecord]] = {}
    for r in runs:
        method = str(r.config.get("method", "?"))
        eps = float(r.config.get("eps", 0.0)) if method in losses.FIXED_EPS else None
        groups.setdefault((method, eps, setting_of(r.config)), []).append(r)
    cells: dict[tuple, Cell] = {}
    for (method, eps, setting), group in groups.items():
        warn_if_mixed(group)
        cell = Cell(
            [100.0 * float(r.metrics[-1]["test_acc"]) for r in group],
            [int(r.config.get("seed", 0)) for r in group],
            eps,
            [str(r.path) for r in group],
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
            print(
                f"warning: pooling runs with different {key} ({', '.join(sorted(values))}): "
                f"{', '.join(str(r.path) for r in group)}",
                file=sys.stderr,
            )


def format_cell(cell: Cell, show_eps: bool) -> str:
    """'66.6 ± 0.3' for several seeds, '66.6' for one; '(ε=0.25)' appended under --best-eps."""
    text = f"{cell.mean:.1f}" if cell.std is None else f"{cell.mean:.1f} ± {cell.std:.1f}"
    return f"{text} (ε={cell.eps:g})" if show_eps and cell.eps is not None else text


def markdown_table(cells: dict[tuple, Cell], best_eps: bool = False) -> str:
    """Table 4 layout in Markdown: rows = methods, columns = settings, column best in bold."""
    rows = sorted({k[0] for k in cells}, key=method_sort_key)
    settings = sorted({k[1] for k in cells}, key=setting_sort_key)
    several_datasets = len({s[0] for s in settings}) > 1
    titles = [(f"{s[0]} " if several_datasets else "") + noise_label(s[1], s[2]) for s in settings]
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
        lines.append(f"| {method_label(*row)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def n_summary(cells: dict[tuple, Cell]) -> str:
    """The seed counts of the cells, e.g. '3' or '1-3'."""
    counts = sorted({len(c.values) for c in cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def write_table_csv(cells: dict[tuple, Cell], path: Path) -> None:
    """One CSV row per cell: method, eps, dataset, noise, rate, n, mean, std, seeds, values, runs."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "eps",
                "dataset",
                "noise",
                "noise_rate",
                "n_seeds",
                "mean_acc",
                "std_acc",
                "seeds",
                "accuracies",
                "runs",
            ]
        )
        for (row, s), c in sorted(
            cells.items(), key=lambda kv: (method_sort_key(kv[0][0]), setting_sort_key(kv[0][1]))
        ):
            w.writerow(
                [
                    row[0],
                    "" if c.eps is None else c.eps,
                    *s,
                    len(c.values),
                    f"{c.mean:.4f}",
                    "" if c.std is None else f"{c.std:.4f}",
                    " ".join(map(str, c.seeds)),
                    " ".join(f"{v:.4f}" for v in c.values),
                    " ".join(c.runs),
                ]
            )


def mean_std_text(values: Sequence[float]) -> str:
    """'66.6 ± 0.3' (sample std) for several values, '66.6' for one."""
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def budget_table(runs: Sequence[runfolder.RunRecord]) -> str:
    """Rows = methods; per (setting, budget T): final test accuracy and noisy_fit (memorisation), % over seeds."""
    groups: dict[tuple, list[runfolder.RunRecord]] = {}
    for r in runs:
        key = (str(r.config.get("method", "?")), setting_of(r.config), int(r.config.get("max_steps", 0)))
        groups.setdefault(key, []).append(r)
    columns = sorted({k[1:] for k in groups}, key=lambda c: (setting_sort_key(c[0]), c[1]))
    methods = sorted({k[0] for k in groups}, key=lambda m: method_sort_key((m, None)))
    acc = {k: [100.0 * float(r.metrics[-1]["test_acc"]) for r in g] for k, g in groups.items()}
    fit = {
        k: [100.0 * float(r.metrics[-1]["noisy_fit"]) for r in g if r.metrics[-1].get("noisy_fit") is not None]
        for k, g in groups.items()
    }
    best = {c: max(round(statistics.fmean(v), 1) for k, v in acc.items() if k[1:] == c) for c in columns}
    seeds = sorted({len(g) for g in groups.values()})
    lines = [
        f"Final clean test accuracy (%) and noisy_fit (% of the flipped training labels the final model "
        f"predicts, i.e. memorised) after T steps: mean ± sample std over {'-'.join(map(str, seeds))} seeds; "
        "best accuracy per column in bold.",
        "",
        "| Method | "
        + " | ".join(f"{noise_label(*c[0][1:])} T={c[1]} {what}" for c in columns for what in ("test acc", "noisy_fit"))
        + " |",
        "|---|" + "---:|" * (2 * len(columns)),
    ]
    for m in methods:
        texts = []
        for c in columns:
            k = (m, *c)
            if k not in acc:
                texts += ["–", "–"]
                continue
            text = mean_std_text(acc[k])
            texts += [
                f"**{text}**" if round(statistics.fmean(acc[k]), 1) == best[c] else text,
                mean_std_text(fit[k]) if fit[k] else "–",
            ]
        lines.append(f"| {method_label(m)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def run_labels(runs: Sequence[runfolder.RunRecord]) -> list[str]:
    """Legend labels: the method, plus whatever else varies among the runs (eps, setting, seed)."""

    def varies(fn) -> bool:
        return len({json.dumps(fn(r)) for r in runs}) > 1

    labels = []
    for r in runs:
        c = r.config
        parts = [METHOD_LABELS.get(c.get("method"), str(c.get("method")))]
        if c.get("method") in losses.FIXED_EPS and varies(lambda r: r.config.get("eps")):
            parts.append(f"ε={c.get('eps'):g}")
        if varies(lambda r: setting_of(r.config)):
            dataset, noise, rate = setting_of(c)
            parts.append(
                (f"{dataset} " if varies(lambda r: r.config.get("dataset")) else "") + noise_label(noise, rate)
            )
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
            ax.text(
                0.5, 0.5, f"no '{key}' in these runs", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
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
    settings = {setting_of(r.config) for r in runs}
    if len(settings) == 1:
        dataset, noise, rate = settings.pop()
        return f"Learning dynamics: {dataset}, {noise_label(noise, rate)}"
    return "Learning dynamics"
