"""A run folder's lifecycle, in one place for train.py, eval.py and sweep.py.

    OUT/                         what train.py writes (and the only files --overwrite removes)
      proselflc-run.json         the suite's mark, written when train.py first takes the folder: only a folder
                                 holding it is a run, and only there does anything get replaced or deleted
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
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import data
import losses
import models
import noise

LOCK_NAME = "train.lock"
MARK = {"suite": "proselflc", "format": 1}  # the content of a folder's mark
MARK_NAMES = {"run": "proselflc-run.json", "stage": "proselflc-stage.json"}  # a run folder's; a push's staging folder's
PUSH_RECORD = "hub_push.json"  # {"repo_id"}: written by train.py once its push at the end succeeded
# Everything train.py (and eval.py --audit/--plot into the run folder) may write: --overwrite removes these only.
RUN_FILES = (
    PUSH_RECORD,
    "config.json",
    "noise.json",
    "metrics.jsonl",
    "model.safetensors",
    "dynamics.safetensors",
    "checkpoints",
    "label_issues.csv",
    "dynamics.png",
    "proselflc",
    LOCK_NAME,
)  # proselflc/: Accelerate's tracker logs
CHECKPOINT_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "state.safetensors",
    "trainer_state.json",
    "config.json",
)
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


def regular_file(path: Path) -> Path:
    """path, if it is a regular file inside its own folder; a FIFO, device, folder or link leading out of the
    folder is a ValueError naming it, found by stat before anything opens it (so nothing waits on it)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device or folder): refused, nothing was read")
    if path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        raise ValueError(f"{path} is a link leading out of its folder: refused, nothing was read")
    return path


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (on the CPU) and metadata; a damaged or irregular file is a ValueError naming it."""
    regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: an object naming one key twice is refused (the suite never writes one)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("a key appears twice")
    return value


def parse_json(text: str, where: str) -> Any:
    """JSON text written by this suite; anything else is a ValueError naming where it came from."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not readable JSON ({e})") from None


def read_json(path: Path, schema: dict[str, Callable[[Any], bool]] | type = dict) -> Any:
    """A regular JSON file holding an object with exactly schema's fields, each passing its check (or any `schema`
    type); a missing, damaged, irregular or other file is a ValueError naming the file and the field."""
    regular_file(path)
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({getattr(e, 'strerror', None) or e})") from None
    value = parse_json(text, str(path))
    if isinstance(schema, dict):
        return check_fields(str(path), value, schema)
    if not isinstance(value, schema):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}, not the "
            f"{'object' if schema is dict else schema.__name__} this suite writes"
        )
    return value


# ----------------------------------------------------------------------------- what the suite writes: schemas


def short(value: Any) -> str:
    """A value for a one-line message: its repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(where: str, value: Any, schema: dict[str, Callable[[Any], bool]]) -> dict:
    """value, if it is an object with exactly schema's keys, each passing its check; else a ValueError naming the field."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a JSON {type(value).__name__}, not the object this suite writes: refused")
    extra, missing = sorted(value.keys() - schema.keys()), sorted(schema.keys() - value.keys())
    if extra or missing:
        what = f"has the field {extra[0]!r}" if extra else f"lacks the field {missing[0]!r}"
        raise ValueError(f"{where} {what}, unlike what this suite writes: refused, nothing was changed")
    for key, ok in schema.items():
        if not ok(value[key]):
            raise ValueError(
                f"{where}: field {key!r} = {short(value[key])} is not what this suite writes: refused, "
                "nothing was changed"
            )
    return value


def integer(lo: int = 0, hi: int = 2**53) -> Callable[[Any], bool]:
    """A check: an int (not a bool) in [lo, hi]."""
    return lambda v: type(v) is int and lo <= v <= hi


def number(lo: float = -math.inf, hi: float = math.inf) -> Callable[[Any], bool]:
    """A check: a finite int or float in [lo, hi]."""
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def text(v: Any) -> bool:
    """A check: a string."""
    return isinstance(v, str)


def boolean(v: Any) -> bool:
    """A check: true or false."""
    return type(v) is bool


def one_of(*values: Any) -> Callable[[Any], bool]:
    """A check: one of these strings (or null, when None is among them)."""
    return lambda v: (v is None or isinstance(v, str)) and v in values


def optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: null, or what ok accepts."""
    return lambda v: v is None or ok(v)


def list_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A check: a list whose items ok accepts."""
    return lambda v: isinstance(v, list) and all(ok(x) for x in v)


def schema_of(ok: Callable[[Any], bool], names: str) -> dict[str, Callable[[Any], bool]]:
    """{name: ok} for each space-separated name."""
    return dict.fromkeys(names.split(), ok)


