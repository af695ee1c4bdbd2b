"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton inverses for Linear and Conv2d layers.

For a layer with output ``s = W a (+ b)`` (a Conv2d applies this at every spatial location
``t`` to the unfolded patch ``a_t``), write ``W~ = [W | b]`` (``[out, in']``, the bias as a last
column fed by a constant 1 appended to ``a``). Its block of the generalized Gauss-Newton
matrix ``G = (1/n) sum_i J_i^T Lambda_i J_i`` (``Lambda_i = sum_c u_ic u_ic^T`` the Hessian of
the loss in the model outputs) is approximated (Martens & Grosse 2015; Grosse & Martens 2016
for convolutions, "expand" variant) by ``S (x) A`` in the row-major order of ``W~``, with

- ``A = 1/(n T) sum_{i,t} a_it a_it^T`` (``[in', in']``, ``T`` locations per example),
- ``S = 1/n sum_{i,c,t} g_ict g_ict^T`` (``[out, out]``), ``g_ict = J_{s,it}^T u_ic`` the
  back-propagated factor columns of ``Lambda_i`` ("type-2" K-FAC: exact, not sampled).

Layers are independent (block-diagonal). With ``S = Q_S diag(s) Q_S^T`` and
``A = Q_A diag(a) Q_A^T`` the solve is ``(Q_S (x) Q_A) diag(1 / (s a^T + l2 + damping))
(Q_S (x) Q_A)^T``: the ``l2`` part of ``H`` and the damping are exact, only the loss curvature is
approximated. EK-FAC (George et al. 2018) keeps the eigenbasis and replaces ``s a^T`` by the
exact second moments of the pseudo-gradients in it, ``diag(Q^T G_layer Q)``, the best diagonal
in that basis in Frobenius norm (one more pass over the data).

Parameters in any other module (BatchNorm, embeddings, custom layers) get the exact diagonal
of the GGN (``unsupported="diagonal"``, with a warning naming them) or an error
(``unsupported="error"``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import JacobianBackend
from ..curvature import Curvature
from ..data import to_device
from ..errors import InflensWarning, InputError, MemoryBudgetError, NotFittedError
from ..losses import output_hessian_factor, output_hessians, sampled_token_factor
from ..objective import Objective
from .base import Solver, require_scalar_l2


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric integer padding of a Conv2d, or None when F.unfold cannot express it."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(m.padding[0]), int(m.padding[1]))


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``[in, out]``."""
    return (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    )


def _supported(m: nn.Module) -> str | None:
    """Why ``m`` cannot be Kronecker-factored (None when it can).

    ``nn.Linear`` subclasses are accepted (e.g. ``MultiheadAttention.out_proj``); a subclass
    whose ``forward`` is not ``x W^T + b``, or a layer called other than once per forward pass
    (``out_proj`` is applied by ``MultiheadAttention`` without calling it), is caught by
    :meth:`KFAC._verify` and gets the exact diagonal.
    """
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        return None
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            return "an Embedding with max_norm (renormalised in place)"
        return None
    if type(m) is nn.Conv2d:
        if m.groups != 1:
            return "grouped convolution"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        if _conv_padding(m) is None:
            return "asymmetric 'same' padding"
        return None
    return f"{type(m).__name__} layers are not Kronecker-factored"


def _rotate_factors_first(t: int, n_in: int, n_out: int, m: int) -> bool:
    """Whether EK-FAC's correction pass should rotate the layer's factors before forming the
    per-example pseudo-gradients (cheaper in floating-point operations).

    The pseudo-gradient in the eigenbasis, ``Q_S^T (sum_t g_t a_t^T) Q_A``, equals
    ``sum_t (Q_S^T g_t)(Q_A^T a_t)^T``. Rotating first costs ``T in^2 + m T (out^2 + out in)``
    per example (``m`` factor columns, ``T`` locations); rotating the formed pseudo-gradient
    costs ``m (T out in + out^2 in + out in^2)``. For a Linear layer (``T = 1``) the first is a
    matrix product over the batch, the second ``p``-sized products per example.
    """
    first = t * n_in * n_in + m * t * (n_out * n_out + n_out * n_in)
    return first <= m * n_out * n_in * (t + n_out + n_in)


class _Layer:
    """Bookkeeping of one factored layer (JSON-friendly through :meth:`to_dict`)."""

    def __init__(self, **kw: Any) -> None:
        self.name: str = kw["name"]
        self.kind: str = kw["kind"]
        self.w: tuple[int, int] | None = kw.get("w")  # slice of theta holding the weight
        self.b: tuple[int, int] | None = kw.get("b")
        self.out: int = kw["out"]
        self.din: int = kw["din"]  # weight columns (in_features or C_in*kh*kw), 0 if no weight
        #: the weight is stored ``[in, out]`` (Hugging Face Conv1D; an Embedding's ``[V, d]``)
        self.transposed: bool = bool(kw.get("transposed", False))
        #: an Embedding's padding index (its row gets no gradient), else None
        self.padding_idx: int | None = kw.get("padding_idx")

    @property
    def diagonal_a(self) -> bool:
        """The input factor is diagonal (an Embedding: one-hot inputs), kept as a vector."""
        return self.kind == "embedding"

    @property
    def dim_a(self) -> int:
        return self.din + (1 if self.b is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        keys = ("name", "kind", "w", "b", "out", "din", "transposed", "padding_idx")
        return {k: getattr(self, k) for k in keys}

    def gather(self, vecs: torch.Tensor) -> torch.Tensor:
        """``[k, p] -> [k, out, in']``: the rows of ``vecs`` as ``W~ = [W | b]``."""
        k = vecs.shape[0]
        parts = []
        if self.w is not None:
            w = vecs[:, self.w[0] : self.w[1]]
            if self.transposed:
                parts.append(w.reshape(k, self.din, self.out).transpose(1, 2))
            else:
                parts.append(w.reshape(k, self.out, self.din))
        if self.b is not None:
            parts.append(vecs[:, self.b[0] : self.b[1]].reshape(k, self.out, 1))
        return torch.cat(parts, 2)

    def scatter(self, out: torch.Tensor, mats: torch.Tensor) -> None:
        """Write ``[k, out, in']`` back into the layer's slices of ``out [k, p]``."""
        k = mats.shape[0]
        if self.w is not None:
            w = mats[:, :, : self.din]
            out[:, self.w[0] : self.w[1]] = (w.transpose(1, 2) if self.transposed else w).reshape(
                k, -1
            )
        if self.b is not None:
            out[:, self.b[0] : self.b[1]] = mats[:, :, -1]


def _find_layers(obj: Objective) -> tuple[list[_Layer], dict[str, str], list[str]]:
    """Factored layers, unsupported module names (with the reason), and uncovered param names."""
    offsets = obj.offsets()
    covered: set[str] = set()
    layers: list[_Layer] = []
    reasons: dict[str, str] = {}
    for mname, m in obj.model.named_modules():
        pre = mname + "." if mname else ""
        own = [n for n, _ in m.named_parameters(recurse=False)]
        sel = [pre + n for n in own if pre + n in offsets]
        if not sel:
            continue
        why = _supported(m)
        if why is not None or any(n not in ("weight", "bias") for n in own):
            reasons[mname or type(m).__name__] = why or "unexpected parameters"
            continue
        w = offsets.get(pre + "weight")
        b = offsets.get(pre + "bias")
        extra: dict[str, Any] = {}
        if isinstance(m, nn.Linear):
            kind, out, din = "linear", m.out_features, m.in_features
        elif _is_hf_conv1d(m):
            kind, out, din = "hf_conv1d", int(m.nf), int(m.weight.shape[0])
            extra["transposed"] = True
        elif isinstance(m, nn.Embedding):
            kind, out, din = "embedding", m.embedding_dim, m.num_embeddings
            extra.update(transposed=True, padding_idx=m.padding_idx)
        else:
            assert isinstance(m, nn.Conv2d)
            kind = "conv2d"
            out = m.out_channels
            din = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        layers.append(
            _Layer(name=mname, kind=kind, w=w, b=b, out=out, din=din if w else 0, **extra)
        )
        covered.update(sel)
    rest = [n for n in obj.names if n not in covered]
    return layers, reasons, rest


class KFAC(Solver):
    """Kronecker-factored approximate inverse of ``G + (l2 + damping) I`` (module docstring).

    ``fit`` makes one pass over the training data (``C`` backward passes per chunk for a model
    with ``C`` outputs per example with ``fisher="ggn"``, one with ``"empirical"``); each query
    is then a few small matrix products per layer. The curvature is always the Gauss-Newton
    matrix (or the empirical Fisher), whatever ``Influence(curvature=...)`` says: for a linear
    model with a convex loss that is the Hessian.

    Args:
        fisher: ``"ggn"`` (the exact Gauss-Newton factors, default), ``"sampled"`` (an unbiased
            Monte-Carlo estimate of them from ``samples`` backward passes per chunk instead of
            ``C``: the vectors ``u = sum_c xi_c u_c / sqrt(samples)`` with random signs
            ``xi``, so ``E[u u^T] = Lambda``; for a model with one output it is exact), or
            ``"empirical"`` (``g`` back-propagated from the actual loss gradient: the empirical
            Fisher, cheaper, biased).
        unsupported: what to do with parameters outside Linear/Conv2d layers: ``"diagonal"``
            (exact GGN diagonal for them, with a warning) or ``"error"``.
        samples: backward passes per chunk with ``fisher="sampled"``.
        seed: seed of the random signs with ``fisher="sampled"``.
    """

    name = "kfac"
    #: solve() is cheap, so per-point queries (self-influence) may call it for every point
    direct = True
    _correct = False

    def __init__(
        self, fisher: str = "ggn", unsupported: str = "diagonal", samples: int = 1, seed: int = 0
    ) -> None:
        super().__init__()
        if fisher not in ("ggn", "sampled", "empirical"):
            raise InputError(f"fisher must be 'ggn', 'sampled' or 'empirical', got {fisher!r}")
        if unsupported not in ("diagonal", "error"):
            raise InputError(f"unsupported must be 'diagonal' or 'error', got {unsupported!r}")
        if not (isinstance(samples, int) and samples >= 1):
            raise InputError(f"samples must be a positive integer, got {samples!r}")
        self.fisher = fisher
        self.unsupported = unsupported
        self.samples = samples
        self.seed = int(seed)

    # ------------------------------------------------------------------ fitting
    def fit(self, curvature: Curvature) -> KFAC:
        require_scalar_l2(curvature, type(self).__name__)  # also as CG's preconditioner
        # the random signs of fisher="sampled" (one stream per fit; not kept after it)
        self._generator_ = torch.Generator().manual_seed(self.seed)
        try:
            return self._fit(curvature)
        finally:
            del self._generator_

    def _fit(self, curvature: Curvature) -> KFAC:
        super().fit(curvature)
        obj = curvature.objective
        layers, reasons, rest = _find_layers(obj)
        modules = dict(obj.model.named_modules())
        bad = self._verify(curvature, layers, modules)
        if bad:
            drop = {n for n, _ in bad}
            for n, why in bad:
                reasons[n] = why
            keep = [lay for lay in layers if lay.name not in drop]
            for lay in layers:
                if lay.name in drop:
                    pre = lay.name + "." if lay.name else ""
                    rest += [pre + s for s, sl in (("weight", lay.w), ("bias", lay.b)) if sl]
            layers = keep
        if rest:
            names = ", ".join(f"'{k}' ({v})" for k, v in reasons.items())
            if self.unsupported == "error":
                raise InputError(
                    f"{type(self).__name__} cannot factor the parameters of {names}: "
                    f"{', '.join(rest)}. Select only Linear/Conv2d parameters with "
                    "Objective(params=...), pass unsupported='diagonal' to use the exact GGN "
                    "diagonal for them, or use solver='arnoldi' / 'cg'"
                )
            warnings.warn(
                f"{type(self).__name__}: using the exact Gauss-Newton diagonal (no Kronecker "
                f"factors) for {len(rest)} parameter tensors of {names}",
                InflensWarning,
                stacklevel=3,
            )
        self.layers_ = [lay.to_dict() for lay in layers]
        self.diag_names_ = list(rest)
        offsets = obj.offsets()
        self.diag_index_ = (
            torch.cat([torch.arange(*offsets[n]) for n in rest]).to(obj.device)
            if rest
            else torch.zeros(0, dtype=torch.long, device=obj.device)
        )
        self.shift_ = curvature.shift
        self.p_ = obj.p
        a_fac, s_fac, diag = self._factor_pass(curvature, layers, modules)
        self.evals_a_: list[torch.Tensor] = []
        self.evecs_a_: list[torch.Tensor] = []
        self.evals_s_: list[torch.Tensor] = []
        self.evecs_s_: list[torch.Tensor] = []
        for a, s in zip(a_fac, s_fac):
            if a.ndim == 1:  # a diagonal factor: eigenvalues as they are, eigenbasis the identity
                la, qa = a, a.new_zeros(0)
            else:
                la, qa = torch.linalg.eigh(a)
            ls, qs = torch.linalg.eigh(s)
            # the factors are PSD; round-off can leave tiny negative eigenvalues
            self.evals_a_.append(la.clamp_min(0))
            self.evecs_a_.append(qa)
            self.evals_s_.append(ls.clamp_min(0))
            self.evecs_s_.append(qs)
        self.diag_ = diag
        self.evals_: list[torch.Tensor] = [
            torch.outer(ls, la) for ls, la in zip(self.evals_s_, self.evals_a_)
        ]
        if self._correct:
            self.evals_ = self._correction_pass(curvature, layers, modules)
        self._finish_info(curvature)
        return self

    def _finish_info(self, curv: Curvature) -> None:
        lam = [e.flatten() for e in self.evals_] + [self.diag_]
        allv = torch.cat(lam) if lam else torch.zeros(1)
        self.info_ = {
            "layers": [lay["name"] or "(model)" for lay in self.layers_],
            "diagonal_parameters": list(self.diag_names_),
            "fisher": self.fisher,
            "max_eigenvalue": float(allv.max()) + self.shift_,
            "min_eigenvalue": float(allv.min()) + self.shift_,
            "shift": self.shift_,
            "eigenvalue_correction": self._correct,
        }
        if self.shift_ <= 0 and float(allv.min()) <= 0:
            raise InputError(
                f"{type(self).__name__}: the Kronecker-factored curvature is singular (some "
                "factor eigenvalues are 0) and l2 + damping = 0; pass damping > 0 (e.g. "
                f"damping={max(1e-3 * float(allv.max()), 1e-8):.3g})"
            )

    # ------------------------------------------------------------------ data passes
    def _hooks(self, layers: list[_Layer], modules: dict[str, nn.Module], store: dict):
        handles = []
        for lay in layers:

            def hook(mod, inputs, output, _name=lay.name):
                store.setdefault(_name, []).append((inputs[0], output))

            handles.append(modules[lay.name].register_forward_hook(hook))
        return handles

    @staticmethod
    def _activations(lay: _Layer, m: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``[B, T, in']``: the inputs of the layer at each of its ``T`` locations (+ a 1); for
        an Embedding the token ids ``[B, T]`` (its one-hot inputs are never formed), ``-1``
        where the id is the padding index (which gets no gradient)."""
        a = a.detach()
        if lay.kind == "embedding":
            ids = a.reshape(a.shape[0], -1)
            if lay.padding_idx is not None:
                ids = torch.where(ids == lay.padding_idx, torch.full_like(ids, -1), ids)
            return ids
        if lay.kind == "conv2d":
            assert isinstance(m, nn.Conv2d)
            pad = _conv_padding(m)
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
            a = cols.transpose(1, 2)  # [B, T, C_in*kh*kw]
        else:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
        if lay.w is None:
            a = a[..., :0]
        if lay.b is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        return a

    @staticmethod
    def _onehot_sum(ids: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
        """``[B, out, V]``: ``sum_t g_t e_{id_t}^T`` per example (an Embedding's gradient in
        ``W~ = W^T`` layout) without forming the one-hot inputs; ids ``-1`` contribute 0."""
        b, t, o = g.shape
        valid = (ids >= 0).to(g.dtype)[..., None]
        out = g.new_zeros(b, vocab, o)
        out.scatter_add_(1, ids.clamp_min(0)[..., None].expand(b, t, o), g * valid)
        return out.transpose(1, 2)

    @staticmethod
    def _out_grads(lay: _Layer, g: torch.Tensor) -> torch.Tensor:
        """``[B, T, out]`` from the gradient with respect to the layer output."""
        if lay.kind == "conv2d":
            return g.flatten(2).transpose(1, 2)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def _factor_columns(self, obj: Objective, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[m, B, *out_shape]``: vectors ``u`` with ``Lambda_i = sum_c u_ic u_ic^T`` (type-2),
        or the actual loss gradient (empirical Fisher, ``m = 1``). For ``"causal_lm"`` the
        output Hessian is block-diagonal over positions with ``V`` columns per position, so
        ``"ggn"`` and ``"sampled"`` both use its unbiased sampled-label factor
        (:func:`~inflens.losses.sampled_token_factor`, ``samples`` vectors)."""
        od = out.detach()
        if self.fisher == "empirical":
            o = od.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(obj.loss_fn(o, y).sum(), o)
            return g[None]
        if obj.builtin_loss and obj.loss_name == "causal_lm":
            return sampled_token_factor(od, y, self.samples, self._generator_)
        per_example = od[0].numel()
        need = od.shape[0] * per_example * per_example * od.element_size() * 3
        if output_hessian_factor(obj.loss_fn, od[:1], y[:1]) is None and need > 2**31:
            raise MemoryBudgetError(
                f"{type(self).__name__}: the output Hessians of {per_example} outputs per "
                f"example need about {need / 2**30:.1f} GiB per chunk; use fisher='empirical', "
                "a smaller batch_size, or a sequence loss such as loss='causal_lm'"
            )
        cols = output_hessian_factor(obj.loss_fn, od, y)
        if cols is None:
            cols = self._factor_columns_autograd(obj, od, y)
        if self.fisher == "sampled":
            gen = self._generator_
            signs = torch.randint(0, 2, (self.samples, cols.shape[0], od.shape[0]), generator=gen)
            signs = (2 * signs - 1).to(dtype=od.dtype, device=od.device)
            mixed = torch.einsum("smb,mbc->sbc", signs, cols.reshape(*cols.shape[:2], -1))
            return (mixed / self.samples**0.5).reshape(self.samples, *od.shape)
        return cols

    @staticmethod
    def _factor_columns_autograd(obj: Objective, od: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[C, B, *out_shape]`` factor columns of ``Lambda_i`` from its autograd Hessian."""
        hess = output_hessians(obj.loss_fn, od, y)  # [B, C, C]
        c = hess.shape[1]
        vals, vecs = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)))
        fac = vecs * vals.clamp_min(0).sqrt()[:, None, :]  # Lambda_i = fac fac^T
        return fac.permute(2, 0, 1).reshape(c, *od.shape)

    def _passes(self, curv: Curvature, layers: list[_Layer], modules, desc: str):
        """Yield ``(x, y, acts, colgrads)`` per chunk: the activations ``[B, T, in']`` of each
        layer and, per factor column ``u_c``, the gradients ``[B, T, out]`` at its outputs."""
        obj = curv.objective
        with obj.evaluating():
            for _, x, y in curv.chunks(desc=desc):
                store: dict[str, list] = {}
                handles = self._hooks(layers, modules, store)
                try:
                    th = obj.theta.detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = obj.predictions(th, x)
                finally:
                    for h in handles:
                        h.remove()
                acts = [self._activations(lay, modules[lay.name], store[lay.name][0][0])
                        for lay in layers]  # fmt: skip
                outs = [store[lay.name][0][1] for lay in layers]
                cols = self._factor_columns(obj, out, y)
                per_col = []
                for j in range(cols.shape[0] if layers else 0):
                    gs = torch.autograd.grad(
                        out, outs, grad_outputs=cols[j], retain_graph=j + 1 < cols.shape[0],
                        allow_unused=True,
                    )  # fmt: skip
                    per_col.append(
                        [
                            self._out_grads(lay, g if g is not None else torch.zeros_like(o))
                            for lay, g, o in zip(layers, gs, outs)
                        ]  # fmt: skip
                    )
                yield x, y, acts, per_col, cols

    def _reduce(self, curv: Curvature, tensors: list[torch.Tensor]) -> None:
        reduce = getattr(curv, "all_reduce", None)  # DistributedCurvature sums over ranks
        if reduce is not None:
            for t in tensors:
                reduce(t)

    def _factor_pass(self, curv: Curvature, layers: list[_Layer], modules):
        obj = curv.objective
        dt, dev = obj.dtype, obj.device
        a_fac = [torch.zeros(lay.dim_a, lay.dim_a, dtype=dt, device=dev) for lay in layers]
        s_fac = [torch.zeros(lay.out, lay.out, dtype=dt, device=dev) for lay in layers]
        diag = torch.zeros(self.diag_index_.numel(), dtype=dt, device=dev)
        for i, lay in enumerate(layers):
            if lay.diagonal_a:
                a_fac[i] = torch.zeros(lay.dim_a, dtype=dt, device=dev)
        for x, _y, acts, per_col, cols in self._passes(curv, layers, modules, "K-FAC factors"):
            for i, a in enumerate(acts):
                t = a.shape[1]
                if layers[i].diagonal_a:  # one-hot inputs: A = diag(token counts) / T
                    ids = a[a >= 0]
                    a_fac[i] += torch.bincount(ids, minlength=layers[i].dim_a).to(dt) / t
                    continue
                a2 = a.reshape(-1, a.shape[-1])
                a_fac[i] += a2.T @ a2 / t
            for grads in per_col:
                for i, g in enumerate(grads):
                    g2 = g.reshape(-1, g.shape[-1])
                    s_fac[i] += g2.T @ g2
            if diag.numel():
                diag += self._diag_chunk(obj, x, cols)
        self._reduce(curv, a_fac + s_fac + [diag])
        n = curv.n
        return [a / n for a in a_fac], [s / n for s in s_fac], diag / n

    def _diag_chunk(self, obj: Objective, x, cols: torch.Tensor) -> torch.Tensor:
        """``sum_i sum_c (J_i^T u_ic)^2`` restricted to the diagonal-fallback parameters.

        ``J_i^T u_i`` is the gradient of ``out_i . u_i`` in the diagonal parameters: the rows
        of a Jacobian over small sub-batches (examples do not interact), never ``vmap`` over
        examples, so every model that runs in whole batches works.
        """
        idx = self.diag_index_
        theta = obj.theta
        rows = JacobianBackend(obj)
        total = theta.new_zeros(idx.numel())
        for u in cols:

            def proj(tf: torch.Tensor, xs, us: torch.Tensor) -> torch.Tensor:
                out = obj.predictions(theta.index_put((idx,), tf), xs)
                return (out * us).reshape(us.shape[0], -1).sum(1)

            jac = rows.rows_jacobian(proj, theta[idx], x, u)  # [B, q]
            total += (jac**2).sum(0)
        return total

    def _correction_pass(self, curv: Curvature, layers: list[_Layer], modules):
        obj = curv.objective
        sums = [torch.zeros_like(e) for e in self.evals_]
        for _x, _y, acts, per_col, _cols in self._passes(
            curv, layers, modules, "EK-FAC eigenvalues"
        ):
            for i, a in enumerate(acts):
                qs, qa = self.evecs_s_[i], self.evecs_a_[i]
                if layers[i].diagonal_a:  # an Embedding: rotate the output side only
                    for grads in per_col:
                        rot = self._onehot_sum(a, grads[i] @ qs, layers[i].dim_a)
                        sums[i] += (rot**2).sum(0)
                    continue
                t, n_in, n_out = a.shape[1], a.shape[2], qs.shape[0]
                rotate_first = _rotate_factors_first(t, n_in, n_out, len(per_col))
                a_rot = a @ qa if rotate_first else a
                for grads in per_col:
                    g = grads[i]
                    if rotate_first:
                        g_rot = g @ qs
                        if t == 1:  # sum_b (g_b o a_b)^2 = (g^2)^T (a^2)
                            sums[i] += (g_rot[:, 0] ** 2).T @ (a_rot[:, 0] ** 2)
                            continue
                        rot = torch.einsum("bto,bta->boa", g_rot, a_rot)
                    else:
                        pg = torch.einsum("bto,bta->boa", g, a)
                        rot = qs.T @ pg @ qa
                    sums[i] += (rot**2).sum(0)
        self._reduce(curv, sums)
        del obj
        return [s / curv.n for s in sums]

    def _verify(self, curv: Curvature, layers: list[_Layer], modules) -> list[tuple[str, str]]:
        """Layers whose autograd gradient is not ``sum_t g_t a_t^T`` on a few examples."""
        if not layers:
            return []
        obj = curv.objective
        x, y = next(iter(curv.data.chunks(min(curv.chunk_size, 8))))[1:]
        x, y = to_device(x, obj.device), y.to(obj.device)
        store: dict[str, list] = {}
        handles = self._hooks(layers, modules, store)
        try:
            th = obj.theta.detach().requires_grad_(True)
            with obj.evaluating(), torch.enable_grad():
                out = obj.predictions(th, x)
                loss = obj.loss_fn(out, y).sum()
        finally:
            for h in handles:
                h.remove()
        bad: list[tuple[str, str]] = []
        calls = {lay.name: len(store.get(lay.name, [])) for lay in layers}
        ok = [lay for lay in layers if calls[lay.name] == 1]
        for lay in layers:
            if calls[lay.name] != 1:
                bad.append((lay.name, f"called {calls[lay.name]} times per forward pass"))
        if not ok:
            return bad
        outs = [store[lay.name][0][1] for lay in ok]
        grads = torch.autograd.grad(loss, [th, *outs], allow_unused=True)
        gth = grads[0]
        for lay, g, o in zip(ok, grads[1:], outs):
            g = torch.zeros_like(o) if g is None else g
            a = self._activations(lay, modules[lay.name], store[lay.name][0][0])
            if lay.diagonal_a:
                rebuilt = self._onehot_sum(a, self._out_grads(lay, g), lay.dim_a).sum(0)
            else:
                rebuilt = torch.einsum("bto,bta->oa", self._out_grads(lay, g), a)
            ref = lay.gather(gth[None])[0]
            scale = float(ref.abs().max()) + torch.finfo(obj.dtype).tiny
            if float((rebuilt - ref).abs().max()) > 1e-4 * scale:
                bad.append((lay.name, "its gradient is not (output gradient) x (input)"))
        return bad

    # ------------------------------------------------------------------ queries
    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "evals_"):
            raise NotFittedError(f"{type(self).__name__}.solve() was called before fit()")
        b = rhs.to(self.evecs_a_[0].dtype if self.evecs_a_ else self.diag_.dtype)
        out = torch.zeros_like(b)
        for i, d in enumerate(self.layers_):
            lay = _Layer(**d)
            qs, qa = self.evecs_s_[i], self.evecs_a_[i]
            mat = lay.gather(b)  # [k, out, in']
            diag_a = qa.numel() == 0  # an identity eigenbasis (a diagonal input factor)
            rot = qs.T @ mat if diag_a else qs.T @ mat @ qa
            rot = rot / (self.evals_[i] + self.shift_)
            lay.scatter(out, qs @ rot if diag_a else qs @ rot @ qa.T)
        if self.diag_index_.numel():
            idx = self.diag_index_
            out[:, idx] = b[:, idx] / (self.diag_ + self.shift_)
        return out

    def dense(self) -> torch.Tensor:
        """The explicit ``[p, p]`` approximation of ``G + (l2 + damping) I`` (for tests/small p)."""
        if not hasattr(self, "evals_"):
            raise NotFittedError(f"{type(self).__name__}.dense() was called before fit()")
        eye = torch.eye(self.p_, dtype=self.diag_.dtype, device=self.diag_.device)
        inv = self.solve(eye)
        return torch.linalg.inv(0.5 * (inv + inv.T))


class EKFAC(KFAC):
    """K-FAC with eigenvalue correction (George et al. 2018; Grosse et al. 2023).

    Same eigenbasis ``Q_S (x) Q_A`` as :class:`KFAC`, but the eigenvalues are the exact second
    moments of the per-example pseudo-gradients ``J_i^T u_ic`` in that basis (one more pass over
    the data). For a layer whose Gauss-Newton block is diagonal in the K-FAC basis (e.g. a
    single linear layer with the squared error) both equal the exact block.
    """

    name = "ekfac"
    _correct = True
