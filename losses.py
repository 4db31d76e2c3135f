"""Target-modification losses of ProSelfLC (Wang et al., CVPR 2021) and robust baselines.

One self-contained file: it imports only ``torch`` and the standard library, so you can copy
``losses.py`` alone into your project::

    >>> from losses import build_loss
    >>> loss_fn = build_loss("proselflc", num_classes=100, total_steps=30_000, exp_base=10.0)
    >>> for t in range(30_000):                  # t = optimizer steps taken so far
    ...     loss = loss_fn(model(x), y, step=t)  # y: class ids [N] or soft labels [N, C]
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     log(loss_fn.last_epsilon)            # [N] tensor (proselflc) or a float, detached

API: ``METHODS`` (valid names), ``HPARAMS`` (hyperparameter names and defaults),
``build_loss(name, num_classes, total_steps=None, **hparams) -> TrainingLoss`` (an nn.Module):
``loss_fn(logits, labels, step=None)`` returns the loss (``step`` is required by proselflc),
``loss_fn.target(logits, labels, step=None)`` the learning target q~ [N, C] of a target method,
``loss_fn.last_epsilon`` the eps of the last call. ``global_trust(step, total_steps, exp_base,
transit)``, ``local_trust(probs)`` and ``proselflc_epsilon(probs, step, total_steps, exp_base,
transit)`` are the pieces of Eq. 10.

Notation: z = logits [N, C], p = softmax(z), q = one-hot label (or a soft label [N, C]),
u = uniform (1/C), H(a, b) = -sum_k a_k log b_k, H(p) = H(p, p), C = number of classes.

Methods (``METHODS``; the name used by ``--method``) and their hyperparameters (defaults):

====================  ==================================================  ========================
name                  learning target q~ / loss (per example)              hyperparameters
====================  ==================================================  ========================
``cce``               q, loss H(q, p)                                      -
``ls``                (1 - eps) q + eps u                                  eps (0.25)
``cp``                (1 - eps) q - eps p                                  eps (0.25)
``bootsoft``          (1 - eps) q + eps p   (fixed eps)                    eps (0.25)
``boothard``          (1 - eps) q + eps onehot(argmax p)                   eps (0.25)
``proselflc``         (1 - eps_i) q + eps_i p,  eps_i = g(t) l(p_i)        exp_base (10), transit (0.5)
``gce``               (1 - p_y^q) / q   (Zhang & Sabuncu 2018)             q (0.7)
``sce``               alpha H(q, p) + beta RCE, RCE = -sum_k p_k log q_k   alpha (6.0), beta (0.1)
====================  ==================================================  ========================

* Target methods: loss = H(q~, p) = (1 - eps) H(q, p) + eps H(r, p) with r = u, -p, p,
  onehot(argmax p) (Table 1 of the paper). Reduction over the batch: ``reduction='mean'``
  (default), ``'sum'`` or ``'none'`` (per-example losses [N]).
* ProSelfLC (Eq. 10): g(t) = 1 / (1 + exp(-exp_base (t/T - transit))) is the global trust
  (t = optimizer steps taken so far, 0..T; T = ``total_steps``), l(p) = 1 - H(p) / log C the
  local trust; g(t) < 0.5 before t = transit T and > 0.5 after.
* GCE with soft labels: sum_k q_k (1 - p_k^q) / q. SCE: the label's log 0 is clipped to
  log(1e-4) (RCE = -log(1e-4) (1 - p_y) for a one-hot label); alpha, beta = 6.0, 0.1 are the
  CIFAR-100 values, use 0.1, 1.0 for CIFAR-10. SCE is "SL" in the paper's Table 4.

Paper's exp_base choices on CIFAR-100 (CVPR version): clean 10; symmetric noise 20/40/60%:
14/12/8; asymmetric noise 20/30/40%: 14/10/8 (transit 0.5 throughout).

Gradient semantics (as in the paper, Eq. 4-5, and the authors' code): the p inside the
targets of ``cp``, ``bootsoft`` and ``proselflc`` carries gradient, so their losses contain
-eps H(p) (cp penalises low entropy) or +eps H(p) (bootsoft/proselflc reward it). ProSelfLC's
eps_i is computed without gradient; ``boothard``'s argmax carries none. This matters: with p
detached the gradient of H((1-eps) q + eps p, p) collapses to (1-eps)(p - q), a re-weighted CCE.
Two variants, off by default, for cp/bootsoft/proselflc:

* ``detach_target=True``: p inside the target is detached (same loss value, gradient
  (1 - eps)(p - q)).
* ``temperature=T0``: the later ProSelfLC variant; p_T = softmax(z.detach() / T0) is used both
  for eps_i (proselflc) and inside the target (detached).

Implementation: every loss starts from ``log_softmax`` in float32 (float64 stays float64;
fp16/bf16 logits are upcast), never log(p + eps), so the loss and gradient are finite for
logits of +-1e4 and under fp16/bf16 autocast. ``cce`` is ``F.cross_entropy``. Every other
method is one ``torch.autograd.Function`` whose forward also computes the closed-form gradient
w.r.t. the logits (from p, log p, q and eps; only when the logits need a gradient) and whose
backward just scales it, e.g. for the target methods, with a = 1 - eps and b = +-eps:
dL/dz = p (a sum(q) + b sum_k p_k log p_k) - a q - b p log p when p in the target carries
gradient, and dL/dz = sum(q~) p - q~ for a constant target. Double backward is not supported.
Speed (CPU, where each op costs about 1 us of dispatch): p = exp(log p) is taken as
2^(log2(e) log p) (the exp2 kernel is several times faster than exp, as accurate as softmax),
the mean's 1/N is folded into the gradient, class ids enter by gather/scatter (no one-hot),
boothard's argmax is a masked amax (the first of ties, like argmax), and per-shape constants
are cached 0-dim tensors (made on the logits' device: no host-to-device copy).
No Python loops over the batch and no host sync: the step may be an int or a 0-dim tensor
(checked against [0, total_steps] only when it is a number or on CPU), ``last_epsilon`` is a
detached tensor. Class ids are range-checked on CPU only (on an accelerator that would need a
host sync; out-of-range ids then trip the device-side gather).

Hyperparameters: ``build_loss`` accepts every key of ``HPARAMS`` for every method (so a trainer
may pass all its flags); a value of None means the default; a method ignores the keys it does
not use, but every given value is validated. Bad input raises ``ValueError``: unknown method or
hyperparameter name, eps outside [0, 1], exp_base <= 0, q outside (0, 1], temperature <= 0,
negative alpha/beta, ``proselflc`` without total_steps, a step outside [0, total_steps], logits
that are not [N, num_classes], labels of the wrong shape/dtype, class ids out of range (CPU).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS: tuple[str, ...] = ("cce", "ls", "cp", "bootsoft", "boothard", "proselflc", "gce", "sce")
HPARAMS: dict[str, object] = {
    "eps": 0.25,
    "exp_base": 10.0,
    "transit": 0.5,
    "q": 0.7,
    "alpha": 6.0,
    "beta": 0.1,
    "detach_target": False,
    "temperature": None,
    "reduction": "mean",
}
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
SCE_LOG_CLIP = math.log(1e-4)  # SCE clips log q_k = log 0 to log(1e-4) (Wang et al. 2019)
_FIXED_EPS = ("ls", "cp", "bootsoft", "boothard")
_SELF_TARGET = ("cp", "bootsoft", "proselflc")  # p inside the target carries gradient


# ----------------------------------------------------------------------------- validation
def _number(name: str, value: object) -> float:
    """Return value as a finite float, or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def _check_hparams(num_classes: int, total_steps: int | None, hp: dict) -> None:
    """Raise ValueError naming the first invalid value among the constructor arguments."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 2")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"total_steps={total_steps!r} must be an int >= 1 (optimizer steps of the run)")
    if not 0.0 <= _number("eps", hp["eps"]) <= 1.0:
        raise ValueError(f"eps={hp['eps']!r} must be in [0, 1]")
    if _number("exp_base", hp["exp_base"]) <= 0.0:
        raise ValueError(f"exp_base={hp['exp_base']!r} must be > 0")
    _number("transit", hp["transit"])
    if not 0.0 < _number("q", hp["q"]) <= 1.0:
        raise ValueError(f"q={hp['q']!r} must be in (0, 1] (GCE exponent)")
    for key in ("alpha", "beta"):
        if _number(key, hp[key]) < 0.0:
            raise ValueError(f"{key}={hp[key]!r} must be >= 0")
    if not isinstance(hp["detach_target"], bool):
        raise ValueError(f"detach_target={hp['detach_target']!r} must be True or False")
    if hp["temperature"] is not None and _number("temperature", hp["temperature"]) <= 0.0:
        raise ValueError(f"temperature={hp['temperature']!r} must be > 0 (or None to disable)")
    if hp["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction={hp['reduction']!r} must be one of {', '.join(REDUCTIONS)}")


def _check_step(step: int | float | Tensor, total_steps: int) -> int | float | Tensor:
    """Raise ValueError unless 0 <= step <= total_steps; return it as a number unless it is an accelerator tensor.

    A 0-dim tensor on an accelerator is returned unchecked: reading it would be a host sync.
    """
    if type(step) is int and 0 <= step <= total_steps:  # the usual case, checked first: it runs every step
        return step
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"step must be a number or a 0-dim real tensor, "
                             f"got shape {tuple(step.shape)} {step.dtype}")
        if step.device.type != "cpu":
            return step
        step = step.item()  # CPU tensor: reading it is not a device sync
    value = _number("step", step)
    if not 0.0 <= value <= total_steps:
        raise ValueError(f"step={step!r} is outside [0, total_steps={total_steps}]")
    return step


def _float_logits(logits: Tensor, num_classes: int) -> Tensor:
    """Check logits are [N, num_classes] floating point; upcast fp16/bf16 to float32."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {type(logits).__name__} "
                         f"{getattr(logits, 'dtype', '')}")
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape [N, {num_classes}], got {tuple(logits.shape)}")
    if logits.dtype != torch.float32 and logits.dtype != torch.float64:
        logits = logits.float()  # softmax statistics in float32 even for fp16/bf16 logits
    return logits


