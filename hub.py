"""Share a finished run on the Hugging Face Hub, and fetch one back.

    python eval.py --push-to-hub RUN_DIR --repo-id owner/name [--dry-run]
        Stage the run's weights, config.json, noise.json, metrics.jsonl, the dynamics plot,
        label_issues.csv (when the audit wrote one) and a model card README.md into RUN_DIR-hub/,
        then create the model repository and upload that folder (--dry-run: stage and list only).
    python eval.py hf://owner/name
        Download a pushed run into the Hugging Face cache and evaluate it like a local run folder.

The run folder itself is only read. The card is huggingface_hub's ModelCard: its YAML comes from
ModelCardData (library_name, tags, datasets, metrics and a model-index holding the final clean test
accuracy, exactly the last test_acc of metrics.jsonl).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import httpx  # httpx: the HTTP client huggingface_hub itself uses

import config
import data
import losses
import report
import runfolder

# What a pushed run holds: copied from the run folder (the optional ones when present), plus the plot and the card.
PUSHED_FILES = ("model.safetensors", "config.json", "noise.json", "metrics.jsonl")
OPTIONAL_PUSHED_FILES = ("dynamics.safetensors", "label_issues.csv")  # the audit's training dynamics and its CSV
PLOT = "dynamics.png"
CARD = "README.md"
STAGE_MARK = runfolder.MARK_NAMES["stage"]  # the staging folder's mark: never uploaded
STAGED_NAMES = frozenset((*PUSHED_FILES, *OPTIONAL_PUSHED_FILES, PLOT, CARD))
HF_PREFIX = "hf://"
# Every way huggingface_hub reports that the Hub cannot be used now: no token, offline mode, an HTTP error
# status (401, 403, 5xx, ...), a refused or timed-out connection.
HUB_ERRORS = (LocalTokenNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, httpx.TransportError)


def dataset_id(cfg: dict[str, Any]) -> str:
    """The dataset as the Hub names it (cifar10 -> uoft-cs/cifar10), else the name the run was given."""
    name = str(cfg["dataset"])
    return data.HUB_IDS.get(name, name)


def eval_result(run: runfolder.RunRecord, noise: dict[str, Any]) -> EvalResult:
    """The model-index entry: the final clean test accuracy (last test_acc of metrics.jsonl) and what it was measured on."""
    dataset, kind, rate = report.setting_of(run.config)
    return EvalResult(
        task_type="image-classification",
        dataset_type=dataset_id(run.config),
        dataset_name=f"{dataset}, clean test split (trained on {report.noise_label(kind, rate)} training labels)",
        dataset_split="test",
        dataset_args={"noise": kind, "noise_rate": rate, "realised_noise_rate": noise.get("realised_rate")},
        metric_type="accuracy",
        metric_name="final clean test accuracy",
        metric_value=run.metrics[-1]["test_acc"],
    )


def card_data(run: runfolder.RunRecord, noise: dict[str, Any], model_name: str) -> ModelCardData:
    """The card's YAML metadata; library_name pytorch: the weights are a plain torch state dict in safetensors."""
    method = str(run.config.get("method"))
    kind = str(noise.get("kind", run.config.get("noise")))
    tags = list(dict.fromkeys(["noisy-labels", method, "proselflc", "image-classification", f"noise-{kind}"]))
    return ModelCardData(
        library_name="pytorch",
        tags=tags,
        datasets=[dataset_id(run.config)],
        metrics=["accuracy"],
        model_name=model_name,
        eval_results=[eval_result(run, noise)],
    )


def hyperparameter_rows(cfg: dict[str, Any]) -> list[str]:
    """Markdown table rows of the method's and the optimiser's values from config.json."""
    keys = (
        "method",
        *config.method_keys(str(cfg.get("method"))),
        "model",
        "weights",
        "max_steps",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "lr_schedule",
        "milestones",
        "poly_power",
        "seed",
        "mixed_precision",
        "world_size",
    )
    return [f"| `{k}` | {cfg[k]} |" for k in keys if cfg.get(k) is not None]