# config.json of a run and of each checkpoint: every field config.recorded_config writes (tests/test_files.py checks
# that the two name the same fields).
RUN_CONFIG = {
    **schema_of(text, "dataset output_dir device input_path"),
    **schema_of(
        optional(text),
        "data_dir image_column label_column key_column noise_file noise_key noise_pairs "
        "milestones resume report_to push_to_hub git_commit weights",
    ),
    **schema_of(
        integer(0),
        "noise_seed resize image_size batch_size gradient_accumulation_steps seed eval_every "
        "eval_batch_size save_every keep_checkpoints log_every",
    ),
    **schema_of(integer(1), "max_steps total_steps num_classes in_channels world_size"),
    **schema_of(optional(integer(0)), "synthetic_size synthetic_classes num_workers train_eval_size"),
    **schema_of(number(0), "max_bad_fraction lr momentum weight_decay"),
    **schema_of(
        optional(number()),
        "audit_epochs eps exp_base transit gce_q alpha beta temperature elr_beta elr_lambda poly_power",
    ),
    **schema_of(boolean, "streaming deterministic overwrite cpu compile sync_bn channels_last"),
    "detach_target": optional(boolean),
    "noise_rate": number(0, 1),
    "recipe": text,
    "noise": one_of(*noise.NOISE_KINDS),
    "in_memory": one_of("auto", "yes", "no"),
    "augment": one_of("paper", "rrc"),
    "model": one_of(*models.MODELS),
    "method": one_of(*losses.METHODS),
    "trust": optional(one_of(*losses.TRUSTS)),
    "lr_schedule": one_of("step", "poly", "cosine"),
    "mixed_precision": one_of("no", "fp16", "bf16"),
    "compile_mode": one_of(None, "default", "reduce-overhead", "max-autotune"),
    "versions": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}


def read_config(path: Path) -> dict[str, Any]:
    """A config.json that train.py wrote (a run's or a checkpoint's), checked whole against RUN_CONFIG."""
    return read_json(path, RUN_CONFIG)


# trainer_state.json of a checkpoint: the counters of train.Run.state and the GradScaler's state (or null).
SCALER = {
    **schema_of(number(0), "scale growth_factor backoff_factor"),
    **schema_of(integer(0), "growth_interval _growth_tracker"),
}
TRAINER_STATE = {
    "step": integer(1),
    "best_acc": number(-1, 1),
    "best_step": integer(0),
    "loss_sum": number(),
    "eps_sum": number(),
    "n_sum": integer(0),
    "scaler": lambda v: (
        v is None or (isinstance(v, dict) and v.keys() == SCALER.keys() and all(ok(v[k]) for k, ok in SCALER.items()))
    ),
}


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of the checkpoint step_N: checked whole, its step N and within its run's steps."""
    path = ckpt / "trainer_state.json"
    state = read_json(path, TRAINER_STATE)
    match = STEP_DIR.fullmatch(ckpt.name)
    if match is None or state["step"] != int(match.group(1)) or state["best_step"] > state["step"]:
        raise ValueError(
            f"{path}: field 'step' = {short(state['step'])} is not the step of {ckpt.name}: refused, "
            "nothing was changed"
        )
    return state


def check_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], unbounded: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """tensors, if they hold exactly expected's keys with its shapes and dtypes, and finite values (+inf allowed
    for the keys in unbounded); else a ValueError naming the file and the tensor."""
    extra, missing = sorted(tensors.keys() - expected.keys()), sorted(expected.keys() - tensors.keys())
    if extra or missing:
        what = f"holds the tensor {extra[0]!r}" if extra else f"lacks the tensor {missing[0]!r}"
        raise ValueError(f"{path} {what}, unlike what this run writes: refused, nothing was changed")
    for key, want in expected.items():
        got = tensors[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(
                f"{path}: tensor {key!r} is {str(got.dtype)[6:]} {list(got.shape)}, this run's is "
                f"{str(want.dtype)[6:]} {list(want.shape)}: refused, nothing was changed"
            )
        if got.is_floating_point() and not (got.isfinite() | ((got == math.inf) if key in unbounded else False)).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values: refused, nothing was changed")
    return tensors


# ----------------------------------------------------------------------------- metrics.jsonl


# One line of metrics.jsonl (train.evaluate_and_log): the fields every line has, and those of runs with known noise.
METRICS = {
    "step": integer(1),
    "lr": number(0),
    "train_loss": number(),
    "epsilon": number(),
    "test_acc": number(0, 1),
    "test_loss": number(),
    "test_examples": integer(0),
    "process_steps": list_of(integer(0)),
    "bad_images": integer(0),
}
NOISE_METRICS = ("clean_fit", "noisy_fit", "noisy_correct", "entropy_clean", "entropy_noisy")  # NaN on an empty subset


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (none without the file), each line checked whole, their steps increasing; only the
    text after the last newline (a line a kill cut short: the suite writes each line with its newline) is dropped."""
    if not os.path.lexists(path):
        return []
    regular_file(path)
    try:
        lines = path.read_text().split("\n")[:-1]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        record = parse_json(line, where)
        known = [k for k in NOISE_METRICS if isinstance(record, dict) and k in record]
        check_fields(where, record, METRICS | dict.fromkeys(known, lambda v: type(v) is float))
        if records and record["step"] <= records[-1]["step"]:
            raise ValueError(
                f"{where}: field 'step' = {record['step']} does not follow step {records[-1]['step']}: "
                "refused, nothing was changed"
            )
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
    """The lock file's {'pid', 'host'}; {} when it is empty, torn or not a regular file (read_json)."""
    try:
        return read_json(lock)
    except ValueError:
        return {}


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
                    print(
                        f"note: {out} was locked by pid {holder.get('pid')} on {holder.get('host')}, which is gone; "
                        f"taking the lock over",
                        file=sys.stderr,
                    )
                    path.unlink(missing_ok=True)
                    continue
                raise ValueError(
                    f"{out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"see {path}): wait for it to end, or choose another --output-dir"
                ) from None
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


