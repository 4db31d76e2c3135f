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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import audit
import data
import hub
import losses
import report
import runfolder

ECE_BINS = 15


# ----------------------------------------------------------------------------- table


def table_main(args: argparse.Namespace) -> None:
    """--table: print the Markdown table, optionally write it (--out) and a CSV (--csv)."""
    runs = runfolder.finished_runs(args.runs)
    if len({r.config.get("max_steps") for r in runs}) > 1:  # several budgets: one column pair per budget
        text = report.budget_table(runs)
        print(text, end="")
        if args.out:
            runfolder.write_or_explain(lambda: Path(args.out).write_text(text), args.out)
        return
    cells = report.collect_cells(runs, best_eps=args.best_eps)
    text = report.markdown_table(cells, best_eps=args.best_eps)
    print(text, end="")
    if args.out:
        runfolder.write_or_explain(lambda: Path(args.out).write_text(text), args.out)
    if args.csv:
        runfolder.write_or_explain(lambda: report.write_table_csv(cells, Path(args.csv)), args.csv)


# ----------------------------------------------------------------------------- plot


def plot_main(args: argparse.Namespace) -> None:
    """--plot: write the PNG to --out (default dynamics.png)."""
    runs = [runfolder.load_run(p) for p in runfolder.find_run_dirs(args.runs)]
    out = Path(args.out or "dynamics.png")
    check_writable(out, "the plot")
    try:
        report.plot_runs(runs, out)
    except OSError as e:
        raise ValueError(f"cannot write the plot to {out} ({e.strerror or e}): choose a writable --out") from None
    print(f"wrote {out} ({len(runs)} runs)")


# ----------------------------------------------------------------------------- model evaluation