def card_body(run: runfolder.RunRecord, noise: dict[str, Any], repo_id: str) -> str:
    """The card's Markdown: method, hyperparameters, noise record, accuracy, plot, command, how to load."""
    cfg, last = run.config, run.metrics[-1]
    best = max(run.metrics, key=lambda m: m.get("test_acc", float("-inf")))
    dataset, kind, rate = report.setting_of(cfg)
    method, realised = str(cfg.get("method")), noise.get("realised_rate")
    lines = [
        f"# {report.method_label(method, cfg.get('eps') if method in losses.FIXED_EPS else None)} on {dataset}, "
        f"{report.noise_label(kind, rate)}",
        "",
        f"A `{cfg.get('model')}` trained with `{cfg.get('method')}` by the ProSelfLC reference training suite "
        f"(`train.py`) on {dataset} with {report.noise_label(kind, rate)} training labels; accuracy is measured on "
        "the clean test split.",
        "",
        "## Result",
        "",
        f"- final clean test accuracy: **{last['test_acc']:.4f}** (step {last['step']} of {cfg.get('total_steps')})",
        f"- best clean test accuracy: {best['test_acc']:.4f} (step {best['step']})",
        "",
        f"![learning dynamics]({PLOT})",
        "",
        "## Label noise (noise.json)",
        "",
        f"- kind: `{noise.get('kind', kind)}`, requested rate {noise.get('requested_rate', rate)}"
        + (
            f", realised rate {realised:.4f} ({noise.get('num_noisy')} of {noise.get('num_examples')} "
            "training labels changed)"
            if isinstance(realised, (int, float))
            else ""
        ),
        f"- noise seed: {noise.get('seed', cfg.get('noise_seed'))}",
        "",
        "## Method and hyperparameters (config.json)",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *hyperparameter_rows(cfg),
        "",
        "## Reproduce",
        "",
        "In a checkout of the suite (at commit `{}`):".format(cfg.get("git_commit") or "unknown"),
        "",
        "```bash",
        config.reproduce_command(cfg),
        "```",
        "",
        "## Load the weights",
        "",
        "```python",
        "import json",
        "from huggingface_hub import snapshot_download",
        "from safetensors.torch import load_file",
        "import models  # models.py of the ProSelfLC suite",
        "",
        f'folder = snapshot_download("{repo_id}")',
        'cfg = json.load(open(f"{folder}/config.json"))',
        'model = models.build_model(cfg["model"], cfg["num_classes"], cfg["in_channels"])',
        'model.load_state_dict(load_file(f"{folder}/model.safetensors"))',
        "model.eval()",
        "```",
        "",
        f"or evaluate it on the clean test split: `python eval.py {HF_PREFIX}{repo_id}`.",
        "",
    ]
    return "\n".join(lines)


def model_card(run_dir: Path, repo_id: str | None = None, run: runfolder.RunRecord | None = None) -> ModelCard:
    """The model card of a finished run (`run`: the run already loaded): ModelCardData YAML, then the Markdown body."""
    run = run or runfolder.finished_run(Path(run_dir))
    noise = runfolder.read_noise(Path(run_dir))
    repo_id = repo_id or f"OWNER/{Path(run_dir).resolve().name}"
    meta = card_data(run, noise, model_name=repo_id.split("/")[-1])
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{card_body(run, noise, repo_id)}")