def has_mark(folder: Path, kind: str = "run") -> bool:
    """Whether folder holds the suite's mark of this kind ('run' or 'stage'), a regular file holding exactly MARK."""
    path = Path(folder) / MARK_NAMES[kind]
    try:
        return os.path.lexists(path) and read_json(path) == MARK
    except ValueError:
        return False


def write_mark(folder: Path, kind: str = "run") -> None:
    """Mark folder as the suite's own ('run' or 'stage'): only a marked folder is ever cleared."""
    write_atomic(Path(folder) / MARK_NAMES[kind], json.dumps(MARK))


def is_run_folder(out: Path) -> bool:
    """Whether out holds a train.py run: the suite's mark, never the names of the files it holds."""
    return has_mark(out, "run")


def suite_names(out: Path) -> list[str]:
    """The names in out that a run would write (RUN_FILES besides the lock), for a folder not marked as a run."""
    return sorted(name for name in RUN_FILES if name != LOCK_NAME and os.path.lexists(out / name))


def check_not_foreign(out: Path) -> None:
    """Refuse a folder without the suite's mark that holds files of a run's names: they are someone else's."""
    names = suite_names(out) if not is_run_folder(out) else []
    if names:
        raise ValueError(
            f"{out} holds {', '.join(names[:4])} but no {MARK_NAMES['run']}: it is not a run folder of "
            "this suite, whose files it would replace or delete; choose another --output-dir (nothing "
            "was changed)"
        )


def is_finished(out: Path) -> bool:
    """A run is finished when its final model is saved (written last, atomically)."""
    return (out / "model.safetensors").is_file()


def contents(out: Path) -> str:
    """'config.json, metrics.jsonl, ...': what a folder holds besides the lock and the checkpoints, for messages."""
    skip = (LOCK_NAME, "checkpoints", *MARK_NAMES.values())
    names = sorted(p.name for p in out.iterdir() if p.name not in skip) if out.is_dir() else []
    return ", ".join(names)


def foreign_files(out: Path) -> list[str]:
    """The names in out that no run writes (a user's own files)."""
    return (
        sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
        if out.is_dir()
        else []
    )


def clear_run_files(out: Path) -> None:
    """--overwrite of a marked run folder: delete the files a run writes (RUN_FILES) and the checkpoint folders
    (step_N, tmp_*), except our lock and the mark; anything else in out or out/checkpoints stays."""
    if not is_run_folder(out):
        raise ValueError(f"{out} is not marked as a run folder ({MARK_NAMES['run']}): nothing is deleted there")
    for child in out.iterdir():
        if child.name == LOCK_NAME or (child.name not in RUN_FILES and not child.name.endswith(".tmp")):
            continue
        if child.name == "checkpoints" and child.is_dir() and not child.is_symlink():
            for ckpt in child.iterdir():
                if re.fullmatch(r"(tmp_(pruned_)?)?step_\d+", ckpt.name) and ckpt.is_dir() and not ckpt.is_symlink():
                    shutil.rmtree(ckpt)
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
    done = sorted(
        (p for p in (out / "checkpoints").glob("step_*") if is_complete(p)),
        key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)),
    )
    return done[-1] if done else None


