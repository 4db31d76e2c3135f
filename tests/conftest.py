"""Shared test set-up: the repo root on sys.path, and a fresh Accelerate state for every test."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