def split_logits(
    model: torch.nn.Module, ds: Any, info: data.DatasetInfo, accelerator: Accelerator, batch_size: int
) -> torch.Tensor:
    """fp32 logits [N, C] of every example of split `ds`, in split order, on CPU, on every process: data.predict
    over data.EvalBatches (each process its part, batch_size per process)."""
    batches = data.EvalBatches(
        ds,
        info,
        accelerator.device,
        batch_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        workers=data.default_workers(accelerator.num_processes),
    )
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
    return {
        "test_acc": float((logits.argmax(dim=1) == labels).float().mean()),
        "test_loss": float(F.cross_entropy(logits, labels)),
    }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """test_metrics, entropy (mean H(p)/log C) and ece from fp32 logits."""
    probs = F.softmax(logits.float(), dim=1)
    return {
        **test_metrics(logits, labels),
        "entropy": float(losses.normalized_entropy(probs).mean()),
        "ece": expected_calibration_error(probs, labels),
        "n": int(len(labels)),
    }


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
        raise FileNotFoundError(
            f"{run_dir} has no model.safetensors: the run has not finished (evaluate a finished run)"
        )
    # The test split never carries noise; skipping it avoids needing e.g. the run's noise file here.
    _, test_ds, info = data.prepare_data({**cfg, "noise": "none"})
    model = runfolder.load_final_model(run_dir, cfg, info)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision="no")  # evaluation is always fp32
    test = data.label_tensors(test_ds)
    logits = split_logits(model, test_ds, info, accelerator, args.batch_size)
    result = {
        "run": str(run_dir),
        "method": cfg.get("method"),
        "dataset": info.name,
        **classification_metrics(logits, test["label"]),
        "processes": accelerator.num_processes,
    }
    recorded = recorded_test_acc(run_dir)
    if recorded is not None:
        result["recorded_test_acc"] = recorded
    if accelerator.is_main_process:
        if args.json:
            print(json.dumps(result))
        else:
            print(f"run {run_dir}: {cfg.get('method')} on {info.name}, {result['n']} clean test examples")
            print(
                f"test_acc={result['test_acc']:.4f} test_loss={result['test_loss']:.4f} "
                f"entropy={result['entropy']:.4f} ece={result['ece']:.4f}"
                + (f" (train.py recorded test_acc={recorded:.4f})" if recorded is not None else "")
            )
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
FLAG_USES = {
    "csv": ("table",),
    "best_eps": ("table",),
    "relabel": ("audit",),
    "drop": ("audit",),
    "top": ("audit",),
    "score": ("audit",),
    "json": ("evaluate",),
    "dataset": ("evaluate", "audit"),
    "data_dir": ("evaluate", "audit"),
    "batch_size": ("evaluate", "audit"),
    "cpu": ("evaluate", "audit"),
    "out": ("plot", "table", "audit"),
    "repo_id": ("push",),
    "dry_run": ("push",),
    "stage_dir": ("push",),
}
OUTPUT_FLAGS = ("out", "csv", "relabel", "drop")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: RUN_DIR... and one of --plot / --table / --audit (none: evaluate the model); every flag typed is
    one the use reads, and every file to be written can be, before any work starts."""
    p = runfolder.Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "runs", nargs="*", metavar="RUN_DIR", help="train.py run folders (--table/--plot: or a parent folder)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plot", action="store_true", help="plot the learning dynamics of the runs to --out (PNG)")
    mode.add_argument("--table", action="store_true", help="print the Table 4 style Markdown table of final accuracies")
    mode.add_argument(
        "--audit", action="store_true", help="rank the training labels by the training dynamics; write label_issues.csv"
    )
    p.add_argument(
        "--out",
        help="output file: the PNG (--plot, default dynamics.png), the Markdown (--table), "
        "the CSV (--audit, default RUN_DIR/label_issues.csv)",
    )
    p.add_argument("--csv", help="--table: also write the cells as CSV to this file")
    p.add_argument(
        "--best-eps", action="store_true", help="--table: one row per method, each cell at its best eps (as Table 4)"
    )
    p.add_argument("--json", action="store_true", help="evaluation: print one JSON object")
    p.add_argument(
        "--dataset", help="evaluation/--audit: override the run's dataset (a Hub id or local path of the same data)"
    )
    p.add_argument("--data-dir", help="evaluation/--audit: a local copy of the data (see train.py --data-dir)")
    p.add_argument("--batch-size", type=int, help="evaluation/--audit batch size per process (default 500)")
    p.add_argument("--top", type=int, help="--audit: how many ranked examples to print (default 10)")
    p.add_argument(
        "--score",
        choices=("dynamics", "final"),
        help="--audit: rank by the training dynamics (default) or by the final model's predictions",
    )
    p.add_argument(
        "--relabel",
        metavar="PATH",
        help="--audit: write a label file with the flagged labels set to the predicted class",
    )
    p.add_argument("--drop", metavar="PATH", help="--audit: write a label file without the flagged examples (label -1)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    mode.add_argument(
        "--push-to-hub", metavar="RUN_DIR", help="upload a finished run with a model card to --repo-id (hub.py)"
    )
    p.add_argument("--repo-id", help="--push-to-hub: the Hub model repository, owner/name")
    p.add_argument("--dry-run", action="store_true", help="--push-to-hub: stage the files and list them, no network")
    p.add_argument("--stage-dir", help="--push-to-hub: where to stage the files (default: RUN_DIR-hub beside the run)")
    args = p.parse_args(argv)
    use = (
        "push"
        if args.push_to_hub
        else "plot"
        if args.plot
        else "table"
        if args.table
        else "audit"
        if args.audit
        else "evaluate"
    )
    for key, uses in FLAG_USES.items():
        if getattr(args, key) not in (None, False) and use not in uses:
            raise ValueError(
                f"--{key.replace('_', '-')} is not used by {'evaluation' if use == 'evaluate' else '--' + use.replace('push', 'push-to-hub')} "
                f"(only by {', '.join('evaluation' if u == 'evaluate' else '--' + u.replace('push', 'push-to-hub') for u in uses)}): drop it"
            )
    args.batch_size = 500 if args.batch_size is None else args.batch_size
    args.top = 10 if args.top is None else args.top
    args.score = args.score or "dynamics"
    if use == "push":
        return check_push_args(args)
    if not args.runs:
        raise ValueError(
            "no run folders given: pass train.py run folders (or, for --table/--plot, a folder holding them)"
        )
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
        hub.push_run(
            Path(args.push_to_hub),
            args.repo_id,
            dry_run=args.dry_run,
            stage_dir=Path(args.stage_dir) if args.stage_dir else None,
        )
        return
    if args.audit and not args.out and hub.is_hub_run(args.runs[0]):
        # a downloaded run lives in the Hugging Face cache, whose files are shared links: write beside the user
        args.out = args.runs[0][len(hub.HF_PREFIX) :].replace("/", "--") + "-label_issues.csv"
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