def _check_labels(labels: Tensor, logits: Tensor) -> Tensor:
    """Return class ids [N] as int64 or soft labels [N, C] in the logits' dtype; raise ValueError.

    The range of class ids is not checked here (see _check_id_range).
    """
    n, c = logits.shape
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor of class ids [N] or soft labels [N, C], got {type(labels).__name__}")
    if labels.dim() == 1 and not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool:
        if labels.shape[0] != n:
            raise ValueError(f"labels have {labels.shape[0]} entries for {n} rows of logits")
        return labels if labels.dtype == torch.int64 else labels.long()
    if labels.dim() == 2 and labels.is_floating_point():
        if tuple(labels.shape) != (n, c):
            raise ValueError(f"soft labels must have shape {(n, c)} like the logits, got {tuple(labels.shape)}")
        return labels.to(logits.dtype)
    raise ValueError(f"labels must be integer class ids [N] or floating soft labels [N, C]; "
                     f"got shape {tuple(labels.shape)} dtype {labels.dtype}")


def _check_id_range(labels: Tensor, num_classes: int) -> None:
    """Raise ValueError naming a class id outside [0, num_classes), for class ids on CPU only.

    On an accelerator, reading the ids would be a host sync; the device-side gather fails instead.
    """
    if labels.dim() == 1 and labels.device.type == "cpu" and labels.numel() > 0:
        lo, hi = (v.item() for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"class id {bad} is out of range [0, {num_classes}) (num_classes={num_classes})")


