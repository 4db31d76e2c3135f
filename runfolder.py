"""A run folder's lifecycle, in one place for train.py, eval.py and sweep.py.

    OUT/                         what train.py writes (and the only files --overwrite removes)
      train.lock                 while a run lives: {"pid", "host"}, taken with O_CREAT|O_EXCL
      config.json  noise.json    the resolved configuration; the noise record
      metrics.jsonl              one JSON object per evaluation (a line torn by a kill is dropped)
      dynamics.safetensors       the label audit's per-example sums
      model.safetensors          the final model: its presence marks the run finished
      checkpoints/step_NNNNNN/   complete once trainer_state.json is in it (written last, then renamed
                                 into place); pruned by renaming to tmp_* first, so never half-deleted

A checkpoint holds only safetensors and JSON that this file writes and reads: model.safetensors
(the unwrapped model), optimizer.safetensors (the optimizer's tensors; its groups and scalars as JSON
metadata), state.safetensors (the run's own tensors: audit sums, ELR targets), rng_<rank>.safetensors
(torch, CUDA, numpy and Python RNG states of each process), trainer_state.json and config.json.
Nothing is unpickled: a folder holding any other file (Accelerate's optimizer.bin, *.pkl) is refused
before anything loads, because loading such a file can run code.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

LOCK_NAME = "train.lock"
# Everything train.py (and eval.py --audit/--plot into the run folder) may write: --overwrite removes these only.
RUN_FILES = ("config.json", "noise.json", "metrics.jsonl", "model.safetensors", "dynamics.safetensors", "checkpoints",
             "label_issues.csv", "dynamics.png", "proselflc", LOCK_NAME)  # proselflc/: Accelerate's tracker logs
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.safetensors", "trainer_state.json", "config.json")
RNG_FILE = re.compile(r"rng_(\d+)\.safetensors")
STEP_DIR = re.compile(r"step_(\d+)")
_held_locks: list[Path] = []  # locks this process took; release_locks() removes them, also at exit


# ----------------------------------------------------------------------------- files written whole or not at all


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save_file; its own I/O error (disk full, file too large) becomes an OSError like any write's."""
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as e:  # e.g. 'Error while serializing: I/O error: File too large (os error 27)'
        code = re.search(r"os error (\d+)|code: (\d+)", str(e))
        err = int(code.group(1) or code.group(2)) if code else errno.EIO
        raise OSError(err, os.strerror(err), str(path)) from None


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_tensors into path.tmp, then rename: a kill or a full disk never leaves a partial file under path's name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_tensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (on the CPU) and metadata; a damaged file is a ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def read_json(path: Path, kind: type = dict) -> Any:
    """A JSON file holding a `kind`; a missing, damaged or other-typed file is a ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} this suite writes")
    return value


# ----------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records: one JSON object per line; a line torn by a kill (or not an object) is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics records up to `step` (a resume from that step writes the later ones again)."""
    if path.exists():
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))


# ----------------------------------------------------------------------------- the lock


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def read_lock(lock: Path) -> dict:
    """The lock file's {'pid', 'host'}; {} when it is empty or torn."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def check_folder_path(out: Path) -> None:
    """Refuse an output folder that is a file or lies under one."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies under the file {path}"
            raise ValueError(f"--output-dir {out} {where}: choose a folder")
        if path.exists():
            return


def lock(out: Path) -> Path:
    """Create out and take out/train.lock atomically with our pid and host; a lock left by a dead process on this
    host (or torn for over 10 s) is taken over with a notice, a live one is refused with one line naming it."""
    check_folder_path(out)
    path, me = out / LOCK_NAME, {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released by its holder meanwhile: try again
                torn = not holder and age > 10  # killed between create and write
                if torn or (holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))):
                    print(f"note: {out} was locked by pid {holder.get('pid')} on {holder.get('host')}, which is gone; "
                          f"taking the lock over", file=sys.stderr)
                    path.unlink(missing_ok=True)
                    continue
                raise ValueError(f"{out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                                 f"see {path}): wait for it to end, or choose another --output-dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _held_locks.append(path)
            return path
    except OSError as e:
        raise ValueError(f"cannot write to --output-dir {out} ({e.strerror or e}): choose a writable folder") from None
    raise ValueError(f"{out}: another run keeps taking {path}; choose another --output-dir")


