"""Target-modification losses of ProSelfLC (Wang et al., CVPR 2021) and the methods it is compared with.

One file, importing only ``torch`` and the standard library: copy ``losses.py`` alone::

    >>> from losses import build_loss
    >>> loss_fn = build_loss("proselflc", num_classes=100, total_steps=30_000, exp_base=10.0)
    >>> for t in range(30_000):                  # t = optimizer steps taken so far
    ...     loss = loss_fn(model(x), y, step=t)  # y: class ids [N] or soft labels [N, C]
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     log(loss_fn.last_epsilon)            # [N] tensor (proselflc) or a float, detached
    >>> elr = build_loss("elr", 100, num_examples=50_000)  # ELR: also pass each example's row
    >>> loss = elr(model(x), y, step=t, index=rows)         # running targets: elr.elr_targets [N, C]

Notation: z = logits [N, C], p = softmax(z), q = one-hot label (or a soft label), u = uniform,
H(a, b) = -sum_k a_k log b_k, H(p) = H(p, p), C classes. Every loss is H(q~, p) or a sum of such
terms, computed from log_softmax(z) in float32 (fp16/bf16 logits are upcast), never log(p + eps).

===============  ======================================================  =============================
method           learning target q~ / loss per example                   hyperparameters (default)
===============  ======================================================  =============================
``cce``          q                                                       -
``ls``           (1 - eps) q + eps u                      (Table 1)      eps (0.25)
``cp``           (1 - eps) q - eps p                      (Table 1)      eps (0.25)
``bootsoft``     (1 - eps) q + eps p                      (Table 1, LC)  eps (0.25)
``boothard``     (1 - eps) q + eps onehot(argmax p)                      eps (0.25)
``proselflc``    (1 - eps_i) q + eps_i p, eps_i = g(t) l(p_i)  (Eq. 10)  exp_base (10), transit (0.5)
``proselflc_t``  the authors' later variant: p_T = softmax(z / T0)       temperature (0.5), trust (maxp)
                 detached, in eps_i and the target
``gce``          loss (1 - p_y^q) / q                   (Zhang 2018)     q (0.7)
``sce``          loss alpha H(q, p) - beta sum_k p_k log max(q_k, 1e-4)  alpha, beta (10 classes:
                                                        (Wang 2019)      0.1, 1.0; else 6.0, 0.1)
``elr``          loss H(q, p) + lambda log(1 - <t_i, p_i>), p clamped    elr_beta, elr_lambda (10
                 to [1e-4, 1 - 1e-4]; before it t_i <- beta t_i +        classes: 0.7, 3; 100 or
                 (1 - beta) p_i / sum(p_i), detached      (Liu 2020)     more: 0.9, 7; else 0.7, 3)
===============  ======================================================  =============================

Eq. 10: g(t) = 1 / (1 + exp(-exp_base (t / T - transit))) (global trust, T = ``total_steps``),
l(p) = 1 - H(p) / log C (local trust, ``trust="entropy"``) or max_k p_k (``trust="maxp"``).
Gradient semantics (Eq. 4-5, the authors' code): the p inside the targets of cp, bootsoft and
proselflc carries gradient; eps_i, boothard's argmax and ELR's t_i carry none. ``detach_target=True``
detaches that p; ``temperature=T0`` replaces it by p_T = softmax(z.detach() / T0), also in eps_i.
Bad input raises a one-line ValueError. Data-dependent checks (class-id and step ranges, which
read values) run eagerly on CPU only, so ``torch.compile(loss_fn, fullgraph=True)`` works.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS: tuple[str, ...] = ("cce", "ls", "cp", "bootsoft", "boothard", "proselflc", "proselflc_t", "gce", "sce", "elr")
HPARAMS: dict[str, object] = {  # None: resolved by method or number of classes (see the table above)
    "eps": 0.25, "exp_base": 10.0, "transit": 0.5, "q": 0.7, "alpha": None, "beta": None,
    "detach_target": False, "temperature": None, "trust": None, "elr_beta": None, "elr_lambda": None,
    "num_examples": None, "reduction": "mean",
}
_PROSELFLC_HPARAMS = ("total_steps", "exp_base", "transit", "detach_target", "temperature", "trust")
USED_HPARAMS: dict[str, tuple[str, ...]] = {  # the hyperparameters each method reads (the rest are ignored)
    "cce": (), "ls": ("eps",), "cp": ("eps", "detach_target"), "bootsoft": ("eps", "detach_target"), "boothard": ("eps",),
    "proselflc": _PROSELFLC_HPARAMS, "proselflc_t": _PROSELFLC_HPARAMS, "gce": ("q",), "sce": ("alpha", "beta"),
    "elr": ("elr_beta", "elr_lambda"),
}
TRUSTS: tuple[str, ...] = ("entropy", "maxp")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def _number(name: str, value: object, low: float = -math.inf, high: float = math.inf, strict: bool = False) -> float:
    """value as a float if it is a finite real number in [low, high] (low excluded if strict), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high or (strict and value == low):
        bounds = f" in {'(' if strict else '['}{low:g}, {high:g}]" if math.isfinite(low) else ""
        raise ValueError(f"{name}={value!r} must be a finite number{bounds}")
    return float(value)


