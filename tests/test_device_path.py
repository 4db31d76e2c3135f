"""The device path: a training step that never waits for the device between log steps, and
evaluation that slices device tensors in large batches."""

import collections
import contextlib
import json

import torch
from conftest import data_config

import config
import data
import losses
import models
import train

# Tensor methods that read a device value on the host: each one waits for the device to finish.
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Count READS and blocking copies to a device (to/cuda/copy_ without non_blocking=True) by name."""
    counts = collections.Counter()

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def to(self, *args, **kwargs):
        parse = {k: v for k, v in kwargs.items() if k != "copy"}  # _parse_to takes to()'s other arguments
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **parse)
        like = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("other")
        moves = device is not None and (like is None or like.device != self.device)  # to(x) of x's device: a cast
        if moves and not non_blocking:
            counts["to(device) blocking"] += 1
        return original_to(self, *args, **kwargs)

    def copy_(self, src, non_blocking=False):
        if not non_blocking and src.device != self.device:
            counts["copy_ across devices blocking"] += 1
        return original_copy(self, src, non_blocking)

    original_to, original_copy = torch.Tensor.to, torch.Tensor.copy_
    for name in READS + ("cuda",):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    yield counts
    monkeypatch.undo()


def test_training_steps_between_log_steps_read_nothing_from_the_device(tmp_path, monkeypatch):
    """Count host reads per step of train.main over steps that neither log, evaluate nor save; with CUDA
    also run them under torch.cuda.set_sync_debug_mode("error"). Batch 512 of 1,437 digits: an epoch every
    2 steps, so epoch starts are among the steps counted."""
    steps, cuda = 8, torch.cuda.is_available()
    per_step, marks = [], []
    original_iter = data.TrainBatches.__iter__

    def marked_iter(self):
        inner = original_iter(self)
        for k in range(steps):
            marks.append(dict(counts))  # at each next(): the interval k -> k+1 is step k's batch and loop body
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error" if 1 <= k < steps - 1 else 0)
            yield next(inner)

    # losses._check_range reads class ids and rows only from CPU tensors, by design (on an accelerator it
    # is skipped, since there it would be a sync): on this CPU stand-in it is not the data path's read
    monkeypatch.setattr(losses, "_check_range", lambda *a, **k: None)
    monkeypatch.setattr(data.TrainBatches, "__iter__", marked_iter)
    every = str(10 * steps)
    argv = [
        "--max-steps",
        str(steps),
        "--batch-size",
        "512",
        "--log-every",
        every,
        "--eval-every",
        every,
        "--save-every",
        every,
        "--train-eval-size",
        "64",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    with counting_host_reads(monkeypatch) as counts:
        try:
            train.main(argv + ([] if cuda else ["--cpu"]))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    assert len(marks) == steps
    for k in range(1, steps - 1):  # step 0 holds the one-time set-up, the last step logs and evaluates
        step = {name: marks[k + 1].get(name, 0) - marks[k].get(name, 0) for name in set(marks[k + 1]) | set(marks[k])}
        per_step.append({name: n for name, n in step.items() if n})
    assert per_step == [{}] * (steps - 2), per_step


def test_evaluation_slices_device_tensors_and_predict_equals_a_bare_forward(monkeypatch):
    """In-memory evaluation: no DataLoader, the split decoded once; predict's logits, in split order, equal a
    bare forward of the same images, also when 3 processes each run a padded part and the parts are gathered."""
    _, test_ds, info = data.prepare_data(data_config())
    torch.manual_seed(0)
    model = models.build_model("digits_cnn", info.num_classes, info.channels).eval()
    monkeypatch.setattr(torch.utils.data, "DataLoader", None)  # in-memory evaluation must not build one
    whole = data.EvalBatches(test_ds, info, torch.device("cpu"), batch_size=128)
    assert [len(x) for x in whole] == [128, 128, 104] and len(whole) == 360
    t = data.to_tensors(test_ds)
    with torch.no_grad():
        bare = model(data.normalize(t["image"], info.mean, info.std))
    assert torch.allclose(data.predict(model, whole, info), bare, atol=1e-5)
    assert torch.equal(whole.label, t["label"]) and torch.equal(whole.index, torch.arange(360))
    rows = torch.tensor([5, 3, 300, 7, 11])
    parts = [data.EvalBatches(test_ds, info, torch.device("cpu"), 1, rows, rank, 3) for rank in range(3)]
    assert [len(list(p)) for p in parts] == [2, 2, 2]  # ceil(5 / 3) each: the last part padded with row 11
    logits = [data.predict(model, p, info) for p in parts]  # each process's own part ...
    gathered = data.predict(model, parts[0], info, gather=lambda mine: torch.cat([mine, *logits[1:]]))  # ... gathered
    assert torch.allclose(gathered, bare[rows], atol=1e-5) and torch.equal(parts[2].label, t["label"][rows])


def test_eval_batch_size_follows_the_batch_size_and_is_recorded(tmp_path, capsys):
    assert config.resolve(["--batch-size", "64"]).eval_batch_size == 64
    assert config.resolve(["--eval-batch-size", "1000"]).eval_batch_size == 1000
    assert config.resolve(["--dataset", "cifar100"]).train_eval_size == 10_000  # a small share of the run
    out = tmp_path / "run"
    assert (
        train.cli(
            ["--cpu", "--max-steps", "2", "--eval-every", "2", "--eval-batch-size", "50", "--output-dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["eval_batch_size"] == 50
    assert train.cli(["--cpu", "--eval-batch-size", "0", "--output-dir", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --eval-batch-size must be at least 1, got 0"
