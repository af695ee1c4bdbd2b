"""The settings, the box and the result of a training-set attack (:mod:`inflens.apps.attack`).

The box is the constraint set of the attack's projected signed-gradient steps (PROTOCOL 4.6:
within half an 8-bit level of each original pixel, so the poisoned image rounds back to the
original 8-bit image); the config collects the attack's settings, validated on creation; the
result holds one attack's state as the loop steps it, then its outcome with its summaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..objective import Objective
from ..solvers import Solver
from .labels import as_classes, outputs_to_labels, probability_of_label

__all__ = [
    "AttackConfig",
    "AttackResult",
    "Pair",
    "PixelBox",
    "Retrain",
    "TargetState",
    "eight_bit_level",
    "target_states",
]

Retrain = Callable[[Objective, tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]
#: an attack's targets at one theta: ``(flipped [m], mean target loss, p(true label) [m])``
TargetState = tuple[torch.Tensor, float, torch.Tensor]


def target_states(
    objective: Objective, loss_name: str | None, thetas: torch.Tensor, targets: list[Pair]
) -> list[TargetState]:
    """The :data:`TargetState` of each attack's targets ``targets[t]`` at its ``thetas[t]``
    (one batch for all: the backend's ``outputs_at`` and ``values_at``)."""
    sizes = [int(t[1].shape[0]) for t in targets]
    be = objective.select_backend(targets[0][0][:1], targets[0][1][:1])
    x = be.many_inputs(torch.cat([t[0] for t in targets]))
    y = torch.cat([t[1] for t in targets])
    th = thetas.repeat_interleave(torch.tensor(sizes), 0)
    with objective.evaluating(), torch.no_grad():
        out = be.outputs_at(th, x)
        loss = be.values_at(th, x, y, "measurement")
    flipped = outputs_to_labels(out, loss_name) != as_classes(y)
    p_true = probability_of_label(out, y).detach()
    return [
        (f, float(v.mean()), p)
        for f, v, p in zip(flipped.split(sizes), loss.split(sizes), p_true.split(sizes))
    ]


def eight_bit_level(value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Size of one 8-bit level in model units: ``(high - low) / 255`` (``2/255`` for [-1, 1])."""
    return (float(value_range[1]) - float(value_range[0])) / 255.0


@dataclass(frozen=True)
class PixelBox:
    """Where a poisoned input may lie: within ``radius`` (L-inf, model units; a float or a
    tensor broadcastable to one input) of its original, and inside ``[low, high]`` (``None``:
    unbounded). :meth:`eight_bit` is the paper's box."""

    radius: float | torch.Tensor
    low: float | None = -1.0
    high: float | None = 1.0

    @classmethod
    def eight_bit(
        cls, value_range: tuple[float, float] = (-1.0, 1.0), levels: float = 0.5
    ) -> PixelBox:
        """``levels`` 8-bit levels around each pixel (0.5, the paper: the poisoned image
        rounds back to the original 8-bit image), inside ``value_range``."""
        return cls(levels * eight_bit_level(value_range), value_range[0], value_range[1])

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Closest point of the box to ``x`` (coordinate-wise clipping)."""
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        x = torch.maximum(torch.minimum(x, x0 + r), x0 - r)
        if self.low is not None or self.high is not None:
            x = x.clamp(self.low, self.high)
        return x


@dataclass(frozen=True)
class AttackConfig:
    """Settings of a :class:`TrainingSetAttack` (validated on creation).

    Attributes:
        step: one signed step, model units (default 0.02 8-bit levels, the paper's).
        box: where poisoned inputs may lie (default ``PixelBox.eight_bit(value_range)``).
        value_range: the range 8-bit 0..255 maps to (``(-1, 1)`` for ``x / 127.5 - 1``).
        solver: inverse-HVP solver of the queries; ``None``: CG preconditioned by the exact
            inverse Hessian at the clean optimum (plain CG above 4,096 parameters).
        damping: added to ``H`` in the queries (Sec. 4.2).
        retrain: ``"newton"`` (smooth strongly convex top layer), ``"lbfgs"``, a callable
            ``(objective, (x, y), theta0) -> theta``, or ``"auto"`` (Newton for a FeatureModel
            top layer of at most 4,096 parameters, else L-BFGS).
        tol: gradient-norm tolerance of the refits.
        chunk_size: images per batch through the extractor.
        refit_start: first refit theta on the clean data, so that "before" and "after" are
            both exact optima (a looser trained model would drift in the first refit).
        progress: progress bars.
    """

    step: float | None = None
    box: PixelBox | None = None
    value_range: tuple[float, float] = (-1.0, 1.0)
    solver: str | Solver | None = None
    damping: float = 0.0
    retrain: str | Retrain = "auto"
    tol: float = 1e-10
    chunk_size: int = 128
    refit_start: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.step is not None and not float(self.step) > 0:
            raise InputError(f"step must be positive, got {self.step}")
        if not float(self.damping) >= 0:
            raise InputError(f"damping must be non-negative, got {self.damping}")
        if not callable(self.retrain) and self.retrain not in ("auto", "newton", "lbfgs"):
            raise InputError(
                f"retrain must be 'auto', 'newton', 'lbfgs' or a callable, got {self.retrain!r}"
            )
        if not float(self.tol) > 0 or int(self.chunk_size) < 1:
            raise InputError(f"need tol > 0 and chunk_size >= 1, got {self.tol}, {self.chunk_size}")
        if not float(self.value_range[1]) > float(self.value_range[0]):
            raise InputError(f"value_range must be (low, high) with low < high: {self.value_range}")


@dataclass
class AttackResult:
    """Outcome of one attack.

    Attributes:
        indices: the poisoned training indices ``[k]``; ``x_poisoned``, ``x_original``: their
            inputs after and before; ``theta``, ``theta_original``: the retrained and the
            original trainable parameters; ``iterations``: steps run (early stop included).
        flipped: ``[m]`` targets whose prediction differs from the label at the end;
            ``initially_correct``: ``[m]`` targets correct at the start.
        target_loss_before/after: mean target measurement; ``prob_true_before/after``: ``[m]``
            probability of the true label (NaN for outputs that are not class scores).
        feature_change: ``[k]`` L2 change of each poisoned input's features (FeatureModel).
        history: per iteration ``{"target_loss", "n_flipped"}``; ``seconds``: wall time (in
            :meth:`TrainingSetAttack.run_many`, its share).
    """

    indices: torch.Tensor
    x_poisoned: torch.Tensor
    x_original: torch.Tensor
    theta: torch.Tensor
    theta_original: torch.Tensor
    iterations: int
    flipped: torch.Tensor
    initially_correct: torch.Tensor
    target_loss_before: float
    target_loss_after: float
    prob_true_before: torch.Tensor
    prob_true_after: torch.Tensor
    feature_change: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def start(
        cls, indices: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, state: TargetState
    ) -> AttackResult:
        """An attack before its first step, at inputs ``x`` and ``theta`` with the targets'
        ``state`` there ("after" = "before"); ``indices``, ``theta`` and the poisoned ``x`` are
        copied."""
        flipped, loss, p_true = state
        return cls(
            indices=indices.clone(),
            x_poisoned=x.clone(),
            x_original=x,
            theta=theta.clone(),
            theta_original=theta.clone(),
            iterations=0,
            flipped=flipped,
            initially_correct=~flipped,
            target_loss_before=loss,
            target_loss_after=loss,
            prob_true_before=p_true,
            prob_true_after=p_true,
        )

    def record(self, x: torch.Tensor, theta: torch.Tensor, state: TargetState) -> None:
        """One step: the poisoned inputs ``x``, the refitted ``theta`` and the targets'
        ``state`` there, appended to :attr:`history`."""
        self.x_poisoned, self.theta, self.iterations = x, theta, self.iterations + 1
        self.flipped, self.target_loss_after, self.prob_true_after = state
        self.history.append({"target_loss": self.target_loss_after, "n_flipped": self.n_flipped})

    @property
    def success(self) -> bool:
        """Every target that was correct at the start is now mispredicted."""
        c = self.initially_correct
        return bool(self.flipped[c].all()) and bool(c.any())

    @property
    def n_flipped(self) -> int:
        """Targets correct at the start and mispredicted at the end."""
        return int((self.flipped & self.initially_correct).sum())

    @property
    def delta(self) -> torch.Tensor:
        """``x_poisoned - x_original``."""
        return self.x_poisoned - self.x_original

    def delta_linf(self) -> float:
        """Largest change of any input coordinate (model units)."""
        return float(self.delta.abs().max()) if self.delta.numel() else 0.0

    def delta_linf_levels(self, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
        """:meth:`delta_linf` in 8-bit levels."""
        return self.delta_linf() / eight_bit_level(value_range)

    def delta_l2(self) -> torch.Tensor:
        """``[k]`` L2 norm of each poisoned input's change (model units)."""
        return self.delta.reshape(self.delta.shape[0], -1).norm(dim=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        fc = self.feature_change
        return {
            "indices": self.indices.tolist(),
            "iterations": self.iterations,
            "success": self.success,
            "n_targets": int(self.flipped.numel()),
            "n_initially_correct": int(self.initially_correct.sum()),
            "n_flipped": self.n_flipped,
            "target_loss_before": self.target_loss_before,
            "target_loss_after": self.target_loss_after,
            "delta_linf": self.delta_linf(),
            "delta_l2": self.delta_l2().tolist(),
            "feature_change_l2": None if fc is None else fc.tolist(),
            "theta_norm_before": float(self.theta_original.norm()),
            "theta_norm_after": float(self.theta.norm()),
            "seconds": self.seconds,
        }