# ------------------------------------------------------------------------ trust scores
def global_trust(step: int | float | Tensor, total_steps: int, exp_base: float = 10.0,
                 transit: float = 0.5) -> float | Tensor:
    """g(t) = 1 / (1 + exp(-exp_base (t/T - transit))); a 0-dim tensor when step is a tensor."""
    if total_steps is None:
        raise ValueError("total_steps=None: ProSelfLC's global trust needs the number of optimizer steps T")
    _check_hparams(2, total_steps, {**HPARAMS, "exp_base": exp_base, "transit": transit})
    _check_step(step, total_steps)  # a tensor step gives a tensor g, as documented
    return _global_trust(step, total_steps, float(exp_base), float(transit))


def _global_trust(step: int | float | Tensor, total_steps: int, exp_base: float, transit: float) -> float | Tensor:
    """g(t) without validation; a Python float for a number step (no tensor op), else a tensor."""
    x = exp_base * (step / total_steps - transit)
    if isinstance(x, Tensor):
        return torch.sigmoid(x.double() if x.dtype == torch.float64 else x.float())
    # numerically stable logistic (math.exp(-x) overflows for very negative x)
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def local_trust(probs: Tensor) -> Tensor:
    """l(p) = 1 - H(p) / log C per row of probs [N, C] (0 log 0 = 0); no gradient."""
    if probs.dim() < 1 or probs.shape[-1] < 2:
        raise ValueError(f"probs must be [..., C] with C >= 2 classes, got shape {tuple(probs.shape)}")
    probs = probs.detach()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return (1.0 - entropy / math.log(probs.shape[-1])).clamp(0.0, 1.0)


def proselflc_epsilon(probs: Tensor, step: int | float | Tensor, total_steps: int,
                      exp_base: float = 10.0, transit: float = 0.5) -> Tensor:
    """eps_i = g(t) * l(p_i) (Eq. 10) per row of probs [N, C]; no gradient."""
    return global_trust(step, total_steps, exp_base, transit) * local_trust(probs)


# ----------------------------------------------------------------- fused autograd functions
# Each loss is one autograd.Function over the logits z. Its forward computes the loss and, when
# z needs a gradient, the closed-form gradient G = dL/dz (the mean's 1/N already folded in) from
# p, log p, q and eps, which it has at hand anyway; backward is one multiplication by the incoming
# gradient. At training batch sizes on CPU every op's dispatch cost counts (about 1 us, as much
# as a [256, 100] pass), so: per-example values are [N, 1] columns that broadcast over classes,
# the per-example coefficients are folded into as few [N, C] passes as possible, tensors no longer
# needed are updated in place, class ids enter by scatter/gather (never as a one-hot), and
# constants are cached 0-dim tensors (a Python number is wrapped into a new tensor by every op).
_LOG2E = 1.0 / math.log(2.0)
_CONSTS: dict[tuple, object] = {}


def _cache(key: tuple, make):
    """_CONSTS[key], made by make() on a miss; the cache is bounded (batch sizes may vary)."""
    value = _CONSTS.get(key)
    if value is None:
        value = make()
        if not torch.compiler.is_compiling():  # a tensor made while tracing must not outlive the trace
            if len(_CONSTS) >= 512:
                _CONSTS.clear()
            _CONSTS[key] = value
    return value