def _positive_int(name: str, value: object, low: int = 1) -> int:
    """value if it is an int >= low, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


def _check_step(step: int | float | Tensor, total_steps: int) -> int | float | Tensor:
    """step as a number in [0, total_steps] (a CPU tensor is read); an accelerator or traced tensor unchecked."""
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"step must be a number or a 0-dim real tensor, got shape {tuple(step.shape)} {step.dtype}")
        if step.device.type != "cpu" or torch.compiler.is_compiling():
            return step  # reading it would be a host sync or a graph break
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 <= step <= total_steps:
        raise ValueError(f"step={step!r} is outside [0, total_steps={total_steps}]")
    return step


def _check_range(ids: Tensor, high: int, what: str) -> None:
    """ValueError naming an id outside [0, high); eager CPU only (elsewhere reading ids is a host sync)."""
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = (v.item() for v in torch.aminmax(ids))
        if lo < 0 or hi >= high:
            raise ValueError(f"{what} {lo if lo < 0 else hi} is out of range [0, {high})")


def _float_logits(logits: Tensor, num_classes: int) -> Tensor:
    """logits [N, num_classes] in float32 (float64 stays float64), else ValueError."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {type(logits).__name__} {getattr(logits, 'dtype', '')}")
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape [N, {num_classes}], got {tuple(logits.shape)}")
    return logits if logits.dtype == torch.float64 else logits.float()


def _dense_labels(labels: Tensor, z: Tensor) -> Tensor:
    """q [N, C] in z's dtype: one-hot of class ids [N], or the soft labels [N, C]; else ValueError."""
    n, c = z.shape
    if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point() \
            and not labels.is_complex() and labels.dtype != torch.bool:
        if labels.shape[0] != n:
            raise ValueError(f"labels have {labels.shape[0]} entries for {n} rows of logits")
        _check_range(labels, c, "class id")
        return F.one_hot(labels.long(), c).to(z.dtype)
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.is_floating_point():
        if tuple(labels.shape) != (n, c):
            raise ValueError(f"soft labels must have shape {(n, c)} like the logits, got {tuple(labels.shape)}")
        return labels.to(z.dtype)
    raise ValueError(f"labels must be integer class ids [N] or floating soft labels [N, C]; got {type(labels).__name__} "
                     f"shape {tuple(getattr(labels, 'shape', ()))} dtype {getattr(labels, 'dtype', None)}")


# ---------------------------------------------------------------------------- Eq. 10
def global_trust(step: int | float | Tensor, total_steps: int, exp_base: float = 10.0,
                 transit: float = 0.5) -> float | Tensor:
    """g(t) = 1 / (1 + exp(-exp_base (t/T - transit))); a 0-dim tensor when step is an unread tensor."""
    if total_steps is None:
        raise ValueError("total_steps=None: ProSelfLC's global trust needs the number of optimizer steps T")
    total_steps = _positive_int("total_steps", total_steps)
    exp_base, transit = _number("exp_base", exp_base, 0.0, strict=True), _number("transit", transit)
    _check_step(step, total_steps)
    if torch.compiler.is_compiling() and not isinstance(step, Tensor):
        step = torch.full((), step, dtype=torch.float64)  # traced as an input: no recompilation per step
    x = exp_base * (step / total_steps - transit)
    if isinstance(x, Tensor):
        return torch.sigmoid(x if x.dtype == torch.float64 else x.float())
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow


