"""The paper's models (Koh & Liang 2017; PROTOCOL sections 1.7, 1.9, 4.1-4.4).

- :class:`LogisticRegression`: multinomial (``classes >= 2``, logits ``x W^T``) or binary
  (``classes = 1``, one logit ``w^T x``, use with ``loss="binary_logistic"``) logistic
  regression **without bias**, as in every LR experiment of the paper.
- :class:`LinearSVM`: a linear score ``w^T x`` without bias, for ``loss="hinge"`` or
  ``loss="smooth_hinge"`` (``SmoothHinge(s, t) = t log(1 + exp((1 - s)/t))``, Sec. 4.3).
- :class:`PaperCNN`: the small all-convolutional tanh network of Fig. 2 (right), 2,616
  parameters (PROTOCOL 4.3).

All models accept inputs of any shape ``[B, ...]`` and flatten (or, for the CNN, reshape to
``[B, 1, 28, 28]``) themselves, so the flat ``[N, 784]`` MNIST arrays can be used directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import InputError

__all__ = ["LinearSVM", "LogisticRegression", "PaperCNN", "truncated_normal_"]


class LogisticRegression(nn.Module):
    """Logistic regression without bias (PROTOCOL 1.7, 4.1, 4.2).

    Args:
        d: number of input features (784 for MNIST).
        classes: ``1`` for the binary model (output ``[B]``, the logit ``w^T x``; pair it with
            ``loss="binary_logistic"``, labels in {0, 1} or {-1, +1}), or ``C >= 2`` for the
            multinomial model (output ``[B, C]`` logits ``x W^T`` with the full, over-
            parameterised ``C x d`` weight matrix; pair it with ``loss="cross_entropy"``).
        dtype: parameter dtype (use ``torch.float64`` for leave-one-out experiments).

    The weights start at zero (the optimum of a convex objective does not depend on it and
    scikit-learn starts there too). The parameter is called ``linear.weight``.
    """

    def __init__(self, d: int, classes: int = 1, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if int(d) < 1 or int(classes) < 1:
            raise InputError(
                f"LogisticRegression needs d >= 1 and classes >= 1, got {d}, {classes}"
            )
        self.d = int(d)
        self.classes = int(classes)
        self.linear = nn.Linear(self.d, self.classes, bias=False, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.reshape(x.shape[0], -1))
        return out[:, 0] if self.classes == 1 else out


class LinearSVM(nn.Module):
    """Linear SVM score ``s = w^T x`` without bias (PROTOCOL 1.9, 4.4); output ``[B]``.

    Use with ``loss="hinge"`` (``max(0, 1 - y s)``) or ``loss="smooth_hinge"`` with a
    temperature ``t``; labels in {0, 1} or {-1, +1}. The weights start at zero; the parameter
    is called ``linear.weight`` (shape ``[1, d]``).
    """

    def __init__(self, d: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if int(d) < 1:
            raise InputError(f"LinearSVM needs d >= 1, got {d}")
        self.d = int(d)
        self.linear = nn.Linear(self.d, 1, bias=False, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))[:, 0]


def truncated_normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill ``t`` in place with N(0, std^2) draws truncated to ``[-2 std, 2 std]`` (TF style).

    TensorFlow's ``truncated_normal`` redraws values outside two standard deviations; this
    does the same by rejection, with a dedicated generator so the result depends on the seed only.
    """
    with torch.no_grad():
        out = torch.empty(t.numel(), dtype=torch.float64)
        filled = 0
        while filled < out.numel():
            draw = torch.randn(
                2 * (out.numel() - filled) + 16, generator=generator, dtype=torch.float64
            )
            draw = draw[draw.abs() <= 2.0][: out.numel() - filled]
            out[filled : filled + draw.numel()] = draw
            filled += draw.numel()
        t.copy_((out * std).reshape(t.shape).to(t.dtype))
    return t


class PaperCNN(nn.Module):
    """The all-convolutional tanh CNN of Fig. 2 (right): 2,616 parameters (PROTOCOL 4.3).

    Six 'VALID' convolutions, each followed by tanh, then global average pooling and a dense
    layer with bias (the logits)::

        h1_a 3x3 1->8  s1 (26x26)   h1_c 3x3 8->8 s2 (12x12)
        h2_a 3x3 8->8  s1 (10x10)   h2_c 3x3 8->8 s2 (4x4)
        h3_a 3x3 8->8  s1 (2x2)     h3_c 1x1 8->10 s1 (2x2)
        global average pool (10) -> dense 10->10 (+ bias) -> logits

    Parameters: ``80 + 4 * 584 + 90 + 110 = 2616``.

    Init (as the original code): conv weights truncated normal (within 2 sigma) with
    ``sigma = 2 / sqrt(k * k * c_in)``, dense weights with ``sigma = 1 / sqrt(10)``, all biases 0,
    drawn from a ``torch.Generator`` seeded with ``seed``. The original's TensorFlow random
    stream cannot be reproduced; only the distribution is.

    Args:
        seed: seed of the initialisation.
        dtype: parameter dtype.

    Inputs: ``[B, 784]``, ``[B, 28, 28]`` or ``[B, 1, 28, 28]`` pixels (in [0, 1] in the paper).
    Use with ``loss="cross_entropy"`` and ``l2`` on the weights only
    (``params=None`` regularises the biases too; see :attr:`weight_names`).
    """

    #: (name, kernel, in, out, stride) of the six convolutions
    LAYERS = (
        ("h1_a", 3, 1, 8, 1),
        ("h1_c", 3, 8, 8, 2),
        ("h2_a", 3, 8, 8, 1),
        ("h2_c", 3, 8, 8, 2),
        ("h3_a", 3, 8, 8, 1),
        ("h3_c", 1, 8, 10, 1),
    )

    def __init__(self, seed: int = 0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.convs = nn.ModuleDict(
            {
                name: nn.Conv2d(cin, cout, k, stride=s, padding=0, dtype=dtype)
                for name, k, cin, cout, s in self.LAYERS
            }
        )
        self.dense = nn.Linear(10, 10, dtype=dtype)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int = 0) -> None:
        """Re-draw the weights as described in the class docstring."""
        g = torch.Generator().manual_seed(int(seed))
        for name, k, cin, _, _ in self.LAYERS:
            conv = self.convs[name]
            truncated_normal_(conv.weight, 2.0 / math.sqrt(k * k * cin), g)
            nn.init.zeros_(conv.bias)
        truncated_normal_(self.dense.weight, 1.0 / math.sqrt(10.0), g)
        nn.init.zeros_(self.dense.bias)

    @property
    def weight_names(self) -> list[str]:
        """Names of the weight tensors (the paper's L2 penalty applies to these, not biases)."""
        return [n for n, _ in self.named_parameters() if n.endswith("weight")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[1:]) != 784:
            raise InputError(f"PaperCNN takes 28x28 images, got inputs of shape {tuple(x.shape)}")
        h = x.reshape(x.shape[0], 1, 28, 28)
        for name, *_ in self.LAYERS:
            h = torch.tanh(self.convs[name](h))
        return self.dense(h.mean(dim=(2, 3)))