def _const(value: float, like: Tensor) -> Tensor:
    """A cached 0-dim tensor holding value, in like's dtype and device."""
    # torch.full fills on the device: no host-to-device copy, so no sync even on an accelerator
    return _cache((value, like.dtype, like.device),
                  lambda: torch.full((), value, dtype=like.dtype, device=like.device))


class _Consts(NamedTuple):
    """One call's constants (see _consts); k is the gradient's scale, 1/N for the mean, else 1."""
    kf: float           # k as a number
    log2e: Tensor       # log2(e): p = 2^(log2(e) log p)
    zero: Tensor
    one: Tensor
    loss_scale: Tensor  # -1/N: turns the sum of negated losses into the mean (NaN for N = 0, like mean())
    k: Tensor
    neg_k: Tensor
    a: Tensor           # 1 - eps (fixed eps)
    log2_scale: Tensor  # log2(k (a + b)), b = sign eps (fixed eps, when > 0), log2(k) for ProSelfLC
    k_a: Tensor         # k a
    shift: Tensor       # -k b / C
    last: Tensor        # C - 1 (see _argmax)
    neg_k_a: Tensor     # -k a as an [N, 1] column (scatter_add_ needs one; Tensor.expand costs an op)
    neg_k_b: Tensor     # -k b as an [N, 1] column
    ramp: Tensor        # C-1, C-2, ..., 0 (see _argmax)


def _consts(logp: Tensor, reduction: str, eps: float | None, sign: float) -> _Consts:
    """The cached _Consts of logits of this shape, dtype and device: one lookup per call."""
    return _cache((logp.shape, reduction, eps, sign, logp.dtype, logp.device),
                  lambda: _make_consts(logp, reduction, eps, sign))


def _make_consts(logp: Tensor, reduction: str, eps: float | None, sign: float) -> _Consts:
    """Build _Consts (see there)."""
    n, c = logp.shape
    k = 1.0 / n if reduction == "mean" and n > 0 else 1.0
    a, b = (1.0, 0.0) if eps is None else (1.0 - eps, sign * eps)
    scale = k if eps is None else k * (a + b)
    values = (_LOG2E, 0.0, 1.0, -1.0 / n if n > 0 else math.nan, k, -k, a,
              math.log2(scale) if scale > 0.0 else 0.0, k * a, -k * b / c, c - 1.0)
    full = [torch.full((), v, dtype=logp.dtype, device=logp.device) for v in values]
    columns = [torch.full((n, 1), v, dtype=logp.dtype, device=logp.device) for v in (-k * a, -k * b)]
    ramp = torch.arange(c - 1, -1, -1, dtype=logp.dtype, device=logp.device)
    return _Consts(k, *full, *columns, ramp)


def _probs(logp: Tensor, log2e: Tensor) -> Tensor:
    """p = 2^(log2(e) log p), a new tensor; log2e: the 0-dim constant log2(e).

    Why exp2: on CPU torch.exp (and softmax, which uses it) costs several times the exp2 kernel;
    the result is as accurate as float32 softmax (|error| < 1e-7).
    """
    return torch.mul(logp, log2e).exp2_()


