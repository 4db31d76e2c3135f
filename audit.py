"""The label audit whole: the statistics gathered during training, their file, the estimator, and the
ranked CSV and relabel/drop label files (python eval.py --audit RUN_DIR). docs/audit.md explains the method.

- audit score (training dynamics; the early-learning effect, Arpit et al. 2017; Northcutt et al. 2021;
  Patrini et al. 2017): train.py adds softmax(z_i) of every training step of the early window that held
  example i, from the forward pass before that step's update, so i was last fitted an epoch earlier and the
  network has not memorised the noisy labels yet (a stream: its evaluations in that window). The window is
  --audit-epochs, or chosen by the run (TrainingDynamics.window_closes: it closes once the labels
  the network had missed start being fitted significantly more often, i.e. memorisation starts); the audit
  prints it. p_bar_i = their mean fits the noisy labels, p_bar ~ q T, with q the clean-label posterior
  and T[i, j] = P(given j | true i). T comes from cleanlab's confident joint C of p_bar (C[j, k]: examples
  given j with p_bar_k >= the mean p_bar_k of the examples given k; rows scaled to the label counts), keeping
  off the diagonal only the pairs whose count is significantly above an even spread of all off-diagonal
  mass (significant_pairs: a class the data shows clean keeps the identity row), and
  q_i = max(p_bar_i T^-1, 0) normalised; T is then re-estimated from the counts of (given label, argmax q)
  until argmax q stops changing (hard EM; a round that would flag half of some label's examples is refused).
  label_quality_i = q_i[y_i] (y = the given label),
  predicted_label_i = argmax_k q_i[k], is_label_issue_i = predicted_label_i != y_i: the threshold needs no
  clean labels. aum_i = mean over all evaluations of z_i[y_i] - max_{k != y_i} z_i[k] (the area under
  the margin, Pleiss et al. 2020) is a column. A second view, LinearProbe (a linear cross-entropy head on the
  network's features, fitted on the same batches), is summed alongside; when its flags and the head's overlap
  less than VIEWS_AGREE, or the head puts most of some label in another class (fits_labels), the probe's
  columns stand and the audit prints a one-line warning (audit_view); else, when T re-estimated from the flags
  is nearly singular (transition_warning), a warning that the list is less sure. The audit prints its noise
  estimate per given label (noise_rate_text). With --score final, or a run without dynamics.safetensors,
  the final model's softmax p replaces q (final_* columns always hold it); a model that memorised the
  noise agrees with it there. corrected_label and eps are ProSelfLC's target class and eps_i at t = T
  from the final model.
- label files (--relabel / --drop): CSV `key,label` for every training example, keyed by
  example_key (noise.py), so row order does not matter; flagged examples get predicted_label, or
  -1, which drops the example from the training set.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

import config
import data
import losses
import runfolder


class TrainingDynamics:
    """Per-row sums of the predictions on the training split, the label audit's input (eval.py).

    early_prob_sum[i] = sum of softmax(z_i) over the training steps of the early window whose batch held row i,
    early_count[i] their number: z_i is the training forward pass, before that step's update, so example i was
    last fitted an epoch earlier, and the network fits clean labels before it memorises the noisy ones (Arpit
    et al. 2017). The window is --audit-epochs epochs, or by default chosen by the run (window_closes): per
    epoch e, of the rows whose previous prediction missed their given label, the share now predicted as it,
    m_e = hits_e / misses_e. Learning drives m_e down; once the network memorises the labels it has not
    fitted, m_e rises again; the window closes at the start of the epoch where that rise is significant.
    Extra state for it: last_pred (int32 per row: 5 MB for ImageNet's 1.28M rows, against 5 GB of sums) and
    two counts per epoch. A stream's batches carry no row of the scored subset, so there the early sums come
    from the evaluations within --audit-epochs epochs (config.STREAM_AUDIT_EPOCHS if not given; at least the first
    evaluation; its length unknown, an epoch counts as the subset's size).
    margin_sum[i] = sum over evaluations of z_y - max_{k != y} z_k of the un-augmented image (the area under
    the margin, Pleiss et al. 2020), count[i] = evaluations of row i, over the whole run. y = the given
    (noisy) label; rows are the training split's rows (a stream: positions in the evaluated subset). Every
    process holds the same sums and counts, on the device, so every process closes the window at the same step.
    """

    SMOOTH = 5  # epochs pooled on each side of the test in window_closes
    Z = 3.0  # one-sided z of the two-proportion test in window_closes

    def __init__(
        self,
        labels: torch.Tensor,
        num_classes: int,
        device: torch.device,
        audit_epochs: float | None,
        from_batches: bool,
        total_images: int = 0,
    ):
        self.label = labels.to(device)
        self.from_batches, self.auto = from_batches, audit_epochs is None and from_batches
        fixed = audit_epochs if audit_epochs is not None else config.STREAM_AUDIT_EPOCHS
        self.end = torch.tensor(math.inf if self.auto else float(fixed), dtype=torch.float64, device=device)
        self._window_end = float(self.end)  # in epochs; inf: still open
        self.margin_sum = torch.zeros(len(labels), device=device)
        self.count = torch.zeros(len(labels), dtype=torch.int64, device=device)
        self.early_prob_sum = torch.zeros(len(labels), num_classes, device=device)
        self.early_count = torch.zeros(len(labels), dtype=torch.int64, device=device)
        self.probe_prob_sum: torch.Tensor | None = None  # the LinearProbe's early sums (keep_probe)
        self.last_pred = torch.full((len(labels),), -1, dtype=torch.int32, device=device)
        epochs = math.ceil(total_images / max(len(labels), 1)) + 1 if self.auto else 0  # of the whole run
        self.misses = torch.zeros(epochs, dtype=torch.int64, device=device)
        self.hits = torch.zeros_like(self.misses)
        self.epoch = 0

    def keep_probe(self) -> None:
        """Keep the early sums of a LinearProbe's softmax too (train.py fits one on the training batches)."""
        self.probe_prob_sum = torch.zeros_like(self.early_prob_sum)

    @property
    def window_end(self) -> float:
        """The window's end in epochs (inf: open) as last read from the device (refresh), or as set."""
        return self._window_end

    @window_end.setter
    def window_end(self, value: float) -> None:
        self._window_end = float(value)
        self.end.fill_(float(value))

    def refresh(self) -> None:
        """Read the window's end from the device (one host sync: train.py calls it on --log-every steps)."""
        self._window_end = float(self.end)

    @classmethod
    def window_closes(cls, hits, misses) -> torch.Tensor:
        """Whether the window ends after these completed epochs (a bool tensor on their device, no host sync):
        some m_e = sum(hits) / sum(misses) over epochs e-SMOOTH+1..e exceeds the lowest m of the epochs before it
        (m0 over n0 misses) by Z sqrt(m0 (1 - m0) (1/n + 1/n0)), for e >= 2 SMOOTH - 1."""
        hits, misses = torch.as_tensor(hits, dtype=torch.float64), torch.as_tensor(misses, dtype=torch.float64)
        k, last = cls.SMOOTH, len(misses)
        if last < 2 * k:
            return torch.zeros((), dtype=torch.bool, device=misses.device)
        pooled = lambda x: (c := torch.cat([x.new_zeros(1), x.cumsum(0)]))[k:] - c[:-k]  # noqa: E731 - e = k-1 .. last-1
        n, h = pooled(misses), pooled(hits)
        valid = n > 0
        m = torch.where(valid, h / n.clamp(min=1), torch.inf)
        low, where = torch.cummin(m, 0)  # the lowest m up to each epoch
        m0 = torch.cat([m.new_full((1,), torch.inf), low[:-1]])  # ... before it
        n0 = n[torch.cat([where.new_zeros(1), where[:-1]])]
        e = torch.arange(k - 1, last, device=misses.device)
        spread = cls.Z * torch.sqrt((m0 * (1 - m0)).clamp(min=0) * (1 / n.clamp(min=1) + 1 / n0.clamp(min=1)))
        return (valid & (e >= 2 * k - 1) & torch.isfinite(m0) & (m - m0 > spread)).any()

    def observes_step(self, t: int, global_batch: int) -> bool:
        """Whether training step t (0-based) adds its batch to the early sums: epoch t * B / N < the window's end.
        An open window is tested on the device at the first step of each epoch; the host reads the outcome on
        --log-every steps (refresh), and observe() masks the steps in between, so no step syncs for it."""
        if not self.from_batches:
            return False
        epoch = t * global_batch // len(self.label)
        if self.auto and epoch > self.epoch and math.isinf(self._window_end) and epoch < len(self.misses):
            closes = self.window_closes(self.hits[:epoch], self.misses[:epoch]) & self.end.isinf()
            self.end.copy_(torch.where(closes, float(epoch), self.end))
        self.epoch = epoch
        return t * global_batch < self._window_end * len(self.label)

    def observes_evaluation(self, step: int, global_batch: int, eval_every: int) -> bool:
        """Whether the evaluation after `step` adds to the early sums (streams): the first one, or within the window."""
        return not self.from_batches and (
            step <= eval_every or step * global_batch <= self.window_end * len(self.label)
        )

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, rows: torch.Tensor, probe_logits: torch.Tensor | None = None) -> None:
        """Add softmax(logits) (and the LinearProbe's softmax) at `rows` to the early sums and, while the window is
        chosen, count this epoch's hits and misses (every process passes the gathered batch; no host sync)."""
        inside = self.epoch < self.end  # on the device: the window may have closed since the host last read it
        self.early_prob_sum.index_add_(0, rows, logits.float().softmax(1) * inside)
        if probe_logits is not None and self.probe_prob_sum is not None:
            self.probe_prob_sum.index_add_(0, rows, probe_logits.float().softmax(1) * inside)
        self.early_count.index_add_(0, rows, torch.ones_like(rows) * inside)
        if self.auto and self.from_batches and self.epoch < len(self.misses):
            pred, given, last = logits.argmax(1), self.label[rows], self.last_pred[rows]
            missed = (last >= 0) & (last != given) & inside
            self.misses[self.epoch] += missed.sum()
            self.hits[self.epoch] += (missed & (pred == given)).sum()
            self.last_pred[rows] = torch.where(inside, pred.to(torch.int32), last)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, early: bool) -> None:
        """Add one evaluation's margins (and, for a stream in the early window, probabilities) at `rows`."""
        z = logits.float()
        given = z.gather(1, labels[:, None]).squeeze(1)
        other = z.scatter(1, labels[:, None], float("-inf")).amax(1)
        self.margin_sum.index_add_(0, rows, given - other)
        self.count.index_add_(0, rows, torch.ones_like(rows))
        if early:
            self.observe(z, rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "margin_sum": self.margin_sum,
            "count": self.count,
            "early_prob_sum": self.early_prob_sum,
            "early_count": self.early_count,
            "last_pred": self.last_pred,
            **({"probe_prob_sum": self.probe_prob_sum} if self.probe_prob_sum is not None else {}),
            "misses": self.misses,
            "hits": self.hits,
            "window_end": self.end,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if name == "window_end":
                self.window_end = float(value)
            else:
                getattr(self, name).copy_(value)

    def window_text(self) -> str:
        """The early window as saved and printed, e.g. 'epochs [0, 21) chosen by the run'."""
        self.refresh()
        end = self.window_end if math.isfinite(self.window_end) else self.epoch + 1
        how = (
            "--audit-epochs"
            if not self.auto
            else (
                "chosen by the run"
                if math.isfinite(self.window_end)
                else "chosen by the run: never closed, the whole run"
            )
        )
        if not self.from_batches:
            how = "evaluations of a stream within " + how.replace("chosen by the run", "the default")
        return f"epochs [0, {end:g}) ({how})"

    def save(self, path: Path, keys: list[str] | None) -> None:
        """dynamics.safetensors: the sums, count and given label per row; the window and a stream's subset keys in the metadata."""
        tensors = {
            k: v.cpu().contiguous()
            for k, v in (self.state_dict() | {"label": self.label}).items()
            if k in ("margin_sum", "count", "early_prob_sum", "early_count", "probe_prob_sum", "label")
        }
        meta = {"rows": "split"} if keys is None else {"rows": "stream_subset", "keys": json.dumps(keys)}
        self.refresh()
        end = self.window_end
        meta |= {
            "early": "training_batches" if self.from_batches else "evaluations",
            "audit_epochs": f"{end:g}" if math.isfinite(end) else f"{self.epoch + 1:g}",
            "window": "auto" if self.auto else "fixed",
            "window_text": self.window_text(),
        }
        runfolder.save_tensors_atomic(tensors, path, meta)


class LinearProbe:
    """A linear softmax head on the input of the network's last Linear layer (a forward pre-hook, detached), fitted
    with plain cross-entropy on the given labels by its own momentum SGD (step LR / (1 + the batch's mean squared
    feature norm), scale-free), on the gathered batch on every process: a view no training loss distorts, and no
    training result changes (no autograd, no random numbers: it starts at zero)."""

    LR = 5.0
    MOMENTUM = 0.9

    def __init__(self, model: torch.nn.Module, num_classes: int, device: torch.device):
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        dim = head.in_features + 1  # the bias as a constant feature
        self.weight = torch.zeros(num_classes, dim, device=device)
        self.velocity = torch.zeros_like(self.weight)
        self.features: torch.Tensor | None = None
        head.register_forward_pre_hook(self.keep)

    def keep(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """The forward pre-hook: the features of the last forward pass, detached."""
        self.features = args[0].detach()

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The probe's logits of this batch, before one SGD step of cross-entropy on (features, labels)."""
        x = torch.cat([features.float().flatten(1), features.new_ones(len(features), 1, dtype=torch.float32)], 1)
        logits = x @ self.weight.T
        grad = (logits.softmax(1) - F.one_hot(labels, self.weight.shape[0]).float()).T @ x / len(x)
        self.velocity.mul_(self.MOMENTUM).add_(grad)
        self.weight.sub_(self.velocity * (self.LR / (1 + x.square().sum(1).mean())))
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "velocity": self.velocity}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)


