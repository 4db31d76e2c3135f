"""Tests of hub.py and eval.py's Hub uses on one real short digits run: the dry-run card and staged files, and
every way a push or a download fails without network (no test here reaches the network)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ENV, UNREACHABLE, assert_one_error_line, read_metrics, run_script, snapshot
from huggingface_hub import ModelCard

import config
import eval as ev
import hub
import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step ProSelfLC run on digits with 40% symmetric noise."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert (
        train.cli(
            [
                "--cpu",
                "--noise",
                "symmetric",
                "--noise-rate",
                "0.4",
                "--max-steps",
                "20",
                "--eval-every",
                "10",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    return out


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The tests' environment (no Hugging Face setting of the caller's) with an empty HF_HOME of this test, plus
    extra."""
    return ENV | {"HF_HOME": str(tmp_path / "hf-home")} | extra


def eval_py(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run eval.py in a subprocess with `env`."""
    return run_script("eval.py", *args, env=env)


def test_dry_run_stages_the_run_and_a_card_whose_accuracy_is_the_final_test_acc(run: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    stage = tmp_path / "stage"
    proc = eval_py(
        hub_env(tmp_path, HF_HUB_OFFLINE="1"),
        "--push-to-hub",
        str(run),
        "--repo-id",
        "someone/digits-run",
        "--dry-run",
        "--stage-dir",
        str(stage),
    )
    assert proc.returncode == 0, proc.stderr
    assert "dry run: would upload 7 files" in proc.stdout and "model.safetensors" in proc.stdout
    assert sorted(p.name for p in stage.iterdir()) == [
        "README.md",
        "config.json",
        "dynamics.png",
        "dynamics.safetensors",
        "metrics.jsonl",
        "model.safetensors",
        "noise.json",
        "proselflc-stage.json",
    ]  # the mark: not uploaded
    for name in hub.PUSHED_FILES:  # copies, byte for byte
        assert (stage / name).read_bytes() == (run / name).read_bytes()
    assert (stage / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert snapshot(run) == before

    card = ModelCard.load(stage / "README.md")
    final = read_metrics(run)[-1]["test_acc"]
    [result] = card.data.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == final  # exactly, not rounded
    assert result.dataset_type == "digits" and result.dataset_split == "test"
    assert result.dataset_args["noise"] == "symmetric" and result.dataset_args["noise_rate"] == 0.4
    assert card.data.library_name == "pytorch" and {"noisy-labels", "proselflc"} <= set(card.data.tags)
    assert card.data.datasets == ["digits"] and card.data.metrics == ["accuracy"]
    noise = json.loads((run / "noise.json").read_text())
    assert (
        f"realised rate {noise['realised_rate']:.4f}" in card.text and "![learning dynamics](dynamics.png)" in card.text
    )
    assert f"{final:.4f}** (step 20 of 20)" in card.text and "models.build_model" in card.text
    assert config.reproduce_command(json.loads((run / "config.json").read_text())) in card.text


def test_the_cards_command_resolves_to_the_runs_configuration(run: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    command = config.reproduce_command(cfg)
    assert command.startswith("python train.py --dataset digits --noise symmetric --noise-rate 0.4 ")
    resolved = vars(config.resolve(shlex.split(command)[2:]))
    skipped = {
        *config.NOT_REPRODUCED,
        "resize",
        "image_size",
        "eps",
        "gce_q",
        "alpha",
        "beta",
        "elr_beta",
        "elr_lambda",
    }
    differs = {k: (v, cfg[k]) for k, v in resolved.items() if k not in skipped and cfg.get(k) != v}
    assert differs == {}
    assert "--eps" not in command and "--resize" not in command  # proselflc reads no eps; digits live in memory


def test_label_issues_are_staged_when_the_audit_wrote_them(run: Path, tmp_path: Path) -> None:
    audited = tmp_path / "audited"
    shutil.copytree(run, audited)
    (audited / "label_issues.csv").write_text("index,key,given_label,label_quality,is_label_issue\n0,k,1,0.1,True\n")
    stage = hub.push_run(audited, "someone/digits-run", dry_run=True)
    assert stage == audited.with_name("audited-hub")
    assert (stage / "label_issues.csv").read_bytes() == (audited / "label_issues.csv").read_bytes()
    (audited / "label_issues.csv").unlink()
    hub.push_run(audited, "someone/digits-run", dry_run=True)  # a second staging replaces the first
    assert not (stage / "label_issues.csv").exists()


@pytest.mark.parametrize(
    "env, words",
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}, ("OfflineModeIsEnabled",)),
        ({"HF_ENDPOINT": UNREACHABLE}, ("no Hugging Face token",)),
        ({"HF_ENDPOINT": UNREACHABLE, "HF_TOKEN": "hf_not_a_real_token"}, ("ConnectError",)),
    ],
)
def test_a_push_without_the_hub_is_one_line_and_changes_nothing(
    run: Path, tmp_path: Path, env: dict, words: tuple
) -> None:
    before = snapshot(run)
    proc = eval_py(
        hub_env(tmp_path, **env),
        "--push-to-hub",
        str(run),
        "--repo-id",
        "someone/digits-run",
        "--stage-dir",
        str(tmp_path / "stage"),
    )
    assert_one_error_line(proc, "cannot push to the Hub as someone/digits-run", *words)
    assert snapshot(run) == before


def test_evaluating_a_hub_run_offline_is_one_line(tmp_path: Path) -> None:
    assert_one_error_line(eval_py(hub_env(tmp_path, HF_HUB_OFFLINE="1"), "hf://x/y"), "cannot download hf://x/y")
    assert not (tmp_path / "hf-home" / "hub" / "models--x--y" / "snapshots").exists()


def test_a_bad_repo_id_an_unfinished_run_and_a_bad_stage_dir_are_refused(run: Path, tmp_path: Path) -> None:
    for repo_id in ("no-owner", "a/b/c", "bad..name/x", "owner/"):
        with pytest.raises(ValueError, match="is not a Hub repository id"):
            hub.push_run(run, repo_id, dry_run=True)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(ValueError, match="has no model.safetensors: the run has not finished"):
        hub.push_run(unfinished, "someone/x", dry_run=True)
    with pytest.raises(ValueError, match="inside the run folder"):
        hub.push_run(run, "someone/x", dry_run=True, stage_dir=run / "hub")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not staged by this suite"):
        hub.push_run(run, "someone/x", dry_run=True, stage_dir=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (unfinished.parent / "unfinished-hub").exists()


def test_auditing_a_hub_run_ranks_by_its_dynamics_and_writes_beside_the_user(
    run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    cache = tmp_path / "hf-cache-snapshot"  # stands in for the download: what a push stages, as snapshot_download gives
    cache.mkdir()
    for name in (*hub.PUSHED_FILES, *hub.OPTIONAL_PUSHED_FILES):
        if (run / name).is_file():
            shutil.copyfile(run / name, cache / name)
    monkeypatch.setattr(hub, "download_run", lambda text: cache)
    monkeypatch.chdir(tmp_path)
    before = snapshot(cache)
    ev.main(["--audit", "hf://someone/digits-run", "--cpu", "--top", "0"])
    out = capsys.readouterr()
    assert "by the early training dynamics" in out.out and "notice:" not in out.err
    assert (tmp_path / "someone--digits-run-label_issues.csv").is_file() and snapshot(cache) == before


def test_a_stage_dir_the_system_refuses_is_one_line(run: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("mine")
    proc = eval_py(
        hub_env(tmp_path),
        "--push-to-hub",
        str(run),
        "--repo-id",
        "someone/x",
        "--dry-run",
        "--stage-dir",
        str(tmp_path / "a-file" / "stage"),
    )
    assert_one_error_line(proc, "Not a directory", str(tmp_path / "a-file" / "stage"), "permissions")
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--push-to-hub", "RUN"], "needs --repo-id"),
        (["--repo-id", "a/b", "RUN"], r"--repo-id is not used by evaluation \(only by --push-to-hub\)"),
        (["--stage-dir", "S", "RUN"], r"--stage-dir is not used by evaluation \(only by --push-to-hub\)"),
        (["--push-to-hub", "RUN", "--repo-id", "a/b", "OTHER"], "takes its one run folder"),
        (["--push-to-hub", "RUN", "--repo-id", "a b"], "is not a Hub repository id"),
    ],
)
def test_push_arguments_are_checked(run: Path, args: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):  # eval.py prints it as one 'error:' line (tested above)
        ev.main([str(run) if a == "RUN" else a for a in args])