def _scaled_probs(logp: Tensor, log2_scale: Tensor) -> Tensor:
    """scale * p = 2^(log2(e) log p + log2(scale)), as cheap as p itself; log2_scale: a 0-dim tensor."""
    return torch.add(log2_scale, logp, alpha=_LOG2E).exp2_()


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_k x_k y_k per row, as an [N, 1] column."""
    return (x * y).sum(1, keepdim=True)


def _argmax(logp: Tensor, top: Tensor, cs: _Consts) -> Tensor:
    """argmax per row as [N, 1] int64, the first of ties like Tensor.argmax; top: the row max; overwrites logp.

    Why not logp.argmax: on CPU the reductions with an index cost 5-8 [N, C] passes. Here the
    row's maxima become 1 (the rest 0), weighted C-1, C-2, ..., 0, so that amax picks the first
    (a row whose maximum is only the last class, or a NaN row, gives 0: index C-1, in range).
    """
    first = logp.ge_(top).mul_(cs.ramp).amax(1, keepdim=True)  # log p >= its row max: at the maxima
    return torch.sub(cs.last, first).long()


def _reduce(neg_loss: Tensor, reduction: str, cs: _Consts) -> Tensor:
    """Reduce per-example losses given negated as an [N, 1] column: mean / sum / none ([N])."""
    if reduction == "none":
        return neg_loss.squeeze(1).neg()
    total = neg_loss.sum()
    return total.neg() if reduction == "sum" else torch.mul(total, cs.loss_scale)


def _add_q_(grad: Tensor, index: Tensor | None, labels: Tensor, coef: Tensor) -> Tensor:
    """grad += coef q in place, q = onehot(index) (index [N, 1]) or the soft labels; coef an [N, 1] column."""
    if index is not None:
        return grad.scatter_add_(1, index, coef)
    return grad.addcmul_(labels, coef)


class _ClosedForm(torch.autograd.Function):
    """Base: forward sets ctx.grad = dL/dz [N, C] (None if z needs none; 1/N of the mean included), ctx.reduction."""

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: ctx.grad carries no graph of its own
            raise RuntimeError("losses.py: double backward (create_graph=True) is not supported")
        if ctx.grad is None:  # only a soft label needed a gradient: it gets none
            return (None,) * (ctx.num_args + 1)
        scale = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
        return (ctx.grad * scale,) + (None,) * ctx.num_args


class _TargetCE(_ClosedForm):
    """H(q~, p) for q~ = (1 - eps) q + sign eps r, and its closed-form gradient.

    trust: the logits that eps_i, a detached r and the argmax come from, without gradient; None
    means z itself (what the module passes; gradcheck passes a fixed copy, so that its numerical
    Jacobian holds them fixed as the gradient semantics do). kind picks r:
      'uniform'  r = u                                         (ls)
      'entropy'  r = p, carrying gradient                      (cp, bootsoft, proselflc)
      'soft'     r = softmax(trust / temperature), no gradient (detach_target: temperature 1)
      'hard'     r = onehot(argmax trust), no gradient         (boothard)
    eps: a float, or None for ProSelfLC: eps_i = g (1 - H(r_i) / log C), no gradient, g a float
    or a 0-dim tensor, r = softmax(trust) for 'entropy'; eps_i [N, 1] is appended to eps_sink.
    With a = 1 - eps, b = sign eps, S = sum_k p_k log p_k, the gradient w.r.t. z is
      p (a sum(q) + b) - a q - b r               for a constant r (sum(r) = 1),
      p (a sum(q) + b S) - a q - b p log p       for r = p (Eq. 4-5: -b dH(p)/dz),
    times k = 1/N for the mean; with eps_i a column, a sum(q) + b S = lerp(sum(q), S, eps_i).
    """

    @staticmethod
    def forward(ctx, z: Tensor, trust: Tensor | None, labels: Tensor, kind: str, eps: float | None,
                g: float | Tensor | None, sign: float, temperature: float, reduction: str,
                eps_sink: list) -> Tensor:
        logp = torch.log_softmax(z, dim=1)
        cs = _consts(logp, reduction, eps, sign)
        ctx.reduction, ctx.num_args, ctx.grad = reduction, 9, None
        index = labels.unsqueeze(1) if labels.dim() == 1 else None  # class ids as [N, 1]
        if index is not None:
            lq, sq = logp.gather(1, index), 1.0  # -H(q, p), sum(q)
        else:
            lq, sq = _rowdot(labels, logp), labels.sum(1, keepdim=True)
        p = plogp = r = hard = None
        if kind == "uniform":
            lr = logp.sum(1, keepdim=True)  # -C H(u, p): the 1/C goes into the loss's coefficient
        elif kind == "hard":
            if trust is None:
                lr = logp.amax(1, keepdim=True)  # log p at argmax p; the argmax is needed for the gradient only
            else:
                hard = trust.argmax(1, keepdim=True)
                lr = logp.gather(1, hard)
        elif kind == "entropy":
            p = _probs(logp, cs.log2e)
            plogp = p * logp
            lr = lr_trust = plogp.sum(1, keepdim=True)  # -H(p)
            if trust is not None and eps is None:
                lr_trust = _rowdot(torch.softmax(trust, 1), torch.log_softmax(trust, 1))
        else:  # soft: r = softmax(trust / T), a constant
            zt = z if trust is None else trust
            zt = zt if temperature == 1.0 else zt / temperature
            if zt is z:  # r = p: H(r) = H(p)
                p = r = _probs(logp, cs.log2e)
                lr = lr_trust = _rowdot(r, logp)
            else:
                r = torch.softmax(zt, dim=1)
                lr = _rowdot(r, logp)  # -H(r, p)
                if eps is None:
                    lr_trust = _rowdot(r, torch.log_softmax(zt, dim=1))  # -H(r)
        if eps is None:  # ProSelfLC: eps_i = g(t) l(r_i) = g (1 + sum_k r_k log r_k / log C)
            local = torch.add(cs.one, lr_trust, alpha=1.0 / math.log(logp.shape[1]))
            # a number g as alpha: Tensor.mul_(number) would wrap it into a tensor first (one op more)
            eps = (local.mul_(g) if isinstance(g, Tensor) else torch.add(cs.zero, local, alpha=g)).clamp_(0.0, 1.0)
            eps_sink.append(eps)
            neg_loss = torch.lerp(lq, lr, eps)  # sign is +1: (1 - eps) lq + eps lr
        elif sign > 0.0 and kind != "uniform":  # (1 - eps) H(q, p) + eps H(r, p), negated: one op
            neg_loss = torch.lerp(lq, lr, eps)
        else:  # (1 - eps) H(q, p) + sign eps H(r, p), negated; lr of 'uniform' is C (-H(u, p))
            b = sign * eps / logp.shape[1] if kind == "uniform" else sign * eps
            neg_loss = torch.add(torch.mul(lq, cs.a), lr, alpha=b)
        loss = _reduce(neg_loss, reduction, cs)
        if not ctx.needs_input_grad[0]:
            return loss
        if isinstance(eps, Tensor):
            ctx.grad = _proselflc_grad(cs, logp, lr, p, plogp, r, index, labels, sq, eps)
        else:
            ctx.grad = _fixed_eps_grad(cs, kind, logp, lr, p, plogp, r, hard, index, labels, sq,
                                       1.0 - eps, sign * eps)
        return loss


class _ModuleTargetCE(_ClosedForm):
    """_TargetCE for the module: trust None, the fixed arguments packed in one tuple (each apply argument costs)."""

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, g: float | Tensor | None, spec: tuple, eps_sink: list | None) -> Tensor:
        kind, eps, sign, temperature, reduction = spec
        loss = _TargetCE.forward(ctx, z, None, labels, kind, eps, g, sign, temperature, reduction, eps_sink)
        ctx.num_args = 4
        return loss


def _fixed_eps_grad(cs: _Consts, kind: str, logp: Tensor, lr: Tensor, p: Tensor | None,
                    plogp: Tensor | None, r: Tensor | None, hard: Tensor | None,
                    index: Tensor | None, labels: Tensor, sq: float | Tensor, a: float, b: float) -> Tensor:
    """k dH(q~, p)/dz for q~ = a q + b r, a and b floats (see _TargetCE); p and r are overwritten."""
    k = cs.kf
    if kind == "entropy":  # p k (a sum(q) + b S) - k b p log p - k a q
        w = torch.add(cs.k_a if index is not None else torch.mul(sq, cs.k_a), lr, alpha=k * b)
        return _add_q_(p.mul_(w).add_(plogp, alpha=-k * b), index, labels, cs.neg_k_a)
    if kind == "soft" and r is p:  # detached r = p: b (p - r) = 0 leaves a re-weighted CCE, k a (sum(q) p - q)
        grad = p.mul_(cs.k_a if index is not None else torch.mul(sq, cs.k_a))
        return _add_q_(grad, index, labels, cs.neg_k_a)
    # constant r: p k (a sum(q) + b) - k a q - k b r
    if index is None:
        grad = (p if p is not None else _probs(logp, cs.log2e)).mul_(torch.mul(sq, k * a).add_(k * b))
    elif a + b > 0.0:  # k (a + b) is a positive number: one exp2 pass gives p k (a + b)
        grad = _scaled_probs(logp, cs.log2_scale)
    else:
        grad = _probs(logp, cs.log2e).mul_(k * (a + b))
    if kind == "uniform":
        grad = grad.add_(cs.shift)
    elif kind == "hard":
        hard = _argmax(logp, lr, cs) if hard is None else hard
        grad = grad.scatter_add_(1, hard, cs.neg_k_b)
    else:
        grad = grad.sub_(r, alpha=k * b)
    return _add_q_(grad, index, labels, cs.neg_k_a)


def _proselflc_grad(cs: _Consts, logp: Tensor, lr: Tensor, p: Tensor | None, plogp: Tensor | None,
                    r: Tensor | None, index: Tensor | None, labels: Tensor, sq: float | Tensor,
                    eps: Tensor) -> Tensor:
    """k dH(q~, p)/dz for q~ = (1 - eps_i) q + eps_i r, eps_i an [N, 1] column (see _TargetCE); p is overwritten."""
    k = cs.kf
    neg_ka = torch.add(cs.neg_k, eps, alpha=k)  # -k (1 - eps_i), the weight of q
    if plogp is not None:  # r = p: p k lerp(sum(q), S, eps) - k eps p log p - k (1 - eps) q
        w = torch.lerp(cs.one if index is not None else sq, lr, eps)
        grad = p.mul_(w if k == 1.0 else w.mul_(cs.k)).addcmul_(plogp, eps, value=-k)
    elif r is p:  # detached r = p: k (1 - eps) (sum(q) p - q)
        grad = p.mul_(neg_ka if index is not None else neg_ka * sq).neg_()
    else:  # constant r: p k lerp(sum(q), 1, eps) - k eps r - k (1 - eps) q
        if index is not None:
            grad = _scaled_probs(logp, cs.log2_scale)
        else:
            grad = _probs(logp, cs.log2e).mul_(torch.lerp(sq, cs.one, eps).mul_(cs.k))
        grad = grad.addcmul_(r, eps, value=-k)
    return _add_q_(grad, index, labels, neg_ka)


class _GCE(_ClosedForm):
    """GCE sum_k q_k (1 - p_k^e) / e; with W = q p^e the gradient w.r.t. z is p sum(W) - W (times k)."""

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, e: float, reduction: str) -> Tensor:
        logp = torch.log_softmax(z, dim=1)
        cs = _consts(logp, reduction, None, 1.0)
        ctx.reduction, ctx.num_args, ctx.grad = reduction, 3, None
        index = labels.unsqueeze(1) if labels.dim() == 1 else None
        if index is not None:
            weight = logp.gather(1, index).mul_(e).exp_()  # W = p_y^e  [N, 1]
            neg_loss = torch.add(_const(-1.0 / e, weight), weight, alpha=1.0 / e)  # (W - 1) / e
        else:
            weight = torch.mul(logp, _const(e * _LOG2E, logp)).exp2_().mul_(labels)  # W = q p^e  [N, C]
            neg_loss = (weight.sum(1, keepdim=True) - labels.sum(1, keepdim=True)).div_(e)
        loss = _reduce(neg_loss, reduction, cs)
        if ctx.needs_input_grad[0]:
            if index is not None:  # k p_y^e (p - onehot(y))
                kw = weight if cs.kf == 1.0 else weight.mul_(cs.k)
                ctx.grad = _probs(logp, cs.log2e).mul_(kw).scatter_add_(1, index, kw.neg())
            else:
                kw = weight.sum(1, keepdim=True).mul_(cs.k)
                ctx.grad = _probs(logp, cs.log2e).mul_(kw).sub_(weight, alpha=cs.kf)
        return loss


class _SCE(_ClosedForm):
    """SCE alpha H(q, p) + beta sum_k p_k rho_k, rho_k = -log max(q_k, 1e-4), and its closed-form gradient."""

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, alpha: float, beta: float, reduction: str) -> Tensor:
        logp = torch.log_softmax(z, dim=1)
        cs = _consts(logp, reduction, None, 1.0)
        clip = -SCE_LOG_CLIP  # rho_k where q_k = 0
        ctx.reduction, ctx.num_args, ctx.grad = reduction, 4, None
        if labels.dim() == 1:  # rho = clip (1 - onehot): RCE = clip (1 - p_y)
            index = labels.unsqueeze(1)
            lq = logp.gather(1, index)
            weight = lq.exp().mul_(beta * clip)  # beta clip p_y
            neg_loss = torch.add(weight, lq, alpha=alpha).sub_(beta * clip)
            if ctx.needs_input_grad[0]:  # k (alpha + beta clip p_y) (p - onehot(y))
                weight = torch.add(_const(cs.kf * alpha, weight), weight, alpha=cs.kf)
                ctx.grad = _probs(logp, cs.log2e).mul_(weight).scatter_add_(1, index, weight.neg())
        else:
            p = _probs(logp, cs.log2e)
            rho = labels.clamp(min=1e-4).log_().neg_()  # the label's log 0 clipped to log(1e-4)
            p_rho = _rowdot(p, rho)
            neg_loss = torch.add(p_rho * -beta, _rowdot(labels, logp), alpha=alpha)
            if ctx.needs_input_grad[0]:  # k (alpha (sum(q) p - q) + beta p (rho - <p, rho>))
                coef = labels.sum(1, keepdim=True).mul_(alpha).sub_(p_rho * beta)
                grad = rho.mul_(beta).add_(coef).mul_(p).sub_(labels, alpha=alpha)
                ctx.grad = grad if cs.kf == 1.0 else grad.mul_(cs.k)
        return _reduce(neg_loss, reduction, cs)


# --------------------------------------------------------------------------------- module
class TrainingLoss(torch.nn.Module):
    """loss = module(logits [N, C], labels [N] ids or [N, C] soft, step=t); see the module docstring."""

    def __init__(self, method: str, num_classes: int, total_steps: int | None = None, *,
                 eps: float = 0.25, exp_base: float = 10.0, transit: float = 0.5, q: float = 0.7,
                 alpha: float = 6.0, beta: float = 0.1, detach_target: bool = False,
                 temperature: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown loss method {method!r}: choose one of {', '.join(METHODS)}")
        hp = dict(eps=eps, exp_base=exp_base, transit=transit, q=q, alpha=alpha, beta=beta,
                  detach_target=detach_target, temperature=temperature, reduction=reduction)
        _check_hparams(num_classes, total_steps, hp)
        if method == "proselflc" and total_steps is None:
            raise ValueError("proselflc needs total_steps=T (the number of optimizer steps of the run), got None")
        self.method, self.num_classes, self.total_steps = method, num_classes, total_steps
        self.eps, self.exp_base, self.transit, self.q = float(eps), float(exp_base), float(transit), float(q)
        self.alpha, self.beta = float(alpha), float(beta)
        self.detach_target = detach_target
        self.temperature = None if temperature is None else float(temperature)
        self.reduction = reduction
        self._last_epsilon: float | Tensor = self.eps if method in _FIXED_EPS else 0.0
        self._sign = -1.0 if method == "cp" else 1.0  # cp subtracts eps p from the target
        if method in ("ls", "boothard"):  # which r the target uses (see _TargetCE)
            self._kind: str | None = "uniform" if method == "ls" else "hard"
        elif method in _SELF_TARGET:
            self._kind = "soft" if detach_target or temperature is not None else "entropy"
        else:  # cce, gce, sce: no target
            self._kind = None

    @property
    def last_epsilon(self) -> float | Tensor:
        """The eps of the last call: a detached [N] tensor (proselflc) or a float; squeezed on read, not per step."""
        eps = self._last_epsilon
        return eps.squeeze(1) if isinstance(eps, Tensor) and eps.dim() == 2 else eps

    @last_epsilon.setter
    def last_epsilon(self, value: float | Tensor) -> None:
        """Set the value last_epsilon reports."""
        self._last_epsilon = value

    def extra_repr(self) -> str:
        """Method and the hyperparameters it uses."""
        used = {"ls": "eps", "cp": "eps", "bootsoft": "eps", "boothard": "eps",
                "proselflc": "exp_base transit", "gce": "q", "sce": "alpha beta"}.get(self.method, "")
        keys = used.split() + (["detach_target", "temperature"] if self.method in _SELF_TARGET else [])
        parts = [f"{self.method!r}", f"num_classes={self.num_classes}", f"total_steps={self.total_steps}"]
        return ", ".join(parts + [f"{k}={getattr(self, k)!r}" for k in keys] + [f"reduction={self.reduction!r}"])

    def _trust(self, step: int | float | Tensor | None) -> float | Tensor:
        """g(t) for ProSelfLC after checking the step."""
        if step is None:
            raise ValueError("proselflc needs step=t (optimizer steps taken so far, 0..total_steps), got None")
        step = _check_step(step, self.total_steps)  # a CPU tensor step becomes a number: fewer ops
        return _global_trust(step, self.total_steps, self.exp_base, self.transit)

    def forward(self, logits: Tensor, labels: Tensor, step: int | float | Tensor | None = None) -> Tensor:
        """The method's loss, reduced by self.reduction; sets self.last_epsilon (detached)."""
        z = _float_logits(logits, self.num_classes)
        labels = _check_labels(labels, z)
        if self.method == "cce":
            _check_id_range(labels, self.num_classes)  # F.cross_entropy would skip the id -100
            return F.cross_entropy(z, labels, reduction=self.reduction)
        g = self._trust(step) if self.method == "proselflc" else None
        try:  # class ids out of range make the CPU gather raise: no range check on the happy path
            return self._fused(z, labels, g)
        except RuntimeError:
            _check_id_range(labels, self.num_classes)  # raises ValueError naming the bad id
            raise

    def _fused(self, z: Tensor, labels: Tensor, g: float | Tensor | None) -> Tensor:
        """Dispatch to the method's autograd Function."""
        if g is not None:  # proselflc
            sink: list[Tensor] = []
            spec = (self._kind, None, 1.0, self.temperature or 1.0, self.reduction)
            loss = _ModuleTargetCE.apply(z, labels, g, spec, sink)
            object.__setattr__(self, "_last_epsilon", sink[0])  # a plain attribute: skip nn.Module's bookkeeping
            return loss
        if self._kind is not None:
            spec = (self._kind, self.eps, self._sign, self.temperature or 1.0, self.reduction)
            return _ModuleTargetCE.apply(z, labels, None, spec, None)
        if self.method == "gce":
            return _GCE.apply(z, labels, self.q, self.reduction)
        return _SCE.apply(z, labels, self.alpha, self.beta, self.reduction)

    def target(self, logits: Tensor, labels: Tensor, step: int | float | Tensor | None = None) -> Tensor:
        """q~ [N, C] of a target method, by plain autograd ops with the gradient semantics above."""
        if self.method in ("gce", "sce"):
            raise ValueError(f"{self.method!r} is a robust loss, not a target modification: target() "
                             f"is defined for {', '.join(METHODS[:6])}")
        z = _float_logits(logits, self.num_classes)
        labels = _check_labels(labels, z)
        _check_id_range(labels, self.num_classes)
        q = F.one_hot(labels, self.num_classes).to(z.dtype) if labels.dim() == 1 else labels
        m, eps = self.method, self.eps
        if m == "cce":
            return q
        if m == "ls":
            return (1.0 - eps) * q + eps / self.num_classes
        p = torch.softmax(z, dim=1)
        if m == "boothard":
            return (1.0 - eps) * q + eps * F.one_hot(p.argmax(1), self.num_classes).to(z.dtype)
        if self.temperature is not None:
            p = torch.softmax(z.detach() / self.temperature, dim=1)
        elif self.detach_target:
            p = p.detach()
        if m == "proselflc":
            eps = (self._trust(step) * local_trust(p)).unsqueeze(1)
        return (1.0 - eps) * q + (-eps if m == "cp" else eps) * p


def build_loss(name: str, num_classes: int, total_steps: int | None = None, **hparams: object) -> TrainingLoss:
    """The loss module for --method name; hparams among HPARAMS (None = default, unused ones ignored)."""
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
        raise ValueError(f"unknown loss hyperparameter(s) {', '.join(unknown)}: choose among {', '.join(HPARAMS)}")
    given = {k: v for k, v in hparams.items() if v is not None}
    return TrainingLoss(name, num_classes, total_steps, **given)