def corrected_targets(
    logits: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProSelfLC at the end of training (step = T): eps_i and argmax_k of losses.py's target q~ of the run's settings."""
    total = int(cfg["total_steps"])
    method = (
        cfg["method"] if cfg["method"] in ("proselflc", "proselflc_t") else "proselflc"
    )  # any run: ProSelfLC's view
    loss_fn = losses.build_loss(
        method,
        logits.shape[1],
        total_steps=total,
        exp_base=cfg.get("exp_base"),
        transit=cfg.get("transit"),
        temperature=cfg.get("temperature"),
        trust=cfg.get("trust"),
    )
    with torch.no_grad():
        target = loss_fn.target(logits.float(), labels, step=total)
    return loss_fn.last_epsilon, target.argmax(dim=1)


def final_model_columns(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The final model's view: its predicted class and its p(given label) per training example."""
    probs = F.softmax(logits.float(), dim=1)
    return {
        "final_predicted_label": probs.argmax(dim=1),
        "final_label_quality": probs.gather(1, labels[:, None]).squeeze(1),
    }


# dynamics.safetensors (TrainingDynamics.save): its metadata fields.
DYNAMICS_META = {
    "rows": runfolder.one_of("split", "stream_subset"),
    "early": runfolder.one_of("training_batches", "evaluations"),
    "audit_epochs": runfolder.text,
    "window": runfolder.one_of("auto", "fixed"),
    "window_text": runfolder.text,
}


def read_dynamics_file(path: Path, num_classes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """dynamics.safetensors checked whole: its five tensors over the same rows (labels in [0, num_classes),
    counts >= 0 and not all 0, sums finite), its metadata fields exactly as written; else one line naming the field."""
    dyn, meta = runfolder.read_tensors(path)
    n = len(dyn["label"]) if "label" in dyn and dyn["label"].dim() == 1 else 0
    runfolder.check_tensors(
        path,
        dyn,
        {
            "label": torch.zeros(n, dtype=torch.int64),
            "count": torch.zeros(n, dtype=torch.int64),
            "early_count": torch.zeros(n, dtype=torch.int64),
            "margin_sum": torch.zeros(n),
            "early_prob_sum": torch.zeros(n, num_classes),
        }
        | ({"probe_prob_sum": torch.zeros(n, num_classes)} if "probe_prob_sum" in dyn else {}),  # older runs: none
    )
    stream = meta.get("rows") == "stream_subset"
    runfolder.check_fields(f"{path} metadata", meta, DYNAMICS_META | ({"keys": runfolder.text} if stream else {}))
    keys = runfolder.parse_json(meta["keys"], f"{path} metadata 'keys'") if stream else None
    bad = next(
        (
            name
            for name, bad in (
                ("label", ((dyn["label"] < 0) | (dyn["label"] >= num_classes)).any()),
                ("count", (dyn["count"] < 0).any() or not dyn["count"].any()),
                ("early_count", (dyn["early_count"] < 0).any()),
                ("early_prob_sum", (dyn["early_prob_sum"] < 0).any()),
                ("probe_prob_sum", "probe_prob_sum" in dyn and (dyn["probe_prob_sum"] < 0).any()),
                (
                    "audit_epochs",
                    not runfolder.number(0)(runfolder.parse_json(meta["audit_epochs"], f"{path} audit_epochs")),
                ),
                ("keys", stream and not (runfolder.list_of(runfolder.text)(keys) and len(set(keys)) == len(keys) == n)),
            )
            if bad
        ),
        None,
    )
    if bad is not None:
        raise ValueError(
            f"{path}: field {bad!r} is not what train.py writes (labels in [0, {num_classes}), counts "
            "at least 0 and not all 0, distinct string keys, one per row): refused"
        )
    return dyn, meta


def read_dynamics(
    run_dir: Path, train_ds: Any, num_classes: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(dynamics.safetensors, checked whole, scattered onto the rows of the map-style training split, its
    metadata); None if the run has none.

    A streamed run's rows are positions in its evaluated subset; their example keys (in the file's
    metadata) place them in the split. Rows never evaluated get count 0.
    """
    path = run_dir / "dynamics.safetensors"
    if not os.path.lexists(path):
        return None
    dyn, meta = read_dynamics_file(path, num_classes)
    n = len(train_ds)
    if meta["rows"] == "stream_subset":
        row_of = {k: i for i, k in enumerate(train_ds["example_key"])}
        keys = json.loads(meta["keys"])
        if any(k not in row_of for k in keys):
            raise ValueError(f"{path}: examples of the run are not in the training split: pass the run's --dataset")
        rows = torch.tensor([row_of[k] for k in keys], dtype=torch.int64)
    else:
        rows = torch.arange(len(dyn["label"]))
        if len(rows) != n:
            raise ValueError(f"{path} has {len(rows)} rows but the training split has {n}: pass the run's --dataset")
    out = {k: torch.zeros((n, *v.shape[1:]), dtype=v.dtype).index_copy(0, rows, v) for k, v in dyn.items()}
    return out, meta


def pair_counts(rows: torch.Tensor, cols: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float [C, C]: how many examples have (rows[i], cols[i]) = (j, k)."""
    return torch.zeros(num_classes, num_classes).index_put_((rows, cols), torch.ones(len(rows)), accumulate=True)


def confident_joint(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C[j, k]: examples given label j whose p_k >= t_k = mean p_k over the examples given k (of such k, the most
    probable), each row scaled to the count of label j (Northcutt et al. 2021, cleanlab's confident joint)."""
    num_classes = probs.shape[1]
    given = torch.bincount(labels, minlength=num_classes).float()
    t = torch.zeros(num_classes).index_add_(0, labels, probs.gather(1, labels[:, None]).squeeze(1)) / given
    above = probs >= torch.where(given > 0, t, torch.inf)  # nobody is confidently in a class nobody is given
    confident = above.any(dim=1)
    true = torch.where(above, probs, -1.0).argmax(dim=1)
    joint = pair_counts(labels[confident], true[confident], num_classes)
    return joint / joint.sum(dim=1, keepdim=True).clamp(min=1) * given[:, None]


def significant_pairs(counts: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """bool [C, C]: which off-diagonal counts[i, j] (true i, given j) are noise, not the estimate's own scatter.

    Null hypothesis for a pair: the off-diagonal mass m of the whole matrix is spread evenly over the
    C (C - 1) pairs, counts[i, j] ~ Poisson(lambda), lambda = max(m / (C (C - 1)), 1) (the floor: a count of
    one or two is scatter, not a pair). A pair is kept when P(X >= counts[i, j]) = gammainc(counts[i, j],
    lambda) < alpha / (C (C - 1)) (Bonferroni over the pairs). An even spread is what symmetric noise gives,
    and there pruning loses nothing: T = a I + b 1 1^T keeps the order of p, so argmax q = argmax p. Pair-flip
    and partial pair noise stand far above it, and a class whose off-diagonal counts are only scatter keeps
    the identity row.
    """
    num_classes = len(counts)
    off = counts * (1 - torch.eye(num_classes))
    pairs = max(num_classes * (num_classes - 1), 1)
    lam = torch.full_like(off, max(float(off.sum()) / pairs, 1.0))
    tail = torch.where(off > 0, torch.special.gammainc(off.clamp(min=1e-12), lam), torch.ones_like(off))
    return tail < alpha / pairs


def noise_transition(joint: torch.Tensor) -> torch.Tensor:
    """T[i, j] = P(given j | true i) from the counts C[j, i] (given j, true i), keeping only significant_pairs off
    the diagonal (the rest of row i's mass stays on its diagonal); a class nobody is in keeps its labels."""
    counts = joint.T
    keep = significant_pairs(counts) | torch.eye(len(joint), dtype=torch.bool)
    kept = torch.where(keep, counts, 0.0)
    kept.diagonal().add_(counts.sum(dim=1) - kept.sum(dim=1))
    mass = kept.sum(dim=1)
    return torch.where(mass[:, None] > 0, kept / mass.clamp(min=1e-12)[:, None], torch.eye(len(joint)))


def clean_posterior(probs: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """q = max(p T^-1, 0) normalised: the fit to the noisy labels, p = q T, solved for the clean-label posterior q
    (Patrini et al. 2017's backward correction); rows left without mass keep p."""
    q = (probs @ torch.linalg.pinv(transition.double()).float()).clamp_(min=0)  # in place: N x C can be GBs
    total = q.sum(dim=1, keepdim=True)
    q.div_(total.clamp_(min=1e-12))
    empty = total.squeeze(1) <= 1e-12
    q[empty] = probs[empty]
    return q


def audit_posterior(p_bar: torch.Tensor, labels: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """q = clean_posterior(p_bar, T): T from the confident joint, then re-estimated from the counts of
    (given, argmax q) until argmax q stops changing (hard EM, at most `rounds` times). A round that would flag
    half or more of some given label's examples is refused (each label is mostly right: noise below 1/2 per
    label, as T being invertible towards q needs), and the last accepted q stands."""
    num_classes = p_bar.shape[1]
    given = torch.bincount(labels, minlength=num_classes)
    q = clean_posterior(p_bar, noise_transition(confident_joint(p_bar, labels)))
    for _ in range(rounds):
        new = clean_posterior(p_bar, noise_transition(pair_counts(labels, q.argmax(dim=1), num_classes)))
        flagged = torch.bincount(labels[new.argmax(dim=1) != labels], minlength=num_classes)
        if (2 * flagged >= given.clamp(min=1)).any():
            return q
        if torch.equal(new.argmax(dim=1), q.argmax(dim=1)):
            return new
        q = new
    return q


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two bool flags (1 when neither flags anything): how far two views agree."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


VIEWS_AGREE = 0.8  # the least overlap of the head's and the probe's flags at which the audit trusts the head
NEAR_SINGULAR = 1 / 3  # the least singular value of T under which p T^-1 magnifies errors more than 3-fold


def dynamics_columns(dyn: dict[str, torch.Tensor], scored: torch.Tensor, view: str = "head") -> dict[str, torch.Tensor]:
    """The audit's columns per row: p_bar = mean early softmax of the view ('head': the network's, 'probe': the
    LinearProbe's), q = audit_posterior over the scored rows, predicted = argmax q, label_quality = q[given],
    aum = mean margin (unscored rows: p_bar)."""
    p_bar = (
        dyn["early_prob_sum" if view == "head" else "probe_prob_sum"] / dyn["early_count"].clamp(min=1)[:, None].float()
    )
    given = dyn["label"].long()
    q = p_bar.clone()
    q[scored] = audit_posterior(p_bar[scored], given[scored])
    return {
        "predicted_label": q.argmax(dim=1),
        "label_quality": q.gather(1, given[:, None]).squeeze(1),
        "aum": dyn["margin_sum"] / dyn["count"].clamp(min=1).float(),
    }


def fits_labels(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> int | None:
    """None when every given label's most frequent predicted class is itself (each label mostly right, as the
    estimator assumes; symmetric noise 0.6 over 10 classes still keeps 0.46 against 0.07), else the first label
    whose examples a view mostly puts in one other class."""
    counts = pair_counts(labels, predicted, num_classes)
    given = counts.sum(dim=1) > 0
    broken = given & (counts.diagonal() < counts.max(dim=1).values)
    return int(broken.nonzero()[0]) if broken.any() else None


def noise_rates(labels: torch.Tensor, is_issue: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The audit's estimate of the noise rate per given label: the share of its examples flagged."""
    given = torch.bincount(labels, minlength=num_classes).float()
    return torch.bincount(labels[is_issue], minlength=num_classes).float() / given.clamp(min=1)


def transition_warning(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> str | None:
    """A one-line warning when T, re-estimated from (given, predicted), is nearly singular: its least singular value
    under NEAR_SINGULAR (a two-way swap at rate r has 1 - 2r: r above 1/3), where the posterior p T^-1 magnifies the
    network's errors and two classes' labels barely tell them apart; else None."""
    counts = pair_counts(labels, predicted, num_classes)
    smallest = float(torch.linalg.svdvals(noise_transition(counts)).min())
    if smallest >= NEAR_SINGULAR:
        return None
    shares = counts * (1 - torch.eye(num_classes)) / counts.sum(dim=1, keepdim=True).clamp(min=1)
    j, k = divmod(int(shares.argmax()), num_classes)
    return (
        f"warning: the estimated noise is near the limit of what labels can tell apart (up to {float(shares[j, k]):.2f} "
        f"of label {j} looks like {k}; the noise transition's least singular value {smallest:.2f} is under 1/3, so the "
        "posterior magnifies the network's errors more than 3-fold): this list is less sure than elsewhere (more wrong "
        "flags, more flips missed); check a sample by hand before acting on it"
    )


def audit_view(
    dyn: dict[str, torch.Tensor], scored: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """(columns, view, warning) from two views of the same run: the network's head and the LinearProbe (a plain
    cross-entropy fit of its features, whatever the training loss). The head's columns stand while their flags
    overlap at least VIEWS_AGREE and the head fits the labels (fits_labels); else the probe's (a loss such as GCE
    or ELR distorts the head's softmax, not the features) with a one-line warning. Without a warning so far,
    transition_warning on the list that stands. Uses only the run and its given labels; a run without a probe:
    the head's."""
    num_classes = dyn["early_prob_sum"].shape[1]
    head = dynamics_columns(dyn, scored, "head")
    chosen, view, warning = head, "head", None
    if "probe_prob_sum" in dyn:
        probe = dynamics_columns(dyn, scored, "probe")
        flags = [(c["predicted_label"] != labels) & scored for c in (head, probe)]
        agree, broken = overlap(*flags), fits_labels(labels[scored], head["predicted_label"][scored], num_classes)
        if agree < VIEWS_AGREE or broken is not None:
            why = (
                f"the network's head flags {int(flags[0].sum())} labels and a linear probe on its features "
                f"{int(flags[1].sum())}, overlapping {agree:.2f} (under {VIEWS_AGREE})"
                if agree < VIEWS_AGREE
                else f"the network's head puts most examples given label {broken} in another class"
            )
            chosen, view = probe, "probe"
            warning = (
                f"warning: {why}: the audit's two views disagree, so this list (the probe's) may be mostly wrong; "
                "check a sample by hand before acting on it"
            )
    warning = warning or transition_warning(labels[scored], chosen["predicted_label"][scored], num_classes)
    return chosen, view, warning


def audit_rows(
    columns: dict[str, torch.Tensor], labels: torch.Tensor, scored: torch.Tensor
) -> tuple[list[int], torch.Tensor]:
    """(every scored row ranked by label_quality, worst first; is_label_issue = predicted_label != given label)."""
    is_issue = (columns["predicted_label"] != labels) & scored
    rows = torch.nonzero(scored).squeeze(1)
    order = torch.argsort(columns["label_quality"][rows], stable=True)
    return rows[order].tolist(), is_issue


def audit_summary(
    is_issue: torch.Tensor, columns: dict[str, torch.Tensor], train: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Precision and recall of the flagged rows against the real flips, and how many flips the prediction recovers."""
    is_noisy = train["is_noisy"].bool()
    flagged, n_noisy = int(is_issue.sum()), int(is_noisy.sum())
    hit = int((is_issue & is_noisy).sum())
    summary = {
        "flagged": flagged,
        "noisy": n_noisy,
        "noise_rate": n_noisy / len(is_noisy),
        "precision": hit / flagged if flagged else 0.0,
        "recall": hit / n_noisy if n_noisy else 0.0,
        "recovered": float((columns["predicted_label"][is_noisy] == train["clean_label"][is_noisy]).float().mean())
        if n_noisy
        else 0.0,
    }
    summary["corrected_recovered"] = (
        float((columns["corrected_label"][is_noisy] == train["clean_label"][is_noisy]).float().mean())
        if n_noisy
        else 0.0
    )
    return summary


def noise_rate_text(
    labels: torch.Tensor, is_issue: torch.Tensor, num_classes: int, names: Sequence[str] | None, k: int = 5
) -> str:
    """The audit's noise estimate in one line: the flagged share overall and of the k given labels highest in
    noise_rates, e.g. '0.118 of 1437 labels; per given label: 9 0.25, 8 0.24, 3 0.20'."""
    rates = noise_rates(labels, is_issue, num_classes)
    top = [int(j) for j in rates.argsort(descending=True, stable=True)[:k] if rates[j] > 0]
    per = ", ".join(f"{names[j] if names else j} {float(rates[j]):.2f}" for j in top) or "none"
    return (
        f"{float(is_issue.float().mean()) if len(labels) else 0.0:.3f} of {len(labels)} labels; per given label: {per}"
    )


def top_confusions(
    labels: torch.Tensor, predicted: torch.Tensor, is_issue: torch.Tensor, names: Sequence[str] | None, k: int = 5
) -> str:
    """The k most frequent (given -> predicted) pairs among the flagged examples, e.g. '3 -> 5 (12), 7 -> 1 (4)'."""
    pairs = torch.stack([labels[is_issue], predicted[is_issue]], dim=1)
    if not len(pairs):
        return "none"
    unique, counts = pairs.unique(dim=0, return_counts=True)
    order = torch.argsort(-counts, stable=True)[:k]
    name = (lambda c: names[c]) if names else str
    return ", ".join(f"{name(int(unique[i, 0]))} -> {name(int(unique[i, 1]))} ({int(counts[i])})" for i in order)


AUDIT_COLUMNS = (
    "index",
    "key",
    "given_label",
    "predicted_label",
    "is_label_issue",
    "label_quality",
    "aum",
    "corrected_label",
    "eps",
    "final_predicted_label",
    "final_label_quality",
)


def write_audit_csv(
    path: Path,
    ranked: list[int],
    keys: list[str],
    train: dict[str, torch.Tensor],
    columns: dict[str, torch.Tensor],
    known_noise: bool,
) -> None:
    """One CSV row per scored training example, worst label_quality first (cleanlab's column names plus ours)."""
    header = ["rank", *(c for c in AUDIT_COLUMNS if c in columns or c in ("index", "key", "given_label"))]
    header += ["clean_label", "is_noisy"] if known_noise else []
    values = {
        **columns,
        "given_label": train["label"],
        "clean_label": train["clean_label"],
        "is_noisy": train["is_noisy"],
    }
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for rank, i in enumerate(ranked, 1):
            row: list[Any] = [rank, i, keys[i]]
            for c in header[3:]:
                v = values[c][i]
                row.append(f"{float(v):.4f}" if v.is_floating_point() else int(v))
            w.writerow(row)


def write_label_file(
    path: Path, keys: list[str], labels: torch.Tensor, is_issue: torch.Tensor, new_labels: torch.Tensor | None
) -> None:
    """A `train.py --noise file --noise-file PATH` file, `key,label` for every training example: the flagged
    ones relabelled to `new_labels`, or (None) given label -1, which drops them from the training set."""
    out = torch.where(is_issue, new_labels if new_labels is not None else torch.full_like(labels, -1), labels)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label"])
        w.writerows(zip(keys, out.tolist()))


class Audit(NamedTuple):
    """The audit of one run: its columns per training row, which rows it scored, their ranking and its source."""

    columns: dict[str, torch.Tensor]
    scored: torch.Tensor
    ranked: list[int]
    is_issue: torch.Tensor
    how: str
    window: str | None
    warning: str | None = None


def audit_labels(run_dir: Path, cfg: dict[str, Any], train_ds: Any, logits: torch.Tensor, score: str) -> Audit:
    """Rank the training labels of a run by its training dynamics (score 'dynamics'; the final model's logits when
    the run kept none, with a notice) or by the final model ('final')."""
    labels = data.label_tensors(train_ds)["label"]
    columns = final_model_columns(logits, labels)
    columns["eps"], columns["corrected_label"] = corrected_targets(logits, labels, cfg)
    dyn, meta = (read_dynamics(run_dir, train_ds, logits.shape[1]) if score == "dynamics" else None) or (None, {})
    window = warning = None
    if dyn is not None:
        if not torch.equal(dyn["label"][dyn["count"] > 0], labels[dyn["count"] > 0]):
            raise ValueError(
                f"{run_dir}: the training labels differ from the run's: pass the run's --dataset and noise files"
            )
        scored = dyn["early_count"] > 0
        chosen, view, warning = audit_view(dyn, scored, labels)
        columns |= chosen
        how = "the early training dynamics" + (
            " of the linear probe on the network's features" if view == "probe" else ""
        )
        window = meta.get("window_text") or f"epochs [0, {meta.get('audit_epochs', '?')})"
    else:
        if score == "dynamics" and int(os.environ.get("RANK", "0")) == 0:
            print(
                f"notice: {run_dir} has no usable dynamics.safetensors (trained before the audit kept training dynamics, "
                f"or with --train-eval-size 0): ranking by the final model, which misses the labels it has memorised",
                file=sys.stderr,
            )
        columns["predicted_label"], columns["label_quality"] = (
            columns["final_predicted_label"],
            columns["final_label_quality"],
        )
        scored, how = torch.ones_like(labels, dtype=torch.bool), "the final model"
    ranked, is_issue = audit_rows(columns, labels, scored)
    columns["is_label_issue"] = is_issue
    return Audit(columns, scored, ranked, is_issue, how, window, warning)


def write_audit(
    audit: Audit,
    train_ds: Any,
    info: data.DatasetInfo,
    cfg: dict[str, Any],
    out: Path,
    top: int,
    relabel: str | None,
    drop: str | None,
) -> None:
    """Write the ranked CSV (and the --relabel/--drop label files) and print what the audit found."""
    train = data.label_tensors(train_ds)
    labels, columns, is_issue, ranked = train["label"], audit.columns, audit.is_issue, audit.ranked
    keys = [str(k) for k in train_ds["example_key"]]
    known_noise = (cfg.get("noise") or "none") != "none"
    names = getattr(train_ds.features["label"], "names", None)
    runfolder.write_or_explain(lambda: write_audit_csv(out, ranked, keys, train, columns, known_noise), out)
    print(
        f"{int(is_issue.sum())} of {int(audit.scored.sum())} training labels flagged as label issues by {audit.how}: "
        f"its predicted class differs from the given label; wrote {out}"
    )
    if audit.window:
        print(f"early window: {audit.window}")
    print(
        f"estimated noise rate: {noise_rate_text(labels[audit.scored], is_issue[audit.scored], info.num_classes, names)}"
    )
    if audit.warning:
        print(audit.warning)
    print(f"most flagged (given -> predicted): {top_confusions(labels, columns['predicted_label'], is_issue, names)}")
    for rank, i in enumerate([i for i in ranked if is_issue[i]][:top], 1):
        print(
            f"{rank:4d}. key={keys[i]} given={int(labels[i])} predicted={int(columns['predicted_label'][i])} "
            f"label_quality={float(columns['label_quality'][i]):.3f} corrected={int(columns['corrected_label'][i])} "
            f"eps={float(columns['eps'][i]):.3f}"
        )
    for path, new in ((relabel, columns["predicted_label"]), (drop, None)):
        if path:
            runfolder.write_or_explain(lambda p=path, n=new: write_label_file(Path(p), keys, labels, is_issue, n), path)
            print(
                f"wrote {path}: train.py --noise file --noise-file {path} trains on the "
                f"{'relabelled' if new is not None else 'remaining'} labels"
            )
    if known_noise or info.clean_subset:  # Clothing1M: against the clean labels of the overlap
        known = audit.scored & data.clean_label_known(train_ds)
        s = audit_summary(
            is_issue[known], {k: v[known] for k, v in columns.items()}, {k: v[known] for k, v in train.items()}
        )
        where = "" if known.all() else f" of the {int(known.sum())} training examples with a known clean label"
        print(
            f"against the real flips{where} ({s['noisy']} noisy, rate {s['noise_rate']:.3f}): precision={s['precision']:.3f} "
            f"recall={s['recall']:.3f}; clean label recovered by the prediction for {s['recovered']:.3f} of the flips, "
            f"by ProSelfLC's corrected target for {s['corrected_recovered']:.3f}"
        )
