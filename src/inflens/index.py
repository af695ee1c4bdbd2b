"""A gradient index on disk: compute the training side once, answer many queries.

Every training example ``z_i`` gets one stored row ``s_i`` (``[D]``); a query turns each test
point into a vector ``q`` of the same length, and the score is ``-(q . s_i) * w_i`` (``w_i = 1``
except for TRAK). For influence functions (:func:`build_index`, :meth:`Influence.build_index`):

- ``A^-1 = P P^T`` factorises for the direct solvers (Exact: eigenvectors or Cholesky;
  Arnoldi: the low-rank eigenbasis; K-FAC/EK-FAC: the Kronecker eigenbasis). The row is
  ``s_i = R P^T (grad loss(z_i) + l2 theta)`` and the query ``q = R P^T grad L(z_test)``, so
  ``-(q . s_i) = -grad L(z_test)^T P R^T R P^T g_i``, which equals ``I_up,loss(z_i, z_test)``
  exactly without a projection (``R = I``) and in expectation with one (``E[R^T R] = I``).
  Same shape ``[n_test, n_train]``, sign (**negative = helpful**) and units as
  :meth:`Influence.loss_influence`; ``-score / n`` predicts the change of the test loss when
  ``z_i`` is removed.
- With a Kronecker projection (``R`` acts on raw per-layer gradients) or ``precondition="test"``
  the row is ``R g_i`` and the query ``q = R A^-1 grad L(z_test)``, ``A^-1 = P P^T`` applied
  from the stored factors: also unbiased, with more variance when ``A`` is ill-conditioned.
- Solvers without a factorisation (CG, PCG, LiSSA) store ``R g_i`` and solve the test side
  with the solver at query time. That needs the fitted :class:`Influence` (and so its training
  data): an index built from one keeps it; one reopened with :meth:`GradientIndex.open` must be
  given ``influence=`` or refuses with a message saying so.

Layout of an index folder (JSON and safetensors/``.npy``, never pickle):

- ``index.json``: method, its settings, the projection's configuration and fingerprint, the
  storage dtype, ``n``, ``D``, chunk and batch sizes, model and data fingerprints.
- ``method.safetensors``: what the query side needs (preconditioner factors, checkpoints).
- ``rows_<j>.npy`` (``[rows, D]``) and, for methods with row weights, ``weights_<j>.npy``:
  chunk ``j`` holds training examples ``[j c, (j + 1) c)``. Each file is written to a ``.tmp``
  and renamed, weights before rows, so a run killed at any moment leaves whole chunks only;
  started again with the same arguments it computes only the missing ones, and since each
  chunk is a deterministic function of (model, data, projection seed, sizes), the files are
  byte-identical to an uninterrupted run. Under ``torch.distributed`` rank ``r`` of ``W``
  writes the chunks ``j = r (mod W)``.
- ``final.safetensors`` + ``complete.json``: what is computed from all the rows (the TRAK
  kernel), written last; an index without ``complete.json`` refuses queries.

Queries stream the chunks through memory maps in blocks sized from ``max_memory_gb``; a
budget that cannot hold one block raises :class:`~inflens.errors.MemoryBudgetError` before
anything is allocated. Top-k is exact (a blocked product with a running top-k); an optional
FAISS backend (``backend="faiss"``, exact inner-product search) is used only when asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from .artifacts import (
    ArtifactMismatchError,
    _barrier,
    _rank_world,
    _save_tensors,
    _write_json,
    data_fingerprint,
    model_fingerprint,
    vectors_fingerprint,
)
from .data import Data, DataLike
from .errors import InputError, MemoryBudgetError
from .objective import Objective
from .projection import (
    DenseProjection,
    IdentityProjection,
    KroneckerProjection,
    Projection,
    make_projection,
    projection_from_config,
)

if TYPE_CHECKING:
    from .influence import Influence

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class IndexConfig:
    """How an index is built (validated; written to ``index.json``).

    Args:
        dim: projection dimension (``None``: no projection, exact).
        projection: ``"auto"``, ``"none"``, ``"dense"``/``"gaussian"``, ``"rademacher"``,
            ``"kronecker"`` (see :func:`inflens.projection.make_projection`).
        seed: seed of the projection.
        dtype: storage dtype, ``"float16"``, ``"float32"`` or ``"float64"`` (``None``: the
            model's dtype). Scores are computed in float32 (float64 for a float64 store).
        chunk_size: training examples per chunk file.
        batch_size: examples per vectorised gradient batch inside a chunk (``None``: from a
            128 MiB budget for the ``[batch, p]`` gradients).
        precondition: influence only: ``"auto"`` (``"train"`` when the solver factorises and
            the projection is not Kronecker, else ``"test"``), ``"train"`` (rows
            ``R P^T g_i``) or ``"test"`` (rows ``R g_i``, ``A^-1`` on the query side).
        max_memory_gb: memory budget of queries (blocks of rows, score blocks).
    """

    dim: int | None = None
    projection: str | Projection = "auto"
    seed: int = 0
    dtype: str | None = None
    chunk_size: int = 16384
    batch_size: int | None = None
    precondition: str = "auto"
    max_memory_gb: float = 2.0

    def __post_init__(self) -> None:
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            raise InputError(f"dim must be a positive integer or None, got {self.dim!r}")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise InputError(
                f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}"
            )
        if int(self.chunk_size) < 1:
            raise InputError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.precondition not in ("auto", "train", "test"):
            raise InputError(
                f"precondition must be 'auto', 'train' or 'test', got {self.precondition!r}"
            )
        if not (float(self.max_memory_gb) > 0):
            raise InputError(f"max_memory_gb must be positive, got {self.max_memory_gb}")


@dataclass(frozen=True)
class TopK:
    """The ``k`` most helpful (most negative score) and most harmful (most positive) training
    points for each test point; every field is ``[n_test, k]``, ordered from the extreme."""

    helpful_indices: torch.Tensor
    helpful_scores: torch.Tensor
    harmful_indices: torch.Tensor
    harmful_scores: torch.Tensor


@dataclass(frozen=True)
class IndexQuality:
    """Compressed against uncompressed scores on a test sample (means over the test points).

    ``recall_helpful`` / ``recall_harmful``: the fraction of the exact ``k`` most helpful /
    most harmful training points found among the index's ``k``. ``per_test`` holds the
    per-test-point values (``[n_test]`` each) under the same names.
    """

    pearson: float
    spearman: float
    recall_helpful: float
    recall_harmful: float
    k: int
    n_test: int
    dim: int
    per_test: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------- preconditioner
class Preconditioner:
    """``A^-1 = P P^T`` of a fitted direct solver: :meth:`half` is ``P^T g``, :meth:`full`
    is ``P P^T g``. Built from the solver's fitted attributes and kept as plain tensors, so a
    reopened index applies it without the solver or the training data.

    Kinds: ``"identity"``; ``"eigh"`` (``P = Q diag(lambda^-1/2)``); ``"cholesky"``
    (``A = L L^T``, ``P = L^-T``); ``"arnoldi"`` (``P = U^T diag(lambda^-1/2)``, plus
    ``(I - U^T U) / sqrt(sigma)`` when the solver applies ``1 / sigma`` outside the kept
    eigenspace, residual ``"mean"`` or ``"shift"``); ``"kfac"`` (per layer
    ``P = (Q_S (x) Q_A) diag((lambda + shift)^-1/2)``, a diagonal for other parameters).
    """

    def __init__(self, kind: str, p: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.kind, self.p, self.t, self.meta = kind, int(p), tensors, meta

    @property
    def out_dim(self) -> int:
        if self.kind == "arnoldi":
            rank = self.t["evecs"].shape[0]
            return rank + (self.p if self.meta.get("outside", 0) > 0 else 0)
        return self.p

    @classmethod
    def identity(cls, p: int) -> Preconditioner:
        return cls("identity", p, {}, {})

    @classmethod
    def from_solver(cls, solver: Any, p: int) -> Preconditioner | None:
        """The factorisation of a fitted solver, or None when it has none (CG, LiSSA)."""
        from .solvers import KFAC, Arnoldi, Exact

        if isinstance(solver, Exact):
            chol = getattr(solver, "chol_", None)
            if chol is not None:
                return cls("cholesky", p, {"chol": chol}, {})
            return cls("eigh", p, {"evals": solver.evals_, "evecs": solver.evecs_}, {})
        if isinstance(solver, Arnoldi):
            u = solver.evecs_
            # the scalar inverse applied outside the kept eigenspace (residual "mean": 1 /
            # the mean left-out eigenvalue; "shift": 1 / (l2 + damping); "none": nothing)
            outside = solver._outside() if hasattr(solver, "_outside") else None
            if outside is None and getattr(solver, "residual", "none") == "shift":
                if solver.shift_ > 0 and u.shape[0] < u.shape[1]:
                    outside = 1.0 / float(solver.shift_)
            meta = {"outside": 0.0 if outside is None else float(outside)}
            return cls("arnoldi", p, {"evecs": u, "evals": solver.evals_}, meta)
        if isinstance(solver, KFAC):
            t: dict[str, torch.Tensor] = {"diag": solver.diag_, "diag_index": solver.diag_index_}
            for i in range(len(solver.layers_)):
                t[f"qs.{i}"] = solver.evecs_s_[i]
                t[f"qa.{i}"] = solver.evecs_a_[i]
                t[f"evals.{i}"] = solver.evals_[i]
            meta = {"layers": solver.layers_, "shift": float(solver.shift_)}
            return cls("kfac", p, t, meta)
        return None

    def _gather(self, d: dict, v: torch.Tensor) -> torch.Tensor:
        k = v.shape[0]
        parts = []
        if d["w"] is not None:
            parts.append(v[:, d["w"][0] : d["w"][1]].reshape(k, d["out"], d["din"]))
        if d["b"] is not None:
            parts.append(v[:, d["b"][0] : d["b"][1]].reshape(k, d["out"], 1))
        return torch.cat(parts, 2)

    def _scatter(self, d: dict, out: torch.Tensor, m: torch.Tensor) -> None:
        k = m.shape[0]
        if d["w"] is not None:
            out[:, d["w"][0] : d["w"][1]] = m[:, :, : d["din"]].reshape(k, -1)
        if d["b"] is not None:
            out[:, d["b"][0] : d["b"][1]] = m[:, :, -1]

    def half(self, g: torch.Tensor) -> torch.Tensor:
        """``P^T g`` for the rows of ``g [B, p]`` -> ``[B, out_dim]``."""
        t = {k: v.to(device=g.device, dtype=g.dtype) for k, v in self.t.items()}
        if self.kind == "identity":
            return g
        if self.kind == "eigh":
            return (g @ t["evecs"]) / t["evals"].sqrt()
        if self.kind == "cholesky":  # L^-1 g
            return torch.linalg.solve_triangular(t["chol"], g.T, upper=False).T
        if self.kind == "arnoldi":
            u, lam = t["evecs"], t["evals"]
            c = g @ u.T
            out = c / lam.sqrt()
            outside = self.meta.get("outside", 0.0)
            if outside > 0:
                out = torch.cat([out, (g - c @ u) * math.sqrt(outside)], 1)
            return out
        shift = self.meta["shift"]
        out = torch.empty_like(g)
        pos = 0
        for i, d in enumerate(self.meta["layers"]):
            rot = t[f"qs.{i}"].T @ self._gather(d, g) @ t[f"qa.{i}"]
            rot = rot / (t[f"evals.{i}"] + shift).sqrt()
            w = rot.shape[1] * rot.shape[2]
            out[:, pos : pos + w] = rot.reshape(g.shape[0], -1)
            pos += w
        idx = self.t["diag_index"].to(g.device)
        if idx.numel():
            out[:, pos:] = g[:, idx] / (t["diag"] + shift).sqrt()
        return out

    def half_t(self, u: torch.Tensor) -> torch.Tensor:
        """``P u`` for the rows of ``u [B, out_dim]`` -> ``[B, p]``."""
        t = {k: v.to(device=u.device, dtype=u.dtype) for k, v in self.t.items()}
        if self.kind == "identity":
            return u
        if self.kind == "eigh":
            return (u / t["evals"].sqrt()) @ t["evecs"].T
        if self.kind == "cholesky":  # L^-T u
            return torch.linalg.solve_triangular(t["chol"].T, u.T, upper=True).T
        if self.kind == "arnoldi":
            v, lam = t["evecs"], t["evals"]
            r = v.shape[0]
            out = (u[:, :r] / lam.sqrt()) @ v
            outside = self.meta.get("outside", 0.0)
            if outside > 0:
                w = u[:, r:]
                out = out + (w - (w @ v.T) @ v) * math.sqrt(outside)
            return out
        shift = self.meta["shift"]
        out = torch.empty(u.shape[0], self.p, dtype=u.dtype, device=u.device)
        pos = 0
        for i, d in enumerate(self.meta["layers"]):
            qs, qa = t[f"qs.{i}"], t[f"qa.{i}"]
            shape = (u.shape[0], qs.shape[0], qa.shape[0])
            w = shape[1] * shape[2]
            rot = u[:, pos : pos + w].reshape(shape) / (t[f"evals.{i}"] + shift).sqrt()
            self._scatter(d, out, qs @ rot @ qa.T)
            pos += w
        idx = self.t["diag_index"].to(u.device)
        if idx.numel():
            out[:, idx] = u[:, pos:] / (t["diag"] + shift).sqrt()
        return out

    def full(self, g: torch.Tensor) -> torch.Tensor:
        """``A^-1 g = P P^T g``."""
        return self.half_t(self.half(g))

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"kind": self.kind, "p": self.p, "meta": self.meta}, dict(self.t)

    @classmethod
    def restore(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Preconditioner:
        return cls(cfg["kind"], cfg["p"], tensors, cfg["meta"])


# ---------------------------------------------------------------------------- methods
def _test_chunks(objective: Objective, test: DataLike, batch: int):
    """Prepared ``(x, y)`` test chunks (the first one checked against the model)."""
    data = test if isinstance(test, Data) else Data(test, "test data")
    for start, x, y in data.chunks(batch):
        x, y = objective.prepare(x, y, data.name, start)
        if start == 0:
            objective.check_batch(x[:16], y[:16], data.name)
        yield x, y


class IndexMethod(ABC):
    """What one kind of index stores per training point and how it turns test points into
    queries. Subclasses register by name with :func:`register_method` so that
    :meth:`GradientIndex.open` can rebuild them from ``index.json``."""

    name = "method"
    objective: Objective
    projection: Projection

    @property
    def width(self) -> int:
        """Length ``D`` of a stored row."""
        return self.projection.dim

    @property
    def has_weights(self) -> bool:
        """Whether rows carry a weight ``w_i`` (scores are multiplied by it)."""
        return False

    @abstractmethod
    def train_rows(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([B, D] rows, [B] weights or None)`` for a prepared training batch."""

    @abstractmethod
    def queries(self, test: DataLike, batch: int = 256) -> torch.Tensor:
        """``[m, D]`` query vectors for the test points."""

    def self_terms(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(c [D] or None, M [D, D] or None)`` with ``score(z_i, z_i) = -((s_i - c) M) . s_i
        * w_i``; raise :class:`InputError` when the method cannot give it from the rows."""
        return None, None

    def fingerprints(self) -> dict[str, str]:
        """Fingerprints of everything the rows depend on besides the training data."""
        return {"model_fingerprint": model_fingerprint(self.objective)}

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON settings and tensors from which :meth:`restore` rebuilds the method."""

    @classmethod
    @abstractmethod
    def restore(
        cls,
        cfg: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        objective: Objective,
        projection: Projection,
        influence: Influence | None,
    ) -> IndexMethod:
        """The method of a reopened index."""

    def unprojected(self) -> IndexMethod:
        """The same method without a projection (the reference of :meth:`GradientIndex.quality`)."""
        raise InputError(f"the {self.name!r} index has no uncompressed reference")

    def finalize(self, index: GradientIndex) -> dict[str, torch.Tensor]:
        """Tensors computed from all rows once they are on disk (default: none)."""
        return {}

    def load_final(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the tensors :meth:`finalize` wrote."""
        return None

    def prepare_reference(self, train: Data, batch: int) -> None:
        """Whatever an in-memory (unprojected) reference needs before scoring (default: none)."""
        return None


_METHODS: dict[str, type[IndexMethod]] = {}


def register_method(cls: type[IndexMethod]) -> type[IndexMethod]:
    """Make :meth:`GradientIndex.open` rebuild indexes whose ``method`` is ``cls.name``."""
    _METHODS[cls.name] = cls
    return cls


@register_method
class InfluenceMethod(IndexMethod):
    """Influence functions on the index (module docstring): rows ``R P^T g_i`` or ``R g_i``."""

    name = "influence"

    def __init__(
        self,
        objective: Objective,
        projection: Projection,
        mode: str,
        factor: Preconditioner | None,
        influence: Influence | None = None,
        solver_name: str = "",
        damping: float = 0.0,
    ) -> None:
        self.objective, self.projection, self.mode, self.factor = (
            objective,
            projection,
            mode,
            factor,
        )
        self.influence, self.solver_name, self.damping = influence, solver_name, float(damping)
        obj = objective
        reg = obj.regularizer_grad(obj.theta)[None]
        self._reg_row = self._project(reg)  # R P^T (l2 theta) or R (l2 theta)

    @classmethod
    def from_influence(cls, inf: Influence, config: IndexConfig) -> InfluenceMethod:
        inf._fitted()
        obj = inf.objective
        factor = Preconditioner.from_solver(inf.solver, obj.p)
        kron = config.projection == "kronecker" or isinstance(
            config.projection, KroneckerProjection
        )
        mode = config.precondition
        if mode == "auto":
            mode = "train" if factor is not None and not kron else "test"
        if mode == "train" and factor is None:
            raise InputError(
                f"precondition='train' needs a solver that factorises A^-1 = P P^T (exact, "
                f"arnoldi, kfac, ekfac); {inf.solver.name!r} does not: use "
                "precondition='test' (the test side is solved at query time)"
            )
        if mode == "train" and kron:
            raise InputError(
                "a Kronecker projection acts on raw per-layer gradients, not on P^T g: use "
                "precondition='test' or projection='dense'"
            )
        if mode == "train":
            q = factor.out_dim  # type: ignore[union-attr]
            proj = make_projection(config.projection, q, config.dim, obj, config.seed, False)
        else:
            proj = make_projection(config.projection, obj.p, config.dim, obj, config.seed, True)
        return cls(obj, proj, mode, factor, inf, inf.solver.name, inf.damping)

    #: largest ``[p, dim]`` combined matrix ``P R^T`` kept in memory (MiB)
    COMBINED_MB = 512.0

    def _combined(self) -> torch.Tensor | None:
        """``P R^T`` (``[p, dim]``) when a dense projection follows the factor and it fits:
        then ``R P^T g = g @ (P R^T)`` costs ``p dim`` per vector instead of ``p q + q dim``
        (forming it costs ``dim`` applications of ``P``, once)."""
        if "_combined_" in self.__dict__:
            return self._combined_
        comb = None
        proj = self.projection
        obj = self.objective
        item = obj.theta.element_size()
        if (
            self.mode == "train"
            and isinstance(proj, DenseProjection)
            and self.factor is not None
            and obj.p * proj.dim * item <= self.COMBINED_MB * 2**20
        ):
            r = proj.transposed_matrix().to(device=obj.device, dtype=obj.dtype).T  # [dim, q]
            comb = self.factor.half_t(r).T.contiguous()  # rows P r_k -> [p, dim]
        self._combined_ = comb
        return comb

    def _project_train(self, g: torch.Tensor) -> torch.Tensor:
        """``R P^T g`` (mode "train") or ``R g`` for training rows: through ``P R^T`` when
        available (many rows per call)."""
        comb = self._combined()
        if comb is not None:
            return g @ comb
        return self._project(g)

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        """The same map applied directly (``P^T`` then ``R``): cheaper for a few vectors."""
        if self.mode == "train":
            g = self.factor.half(g)  # type: ignore[union-attr]
        return self.projection.project(g)

    def train_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        obj = self.objective
        if isinstance(self.projection, KroneckerProjection):
            rows = self.projection.project_examples(obj, x, y, "loss")
            return rows + self._reg_row.to(rows.dtype), None
        with obj.evaluating():
            g = obj.per_example_grads(x, y, "loss")
        return self._project_train(g + obj.regularizer_grad(obj.theta)), None

    def _inverse(self, g: torch.Tensor) -> torch.Tensor:
        if self.factor is not None:
            return self.factor.full(g)
        if self.influence is None:
            raise InputError(
                f"this index was built with the {self.solver_name!r} solver, which has no "
                "stored factorisation: its test side is solved at query time, which needs the "
                "fitted Influence. Reopen it with GradientIndex.open(folder, objective, "
                "influence=inf), or build the index with a direct solver (exact, arnoldi, "
                "kfac, ekfac)"
            )
        return self.influence.solver.solve(g)

    def queries(self, test: DataLike, batch: int = 256) -> torch.Tensor:
        obj = self.objective
        out = []
        with obj.evaluating():
            for x, y in _test_chunks(obj, test, batch):
                g = obj.per_example_grads(x, y, "measurement")
                if self.mode == "train":
                    out.append(self._project(g))
                else:
                    out.append(self.projection.project(self._inverse(g)))
        return torch.cat(out, 0)

    def self_terms(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.mode != "train":
            raise InputError(
                "self-influence from the rows needs the symmetric form (rows R P^T g_i): build "
                "the index with precondition='train' and a dense or no projection, or use "
                "Influence.self_influence()"
            )
        return self._reg_row[0], None

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: dict[str, Any] = {
            "mode": self.mode,
            "solver": self.solver_name,
            "damping": self.damping,
            "loss": self.objective.loss_name,
            # a per-parameter l2 is covered by the model fingerprint, not written here
            "l2": self.objective.l2 if self.objective.l2_diag is None else None,
        }
        tensors: dict[str, torch.Tensor] = {}
        if self.factor is not None:
            fc, ft = self.factor.state()
            cfg["factor"] = fc
            tensors = {"factor." + k: v for k, v in ft.items()}
        return cfg, tensors

    @classmethod
    def restore(cls, cfg, tensors, objective, projection, influence):
        factor = None
        if "factor" in cfg:
            sub = {k[len("factor.") :]: v for k, v in tensors.items() if k.startswith("factor.")}
            factor = Preconditioner.restore(cfg["factor"], sub)
        if influence is not None and factor is None:
            if influence.solver.name != cfg["solver"] or influence.damping != cfg["damping"]:
                raise ArtifactMismatchError(
                    f"the index was built with solver {cfg['solver']!r}, damping "
                    f"{cfg['damping']}; the Influence given has {influence.solver.name!r}, "
                    f"damping {influence.damping}"
                )
        return cls(
            objective, projection, cfg["mode"], factor, influence, cfg["solver"], cfg["damping"]
        )

    def unprojected(self) -> InfluenceMethod:
        ident = IdentityProjection(self.projection.in_dim)
        return InfluenceMethod(
            self.objective, ident, self.mode, self.factor, self.influence, self.solver_name,
            self.damping,
        )  # fmt: skip


# ---------------------------------------------------------------------------- storage helpers
def _rows_path(folder: Path, j: int) -> Path:
    return folder / f"rows_{j:06d}.npy"


def _weights_path(folder: Path, j: int) -> Path:
    return folder / f"weights_{j:06d}.npy"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary file, then an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(f"{key}:{vectors_fingerprint(tensors[key])}|".encode())
    return h.hexdigest()


def _auto_batch(p: int, itemsize: int, chunk: int) -> int:
    return int(max(1, min(chunk, (128 * 2**20) // max(1, 2 * p * itemsize))))


def write_index(
    folder: str | os.PathLike,
    method: IndexMethod,
    train: Data,
    config: IndexConfig,
    callback: Callable[[int, int], None] | None = None,
) -> GradientIndex:
    """Write (or resume) an index of ``method`` over ``train`` in ``folder``; returns it.

    Chunks already on disk are kept; a folder made with other settings, another model or
    other data is refused (:class:`~inflens.artifacts.ArtifactMismatchError`). ``callback(j,
    num_chunks)`` is called after each chunk is written (a test uses it to interrupt a run).
    """
    folder = Path(folder)
    obj = method.objective
    rank, world = _rank_world()
    n = len(train)
    dtype = config.dtype or str(obj.dtype).replace("torch.", "")
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"cannot store {dtype} rows; pass dtype='float32' or 'float64'")
    chunk = int(config.chunk_size)
    batch = int(config.batch_size or _auto_batch(obj.p, obj.theta.element_size(), chunk))
    mcfg, mtensors = method.state()
    header: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "method": method.name,
        "method_module": type(method).__module__,
        "method_config": mcfg,
        "projection": method.projection.config(),
        "projection_fingerprint": method.projection.fingerprint(),
        "n": n,
        "width": method.width,
        "weights": method.has_weights,
        "dtype": dtype,
        "chunk_size": chunk,
        "batch_size": batch,
        "num_chunks": -(-n // chunk),
        "p": obj.p,
        "data_fingerprint": data_fingerprint(train),
        # the fitted factors (eigenvectors may differ in sign between fits): chunks written
        # with one factorisation must never be mixed with chunks of another
        "method_tensors_fingerprint": _tensors_fingerprint(mtensors),
        **method.fingerprints(),
    }
    meta_path = folder / "index.json"
    exists = meta_path.is_file()
    _barrier()  # every rank decides from the same state of the folder
    if exists:
        saved = json.loads(meta_path.read_text())
        if config.batch_size is None:  # resume with the sizes the first run resolved
            header["batch_size"] = batch = int(saved.get("batch_size", batch))
        for key in sorted(set(header) | set(saved)):
            if saved.get(key) != json.loads(json.dumps(header.get(key))):
                raise ArtifactMismatchError(
                    f"{folder} holds an index built with a different {key!r} (saved "
                    f"{str(saved.get(key))[:80]!r}, now {str(header.get(key))[:80]!r}); resume "
                    "with the same model, data and settings, or build into a new folder"
                )
    elif rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(folder / "method.safetensors", mtensors, {"format": str(FORMAT_VERSION)})
        _write_json(meta_path, header)  # last: marks a started index
    _barrier()
    num = header["num_chunks"]
    mine = range(rank, num, world)
    for j in mine:  # stale temporary files of this rank's chunks, left by a killed run
        for p_ in (_rows_path(folder, j), _weights_path(folder, j)):
            p_.with_name(p_.name + ".tmp").unlink(missing_ok=True)
    for j in mine:
        path = _rows_path(folder, j)
        if path.is_file():
            continue
        lo, hi = j * chunk, min(n, (j + 1) * chunk)
        rows, weights = [], []
        for b in range(lo, hi, batch):
            x, y = train.get(torch.arange(b, min(hi, b + batch)))
            x, y = obj.prepare(x, y, train.name, b)
            r, w = method.train_rows(x, y)
            rows.append(r.detach().to("cpu", TORCH_DTYPES[dtype]).numpy())
            if w is not None:
                weights.append(w.detach().to("cpu", torch.float64).numpy())
        if method.has_weights:
            _save_npy(_weights_path(folder, j), np.concatenate(weights))
        _save_npy(path, np.concatenate(rows, 0))
        if callback is not None:
            callback(j, num)
    _barrier()
    index = GradientIndex(folder, method, header, config.max_memory_gb)
    if rank == 0:
        missing = index._missing()
        if missing:  # a rank failed: leave the folder resumable
            raise InputError(f"{folder}: {len(missing)} chunks missing after the build")
        final = method.finalize(index)
        _save_tensors(folder / "final.safetensors", final, {"format": str(FORMAT_VERSION)})
        _write_json(folder / "complete.json", {"complete": True, "num_chunks": num})
    _barrier()
    index._load_final()
    return index


def build_index(
    inf: Influence,
    folder: str | os.PathLike,
    dim: int | None = None,
    projection: str | Projection = "auto",
    callback: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> GradientIndex:
    """An index of ``inf``'s training gradients in ``folder`` (see the module docstring).

    ``index.loss_influence(test)`` then approximates ``inf.loss_influence(test)`` (equal to
    round-off with ``dim=None``): ``I_up,loss = -grad L(z_test)^T A^-1 (grad loss(z_i) + l2
    theta)``, negative = helpful. ``kwargs`` are the other :class:`IndexConfig` fields.
    """
    config = IndexConfig(dim=dim, projection=projection, **kwargs)
    method = InfluenceMethod.from_influence(inf, config)
    return write_index(folder, method, inf.train, config, callback)


# ---------------------------------------------------------------------------- the index
class GradientIndex:
    """Stored training-side rows and the query map of one method (module docstring).

    Build it with :meth:`Influence.build_index` (influence functions) or with
    :mod:`inflens.attribution` (TRAK, TracIn, gradient dot/cosine); reopen it in any process
    with :meth:`open`. Every score is ``[n_test, n_train]`` with **negative = helpful**.
    """

    def __init__(
        self, folder: Path, method: IndexMethod, header: dict[str, Any], max_memory_gb: float
    ) -> None:
        self.folder, self.method, self.header = Path(folder), method, header
        self.max_memory_gb = float(max_memory_gb)
        self._faiss: Any = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        objective: Objective,
        influence: Influence | None = None,
        train: DataLike | None = None,
        max_memory_gb: float = 2.0,
    ) -> GradientIndex:
        """A finished index from ``folder``, for queries with ``objective``'s model.

        Refuses (:class:`~inflens.artifacts.ArtifactMismatchError`) a model whose parameters,
        loss or l2 differ from those the index was built with, and, when ``train`` is given,
        other training data. ``influence`` is needed only for an index whose solver has no
        stored factorisation (CG, LiSSA). Nothing is refitted and the training data are not
        read (except to check ``train``'s fingerprint).
        """
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist: not an inflens index folder")
        header = json.loads(path.read_text())
        if header.get("format") != FORMAT_VERSION:
            raise InputError(f"{folder}: unknown index format {header.get('format')!r}")
        if not (folder / "complete.json").is_file():
            raise InputError(
                f"{folder} is an unfinished index (a build was interrupted): run the same build "
                "again to finish it; finished chunks are kept"
            )
        now = model_fingerprint(objective)
        if header.get("model_fingerprint") != now:
            raise ArtifactMismatchError(
                f"the index in {folder} was built with different model parameters "
                f"(fingerprint {str(header.get('model_fingerprint'))[:12]}..., now {now[:12]}...);"
                " open it with the same trained model (same parameters, loss and l2) or rebuild"
            )
        if train is not None:
            d = data_fingerprint(Data(train, "training data"))
            if header.get("data_fingerprint") != d:
                raise ArtifactMismatchError(
                    f"the index in {folder} was built on different training data (fingerprint "
                    f"{header['data_fingerprint'][:12]}..., now {d[:12]}...); pass the same data "
                    "in the same order, or rebuild"
                )
        name = header["method"]
        if name not in _METHODS:
            module = str(header.get("method_module", ""))
            if module.startswith("inflens."):  # only this package's modules are imported
                importlib.import_module(module)
        if name not in _METHODS:
            raise InputError(f"{folder}: index method {name!r} is not registered")
        projection = projection_from_config(header["projection"])
        if projection.fingerprint() != header["projection_fingerprint"]:
            raise ArtifactMismatchError(
                f"the projection regenerated from the seed in {folder} differs from the one "
                "the index was built with (a different random number generator?); rebuild it"
            )
        tensors = load_file(str(folder / "method.safetensors"))
        tensors = {k: v.to(objective.device) for k, v in tensors.items()}
        method = _METHODS[name].restore(
            header["method_config"], tensors, objective, projection, influence
        )
        extra = {k: v for k, v in method.fingerprints().items() if k != "model_fingerprint"}
        for key, value in extra.items():
            if header.get(key) != value:
                raise ArtifactMismatchError(
                    f"the index in {folder} was built with a different {key.replace('_', ' ')}"
                )
        index = cls(folder, method, header, max_memory_gb)
        index._load_final()
        return index

    def _load_final(self) -> None:
        path = self.folder / "final.safetensors"
        tensors = load_file(str(path)) if path.is_file() else {}
        self.method.load_final({k: v.to(self.method.objective.device) for k, v in tensors.items()})

    # ------------------------------------------------------------------ facts
    @property
    def n(self) -> int:
        """Number of indexed training points."""
        return int(self.header["n"])

    @property
    def dim(self) -> int:
        """Length of a stored row."""
        return int(self.header["width"])

    @property
    def disk_bytes(self) -> int:
        """Bytes of every file in the index folder."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    def _missing(self) -> list[int]:
        return [
            j for j in range(self.header["num_chunks"]) if not _rows_path(self.folder, j).is_file()
        ]

    # ------------------------------------------------------------------ streaming
    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.header["dtype"] == "float64" else torch.float32

    def _block_rows(self, per_row_extra: int) -> int:
        """Rows per block within the memory budget (``per_row_extra`` values per row besides
        the row itself: score columns, top-k candidates)."""
        item = 8 if self._compute_dtype() == torch.float64 else 4
        per_row = (self.dim + per_row_extra) * item + 8
        rows = int(self.max_memory_gb * 2**30 // per_row)
        if rows < 1:
            raise MemoryBudgetError(
                f"one row block needs {per_row / 2**30:.3g} GiB per row, more than "
                f"max_memory_gb={self.max_memory_gb}; raise max_memory_gb or query fewer test "
                "points at once"
            )
        return min(rows, int(self.header["chunk_size"]))

    def _blocks(
        self, rows_per_block: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """``(start, rows [b, D], weights [b] or None)`` over the whole store."""
        missing = self._missing()
        if missing:
            raise InputError(
                f"{self.folder} is missing {len(missing)} of {self.header['num_chunks']} chunks "
                f"(first: {missing[0]}); run the build again with the same arguments"
            )
        dt = self._compute_dtype()
        chunk = int(self.header["chunk_size"])
        dev = self.method.objective.device
        for j in range(self.header["num_chunks"]):
            # copy-on-write map: a writable view for torch.from_numpy without copying the
            # block (nothing writes to it, so the file is never modified)
            rows = np.load(_rows_path(self.folder, j), mmap_mode="c", allow_pickle=False)
            weights = None
            if self.header["weights"]:
                weights = np.load(_weights_path(self.folder, j), allow_pickle=False)
            for b in range(0, rows.shape[0], rows_per_block):
                t = torch.from_numpy(rows[b : b + rows_per_block])
                w = None
                if weights is not None:
                    w = torch.from_numpy(weights[b : b + rows_per_block]).to(dev, dt)
                yield j * chunk + b, t.to(device=dev, dtype=dt), w

    def _queries(self, test: DataLike) -> torch.Tensor:
        return self.method.queries(test).to(self._compute_dtype())

    @staticmethod
    def _scores(q: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        s = -(q @ rows.T)
        return s if w is None else s * w

    # ------------------------------------------------------------------ queries
    def loss_influence(self, test: DataLike) -> torch.Tensor:
        """``[n_test, n_train]`` scores of the index's method; negative = helpful.

        For an influence index: ``I_up,loss(z_i, z_test) = -grad L(z_test)^T A^-1 (grad
        loss(z_i) + l2 theta)``, exactly with ``dim=None``, in expectation with a projection.
        """
        q = self._queries(test)
        m = q.shape[0]
        need = m * self.n * q.element_size() / 2**30
        if need > self.max_memory_gb:
            raise MemoryBudgetError(
                f"a dense [{m}, {self.n}] score matrix needs {need:.2f} GiB, more than "
                f"max_memory_gb={self.max_memory_gb}; use topk(test, k), fewer test points, or "
                "raise max_memory_gb"
            )
        out = q.new_empty(m, self.n)
        for start, rows, w in self._blocks(self._block_rows(m)):
            out[:, start : start + rows.shape[0]] = self._scores(q, rows, w)
        return out

    def topk(self, test: DataLike, k: int = 10, backend: str = "exact") -> TopK:
        """The ``k`` most helpful and most harmful training points per test point.

        ``backend="exact"`` (default, the reference): a blocked product over the store with a
        running top-k, within ``max_memory_gb``. ``backend="faiss"``: FAISS exact inner-product
        search (``faiss`` must be installed; the whole store is loaded into it once).
        """
        k = int(k)
        if not 1 <= k <= self.n:
            raise InputError(f"k must lie in [1, {self.n}] (the number of indexed points), got {k}")
        if backend == "faiss":
            return self._topk_faiss(test, k)
        if backend != "exact":
            raise InputError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        q = self._queries(test)
        m = q.shape[0]
        lo_v = q.new_full((m, 0), 0.0)
        lo_i = torch.zeros(m, 0, dtype=torch.long, device=q.device)
        hi_v, hi_i = lo_v, lo_i
        for start, rows, w in self._blocks(self._block_rows(2 * m)):
            s = self._scores(q, rows, w)
            kb = min(k, s.shape[1])
            # the block's own top-k first, then a merge of 2k candidates per test point
            for largest in (False, True):
                v, pos = torch.topk(s, kb, dim=1, largest=largest)
                run_v, run_i = (hi_v, hi_i) if largest else (lo_v, lo_i)
                cat_v, cat_i = torch.cat([run_v, v], 1), torch.cat([run_i, pos + start], 1)
                v, pos = torch.topk(cat_v, min(k, cat_v.shape[1]), dim=1, largest=largest)
                if largest:
                    hi_v, hi_i = v, cat_i.gather(1, pos)
                else:
                    lo_v, lo_i = v, cat_i.gather(1, pos)
        return TopK(lo_i, lo_v, hi_i, hi_v)

    def _topk_faiss(self, test: DataLike, k: int) -> TopK:
        try:
            import faiss  # type: ignore[import-not-found]
        except ImportError as exc:
            raise InputError(
                "backend='faiss' needs the faiss package (pip install faiss-cpu); the default "
                "backend='exact' needs nothing"
            ) from exc
        if self._faiss is None:
            index = faiss.IndexFlatIP(self.dim)
            for _, rows, w in self._blocks(self._block_rows(0)):
                if w is not None:  # the row weight folds into the stored vector
                    rows = rows * w[:, None]
                index.add(rows.to(torch.float32).cpu().numpy())
            self._faiss = index
        q = self._queries(test).to(torch.float32).cpu().numpy()
        # score = -(q . s): most helpful = largest q . s; most harmful = largest (-q) . s
        d_help, i_help = self._faiss.search(q, k)
        d_harm, i_harm = self._faiss.search(-q, k)
        dev = self.method.objective.device
        return TopK(
            torch.from_numpy(i_help).long().to(dev),
            -torch.from_numpy(d_help).to(dev),
            torch.from_numpy(i_harm).long().to(dev),
            torch.from_numpy(d_harm).to(dev),
        )

    def self_influence(self) -> torch.Tensor:
        """``[n_train]`` score of each training point on itself (for an influence index
        ``I_up,loss(z_i, z_i) = -grad loss(z_i)^T A^-1 (grad loss(z_i) + l2 theta)``), from
        the stored rows alone: ``-((s_i - c) M) . s_i * w_i`` with the method's ``c`` and
        ``M`` (:meth:`IndexMethod.self_terms`)."""
        c, mat = self.method.self_terms()
        dt = self._compute_dtype()
        c = None if c is None else c.to(dt)
        mat = None if mat is None else mat.to(dt)
        out = torch.empty(self.n, dtype=dt, device=self.method.objective.device)
        for start, rows, w in self._blocks(self._block_rows(self.dim + 1)):
            left = rows if c is None else rows - c
            if mat is not None:
                left = left @ mat
            val = -(left * rows).sum(1)
            out[start : start + rows.shape[0]] = val if w is None else val * w
        return out

    def quality(
        self, test_sample: DataLike, k: int = 10, train: DataLike | None = None
    ) -> IndexQuality:
        """Compressed against uncompressed scores of the same method on ``test_sample``.

        The reference recomputes the method without a projection over the training data
        (``train``; an index built in this process uses its own): Pearson and Spearman
        correlation per test point over all training points, and the recall of the exact
        ``k`` most helpful and most harmful points among the index's top ``k``.
        """
        data = self._train_data(train)
        approx = self.loss_influence(test_sample)
        ref = self.method.unprojected()
        batch = int(self.header["batch_size"])
        ref.prepare_reference(data, batch)
        q = ref.queries(test_sample)
        exact = torch.empty_like(approx, dtype=q.dtype)
        obj = ref.objective
        for start, x, y in data.chunks(batch):
            x, y = obj.prepare(x, y, data.name, start)
            rows, w = ref.train_rows(x, y)
            exact[:, start : start + rows.shape[0]] = self._scores(q, rows, w)
        return compare_scores(approx, exact.to(approx.dtype), k, self.dim)

    def _train_data(self, train: DataLike | None) -> Data:
        if train is None:
            inf = getattr(self.method, "influence", None)
            data = getattr(self.method, "train", None) or (inf.train if inf is not None else None)
            if data is None:
                raise InputError(
                    "quality() recomputes the uncompressed scores from the training data: pass "
                    "train=(X, y) (the data the index was built on)"
                )
            return data
        data = Data(train, "training data")
        if data_fingerprint(data) != self.header["data_fingerprint"]:
            raise ArtifactMismatchError(
                f"the training data given differ from those the index in {self.folder} was "
                "built on; pass the same data in the same order"
            )
        return data


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis (ties broken by position; fine for continuous scores)."""
    r = torch.empty_like(x)
    order = x.argsort(-1)
    r.scatter_(-1, order, torch.arange(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x))
    return r


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * b).sum(-1) / den


def compare_scores(approx: torch.Tensor, exact: torch.Tensor, k: int, dim: int) -> IndexQuality:
    """Pearson, Spearman and top-``k`` recall (helpful and harmful) of ``approx`` against
    ``exact``, both ``[n_test, n_train]``, per test point and averaged."""
    a, e = approx.double(), exact.double()
    k = min(int(k), a.shape[1])
    pear = _pearson(a, e)
    spear = _pearson(_ranks(a), _ranks(e))

    def recall(largest: bool) -> torch.Tensor:
        ia = a.topk(k, 1, largest=largest).indices
        ie = e.topk(k, 1, largest=largest).indices
        hit = (ia[:, :, None] == ie[:, None, :]).any(2).double().sum(1)
        return hit / k

    rh, rm = recall(False), recall(True)
    per = {"pearson": pear, "spearman": spear, "recall_helpful": rh, "recall_harmful": rm}
    return IndexQuality(
        pearson=float(pear.mean()),
        spearman=float(spear.mean()),
        recall_helpful=float(rh.mean()),
        recall_harmful=float(rm.mean()),
        k=k,
        n_test=int(a.shape[0]),
        dim=int(dim),
        per_test=per,
    )
