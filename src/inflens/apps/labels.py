"""Model outputs to predicted labels, and labels to classes: one rule for every application.

A one-logit model (one output per example, or one column; the ``"binary_logistic"``,
``"hinge"`` and ``"smooth_hinge"`` losses) predicts class 1 where the logit is positive and
class 0 elsewhere; a model with several output columns predicts the argmax. Binary labels
may be ``{0, 1}`` or ``{-1, +1}``; :func:`as_classes` maps both to ``{0, 1}`` so that
predictions and labels compare directly.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..objective import Objective

__all__ = ["as_classes", "outputs_to_labels", "predict_labels", "probability_of_label"]

#: losses whose model has one logit per example
BINARY_LOSSES = ("binary_logistic", "hinge", "smooth_hinge")


def _one_logit(outputs: torch.Tensor) -> bool:
    return outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)


def outputs_to_labels(outputs: torch.Tensor, loss_name: str | None = None) -> torch.Tensor:
    """Predicted classes ``[B]``: ``logit > 0`` (as 0/1) for one-logit outputs, else argmax.

    ``loss_name`` (an :class:`~inflens.Objective`'s ``loss_name``) only guards against losses
    whose outputs are not class scores (``"mse"``): those raise :class:`InputError`.
    """
    if loss_name == "mse":
        raise InputError(
            "cannot turn outputs of the loss 'mse' into labels (a regression); pass your own "
            "outputs -> labels function"
        )
    if _one_logit(outputs):
        return (outputs.reshape(-1) > 0).long()
    if outputs.ndim == 2:
        return outputs.argmax(1)
    raise InputError(f"outputs of shape {tuple(outputs.shape)} are not class scores [B, C]")


def as_classes(y: torch.Tensor) -> torch.Tensor:
    """Labels as classes ``[B]``: ``{-1, +1}`` becomes ``{0, 1}``; other labels are kept."""
    y = torch.as_tensor(y).reshape(-1)
    if y.numel() and bool((y < 0).any()):
        return (y > 0).long()
    return y.long()


def predict_labels(objective: Objective, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes of ``x`` at ``theta`` (:func:`outputs_to_labels`, no gradients)."""
    with torch.no_grad():
        out = objective.outputs(theta, x)
    return outputs_to_labels(out, objective.loss_name if objective.builtin_loss else None)


def probability_of_label(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` model probability of the label: ``sigma(+-logit)`` for one logit, softmax else.

    NaN for outputs that are not class scores.
    """
    cls = as_classes(y)
    if _one_logit(outputs):
        p1 = torch.sigmoid(outputs.reshape(-1))
        return torch.where(cls == 1, p1, 1 - p1)
    if outputs.ndim == 2:
        return outputs.softmax(1).gather(1, cls[:, None])[:, 0]
    return torch.full((outputs.shape[0],), float("nan"), dtype=outputs.dtype)