def check_checkpoint_files(ckpt: Path) -> None:
    """Refuse a checkpoint holding any file this suite does not write (it could need unpickling) or lacking one."""
    foreign = sorted(
        p.name for p in ckpt.iterdir() if p.name not in CHECKPOINT_FILES and not RNG_FILE.fullmatch(p.name)
    )
    for name in sorted(set(p.name for p in ckpt.iterdir()) - set(foreign)):
        regular_file(ckpt / name)  # a FIFO or a link out of the checkpoint is refused before anything opens it
    if foreign:
        raise ValueError(
            f"checkpoint {ckpt} holds {', '.join(foreign[:4])}, which this suite never writes (checkpoints "
            "are safetensors and JSON only; a pickle can run code when loaded): refused, nothing was "
            "loaded. A checkpoint from an older version of the suite cannot be resumed: start over"
        )
    missing = [name for name in CHECKPOINT_FILES if not (ckpt / name).is_file()]
    if missing or not any(RNG_FILE.fullmatch(p.name) for p in ckpt.iterdir()):
        raise ValueError(
            f"checkpoint {ckpt} is incomplete (missing {', '.join(missing) or 'rng_0.safetensors'}): "
            "resume from another one or start over with --overwrite"
        )


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints: each older one is renamed to tmp_* (no longer complete) first."""
    done = sorted(
        (p for p in (out / "checkpoints").glob("step_*") if is_complete(p)),
        key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)),
    )
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


def read_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.safetensors checked whole against the run's optimizer: its groups as this run's configuration made
    them (lr aside: the schedule sets it every step), its state of the parameters' shapes and dtypes, finite. The
    state_dict to load, with this run's own groups: a checkpoint never overrides a typed setting."""
    tensors, meta = read_tensors(path)
    check_fields(f"{path} metadata", meta, {"param_groups": text, "scalars": text})
    live = optimizer.state_dict()
    groups = parse_json(meta["param_groups"], f"{path} param_groups")
    if not isinstance(groups, list) or len(groups) != len(live["param_groups"]):
        raise ValueError(
            f"{path}: field 'param_groups' = {short(groups)} is not the {len(live['param_groups'])} "
            "group(s) of this run's optimizer: refused, nothing was changed"
        )
    for i, (saved, mine) in enumerate(zip(groups, live["param_groups"])):
        where = f"{path} param_groups[{i}]"
        check_fields(where, saved, dict.fromkeys(mine, lambda v: True))
        for key, value in mine.items():
            same = number(0)(saved[key]) if key == "lr" else type(saved[key]) is type(value) and saved[key] == value
            if not same:
                raise ValueError(
                    f"{where}: field {key!r} = {short(saved[key])} differs from this run's "
                    f"{short(value)} (set by its flags): refused, nothing was changed"
                )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scalars = parse_json(meta["scalars"], f"{path} scalars")
    entry = re.compile(r"(\d+)\.(\w+)")

    def param_of(key: str) -> torch.Tensor:
        match = entry.fullmatch(key)
        if match is None or int(match.group(1)) >= len(params):
            raise ValueError(
                f"{path}: state {key!r} belongs to no parameter of this run's model: refused, nothing was changed"
            )
        return params[int(match.group(1))]

    check_tensors(path, tensors, {k: param_of(k).detach() for k in tensors})
    check_fields(f"{path} scalars", scalars, {k: optional(number()) for k in scalars if param_of(k) is not None})
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": live["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and JSON metadata."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(key.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
        "python": json.dumps(random.getstate()),
    }
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
    """Raise ValueError unless rng_state()'s output would load: its tensors and metadata exactly as written, tried
    on fresh generators, the global ones untouched."""
    cuda = {
        k: v for k, v in tensors.items() if re.fullmatch(r"cuda\.\d+", k) and v.dtype == torch.uint8 and v.dim() == 1
    }
    check_tensors(
        "its tensors", tensors, {"torch": torch.get_rng_state(), "numpy": torch.zeros(624, dtype=torch.int64)} | cuda
    )
    check_fields("its metadata", meta, {"numpy": text, "python": text})
    if not ((tensors["numpy"] >= 0) & (tensors["numpy"] < 2**32)).all():
        raise ValueError("its numpy state holds values outside [0, 2^32)")
    try:
        torch.Generator().set_state(tensors["torch"])
        kind, pos, has_gauss, gauss = parse_json(meta["numpy"], "its numpy metadata")
        np.random.RandomState().set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = parse_json(meta["python"], "its python metadata")
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"its RNG state does not load ({type(e).__name__}: {e})") from None


def save_rng_state(path: Path) -> None:
    """This process's RNG states into a safetensors file."""
    tensors, meta = rng_state()
    save_tensors(tensors, path, meta)