def release_locks() -> None:
    """Remove the run-folder locks this process holds."""
    while _held_locks:
        path = _held_locks.pop()
        if read_lock(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- what a folder holds


def is_run_folder(out: Path) -> bool:
    """Whether out holds a train.py run (its config.json, metrics.jsonl or checkpoints)."""
    return any((out / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints"))


def is_finished(out: Path) -> bool:
    """A run is finished when its final model is saved (written last, atomically)."""
    return (out / "model.safetensors").is_file()


def contents(out: Path) -> str:
    """'config.json, metrics.jsonl, ...': what a folder holds besides the lock and the checkpoints, for messages."""
    names = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, "checkpoints")) if out.is_dir() else []
    return ", ".join(names)


def foreign_files(out: Path) -> list[str]:
    """The names in out that no run writes (a user's own files)."""
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp")) \
        if out.is_dir() else []


def clear_run_files(out: Path) -> None:
    """--overwrite: delete the files a run writes (RUN_FILES), except our lock; anything else in out stays."""
    for child in out.iterdir():
        if child.name == LOCK_NAME or (child.name not in RUN_FILES and not child.name.endswith(".tmp")):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ----------------------------------------------------------------------------- checkpoints


def is_complete(ckpt: Path) -> bool:
    """A checkpoint folder step_N whose trainer_state.json (written last, before the rename into place) exists."""
    return STEP_DIR.fullmatch(ckpt.name) is not None and (ckpt / "trainer_state.json").is_file()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in out/checkpoints, or None."""
    done = sorted((p for p in (out / "checkpoints").glob("step_*") if is_complete(p)),
                  key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))
    return done[-1] if done else None


def check_checkpoint_files(ckpt: Path) -> None:
    """Refuse a checkpoint holding any file this suite does not write (it could need unpickling) or lacking one."""
    foreign = sorted(p.name for p in ckpt.iterdir() if p.name not in CHECKPOINT_FILES and not RNG_FILE.fullmatch(p.name))
    if foreign:
        raise ValueError(f"checkpoint {ckpt} holds {', '.join(foreign[:4])}, which this suite never writes (checkpoints "
                         "are safetensors and JSON only; a pickle can run code when loaded): refused, nothing was "
                         "loaded. A checkpoint from an older version of the suite cannot be resumed: start over")
    missing = [name for name in CHECKPOINT_FILES if not (ckpt / name).is_file()]
    if missing or not any(RNG_FILE.fullmatch(p.name) for p in ckpt.iterdir()):
        raise ValueError(f"checkpoint {ckpt} is incomplete (missing {', '.join(missing) or 'rng_0.safetensors'}): "
                         "resume from another one or start over with --overwrite")


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints: each older one is renamed to tmp_* (no longer complete) first."""
    done = sorted((p for p in (out / "checkpoints").glob("step_*") if is_complete(p)),
                  key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))
    for old in done[:-keep]:
        doomed = old.with_name("tmp_pruned_" + old.name)
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    for stale in (out / "checkpoints").glob("tmp_pruned_*"):  # left by a kill during an earlier prune
        shutil.rmtree(stale, ignore_errors=True)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer state_dict as safetensors tensors ('<param>.<name>') plus JSON metadata for everything else."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    """The inverse of flatten_optimizer: a state_dict for optimizer.load_state_dict."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *json.loads(meta["scalars"]).items()]:
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and JSON metadata."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]), "python": json.dumps(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Restore what rng_state() returned (checked first by check_rng_state, so nothing is half-restored)."""
    check_rng_state(tensors, meta)
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss_next))



def check_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Raise ValueError unless rng_state()'s output would load: tried on fresh generators, the global ones untouched."""
    try:
        torch.Generator().set_state(tensors["torch"])
        kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
        np.random.RandomState().set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = json.loads(meta["python"])
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"its RNG state does not load ({type(e).__name__}: {e})") from None


def save_rng_state(path: Path) -> None:
    """This process's RNG states into a safetensors file."""
    tensors, meta = rng_state()
    save_tensors(tensors, path, meta)


def load_rng_state(path: Path) -> None:
    """Restore this process's RNG states from save_rng_state's file."""
    set_rng_state(*read_tensors(path))


def check_header(path: Path) -> None:
    """Raise ValueError unless path is a safetensors file whose header reads (no tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path.name} is not a readable safetensors file ({e})") from None


def replace_checkpoint(tmp: Path, final: Path) -> None:
    """Rename a whole checkpoint into place; one already there (the same step, written before) is moved aside first."""
    if final.exists():
        doomed = final.with_name("tmp_pruned_" + final.name)
        os.replace(final, doomed)
        shutil.rmtree(doomed)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------- command lines: one line per error


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a ValueError (one 'error:' line, exit 2), not a usage block and SystemExit."""

    def error(self, message: str):
        raise ValueError(f"{message} (see python {self.prog} --help)")


def error_line(e: Exception) -> str:
    """The one line of an error: its message; a write the system refused (permissions, disk full) says so."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return f"{e.strerror or e}: {e.filename or 'a file of the run'}; check the folder's permissions and free space"
    return str(e)


def run_cli(main: Callable[[], int | None]) -> int:
    """A script's main(); bad input or a refused write becomes one 'error: ...' line and exit code 2
    (PROSELFLC_DEBUG=1: the traceback)."""
    try:
        return main() or 0
    except (ValueError, OSError) as e:
        if os.environ.get("PROSELFLC_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
