"""Shared test set-up: a test environment free of the user's Hugging Face settings, the repo root on sys.path, a
fresh Accelerate state for every test, and the constants, runs and helpers that several test files use."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import config

# The user's Hugging Face settings (HF_HUB_OFFLINE=1 on an offline cluster, HF_TOKEN, HF_ENDPOINT, a cache
# elsewhere) must not change a test's outcome. datasets and huggingface_hub read them once, when first imported,
# so they are removed here, before any test module imports a script; in-process tests and every subprocess
# (which inherits os.environ, or gets ENV) see the same clean environment. The caches and any stored token live
# in a folder of this test session. A test that wants other values sets them itself (monkeypatch, or env=).
HF_PREFIXES = ("HF_", "HUGGING_FACE", "HUGGINGFACE")
for _name in [name for name in os.environ if name.startswith(HF_PREFIXES)]:
    del os.environ[_name]
HF_SESSION = Path(tempfile.mkdtemp(prefix="proselflc-tests-hf-"))
atexit.register(shutil.rmtree, HF_SESSION, ignore_errors=True)
os.environ.update(
    HF_HOME=str(HF_SESSION / "home"), HF_DATASETS_CACHE=str(HF_SESSION / "datasets"), HF_HUB_DISABLE_TELEMETRY="1"
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # subprocess runs: one thread each
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]  # two CPU processes
UNREACHABLE = "http://127.0.0.1:9"  # the discard port on this machine: connections are refused at once
# 256 synthetic CIFAR-shaped images (10 classes) and the small CNN
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-size", "256", "--model", "digits_cnn", "--batch-size", "32"]
# A run of a few seconds: 6 steps, checkpoints at steps 2 and 4, evaluations at 2, 4 and 6.
TINY = ["--cpu", *SYNTHETIC, "--max-steps", "6", "--save-every", "2", "--eval-every", "2"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs do not leak settings."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ----------------------------------------------------------------------------- running the scripts


def run_script(
    *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python *args` in a subprocess (in the repo root, ENV unless env is given), output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_once_written(args: list[str], marker: Path, env: dict | None = None, seconds: float = 120) -> None:
    """Run `python *args` in the repo root and SIGKILL it as soon as `marker` exists (a kill -9 mid-run)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=ENV if env is None else env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + seconds
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def read_metrics(run: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl, parsed."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def data_config(**overrides):
    """train.py's resolved configuration of overrides['dataset'] (default: digits), then the overrides: what
    data.prepare_data takes."""

    return {**vars(config.resolve(["--dataset", str(overrides.get("dataset", config.DEFAULT_DATASET))])), **overrides}


# ----------------------------------------------------------------------------- refusals: one line, exit 2


def one_error_line(capsys) -> str:
    """The single stderr line of a run refused in this process (notes aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A subprocess refused its input: exit 2 and exactly one 'error: ...' line on stderr naming the words, no
    traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    for w in words:
        assert w in lines[0], lines[0]


class Evil:
    """A pickle that creates a marker file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- runs shared by several tests


def train_digits(folder: Path, *flags: str) -> tuple[Path, list[str]]:
    """A 300-step digits run (the digits recipe, evaluations every 100 steps) through the real command line:
    its folder and its stdout lines."""
    out = folder / "run"
    proc = run_script(
        "train.py", "--cpu", "--max-steps", "300", "--eval-every", "100", *flags, "--output-dir", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout.strip().splitlines()


@pytest.fixture(scope="session")
def clean_digits_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """Digits with clean labels (ProSelfLC), a checkpoint at step 150."""
    return train_digits(tmp_path_factory.mktemp("clean-digits"), "--save-every", "150")


@pytest.fixture(scope="session")
def noisy_digits_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The quick start: ProSelfLC on digits with 40% symmetric label noise."""
    return train_digits(
        tmp_path_factory.mktemp("noisy-digits"), "--method", "proselflc", "--noise", "symmetric", "--noise-rate", "0.4"
    )


@pytest.fixture(scope="session")
def killed_run(tmp_path_factory) -> Path:
    """A TINY run killed after its checkpoint at step 4: config, checkpoints at steps 2 and 4, metrics of steps 2,
    4 and 6, no model.safetensors. Resumable with TINY; copy it before changing it."""
    import train

    out = tmp_path_factory.mktemp("killed") / "run"
    assert train.cli([*TINY, "--output-dir", str(out)]) == 0
    (out / "model.safetensors").unlink()
    return out


@pytest.fixture
def killed_copy(killed_run, tmp_path) -> Path:
    """A copy of killed_run in the test's own folder (tmp_path / "run"), free to change."""
    return Path(shutil.copytree(killed_run, tmp_path / "run"))


def start_train(flags: list[str]) -> subprocess.Popen:
    """`python train.py *flags` in the repo root, running in the background (stderr piped, as text)."""
    return subprocess.Popen(
        [sys.executable, "train.py", *flags],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