def read_rng_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """save_rng_state's file, checked whole (check_rng_state)."""
    tensors, meta = read_tensors(path)
    try:
        check_rng_state(tensors, meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tensors, meta


def check_header(path: Path) -> None:
    """Raise ValueError unless path is a regular safetensors file whose header reads (no tensor is loaded)."""
    regular_file(path)
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


def peer_failed(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run exited (its own error line says why)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(e, torch.distributed.DistError) or "closed by peer" in str(e) or "remote worker" in str(e)
    )


def run_cli(main: Callable[[], int | None]) -> int:
    """A script's main(); bad input or a refused write becomes one 'error: ...' line and exit code 2
    (PROSELFLC_DEBUG=1: the traceback). Under torchrun an error every process raises is printed by rank 0 only,
    an error of one process during training by that process; a stop signal exits 143; locks are released."""
    rank = int(os.environ.get("RANK", "0"))
    STOP["signal"] = 0
    try:
        return main() or 0
    except Finished as e:
        if rank == 0:
            print(e, file=sys.stderr)
    except Stopped as e:
        if rank == 0:
            print(e, file=sys.stderr)
        return stop_code(STOP["signal"])
    except RuntimeError as e:
        if not peer_failed(e) or os.environ.get("PROSELFLC_DEBUG"):
            raise
        return 2  # another process failed and printed why; this one stops without a second line
    except (ValueError, FloatingPointError, OSError) as e:
        if os.environ.get("PROSELFLC_DEBUG"):
            raise
        agreed = isinstance(e, AgreedError) or getattr(e, "agreed", False)  # every process raised it
        if rank == 0 or (STOP["training"] and not agreed):
            print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    finally:
        STOP["training"] = False
        release_locks()
    return 0


def leave(code: int) -> NoReturn:
    """Exit with code; a process of several exits without finalising the interpreter (see the comment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The process group's C++ threads can outlive it and take the GIL while the interpreter finalises, which
        # aborts a finished run now and then (SIGABRT, "terminate called without an active exception"): the run's
        # files are closed and its lock released, so leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ----------------------------------------------------------------------------- stop signals and agreement


class Finished(Exception):
    """--resume auto on a finished run: nothing to do, exit 0 with one line."""


class Stopped(Exception):
    """SIGTERM, SIGUSR1 (preemption) or SIGINT (Ctrl-C) during training: a checkpoint was written at the step
    reached; exit stop_code (143, or 130 for Ctrl-C)."""


class AgreedError(ValueError):
    """An error every process raises together (after agree): only rank 0 prints it."""


EXIT_STOPPED = 128 + signal.SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # preemption, and Ctrl-C
STOP = {"signal": 0, "training": False}  # set by on_stop_signal; the loop checks it between steps


def stop_code(signum: int) -> int:
    """The exit status of a stop: 130 for Ctrl-C (SIGINT), as a shell reports it; 143 for preemption (SIGTERM, SIGUSR1)."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else EXIT_STOPPED


def on_stop_signal(signum: int, frame: Any) -> None:
    """During training: ask the loop to checkpoint and stop (a second signal changes nothing). Before it
    (start-up): leave at once, lock released, exit stop_code."""
    if STOP["training"] or STOP["signal"]:
        STOP["signal"] = STOP["signal"] or signum
        return
    STOP["signal"] = signum
    release_locks()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped by {signal.Signals(signum).name} during start-up: no checkpoint was written", file=sys.stderr)
    os._exit(stop_code(signum))


def stop_requested(accelerator: Accelerator, sync_step: bool) -> bool:
    """Whether a stop signal reached any process: one process reads its flag each step (no device value); several
    agree on the steps that sync anyway (log steps), so they all stop at the same step."""
    if accelerator.num_processes == 1:
        return STOP["signal"] != 0
    if not sync_step:
        return False
    return accelerator.gather(torch.tensor([STOP["signal"]], device=accelerator.device)).max().item() != 0


def agree(accelerator: Accelerator, error: str | None) -> None:
    """Raise the first process's error on every process (so all stop together); nothing when none failed."""
    errors = [e for e in gather_object([error]) if e] if accelerator.num_processes > 1 else [error] if error else []
    if errors:
        raise AgreedError(errors[0])


# ----------------------------------------------------------------------------- opening a run folder


def open_run_folder(
    out: Path, resume: str | None, overwrite: bool, accelerator: Accelerator
) -> tuple[Path | None, bool]:
    """Lock the run folder and decide what the run does with it, touching nothing else: (checkpoint to resume or
    None, whether the run files must be cleared once the data and model are built)."""
    refused = [None]
    if accelerator.is_main_process:
        try:
            lock(out)
        except ValueError as e:
            refused = [str(e)]
    broadcast_object_list(refused)  # every process stops when the main one could not take the folder
    if refused[0]:
        raise AgreedError(refused[0])
    check_not_foreign(out)
    last, started = latest_checkpoint(out), is_run_folder(out)
    if resume == "auto":
        if is_finished(out):
            raise Finished(f"{out} already holds a finished run: nothing to do (--resume auto)")
        if last is None and started:
            accelerator.print(f"note: {out} holds a run stopped before its first checkpoint: starting it over")
        ckpt, clear = last, last is None and started
    elif resume:
        if is_finished(out):
            raise ValueError(f"{out} already holds a finished run: nothing to resume; choose another --output-dir")
        ckpt, clear = find_checkpoint(resume, out, last), False
    else:
        ckpt, clear = None, overwrite
        check_fresh_folder(out, overwrite, last)
    if ckpt is not None:
        check_checkpoint(ckpt, accelerator.process_index)
        read_metrics(out / "metrics.jsonl")  # checked whole before the resume cuts it at the checkpoint's step
    return ckpt, clear


def check_fresh_folder(out: Path, overwrite: bool, last: Path | None) -> None:
    """A new run may go into an empty folder or, with --overwrite, replace a run; never over anything else."""
    if overwrite:
        if foreign_files(out) and not is_run_folder(out):  # only a marked run is replaced
            raise ValueError(
                f"--overwrite: {out} holds files that are not a train.py run's "
                f"({', '.join(foreign_files(out)[:4])}): it replaces only a run; choose "
                "another --output-dir (nothing was deleted)"
            )
    elif is_finished(out):
        raise ValueError(f"{out} already holds a finished run: pass --overwrite to replace it, or another --output-dir")
    elif is_run_folder(out):
        if last is not None:
            raise ValueError(
                f"{out} holds an unfinished run (last checkpoint {last.name}): pass --resume latest (or "
                f"auto) to continue it, or --overwrite to start it over"
            )
        raise ValueError(
            f"{out} holds a run stopped before its first checkpoint ({contents(out)}): nothing "
            f"to resume; pass --overwrite to start it over, or choose another --output-dir"
        )


def find_checkpoint(resume: str, out: Path, last: Path | None) -> Path:
    """The checkpoint to resume from: the latest complete one in out/checkpoints, or the folder given."""
    if resume == "latest":
        if last is None:
            held = contents(out)
            advice = (
                f"the folder holds {held}: nothing to resume; start it over with --overwrite instead of --resume latest"
                if held
                else "the folder holds no run yet: start without --resume"
            )
            raise ValueError(f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; {advice}")
        return last
    path = Path(resume)
    if not is_complete(path):
        raise ValueError(f"--resume {resume}: not a complete checkpoint (a step_N folder with trainer_state.json)")
    return path


def check_checkpoint(ckpt: Path, rank: int) -> None:
    """Before anything loads or is written: only regular files this suite writes, each readable, its config and
    trainer state checked whole, this process's RNG state loadable."""
    check_checkpoint_files(ckpt)
    try:
        for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
            check_header(ckpt / name)
        config = read_config(ckpt / "config.json")
        state = read_trainer_state(ckpt)
        if state["step"] >= config["max_steps"]:
            raise ValueError(
                f"trainer_state.json: field 'step' = {state['step']} is not below the run's {config['max_steps']} steps"
            )
        rng = ckpt / f"rng_{rank}.safetensors"
        if os.path.lexists(rng):
            read_rng_state(rng)
    except ValueError as e:
        raise ValueError(
            f"checkpoint {ckpt} is damaged: {e}; resume from another one or start over with "
            f"--overwrite (nothing was loaded)"
        ) from None


def start_run_folder(
    out: Path, config: dict, record: dict, clear: bool, step: int | None, accelerator: Accelerator
) -> None:
    """After every check: mark the folder as a run's, clear the old run's files (--overwrite, or an auto restart),
    then write config.json and noise.json; a resume (from `step`) keeps the metrics lines up to its step."""
    accelerator.wait_for_everyone()  # every process has read the folder before the main one changes it
    if accelerator.is_main_process:
        if not is_run_folder(out):
            write_mark(out)
        if clear:
            clear_run_files(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(config, indent=2))
        write_atomic(out / "noise.json", json.dumps(record, indent=2))
        if step is not None:
            truncate_metrics(out / "metrics.jsonl", step)
    accelerator.wait_for_everyone()


def storage_error(e: OSError | str, out: Path, what: str) -> str:
    """One line for a failed write (disk full, read-only): what failed and which checkpoint can still be resumed."""
    last = latest_checkpoint(out)
    usable = (
        f"{last} is complete and still usable: free space or fix the folder, then run again with --resume latest"
        if last is not None
        else "no checkpoint was completed yet"
    )
    why = e if isinstance(e, str) else (e.strerror or str(e))
    return f"cannot write the {what} in {out} ({why}); {usable}"


# ----------------------------------------------------------------------------- writing and reading a checkpoint


@dataclass
class Trainee:
    """What a checkpoint holds: the prepared model and optimizer, the run's own tensors (by prefix), its counters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    own: dict[str, torch.nn.Module | Any]  # prefix -> an object with state_dict/load_state_dict (loss, audit)
    config: dict
    state: dict


def own_tensors(trainee: Trainee) -> dict[str, torch.Tensor]:
    """The run's own state beyond model and optimizer, as '<prefix>.<name>' tensors."""
    return {f"{prefix}.{k}": v for prefix, obj in trainee.own.items() for k, v in obj.state_dict().items()}


def write_checkpoint(accelerator: Accelerator, trainee: Trainee, tmp: Path) -> None:
    """The main process's files of a checkpoint, trainer_state.json last (it marks the checkpoint complete)."""
    model = accelerator.unwrap_model(trainee.model, keep_torch_compile=False)
    save_tensors(model.state_dict(), tmp / "model.safetensors")
    tensors, meta = flatten_optimizer(trainee.optimizer.state_dict())
    save_tensors(tensors, tmp / "optimizer.safetensors", meta)
    save_tensors(own_tensors(trainee), tmp / "state.safetensors")
    (tmp / "config.json").write_text(json.dumps(trainee.config, indent=2))  # the checkpoint's own record (resume check)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    (tmp / "trainer_state.json").write_text(json.dumps(trainee.state | {"scaler": scaler}))


def save_checkpoint(accelerator: Accelerator, trainee: Trainee, out: Path, step: int, keep: int) -> None:
    """Every process writes its RNG state and the main one the rest into tmp_step_N, renamed to step_N once whole,
    then older ones are pruned: a kill or a full disk at any point leaves the last complete checkpoint usable. A
    failure on any process stops every process with its message."""
    folder = out / "checkpoints"
    final, tmp = folder / f"step_{step:06d}", folder / f"tmp_step_{step:06d}"

    def attempt(write: Callable[[], Any]) -> str | None:
        try:
            write()
        except OSError as e:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes space
            return storage_error(e, out, f"checkpoint {final.name}")
        return None

    main = accelerator.is_main_process
    agree(
        accelerator,
        attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True))) if main else None,
    )
    try:
        agree(accelerator, attempt(lambda: save_rng_state(tmp / f"rng_{accelerator.process_index}.safetensors")))
    except AgreedError:
        if main:  # another process failed to write its part: the partial checkpoint only takes space
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    agree(
        accelerator,
        attempt(
            lambda: (
                write_checkpoint(accelerator, trainee, tmp),
                replace_checkpoint(tmp, final),
                prune_checkpoints(out, keep),
            )
        )
        if main
        else None,
    )


