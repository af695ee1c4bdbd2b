"""Per-example losses: ``(outputs, targets) -> [batch]`` tensors.

Built-in names accepted by :class:`inflens.Objective`:

- ``"cross_entropy"``: outputs ``[B, C]`` logits, integer targets in ``[0, C)``.
- ``"binary_logistic"``: one logit per example (``[B]`` or ``[B, 1]``), labels in {0, 1} or
  {-1, +1}; ``L = log(1 + exp(-y s))`` with ``y`` in {-1, +1}.
- ``"hinge"``: ``max(0, 1 - y s)``; its derivative is -y inside the margin and 0 outside, its
  second derivative is 0 (as with autodiff in the original code, so ``H = l2 I`` exactly).
- ``"smooth_hinge"``: ``SmoothHinge(s, t) = t log(1 + exp((1 - s)/t))`` (Sec. 4.3); ``t = 0`` is
  the hinge.
- ``"mse"``: mean over the non-batch dimensions of ``(outputs - targets)^2``.
- ``"causal_lm"``: next-token cross-entropy with the Hugging Face conventions. Outputs
  ``[B, T, V]`` logits (a tensor, or a ``ModelOutput`` whose ``logits`` the objective takes),
  labels ``[B, T]`` token ids; position ``t`` of the logits predicts label ``t + 1`` (the
  one-position shift), and label ``-100`` is not counted. The per-example loss is the *mean*
  over that sequence's counted tokens, ``L_i = (1 / N_i) sum_{t counted} l_it``; a sequence
  with no counted token is refused (its mean is undefined).
- ``"sequence_classification"``: cross-entropy on ``[B, C]`` logits (``ModelOutput.logits``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _binary_scores(outputs: torch.Tensor, name: str) -> torch.Tensor:
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.ndim == 1:
        return outputs
    raise InputError(
        f"loss {name!r} needs one logit per example (model output [batch] or [batch, 1]), "
        f"got outputs of shape {tuple(outputs.shape)}; use 'cross_entropy' for several classes."
    )


def signed_labels(targets: torch.Tensor) -> torch.Tensor:
    """Map labels in {0, 1} to {-1, +1}; labels already in {-1, +1} pass unchanged."""
    t = targets.to(torch.get_default_dtype()) if not targets.is_floating_point() else targets
    # 0 -> -1, 1 -> +1, -1 -> -1: y = sign(2t - 1) for t in {0,1}; for t = -1 that gives -3 -> -1.
    return torch.where(t > 0, torch.ones_like(t), -torch.ones_like(t))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` accurate to float64 precision, with exact first and second derivatives.

    ``F.softplus`` defaults to ``threshold=20``: above it it returns ``x`` itself, so the value is
    off by ``log(1 + e^-x) ~ 2e-9``, the derivative is exactly 1 and the second derivative exactly
    0 there (a ~2e-9 relative error in float64 gradients and Hessians; for the smooth hinge with
    t = 0.001 every point more than 0.02 inside the margin lost its curvature). ``exp(40)``
    does not overflow even in float32 and ``e^-40 < 1e-17``, so 40 is exact in both dtypes
    (half precision keeps the default, where ``exp(40)`` could overflow).
    """
    wide = x.dtype in (torch.float32, torch.float64)
    return F.softplus(x, beta=1.0, threshold=40.0 if wide else 20.0)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per example: ``-log softmax(outputs)[y]``."""
    return F.cross_entropy(outputs, targets, reduction="none")


#: the label that PyTorch's and Hugging Face's losses ignore
IGNORE_INDEX = -100


def causal_lm_token_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: ``l_it / N_i`` for each label position ``t`` (0 at position 0, at ignored
    labels and at padding), so that the row sums are the ``"causal_lm"`` per-example losses.

    ``l_it = -log softmax(outputs[i, t - 1])[targets[i, t]]`` (the logits at ``t - 1`` predict
    the token at ``t``); ``N_i`` is the number of labels that are not ``-100`` after the shift.
    """
    if outputs.ndim != 3 or targets.ndim != 2 or outputs.shape[:2] != targets.shape:
        raise InputError(
            "'causal_lm' needs logits [batch, T, vocab] and labels [batch, T], got logits "
            f"{tuple(outputs.shape)} and labels {tuple(targets.shape)}"
        )
    labels = targets[:, 1:]
    keep = labels != IGNORE_INDEX
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(outputs[:, :-1], dim=-1)
    nll = -torch.gather(logp, 2, safe.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    count = keep.sum(1, keepdim=True).clamp_min(1).to(nll.dtype)
    per_token = torch.where(keep, nll, torch.zeros_like(nll)) / count
    return torch.cat([per_token.new_zeros(per_token.shape[0], 1), per_token], 1)


def causal_lm(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per sequence, the mean over its counted tokens (module docstring)."""
    return causal_lm_token_losses(outputs, targets).sum(1)


def sequence_classification(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of ``[B, C]`` sequence-level logits (as ``"cross_entropy"``)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def binary_logistic(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(-y s))`` with ``y`` in {-1, +1} (labels 0/1 are mapped to -1/+1)."""
    s = _binary_scores(outputs, "binary_logistic")
    y = signed_labels(targets).to(s.dtype)
    return _softplus(-y * s)


def hinge(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``max(0, 1 - y s)`` with ``y`` in {-1, +1}."""
    s = _binary_scores(outputs, "hinge")
    y = signed_labels(targets).to(s.dtype)
    return torch.clamp(1 - y * s, min=0)


def smooth_hinge_value(margin: torch.Tensor, t: float) -> torch.Tensor:
    """``SmoothHinge(s, t) = t * log(1 + exp((1 - s) / t))``, computed stably; hinge at t = 0."""
    if t == 0:
        return torch.clamp(1 - margin, min=0)
    return t * _softplus((1 - margin) / t)


@dataclass(frozen=True)
class SmoothHinge:
    """Smooth hinge loss of Sec. 4.3 with temperature ``t`` (``t -> 0`` gives the hinge)."""

    t: float = 0.001

    def __post_init__(self) -> None:
        if not (self.t >= 0):
            raise InputError(f"smooth hinge temperature t must be >= 0, got {self.t}")

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s = _binary_scores(outputs, "smooth_hinge")
        y = signed_labels(targets).to(s.dtype)
        return smooth_hinge_value(y * s, self.t)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example, averaged over the non-batch dimensions."""
    diff = outputs - targets.to(outputs.dtype)
    return (diff**2).reshape(diff.shape[0], -1).mean(1)


BUILTIN_LOSSES = (
    "cross_entropy",
    "binary_logistic",
    "hinge",
    "smooth_hinge",
    "mse",
    "causal_lm",
    "sequence_classification",
)
#: losses whose per-example value is a mean of per-token terms (per-token influence applies)
TOKEN_LOSSES = {"causal_lm": causal_lm_token_losses}
_BINARY = ("binary_logistic", "hinge", "smooth_hinge")


def output_hessians(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, C, C]``: ``Lambda_i``, the Hessian of each example's loss in its ``C`` outputs
    (``torch.func``, one example at a time under ``vmap``; outputs of any per-example shape are
    flattened)."""
    from torch.func import hessian, vmap

    def single(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(o[None], t[None])[0]

    b, c = outputs.shape[0], outputs[0].numel()
    return vmap(hessian(single))(outputs, targets).reshape(b, c, c)


def output_hessian_factor(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """``[m, B, C]`` vectors ``u`` with ``Lambda_i = sum_m u_mi u_mi^T`` (the Hessian of the loss
    in the outputs) in closed form, for the built-in cross-entropy; None for other losses.

    Softmax cross-entropy: ``Lambda = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T`` (the
    cross terms sum to ``-2 p p^T`` and ``sum_c p_c p p^T = p p^T``), so
    ``u_c = sqrt(p_c) (e_c - p)``: no eigendecomposition per example.
    """
    if loss_fn not in (cross_entropy, sequence_classification) or outputs.ndim != 2:
        return None
    p = torch.softmax(outputs, dim=-1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    u = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])  # [B, c, C]: sqrt(p_c) (e_c - p)
    return u.permute(1, 0, 2)


def sampled_token_factor(
    outputs: torch.Tensor, targets: torch.Tensor, samples: int, generator: torch.Generator
) -> torch.Tensor:
    """``[samples, B, T, V]`` Monte-Carlo factor columns of the ``"causal_lm"`` output Hessian.

    The Hessian of ``l_it / N_i`` in the logits at ``t - 1`` is ``(diag p - p p^T) / N_i``
    (``p`` the predicted distribution there) and different positions do not mix. With a label
    ``y^ ~ p`` drawn independently at every counted position, ``u = (e_y^ - p) / sqrt(N_i)``
    has ``E[u u^T] = (diag p - p p^T) / N_i`` at each position and ``E[u_t u_s^T] = 0``
    across positions: an unbiased estimate of the whole block-diagonal output Hessian from one
    vector per sample (the "true Fisher" of the predictive distribution), where the exact
    factorisation would need ``V`` vectors per position. Divided by ``sqrt(samples)``.
    """
    logits = outputs[:, :-1].detach()
    labels = targets[:, 1:]
    keep = (labels != IGNORE_INDEX).to(logits.dtype)
    count = keep.sum(1).clamp_min(1)
    p = torch.softmax(logits, dim=-1)
    b, t, v = p.shape
    # inverse-CDF draws (one uniform per position and sample, then a binary search in the
    # cumulative distribution): an order of magnitude faster than torch.multinomial on
    # [B T, V] rows, and exact in distribution up to float64 round-off of the cumulative sums
    cdf = p.reshape(-1, v).to("cpu", torch.float64).cumsum(1)
    unif = torch.rand(cdf.shape[0], samples, generator=generator, dtype=torch.float64)
    draws = torch.searchsorted(cdf, unif * cdf[:, -1:], right=True).clamp_max(v - 1)  # [BT, s]
    idx = draws.T.reshape(samples, b, t, 1).to(p.device)
    u = (-p[None]).expand(samples, b, t, v).clone()
    u.scatter_add_(-1, idx, torch.ones(idx.shape, dtype=p.dtype, device=p.device))  # e_y^ - p
    u = u * (keep / count[:, None]).sqrt()[None, :, :, None]
    u = u / samples**0.5
    return torch.cat([u, u.new_zeros(samples, b, 1, v)], 2)  # the last logits predict nothing


def resolve_loss(loss: str | LossFn, t: float | None = None) -> tuple[str, LossFn]:
    """Return ``(name, fn)`` for a built-in loss name or a user callable."""
    if callable(loss):
        return getattr(loss, "__name__", type(loss).__name__), loss
    if loss == "smooth_hinge":
        return loss, SmoothHinge(0.001 if t is None else float(t))
    if t is not None:
        raise InputError(f"temperature t is only used by 'smooth_hinge', not by {loss!r}")
    table: dict[str, LossFn] = {
        "cross_entropy": cross_entropy,
        "binary_logistic": binary_logistic,
        "hinge": hinge,
        "mse": mse,
        "causal_lm": causal_lm,
        "sequence_classification": sequence_classification,
    }
    if loss not in table:
        raise InputError(
            f"unknown loss {loss!r}; use one of {', '.join(BUILTIN_LOSSES)} "
            "or a callable (outputs, targets) -> per-example losses"
        )
    return loss, table[loss]


def check_targets(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise :class:`InputError` when targets do not fit a built-in loss and the model outputs."""
    if outputs.shape[0] != targets.shape[0]:
        raise InputError(
            f"model returned {outputs.shape[0]} outputs for a batch with {targets.shape[0]} labels"
        )
    if name == "causal_lm":
        if outputs.ndim != 3 or targets.ndim != 2 or outputs.shape[:2] != targets.shape:
            raise InputError(
                "'causal_lm' needs logits [batch, T, vocab] and labels [batch, T] (Hugging Face "
                f"style: labels = input_ids, padding set to -100), got logits "
                f"{tuple(outputs.shape)} and labels {tuple(targets.shape)}"
            )
        if targets.is_floating_point():
            raise InputError("'causal_lm' needs integer token labels; convert with labels.long()")
        v = outputs.shape[2]
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= v))
        if bad.any():
            raise InputError(
                f"token labels must lie in [0, {v - 1}] or be -100 (ignored), found "
                f"{int(targets[bad][0])}"
            )
        empty = (targets[:, 1:] == IGNORE_INDEX).all(1)
        if empty.any():
            raise InputError(
                f"sequence {int(empty.nonzero()[0, 0])} of the batch has no counted token after "
                "the one-position shift (all labels are -100): its mean loss is undefined; drop "
                "it from the data"
            )
        return
    if name in ("cross_entropy", "sequence_classification"):
        if outputs.ndim != 2:
            raise InputError(
                "'cross_entropy' needs model outputs of shape [batch, classes], "
                f"got {tuple(outputs.shape)}"
            )
        if targets.is_floating_point() or targets.ndim != 1:
            onehot = targets.ndim == 2 and targets.shape == outputs.shape
            raise InputError(
                "'cross_entropy' needs integer class labels of shape [batch], got "
                f"{targets.dtype} labels of shape {tuple(targets.shape)}; "
                + ("one-hot targets: convert with y.argmax(1)" if onehot else
                   "convert with y.long()")
            )  # fmt: skip
        c = outputs.shape[1]
        if (targets == IGNORE_INDEX).any():
            raise InputError(
                "label -100 (PyTorch's ignore_index) found: a classification loss would give "
                "such an example zero loss and zero influence. Drop those examples, or use "
                "loss='causal_lm' for token sequences, where -100 marks positions not counted"
            )
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= c:
            raise InputError(
                f"labels must lie in [0, {c - 1}] for a model with {c} outputs, "
                f"found labels in [{lo}, {hi}]"
            )
    elif name in _BINARY:
        _binary_scores(outputs, name)
        vals = set(torch.unique(targets).tolist())
        if not (vals <= {0, 1} or vals <= {-1, 1}):
            bad = sorted(vals - {0, 1, -1})[:5]
            raise InputError(
                f"loss {name!r} needs labels in {{0, 1}} or {{-1, +1}}, found values such as {bad}"
                if bad
                else f"loss {name!r} needs labels in {{0, 1}} or {{-1, +1}}, not a mix of both"
            )
    elif name == "mse":
        if tuple(outputs.shape) != tuple(targets.shape):
            raise InputError(
                f"'mse' needs targets of the same shape as the outputs: outputs "
                f"{tuple(outputs.shape)}, targets {tuple(targets.shape)}"
            )