def default_stage_dir(run_dir: Path) -> Path:
    """RUN_DIR-hub beside the run folder: the staging folder when none is given."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + "-hub")


def prepare_stage_dir(stage_dir: Path, run_dir: Path) -> None:
    """A staging folder of the suite's own outside the run folder: a new or empty one is marked as staging; one
    marked before is emptied of what was staged there; any other folder, or anything else in it, is refused."""
    if stage_dir.resolve() == run_dir.resolve() or stage_dir.resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"the staging folder {stage_dir} lies inside the run folder {run_dir}: choose another")
    if os.path.lexists(stage_dir):
        if not stage_dir.is_dir() or stage_dir.is_symlink():
            raise ValueError(f"the staging folder {stage_dir} is not a folder: choose a new or empty folder")
        marked = runfolder.has_mark(stage_dir, "stage")
        if not marked and any(stage_dir.iterdir()):
            raise ValueError(
                f"the staging folder {stage_dir} holds files and was not staged by this suite (no "
                f"{STAGE_MARK}): choose a new or empty folder (nothing was changed)"
            )
        foreign = sorted(
            p.name
            for p in stage_dir.iterdir()
            if p.name != STAGE_MARK and (p.name not in STAGED_NAMES or p.is_symlink() or not p.is_file())
        )
        if foreign:
            raise ValueError(
                f"the staging folder {stage_dir} holds files this suite did not stage "
                f"({', '.join(foreign[:3])}): choose a new or empty folder (nothing was changed)"
            )
        for p in stage_dir.iterdir():
            if p.name != STAGE_MARK:
                p.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    runfolder.write_mark(stage_dir, "stage")


def stage_run(run_dir: Path, repo_id: str, stage_dir: Path) -> list[Path]:
    """Copy the run's files, draw the plot and write the card into stage_dir; return the staged files."""
    run = runfolder.finished_run(run_dir)
    card = model_card(run_dir, repo_id, run)  # before any write: a damaged run leaves no half-staged folder
    files = [
        runfolder.regular_file(run_dir / name)
        for name in (*PUSHED_FILES, *OPTIONAL_PUSHED_FILES)
        if os.path.lexists(run_dir / name)
    ]
    for weights in (f for f in files if f.suffix == ".safetensors"):
        runfolder.check_header(weights)
    prepare_stage_dir(stage_dir, run_dir)
    for f in files:
        shutil.copyfile(f, stage_dir / f.name)
    report.plot_runs([run], stage_dir / PLOT)
    card.save(stage_dir / CARD)
    return sorted(p for p in stage_dir.iterdir() if p.name != STAGE_MARK)


def upload(stage_dir: Path, repo_id: str, private: bool) -> str:
    """create_repo (exist_ok) + upload_folder of the staged folder; the commit URL. Hub failures: one-line ValueError."""
    try:
        if huggingface_hub.get_token() is None:
            raise LocalTokenNotFoundError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
        huggingface_hub.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=stage_dir,
            repo_type="model",
            ignore_patterns=[STAGE_MARK],
            commit_message="Upload a ProSelfLC run",
        )
    except HUB_ERRORS as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"cannot push to the Hub as {repo_id} ({type(e).__name__}: {first}); the staged files are in {stage_dir}"
        ) from None
    return str(getattr(info, "commit_url", info))


def push_run(
    run_dir: Path, repo_id: str, *, dry_run: bool = False, stage_dir: Path | None = None, private: bool = False
) -> Path:
    """Stage a finished run (the run folder is only read) and upload it to the model repo `repo_id`; the staged folder."""
    run_dir = Path(run_dir)
    config.check_repo_id(repo_id)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder: pass a finished train.py run folder")
    stage_dir = Path(stage_dir) if stage_dir is not None else default_stage_dir(run_dir)
    staged = stage_run(run_dir, repo_id, stage_dir)
    listing = "\n".join(f"  {p.name} ({p.stat().st_size:,} bytes)" for p in staged)
    if dry_run:
        print(
            f"dry run: would upload {len(staged)} files from {stage_dir} to https://huggingface.co/{repo_id}:\n{listing}"
        )
        return stage_dir
    url = upload(stage_dir, repo_id, private)
    print(f"pushed {len(staged)} files from {stage_dir} to https://huggingface.co/{repo_id} ({url}):\n{listing}")
    return stage_dir


def is_hub_run(text: str) -> bool:
    """Whether a RUN_DIR argument names a pushed run (hf://owner/name)."""
    return text.startswith(HF_PREFIX)


def download_run(text: str) -> Path:
    """snapshot_download of hf://owner/name into the Hugging Face cache; the local folder, to use as a run folder."""
    repo_id = config.check_repo_id(text[len(HF_PREFIX) :])
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, repo_type="model", allow_patterns=[*PUSHED_FILES, *OPTIONAL_PUSHED_FILES, CARD]
        )
    except (*HUB_ERRORS, LocalEntryNotFoundError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot download {text} from the Hub ({type(e).__name__}: {first})") from None
    return Path(folder)