def load_checkpoint(accelerator: Accelerator, trainee: Trainee, ckpt: Path) -> None:
    """Model, optimizer, the run's own tensors, this process's RNG state and the step counters (into trainee.state)
    from a checkpoint that check_checkpoint accepted: every file checked whole against this run before any loads."""
    state = read_trainer_state(ckpt)
    model = accelerator.unwrap_model(trainee.model, keep_torch_compile=False)
    weights = check_tensors(ckpt / "model.safetensors", read_tensors(ckpt / "model.safetensors")[0], model.state_dict())
    optimizer = read_optimizer(ckpt / "optimizer.safetensors", trainee.optimizer)
    own = check_tensors(
        ckpt / "state.safetensors",
        read_tensors(ckpt / "state.safetensors")[0],
        own_tensors(trainee),
        unbounded=("dynamics.window_end",),
    )  # the audit's window: inf while it is open
    saved_world = read_config(ckpt / "config.json")["world_size"]
    same_world = saved_world == accelerator.num_processes
    rng = read_rng_state(ckpt / f"rng_{accelerator.process_index}.safetensors") if same_world else None
    try:
        model.load_state_dict(weights)
        trainee.optimizer.load_state_dict(optimizer)
        for prefix, obj in trainee.own.items():
            obj.load_state_dict({k[len(prefix) + 1 :]: v for k, v in own.items() if k.startswith(prefix + ".")})
        if accelerator.scaler is not None and state["scaler"]:
            accelerator.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"checkpoint {ckpt} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"resume from another one or start over with --overwrite"
        ) from None
    if rng is not None:
        set_rng_state(*rng)
    else:
        accelerator.print(
            f"note: {ckpt} was written by {saved_world} processes, this run has "
            f"{accelerator.num_processes}: the data order and RNG differ from an uninterrupted run"
        )
    trainee.state.update({k: v for k, v in state.items() if k != "scaler"})
    accelerator.print(f"resumed from {ckpt} at step {trainee.state['step']}")


