"""sweep.py uses every value typed once: duplicate grid values, values no job reads and train.py flags after -- that
the grid sets itself are one error line and exit 2, before any run starts or any folder is made."""

import pytest

import runfolder
import sweep


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seeds", "0", "0"], "--seeds lists 0 twice"),
        (["--methods", "cce", "gce", "cce"], "--methods lists 'cce' twice"),
        (["--settings", "symmetric:0.4", "symmetric:0.4"], "--settings lists ('symmetric', 0.4) twice"),
        (["--budgets", "300", "300"], "--budgets lists 300 twice"),
        (["--methods", "cce", "--eps", "0.1"], "--eps is read only by ls, cp, bootsoft, boothard"),
        (["--gpus", "0", "--jobs", "2"], "--jobs with --gpus"),
        (
            ["--accelerate-config", "accelerate_config.yaml"],
            "--accelerate-config is read by --launcher accelerate only",
        ),
        (["--", "--seed", "3"], "--seed after --: the grid sets it"),
        (["--", "--output-dir", "elsewhere"], "--output-dir after --: the grid sets it"),
        (["--", "--max-steps=5"], "--max-steps after --: the grid sets it"),
        (["--", "--resume", "latest"], "--resume after --: the grid sets it"),
        (["--", "--overwrite"], "--overwrite after --: the grid sets it"),
        (["--", "--method", "gce"], "--method after --: the grid sets it"),
    ],
)
def test_a_value_the_grid_would_not_use_once_is_one_line(tmp_path, capsys, argv, words):
    root = tmp_path / "sweep"
    argv = ["--dry-run", "--output-root", str(root), *argv]
    assert runfolder.run_cli(lambda: sweep.main(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not root.exists()


def test_a_train_flag_the_grid_leaves_open_reaches_every_run(tmp_path, capsys):
    argv = ["--dry-run", "--methods", "cce", "--budgets", "300", "--output-root", str(tmp_path), "--", "--lr", "0.05"]
    assert sweep.main(argv) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert len(commands) == 3 and all("--lr 0.05" in c and c.endswith("--resume auto") for c in commands)
