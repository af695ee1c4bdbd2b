"""Random projections of per-example gradients (Johnson-Lindenstrauss sketches).

A projection ``R`` (``[dim, q]``) is scaled so that ``E[R^T R] = I``: for any two vectors
``u, v``, ``E[(R u) . (R v)] = u . v``, with variance ``(|u|^2 |v|^2 + (u . v)^2) / dim`` for
Gaussian entries (Rademacher entries: at most that). Inner products of gradients, and so
influence scores, survive the compression in expectation; the relative error of one inner
product is about ``sqrt(2 / dim)`` times ``|u| |v| / |u . v|``.

Three kinds, one interface (:class:`Projection`: ``project([B, q]) -> [B, dim]``, a JSON
``config()``, :func:`projection_from_config` to rebuild it in another process):

- :class:`IdentityProjection`: no compression (``dim = q``), exact.
- :class:`DenseProjection`: i.i.d. Gaussian or Rademacher entries, ``/ sqrt(dim)``. The matrix
  is never stored on disk: it is regenerated deterministically from ``seed`` in blocks of
  ``block_rows`` input coordinates (a ``torch.Generator`` per block), and kept in memory only
  when it is small (``cache_mb``).
- :class:`KroneckerProjection` (LoGra-style, Choe et al. 2024): for every ``nn.Linear`` layer
  with gradient ``G = sum_t g_t a_t^T`` (``g_t`` the gradient at the layer output, ``a_t`` its
  input with a 1 appended for the bias, summed over the ``T`` locations of a sequence), the
  projected gradient is ``R_out G R_in^T = sum_t (R_out g_t)(R_in a_t)^T``, i.e. the
  Kronecker product ``R_out (x) R_in`` applied to the row-major ``vec(G)``. Computed from
  forward/backward hooks (:meth:`KroneckerProjection.project_examples`), the full per-example
  gradient is never formed: the cost per example is ``T (d_in r_in + d_out r_out + r_in r_out)``
  instead of ``T d_in d_out``. A side whose rank equals its dimension uses the identity (exact).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .objective import Objective

PROJECTION_KINDS = ("auto", "none", "dense", "gaussian", "rademacher", "kronecker")


def _block_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one block, stable across processes and platforms."""
    h = hashlib.sha256(repr((int(seed), *map(int, parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _random(rows: int, cols: int, kind: str, seed: int) -> torch.Tensor:
    """``[rows, cols]`` float32 entries of unit variance (Gaussian or +-1), from ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=g).to(torch.float32).mul_(2).sub_(1)
    return torch.randn(rows, cols, generator=g, dtype=torch.float32)


class Projection(ABC):
    """A linear map ``[B, in_dim] -> [B, dim]`` with ``E[R^T R] = I``."""

    kind = "projection"
    in_dim: int
    dim: int

    @abstractmethod
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, dim]`` in ``g``'s dtype."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON description from which :func:`projection_from_config` rebuilds the same map."""

    def fingerprint(self) -> str:
        """SHA-256 of the configuration and of a probe ``R u`` (detects a different RNG)."""
        h = hashlib.sha256(repr(sorted(self.config().items())).encode())
        u = torch.linspace(-1.0, 1.0, self.in_dim, dtype=torch.float64)[None]
        h.update(self.project(u).to(torch.float32).numpy().tobytes())
        return h.hexdigest()


class IdentityProjection(Projection):
    """No compression: ``R = I``."""

    kind = "none"

    def __init__(self, in_dim: int) -> None:
        self.in_dim = self.dim = int(in_dim)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim}


class DenseProjection(Projection):
    """``R [dim, in_dim]`` with i.i.d. entries ``N(0, 1/dim)`` or ``+-1/sqrt(dim)``.

    Args:
        in_dim: input dimension ``q``.
        dim: output dimension.
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: the matrix is a deterministic function of ``(seed, in_dim, dim, kind,
            block_rows)``.
        block_rows: input coordinates per generated block of ``R^T``.
        cache_mb: keep the generated matrix in memory when it takes at most this many MiB
            (float32); otherwise every call regenerates it block by block.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        kind: str = "gaussian",
        seed: int = 0,
        block_rows: int = 4096,
        cache_mb: float = 256.0,
    ) -> None:
        if kind not in ("gaussian", "rademacher"):
            raise InputError(f"a dense projection is 'gaussian' or 'rademacher', got {kind!r}")
        if int(dim) < 1 or int(in_dim) < 1:
            raise InputError(f"projection dimensions must be positive, got {in_dim} -> {dim}")
        self.in_dim, self.dim, self.kind = int(in_dim), int(dim), kind
        self.seed, self.block_rows, self.cache_mb = int(seed), int(block_rows), float(cache_mb)
        self._cache: torch.Tensor | None = None

    def _block(self, b: int) -> torch.Tensor:
        lo = b * self.block_rows
        rows = min(self.block_rows, self.in_dim - lo)
        return _random(rows, self.dim, self.kind, _block_seed(self.seed, b)) / math.sqrt(self.dim)

    def transposed_matrix(self) -> torch.Tensor:
        """``R^T [in_dim, dim]`` (float32), generated in full: for tests and small problems."""
        nb = -(-self.in_dim // self.block_rows)
        return torch.cat([self._block(b) for b in range(nb)], 0)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        if g.shape[-1] != self.in_dim:
            raise InputError(f"expected vectors of length {self.in_dim}, got {g.shape[-1]}")
        if self.in_dim * self.dim * 4 <= self.cache_mb * 2**20:
            if self._cache is None:
                self._cache = self.transposed_matrix()
            return g @ self._cache.to(device=g.device, dtype=g.dtype)
        out = g.new_zeros(g.shape[0], self.dim)
        for b in range(-(-self.in_dim // self.block_rows)):
            lo = b * self.block_rows
            blk = self._block(b).to(device=g.device, dtype=g.dtype)
            out += g[:, lo : lo + blk.shape[0]] @ blk
        return out

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "dim": self.dim,
            "seed": self.seed,
            "block_rows": self.block_rows,
        }


@dataclass(frozen=True)
class LinearLayerSpec:
    """Where one ``nn.Linear`` layer's parameters sit in theta.

    ``weight`` and ``bias`` are ``(start, stop)`` slices of theta (``None`` when not selected);
    the layer's gradient is taken as ``[W | b]``, ``[d_out, d_in + (1 if bias)]``.
    """

    name: str
    d_out: int
    d_in: int
    weight: tuple[int, int] | None
    bias: tuple[int, int] | None

    @property
    def cols(self) -> int:
        return (self.d_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)

    def gather(self, vecs: torch.Tensor) -> torch.Tensor:
        """``[B, p] -> [B, d_out, cols]``: the rows of ``vecs`` as ``[W | b]``."""
        k = vecs.shape[0]
        parts = []
        if self.weight is not None:
            parts.append(vecs[:, self.weight[0] : self.weight[1]].reshape(k, self.d_out, self.d_in))
        if self.bias is not None:
            parts.append(vecs[:, self.bias[0] : self.bias[1]].reshape(k, self.d_out, 1))
        return torch.cat(parts, 2)


def linear_layers(objective: Objective) -> list[LinearLayerSpec] | None:
    """The ``nn.Linear`` layers that hold every selected parameter, or ``None`` when some
    selected parameter lives elsewhere (then only a dense projection applies)."""
    offsets = objective.offsets()
    covered: set[str] = set()
    layers: list[LinearLayerSpec] = []
    for mname, m in objective.model.named_modules():
        pre = mname + "." if mname else ""
        w, b = offsets.get(pre + "weight"), offsets.get(pre + "bias")
        if type(m) is not nn.Linear or (w is None and b is None):
            continue
        layers.append(LinearLayerSpec(mname, m.out_features, m.in_features, w, b))
        covered.update(n for n, s in ((pre + "weight", w), (pre + "bias", b)) if s is not None)
    if set(objective.names) - covered:
        return None
    return layers


def kronecker_ranks(layers: list[LinearLayerSpec], dim: int) -> list[tuple[int, int]]:
    """Per-layer ``(r_out, r_in)``: the largest common rank ``r`` (each side capped at its
    dimension) whose total ``sum r_out r_in`` stays within ``dim``."""
    if not layers:
        raise InputError("a Kronecker projection needs at least one nn.Linear layer")

    def ranks(r: int) -> list[tuple[int, int]]:
        return [(min(lay.d_out, r), min(lay.cols, r)) for lay in layers]

    lo, hi = 1, max(max(lay.d_out, lay.cols) for lay in layers)
    if sum(a * b for a, b in ranks(1)) > dim:
        raise InputError(
            f"dim={dim} is smaller than the number of Linear layers ({len(layers)}); a "
            "Kronecker projection needs at least 1 x 1 per layer"
        )
    while lo < hi:  # largest r with total <= dim
        mid = (lo + hi + 1) // 2
        if sum(a * b for a, b in ranks(mid)) <= dim:
            lo = mid
        else:
            hi = mid - 1
    return ranks(lo)


class KroneckerProjection(Projection):
    """Per-layer ``R_out (x) R_in`` (LoGra-style; module docstring).

    Args:
        layers: the Linear layers (:func:`linear_layers`), covering all of theta.
        p: the length of theta.
        ranks: ``(r_out, r_in)`` per layer (:func:`kronecker_ranks`).
        kind: ``"gaussian"`` or ``"rademacher"`` entries.
        seed: the factors are a deterministic function of ``(seed, layer index, side)``.
    """

    kind = "kronecker"

    def __init__(
        self,
        layers: list[LinearLayerSpec],
        p: int,
        ranks: list[tuple[int, int]],
        kind: str = "gaussian",
        seed: int = 0,
    ) -> None:
        if len(ranks) != len(layers):
            raise InputError(f"{len(ranks)} rank pairs for {len(layers)} layers")
        if kind not in ("gaussian", "rademacher"):
            raise InputError(f"Kronecker factors are 'gaussian' or 'rademacher', got {kind!r}")
        self.layers, self.in_dim, self.entries, self.seed = list(layers), int(p), kind, int(seed)
        self.ranks = [(int(a), int(b)) for a, b in ranks]
        for lay, (ro, ri) in zip(self.layers, self.ranks):
            if not (1 <= ro <= lay.d_out and 1 <= ri <= lay.cols):
                raise InputError(f"layer {lay.name!r}: ranks ({ro}, {ri}) outside its shape")
        self.dim = sum(a * b for a, b in self.ranks)
        self._factors: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [
            (self._factor(i, 0, ro, lay.d_out), self._factor(i, 1, ri, lay.cols))
            for i, (lay, (ro, ri)) in enumerate(zip(self.layers, self.ranks))
        ]

    def _factor(self, layer: int, side: int, r: int, d: int) -> torch.Tensor | None:
        if r == d:
            return None  # identity: that side is not compressed
        return _random(r, d, self.entries, _block_seed(self.seed, layer, side)) / math.sqrt(r)

    def factors(self, i: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
        """``(R_out [r_out, d_out], R_in [r_in, cols])`` of layer ``i`` (identities included)."""
        lay = self.layers[i]
        out = []
        for f, d in zip(self._factors[i], (lay.d_out, lay.cols)):
            out.append(torch.eye(d, dtype=dtype) if f is None else f.to(dtype))
        return tuple(out)

    @staticmethod
    def _apply(f: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """``v @ f^T`` over the last axis (identity when ``f`` is None)."""
        return v if f is None else v @ f.to(device=v.device, dtype=v.dtype).T

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Full gradients ``[B, p]`` -> ``[B, dim]``: ``R_out [W | b] R_in^T`` per layer."""
        if g.shape[-1] != self.in_dim:
            raise InputError(f"expected vectors of length {self.in_dim}, got {g.shape[-1]}")
        parts = []
        for lay, (fo, fi) in zip(self.layers, self._factors):
            m = lay.gather(g)  # [B, out, cols]
            m = self._apply(fi, m)  # [B, out, r_in]
            m = self._apply(fo, m.transpose(1, 2)).transpose(1, 2)  # [B, r_out, r_in]
            parts.append(m.reshape(g.shape[0], -1))
        return torch.cat(parts, 1)

    def project_factors(self, acts: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """``[B, dim]`` from per-layer inputs ``[B, T, cols]`` and output gradients
        ``[B, T, d_out]``: ``sum_t (R_out g_t)(R_in a_t)^T`` flattened."""
        parts = []
        for (fo, fi), a, g in zip(self._factors, acts, grads):
            pa, pg = self._apply(fi, a), self._apply(fo, g)
            parts.append(torch.einsum("bto,bti->boi", pg, pa).reshape(a.shape[0], -1))
        return torch.cat(parts, 1)

    def project_examples(
        self,
        objective: Objective,
        x: torch.Tensor,
        y: torch.Tensor,
        which: str = "loss",
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected per-example gradients ``[B, dim]`` of the loss (or measurement) without
        forming them: one forward pass with hooks on the Linear layers, one backward pass of
        the summed values to the layer outputs (examples are independent in eval mode)."""
        theta = objective.theta if theta is None else theta
        modules = dict(objective.model.named_modules())
        store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        handles = []
        for lay in self.layers:

            def hook(mod, inputs, output, _name=lay.name):
                store.setdefault(_name, []).append((inputs[0], output))

            handles.append(modules[lay.name].register_forward_hook(hook))
        fn = objective.losses if which == "loss" else objective.measurements
        try:
            with objective.evaluating(), torch.enable_grad():
                th = theta.detach().requires_grad_(True)
                vals = fn(th, x, y)
        finally:
            for h in handles:
                h.remove()
        for lay in self.layers:
            if len(store.get(lay.name, [])) != 1:
                raise InputError(
                    f"layer {lay.name!r} ran {len(store.get(lay.name, []))} times in one forward "
                    "pass; a Kronecker projection needs each Linear layer called once per "
                    "example: use projection='dense'"
                )
        outs = [store[lay.name][0][1] for lay in self.layers]
        grads = torch.autograd.grad(vals.sum(), outs, allow_unused=True)
        acts, gs = [], []
        for lay, (a, o), g in zip(self.layers, (store[lay.name][0] for lay in self.layers), grads):
            g = torch.zeros_like(o) if g is None else g
            b = a.shape[0]
            a = a.detach().reshape(b, -1, a.shape[-1])
            if lay.weight is None:
                a = a[..., :0]
            if lay.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
            acts.append(a)
            gs.append(g.detach().reshape(b, -1, g.shape[-1]))
        return self.project_factors(acts, gs)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "entries": self.entries,
            "seed": self.seed,
            "ranks": [list(r) for r in self.ranks],
            "layers": [asdict(lay) for lay in self.layers],
        }


def projection_from_config(cfg: dict[str, Any]) -> Projection:
    """Rebuild a projection from its :meth:`Projection.config`."""
    kind = cfg.get("kind")
    if kind == "none":
        return IdentityProjection(cfg["in_dim"])
    if kind in ("gaussian", "rademacher"):
        return DenseProjection(
            cfg["in_dim"], cfg["dim"], kind, cfg["seed"], block_rows=cfg["block_rows"]
        )
    if kind == "kronecker":
        layers = [
            LinearLayerSpec(
                d["name"],
                d["d_out"],
                d["d_in"],
                None if d["weight"] is None else tuple(d["weight"]),
                None if d["bias"] is None else tuple(d["bias"]),
            )
            for d in cfg["layers"]
        ]
        return KroneckerProjection(
            layers, cfg["in_dim"], [tuple(r) for r in cfg["ranks"]], cfg["entries"], cfg["seed"]
        )
    raise InputError(f"unknown projection kind {kind!r} in an index header")


#: "auto" uses a dense projection while ``q * dim`` float32 entries take at most this (MiB)
DENSE_AUTO_MB = 512.0


def make_projection(
    projection: str | Projection,
    in_dim: int,
    dim: int | None,
    objective: Objective | None = None,
    seed: int = 0,
    raw_gradients: bool = True,
) -> Projection:
    """The projection named by ``projection`` for vectors of length ``in_dim``.

    ``"auto"``: none when ``dim`` is None or ``dim >= in_dim``; dense Gaussian while the
    matrix would take at most :data:`DENSE_AUTO_MB`; otherwise Kronecker when the vectors are
    raw gradients (``raw_gradients``) of a model whose selected parameters all sit in
    ``nn.Linear`` layers, else dense (regenerated block by block). ``"dense"`` means Gaussian.
    A :class:`Projection` object is passed through after checking its input dimension.
    """
    if isinstance(projection, Projection):
        if projection.in_dim != in_dim:
            raise InputError(
                f"the projection takes vectors of length {projection.in_dim}, the index stores "
                f"vectors of length {in_dim}"
            )
        return projection
    if projection not in PROJECTION_KINDS:
        raise InputError(
            f"projection must be one of {', '.join(PROJECTION_KINDS)}, got {projection!r}"
        )
    if dim is not None and int(dim) < 1:
        raise InputError(f"dim must be a positive integer or None, got {dim}")
    if projection == "none" or dim is None or (projection == "auto" and dim >= in_dim):
        if projection not in ("auto", "none"):
            raise InputError(f"projection={projection!r} needs dim (an integer)")
        return IdentityProjection(in_dim)
    dim = int(dim)
    kind = projection
    if kind == "auto":
        layers = linear_layers(objective) if (objective is not None and raw_gradients) else None
        small = in_dim * dim * 4 <= DENSE_AUTO_MB * 2**20
        kind = "gaussian" if (small or not layers) else "kronecker"
    if kind == "dense":
        kind = "gaussian"
    if kind == "kronecker":
        if objective is None or not raw_gradients:
            raise InputError(
                "a Kronecker projection applies to raw per-layer gradients only; with a "
                "factorised preconditioner the stored vectors are not, so use "
                "projection='dense' (or precondition='test')"
            )
        layers = linear_layers(objective)
        if not layers:
            raise InputError(
                "projection='kronecker' needs every selected parameter to belong to an "
                "nn.Linear layer; select them with Objective(params=...) or use "
                "projection='dense'"
            )
        return KroneckerProjection(layers, in_dim, kronecker_ranks(layers, dim), seed=seed)
    return DenseProjection(in_dim, dim, kind, seed)