# ----------------------------------------------------------------------------- reading finished runs (eval, hub)


class RunRecord(NamedTuple):
    """One train.py output folder: its config.json dict and its metrics.jsonl records."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]


def find_run_dirs(paths: Sequence[str]) -> list[Path]:
    """Run folders among `paths`: a folder holding metrics.jsonl, or every such folder below a parent."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a folder: pass train.py run folders or a folder holding them")
        if (p / "metrics.jsonl").is_file() or (p / "config.json").is_file():
            found.append(p)
            continue
        below = sorted(m.parent for m in p.rglob("metrics.jsonl"))
        if not below:
            raise FileNotFoundError(f"{p} has no metrics.jsonl and no run folder below it: pass train.py run folders")
        found.extend(below)
    if not found:
        raise ValueError("no run folders given: pass train.py run folders or a folder holding them")
    return list(dict.fromkeys(found))  # a run given twice counts once


def read_run_config(path: Path) -> dict[str, Any]:
    """config.json of a run folder, checked whole (read_config)."""
    if not os.path.lexists(path / "config.json"):
        raise FileNotFoundError(f"{path} has no config.json: not a train.py run folder")
    return read_config(path / "config.json")


def load_run(path: Path) -> RunRecord:
    """Read config.json and metrics.jsonl, each checked whole (read_config, read_metrics)."""
    config = read_run_config(path)
    f = path / "metrics.jsonl"
    if not os.path.lexists(f):
        raise FileNotFoundError(
            f"{path} has no metrics.jsonl: the run has not evaluated yet (or this is not a run folder)"
        )
    metrics = read_metrics(f)
    if not metrics:
        raise ValueError(f"{f} holds no evaluation yet: wait for the run's first evaluation")
    return RunRecord(path, config, metrics)


