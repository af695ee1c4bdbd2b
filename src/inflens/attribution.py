"""Gradient-based attribution beside influence functions, on the same on-disk index.

One API, :func:`build_attribution_index` (``method=``), returns a
:class:`~inflens.index.GradientIndex` with the same queries as an influence index
(``loss_influence``, ``topk``, ``self_influence``, ``quality``). Every score is
``[n_test, n_train]`` and oriented like ``I_up,loss``: **negative = helpful** (the training
point lowers the test loss / supports the prediction).

- ``"grad_dot"``: ``-grad L(z_test) . grad loss(z_i)`` at the final parameters: influence
  with ``H`` replaced by the identity (no ``l2 theta`` term).
- ``"cosine"``: ``-cos(grad L(z_test), grad loss(z_i))`` (averaged over checkpoints if given).
- ``"tracin"`` (TracInCP, Pruthi et al. 2020): ``-sum_c lr_c grad L_c(z_test) . grad
  loss_c(z_i)`` over checkpoints ``c`` with learning rates ``lr_c``; with one checkpoint it is
  ``lr * grad_dot``. Rows store ``sqrt(lr_c) R grad loss_c(z_i)`` side by side.
- ``"trak"`` (Park et al. 2023): per checkpoint (independently trained models), ``phi_i = R
  grad f(z_i)`` with the output function ``f = log(p / (1 - p))`` of the true class, and
  ``tau(z)_i = mean_c phi_c(z)^T (Phi_c^T Phi_c + lambda I)^-1 phi_{c,i} * mean_c (1 -
  p_{c,i})``; the score is ``-tau``. The kernels ``Phi_c^T Phi_c`` are computed from the
  stored rows after the build (``final.safetensors``), so a query is one small solve.

Checkpoints are a list of state dicts (``model.state_dict()`` of each saved model); only the
selected parameters may differ from the objective's model (frozen parameters and buffers are
taken from it; a checkpoint with other BatchNorm statistics is refused). They are stored in
the index folder (safetensors) because the query side needs each checkpoint's test
gradients.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Data, DataLike
from .errors import CurvatureError, InputError
from .index import (
    GradientIndex,
    IndexConfig,
    IndexMethod,
    _test_chunks,
    register_method,
    write_index,
)
from .objective import Objective
from .projection import IdentityProjection, KroneckerProjection, Projection, make_projection

METHODS = ("grad_dot", "cosine", "tracin", "trak")


@dataclass(frozen=True)
class AttributionSettings:
    """Method settings (validated).

    Args:
        method: ``"grad_dot"``, ``"cosine"``, ``"tracin"`` or ``"trak"``.
        learning_rates: TracIn's ``lr_c`` per checkpoint (required for ``"tracin"``).
        trak_damping: ``lambda >= 0`` added to each TRAK kernel ``Phi^T Phi``.
    """

    method: str = "tracin"
    learning_rates: tuple[float, ...] | None = None
    trak_damping: float = 0.0

    def __post_init__(self) -> None:
        if self.learning_rates is not None:
            # a list from the caller becomes the tuple a frozen, hashable config needs
            object.__setattr__(self, "learning_rates", tuple(float(r) for r in self.learning_rates))
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.learning_rates is not None and not all(float(r) > 0 for r in self.learning_rates):
            raise InputError(f"learning rates must be positive, got {self.learning_rates}")
        if not float(self.trak_damping) >= 0:
            raise InputError(f"trak_damping must be >= 0, got {self.trak_damping}")


def _margin(loss_name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TRAK's output function ``f = log(p / (1 - p))`` of the true class."""
    if loss_name == "cross_entropy":

        def f(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            y = y.long()
            own = out.gather(1, y[:, None])[:, 0]
            # a comparison, not one_hot (which checks the labels with .item(), refused by vmap)
            mask = torch.arange(out.shape[1], device=out.device) == y[:, None]
            return own - out.masked_fill(mask, float("-inf")).logsumexp(1)

        return f
    if loss_name == "binary_logistic":
        return lambda out, y: torch.where(y > 0, 1.0, -1.0).to(out.dtype) * out.reshape(-1)
    raise InputError(
        f"TRAK needs a classification loss ('cross_entropy' or 'binary_logistic'), got "
        f"{loss_name!r}; use method='tracin' or 'grad_dot'"
    )


def _one_minus_p(loss_name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - p(true class)`` per example (TRAK's ``Q``)."""
    if loss_name == "cross_entropy":
        return 1 - torch.softmax(out, 1).gather(1, y.long()[:, None])[:, 0]
    sign = torch.where(y > 0, 1.0, -1.0).to(out.dtype)
    return torch.sigmoid(-sign * out.reshape(-1))


def _checkpoint_thetas(
    objective: Objective, checkpoints: Sequence[Mapping[str, torch.Tensor]] | None
) -> list[torch.Tensor]:
    """Flat selected parameters of each checkpoint (the objective's theta when None)."""
    if checkpoints is None:
        return [objective.theta]
    if len(checkpoints) == 0:
        raise InputError("checkpoints is an empty list; pass None to use the final model")
    thetas = []
    for c, sd in enumerate(checkpoints):
        missing = [n for n in objective.names if n not in sd]
        if missing:
            raise InputError(f"checkpoint {c} lacks the parameters {', '.join(missing[:5])}")
        for name, frozen in objective.frozen.items():
            if name in sd and not torch.equal(sd[name].to(frozen), frozen):
                raise InputError(
                    f"checkpoint {c} differs from the model in the frozen tensor {name!r}; only "
                    "the selected parameters may change between checkpoints (load the "
                    "checkpoint into the model and build one index per model instead)"
                )
        parts = []
        for name, shape in zip(objective.names, objective.shapes):
            t = sd[name]
            if tuple(t.shape) != tuple(shape):
                raise InputError(f"checkpoint {c}: {name} has shape {tuple(t.shape)}, not {shape}")
            parts.append(t.detach().to(objective.theta).reshape(-1))
        thetas.append(torch.cat(parts))
    return thetas


@register_method
class GradientMethod(IndexMethod):
    """Rows for gradient dot/cosine, TracIn and TRAK (module docstring)."""

    name = "attribution"

    def __init__(
        self,
        objective: Objective,
        projection: Projection,
        settings: AttributionSettings,
        thetas: list[torch.Tensor],
    ) -> None:
        self.objective, self.projection, self.settings = objective, projection, settings
        self.thetas = thetas
        self.train: Data | None = None
        self.kernel_inv_: list[torch.Tensor] | None = None
        m = settings.method
        n_ckpt = len(thetas)
        if m == "tracin":
            lrs = settings.learning_rates
            if lrs is None or len(lrs) != n_ckpt:
                raise InputError(
                    f"method='tracin' needs one learning rate per checkpoint ({n_ckpt}), got "
                    f"{None if lrs is None else len(lrs)}"
                )
            self.weights = [float(r) for r in lrs]
        elif m == "grad_dot":
            if n_ckpt != 1:
                raise InputError("method='grad_dot' uses one model; for several use 'tracin'")
            self.weights = [1.0]
        else:
            self.weights = [1.0 / n_ckpt] * n_ckpt
        if m == "trak":
            margin = _margin(objective.loss_name)
            # a second objective over the same model whose measurement is TRAK's output function
            self._f_obj = Objective(
                objective.model, objective.loss_name, objective.l2_given, objective.names, margin
            )

    @property
    def width(self) -> int:
        return self.projection.dim * len(self.thetas)

    @property
    def has_weights(self) -> bool:
        return self.settings.method == "trak"

    def _grads(self, obj: Objective, x, y, which: str, theta: torch.Tensor) -> torch.Tensor:
        """Projected per-example gradients ``[B, dim]`` at ``theta``."""
        if isinstance(self.projection, KroneckerProjection):
            return self.projection.project_examples(obj, x, y, which, theta)
        return self.projection.project(obj.per_example_grads(x, y, which, theta))

    def _rows(self, x, y, which: str) -> torch.Tensor:
        m = self.settings.method
        obj = self._f_obj if m == "trak" else self.objective
        if m == "trak":
            which = "measurement"  # the output function, on train and test side alike
        parts = []
        with obj.evaluating():
            for w, th in zip(self.weights, self.thetas):
                r = self._grads(obj, x, y, which, th)
                if m == "cosine":
                    r = r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
                if m != "trak":  # TRAK's 1/C sits on the query side, with the kernel
                    r = r * w**0.5
                parts.append(r)
        return torch.cat(parts, 1)

    def train_rows(self, x, y):
        rows = self._rows(x, y, "loss")
        if self.settings.method != "trak":
            return rows, None
        obj = self.objective
        with torch.no_grad(), obj.evaluating():
            q = [_one_minus_p(obj.loss_name, obj.outputs(th, x), y) for th in self.thetas]
        return rows, torch.stack(q).mean(0)

    def queries(self, test: DataLike, batch: int = 256) -> torch.Tensor:
        out = []
        for x, y in _test_chunks(self.objective, test, batch):
            q = self._rows(x, y, "measurement")
            if self.settings.method == "trak":
                q = self._apply_kernel(q)
            out.append(q)
        return torch.cat(out, 0)

    def _apply_kernel(self, q: torch.Tensor) -> torch.Tensor:
        if self.kernel_inv_ is None:
            raise InputError("the TRAK kernel is missing: the index build did not finish")
        d = self.projection.dim
        parts = []
        for c, (w, kinv) in enumerate(zip(self.weights, self.kernel_inv_)):
            parts.append(w * (q[:, c * d : (c + 1) * d] @ kinv.to(q.dtype)))
        return torch.cat(parts, 1)

    def self_terms(self):
        if self.settings.method != "trak":
            return None, None
        d = self.projection.dim
        mat = torch.zeros(self.width, self.width, dtype=torch.float64)
        for c, (w, kinv) in enumerate(zip(self.weights, self.kernel_inv_ or [])):
            mat[c * d : (c + 1) * d, c * d : (c + 1) * d] = w * kinv.double().cpu()
        return None, mat.to(self.objective.device)

    # ------------------------------------------------------------------ TRAK kernel
    def _kernels_from(self, blocks) -> list[torch.Tensor]:
        d = self.projection.dim
        ks = [torch.zeros(d, d, dtype=torch.float64) for _ in self.thetas]
        for rows in blocks:
            r = rows.double().cpu()
            for c in range(len(self.thetas)):
                rc = r[:, c * d : (c + 1) * d]
                ks[c] += rc.T @ rc
        return ks

    def _invert(self, ks: list[torch.Tensor]) -> list[torch.Tensor]:
        lam = float(self.settings.trak_damping)
        out = []
        for c, k in enumerate(ks):
            a = k + lam * torch.eye(k.shape[0], dtype=k.dtype)
            chol, bad = torch.linalg.cholesky_ex(a)
            if int(bad):
                raise CurvatureError(
                    f"the TRAK kernel Phi^T Phi of checkpoint {c} is singular (fewer training "
                    "points than the projection dimension, or collinear gradients); pass "
                    f"trak_damping > 0 (e.g. {1e-6 * float(k.diagonal().mean()):.3g}) or a "
                    "smaller dim"
                )
            out.append(torch.cholesky_inverse(chol))
        return out

    def finalize(self, index: GradientIndex) -> dict[str, torch.Tensor]:
        if self.settings.method != "trak":
            return {}
        ks = self._kernels_from(r for _, r, _ in index._blocks(index._block_rows(0)))
        return {f"kernel_inv.{c}": k for c, k in enumerate(self._invert(ks))}

    def load_final(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.settings.method == "trak" and tensors:
            self.kernel_inv_ = [tensors[f"kernel_inv.{c}"] for c in range(len(self.thetas))]

    def prepare_reference(self, train: Data, batch: int) -> None:
        if self.settings.method != "trak":
            return

        def rows():
            for start, x, y in train.chunks(batch):
                x, y = self.objective.prepare(x, y, train.name, start)
                yield self.train_rows(x, y)[0]

        self.kernel_inv_ = self._invert(self._kernels_from(rows()))

    def unprojected(self) -> GradientMethod:
        ref = GradientMethod(
            self.objective, IdentityProjection(self.objective.p), self.settings, self.thetas
        )
        ref.train = self.train
        return ref

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        s = self.settings
        cfg = {
            "method": s.method,
            "learning_rates": None if s.learning_rates is None else list(s.learning_rates),
            "trak_damping": s.trak_damping,
            "checkpoints": len(self.thetas),
            "loss": self.objective.loss_name,
        }
        return cfg, {f"theta.{c}": th for c, th in enumerate(self.thetas)}

    @classmethod
    def restore(cls, cfg, tensors, objective, projection, influence):
        lrs = cfg["learning_rates"]
        settings = AttributionSettings(
            cfg["method"], None if lrs is None else tuple(lrs), cfg["trak_damping"]
        )
        thetas = [tensors[f"theta.{c}"].to(objective.theta) for c in range(cfg["checkpoints"])]
        return cls(objective, projection, settings, thetas)


def build_attribution_index(
    objective: Objective,
    train: DataLike,
    folder: str | os.PathLike,
    settings: AttributionSettings = AttributionSettings(),
    checkpoints: Sequence[Mapping[str, torch.Tensor]] | None = None,
    config: IndexConfig | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> GradientIndex:
    """An index for ``settings.method`` (``"grad_dot"``, ``"cosine"``, ``"tracin"``, ``"trak"``).

    Args:
        objective: the final model, loss and selected parameters.
        train: the training data (row ``i`` of every score is example ``i``).
        folder: where the index is written (resumed if a build was interrupted).
        settings: the method, TracIn's learning rate per checkpoint, TRAK's damping
            (:class:`AttributionSettings`).
        checkpoints: state dicts of the models to attribute with (TracIn: saved during
            training; TRAK: independently trained models); ``None``: the final model.
        config: projection (``dim``, ``projection``, ``seed``), storage ``dtype``, chunking and
            memory budget (:class:`~inflens.index.IndexConfig`, as in
            :meth:`Influence.build_index`; ``None``: its defaults, no projection).
        callback: called as ``callback(j, num_chunks)`` after each chunk is written.

    Returns:
        The index; ``index.loss_influence(test)`` is ``[n_test, n_train]``, negative = helpful.
    """
    if not isinstance(settings, AttributionSettings):
        raise InputError(
            f"settings must be an AttributionSettings (e.g. AttributionSettings('tracin', "
            f"learning_rates=(0.01,))), got {type(settings).__name__}"
        )
    config = IndexConfig() if config is None else config
    if not isinstance(config, IndexConfig):
        raise InputError(f"config must be an IndexConfig, got {type(config).__name__}")
    thetas = _checkpoint_thetas(objective, checkpoints)
    proj = make_projection(config.projection, objective.p, config.dim, objective, config.seed)
    gm = GradientMethod(objective, proj, settings, thetas)
    data = Data(train, "training data")
    gm.train = data
    return write_index(folder, gm, data, config, callback)
