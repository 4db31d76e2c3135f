"""Shared test set-up: the repo root on sys.path, and a fresh Accelerate state for every test."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # subprocess runs: one thread each
# A run of a few seconds: 256 synthetic images, the small CNN, checkpoints and evaluations every 2 steps.
TINY = ["--cpu", "--dataset", "synthetic", "--synthetic-size", "256", "--model", "digits_cnn", "--batch-size", "32",
        "--max-steps", "4", "--save-every", "2", "--eval-every", "2"]


def one_error_line(capsys) -> str:
    """The single stderr line of a refused run (notes aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs do not leak settings."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def data_config(**overrides):
    """train.py's resolved configuration of overrides['dataset'] (default: digits), then the overrides: what
    data.prepare_data takes."""
    import train

    return {**vars(train.resolve_args(["--dataset", str(overrides.get("dataset", train.DEFAULT_DATASET))])), **overrides}


def kill_once_written(args: list[str], marker: Path, env: dict, seconds: float = 120) -> None:
    """Run `python *args` in the repo root and SIGKILL it as soon as `marker` exists (a kill -9 mid-run)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