def finished_run(run_dir: Path) -> RunRecord:
    """The run at `run_dir` if it has finished (model.safetensors written, metrics.jsonl at its last step)."""
    if not is_finished(Path(run_dir)):
        raise ValueError(f"{run_dir} has no model.safetensors: the run has not finished (pass a finished run)")
    return load_run(Path(run_dir))  # model.safetensors is written last, after the final metrics line


def finished_runs(paths: Sequence[str]) -> list[RunRecord]:
    """Load the runs under `paths`, skipping (with a warning) those that have not finished."""
    runs = []
    for p in find_run_dirs(paths):
        run = load_run(p)
        if is_finished(p):
            runs.append(run)
        else:
            total = run.config.get("total_steps", run.config.get("max_steps"))
            print(
                f"warning: skipping unfinished run {p} (step {run.metrics[-1].get('step')} of {total})", file=sys.stderr
            )
    if not runs:
        raise ValueError("none of the given runs has finished: the table reports final accuracies only")
    return runs


# noise.json (noise.noise_record): the label noise a run trained on.
NOISE_RECORD = {
    "kind": one_of(*noise.NOISE_KINDS),
    "requested_rate": optional(number(0, 1)),
    "expected_rate": optional(number(0, 1)),
    "realised_rate": number(0, 1),
    "realised_rate_per_class": list_of(optional(number(0, 1))),
    "pairs": lambda v: v is None or (isinstance(v, dict) and all(integer(0)(x) for x in v.values())),
    "seed": optional(integer(0)),
    "num_classes": integer(1),
    "num_examples": integer(0),
    "num_noisy": integer(0),
    "key": text,
    "noise_file": optional(text),
    "noise_key": optional(text),
    "noisy_keys": list_of(text),
    "noisy_indices": optional(list_of(integer(0))),
}


def read_noise(run_dir: Path) -> dict[str, Any]:
    """noise.json of a run folder, checked whole ({} for a run without one)."""
    f = Path(run_dir) / "noise.json"
    return read_json(f, NOISE_RECORD) if os.path.lexists(f) else {}


def load_final_model(run_dir: Path, cfg: dict[str, Any], info: data.DatasetInfo) -> torch.nn.Module:
    """Build the run's model from config.json, check it fits the dataset, load model.safetensors (fp32, eval mode)."""
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no model.safetensors: the run has not finished (evaluate a finished run)"
        )
    if int(cfg["num_classes"]) != info.num_classes:
        raise ValueError(
            f"the model has {cfg['num_classes']} classes but dataset {info.name!r} has "
            f"{info.num_classes}: pass the --dataset the run was trained on"
        )
    if int(cfg.get("in_channels", info.channels)) != info.channels:
        raise ValueError(
            f"the model takes {cfg['in_channels']} input channels but dataset {info.name!r} has "
            f"{info.channels}: pass the --dataset the run was trained on"
        )
    model = models.build_model(
        cfg["model"], int(cfg["num_classes"]), int(cfg.get("in_channels", info.channels))
    ).float()
    model.load_state_dict(check_tensors(weights, read_tensors(weights)[0], model.state_dict()))
    return model.eval()


def write_or_explain(write, path: str | Path) -> None:
    """Run a write; a refusal by the system (full disk, read-only) becomes one line naming the file."""
    try:
        write()
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror or e}): choose a writable place with free space") from None