def normalized_entropy(probs: Tensor) -> Tensor:
    """H(p) / log C per row of probs [..., C], with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1) / math.log(probs.shape[-1])


def local_trust(probs: Tensor, trust: str = "entropy") -> Tensor:
    """l(p) = 1 - H(p) / log C ("entropy", Eq. 10) or max_k p_k ("maxp") per row of probs [N, C]; no gradient."""
    if probs.dim() < 1 or probs.shape[-1] < 2:
        raise ValueError(f"probs must be [..., C] with C >= 2 classes, got shape {tuple(probs.shape)}")
    probs = probs.detach()
    return probs.amax(-1) if trust == "maxp" else (1.0 - normalized_entropy(probs)).clamp(0.0, 1.0)


def proselflc_epsilon(probs: Tensor, step: int | float | Tensor, total_steps: int, exp_base: float = 10.0,
                      transit: float = 0.5, trust: str = "entropy") -> Tensor:
    """eps_i = g(t) * l(p_i) (Eq. 10) per row of probs [N, C]; no gradient."""
    return global_trust(step, total_steps, exp_base, transit) * local_trust(probs, trust)


# ---------------------------------------------------------------------------- module
class TrainingLoss(torch.nn.Module):
    """loss = module(logits [N, C], labels [N] ids or [N, C] soft, step=t, index=rows); see the module docstring."""

    def __init__(self, method: str, num_classes: int, total_steps: int | None = None, *, eps: float = 0.25,
                 exp_base: float = 10.0, transit: float = 0.5, q: float = 0.7, alpha: float | None = None,
                 beta: float | None = None, detach_target: bool = False, temperature: float | None = None,
                 trust: str | None = None, elr_beta: float | None = None, elr_lambda: float | None = None,
                 num_examples: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown loss method {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.num_classes = method, _positive_int("num_classes", num_classes, 2)
        self.total_steps = None if total_steps is None else _positive_int("total_steps", total_steps)
        if method.startswith("proselflc") and total_steps is None:
            raise ValueError(f"{method} needs total_steps=T (the number of optimizer steps of the run), got None")
        ten, many = num_classes == 10, num_classes >= 100
        self.eps, self.q = _number("eps", eps, 0.0, 1.0), _number("q", q, 0.0, 1.0, strict=True)
        self.exp_base, self.transit = _number("exp_base", exp_base, 0.0, strict=True), _number("transit", transit)
        self.alpha = _number("alpha", (0.1 if ten else 6.0) if alpha is None else alpha, 0.0)
        self.beta = _number("beta", (1.0 if ten else 0.1) if beta is None else beta, 0.0)
        self.elr_beta = _number("elr_beta", (0.9 if many else 0.7) if elr_beta is None else elr_beta, 0.0, 1.0)
        self.elr_lambda = _number("elr_lambda", (7.0 if many else 3.0) if elr_lambda is None else elr_lambda, 0.0)
        if temperature is None and method == "proselflc_t":
            temperature = 0.5  # the authors' recorded runs use T0 between 0.4 and 0.5
        self.temperature = None if temperature is None else _number("temperature", temperature, 0.0, strict=True)
        self.trust = trust or ("maxp" if method == "proselflc_t" else "entropy")
        if self.trust not in TRUSTS:
            raise ValueError(f"trust={trust!r} must be one of {', '.join(TRUSTS)}")
        if not isinstance(detach_target, bool):
            raise ValueError(f"detach_target={detach_target!r} must be True or False")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} must be one of {', '.join(REDUCTIONS)}")
        self.detach_target, self.reduction = detach_target, reduction
        self.last_epsilon: float | Tensor = self.eps if method in ("ls", "cp", "bootsoft", "boothard") else 0.0
        if method == "elr":
            if num_examples is None:
                raise ValueError("elr needs num_examples=N (rows of the training split) for its running targets")
            _positive_int("num_examples", num_examples)
            self.register_buffer("elr_targets", torch.zeros(num_examples, num_classes))

    def extra_repr(self) -> str:
        """The method and the hyperparameters it uses."""
        keys = ["num_classes", *USED_HPARAMS[self.method], "reduction"]
        return ", ".join([repr(self.method)] + [f"{k}={getattr(self, k)!r}" for k in keys])

    def epsilon(self, probs: Tensor, step: int | float | Tensor | None) -> Tensor:
        """ProSelfLC's eps_i = g(t) l(p_i) (Eq. 10) with this module's hyperparameters."""
        if step is None:
            raise ValueError(f"{self.method} needs step=t (optimizer steps taken so far, 0..total_steps), got None")
        step = _check_step(step, self.total_steps)  # an eager CPU tensor is read: g(t) in float64 like an int's
        return proselflc_epsilon(probs, step, self.total_steps, self.exp_base, self.transit, self.trust)

    def target(self, logits: Tensor, labels: Tensor, step: int | float | Tensor | None = None) -> Tensor:
        """q~ [N, C] of a target method (cce .. proselflc_t), with the gradient semantics above."""
        if self.method in ("gce", "sce", "elr"):
            raise ValueError(f"{self.method!r} is a robust loss, not a target modification: target() is "
                             f"defined for {', '.join(METHODS[:7])}")
        z = _float_logits(logits, self.num_classes)
        return self._target(z, _dense_labels(labels, z), step)

    def _target(self, z: Tensor, q: Tensor, step: int | float | Tensor | None) -> Tensor:
        """q~ from checked logits z and dense labels q: one line per row of Table 1."""
        m, eps = self.method, self.eps
        if m == "cce":
            return q
        if m == "ls":
            return (1.0 - eps) * q + eps / self.num_classes
        p = torch.softmax(z, dim=1)
        if m == "boothard":
            return (1.0 - eps) * q + eps * F.one_hot(p.argmax(1), self.num_classes).to(q.dtype)
        if self.temperature is not None:
            p = torch.softmax(z.detach() / self.temperature, dim=1)
        elif self.detach_target:
            p = p.detach()
        if m == "cp":
            return (1.0 - eps) * q - eps * p
        if m == "bootsoft":
            return (1.0 - eps) * q + eps * p
        eps = self.epsilon(p, step)  # proselflc, proselflc_t
        self.last_epsilon = eps.detach()
        return (1.0 - eps).unsqueeze(1) * q + eps.unsqueeze(1) * p

    def _elr_regulariser(self, logp: Tensor, index: Tensor | None) -> Tensor:
        """log(1 - <t_i, p_i>) per example, after t_i <- beta t_i + (1 - beta) p_i / sum(p_i) (p clamped, detached)."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or len(index) != len(logp):
            raise ValueError(f"elr needs index=rows: an integer tensor [{len(logp)}] of the examples' rows in the training split")
        _check_range(index, len(self.elr_targets), "index")
        p = logp.exp().clamp(1e-4, 1.0 - 1e-4)
        p_hat = p.detach()
        t = self.elr_beta * self.elr_targets[index].to(p) + (1.0 - self.elr_beta) * p_hat / p_hat.sum(1, keepdim=True)
        self.elr_targets[index] = t.to(self.elr_targets.dtype)
        return torch.log(1.0 - (t * p).sum(1))

    def forward(self, logits: Tensor, labels: Tensor, step: int | float | Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        """The method's loss, reduced by self.reduction; ProSelfLC sets self.last_epsilon, ELR its running targets."""
        z = _float_logits(logits, self.num_classes)
        q = _dense_labels(labels, z)
        logp = torch.log_softmax(z, dim=1)
        if self.method == "gce":
            per_example = (q * (1.0 - torch.exp(self.q * logp))).sum(1) / self.q  # p^q as exp(q log p): finite gradient at p = 0
        elif self.method == "sce":
            rce = -(logp.exp() * q.clamp(min=1e-4).log()).sum(1)
            per_example = self.alpha * -(q * logp).sum(1) + self.beta * rce
        elif self.method == "elr":
            per_example = -(q * logp).sum(1) + self.elr_lambda * self._elr_regulariser(logp, index)
        else:
            per_example = -(self._target(z, q, step) * logp).sum(1)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


def build_loss(name: str, num_classes: int, total_steps: int | None = None, **hparams: object) -> TrainingLoss:
    """The loss module for --method name; hparams among HPARAMS (None = default, unused ones ignored)."""
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
        raise ValueError(f"unknown loss hyperparameter(s) {', '.join(unknown)}: choose among {', '.join(HPARAMS)}")
    return TrainingLoss(name, num_classes, total_steps, **{k: v for k, v in hparams.items() if v is not None})
