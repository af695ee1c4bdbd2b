"""LiSSA: the stochastic Neumann-series estimator of ``H^-1 v`` (Agarwal et al.; Sec. 3)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from tqdm.auto import tqdm

from ..curvature import Curvature, power_iteration
from ..data import index_batch, to_device
from ..errors import CurvatureError, InflensWarning, InputError, SolverDivergedError
from .base import Solver
from .exact import _round_up

#: steps whose mini-batch indices are drawn at once (one ``[BLOCK, batch_size]`` draw from the
#: repeat's generator, whatever the chain does: its index stream does not depend on when it
#: stops)
BLOCK = 256
#: first convergence checkpoint of the automatic depth; later ones follow at ``GROWTH`` times
#: the previous one
FIRST_CHECK = 50
#: largest number of examples gathered at once for a block of autograd steps
GATHER_MAX = 4096
GROWTH = 1.5


class _BatchOperator:
    """``A_j h = (1/B) sum_{i in batch} C_i h + (l2 + damping) h`` on training indices
    (``l2`` elementwise for a per-parameter l2).

    When the derivatives backend has per-example curvature factors (a Linear layer on frozen
    features: its inputs and output Hessians, the quantities
    :meth:`inflens.curvature.Curvature.reusing` keeps per chunk) they are computed once for
    the whole training set, within ``budget_bytes``, and a product gathers the mini-batch's
    rows of them; otherwise the examples are gathered and
    :meth:`~inflens.curvature.Curvature.batch_matvec` computes the product by autograd.
    """

    def __init__(self, curv: Curvature, budget_bytes: int = 2**30) -> None:
        self.curv = curv
        self.factors = self._all_factors(curv, budget_bytes)
        self.leaves, self.spec = tree_flatten(self.factors)

    @staticmethod
    def _all_factors(curv: Curvature, budget: int):
        obj = curv.objective
        parts = []
        used = 0
        with obj.evaluating():
            for _, x, y in curv.chunks():
                backend = obj.select_backend(x, y)
                hit = backend.curvature_factors(obj.theta, x, y)
                leaves = tree_leaves(hit)
                # only factors made of per-example rows can be gathered by index
                if hit is None or not all(
                    isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == y.shape[0]
                    for t in leaves
                ):
                    return None
                used += sum(t.numel() * t.element_size() for t in leaves)
                if used > budget:
                    return None
                parts.append(hit)
        if not parts:
            return None
        flat = [tree_flatten(h) for h in parts]
        spec = flat[0][1]
        cols = [torch.cat([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
        return tree_unflatten(cols, spec)

    def gather(self, idx: torch.Tensor):
        """What :meth:`product` needs for the examples ``idx [m]`` of a block of steps: the
        examples themselves when there are at most ``GATHER_MAX`` (one gather for many small
        steps), else the indices (rows gathered per step)."""
        if self.factors is None and idx.numel() <= GATHER_MAX:
            x, y = self.curv.data.get(idx)
            return to_device(x, self.curv.device), y.to(self.curv.device)
        return idx

    def product(self, h: torch.Tensor, batch, rows: slice) -> torch.Tensor:
        """``A_j h`` for the examples ``rows`` of a gathered ``batch``."""
        curv = self.curv
        if isinstance(batch, torch.Tensor):
            idx = batch[rows]
            if self.factors is not None:
                idx = idx.to(self.leaves[0].device)
                part = tree_unflatten([t[idx] for t in self.leaves], self.spec)
                prod = curv.objective.backend.product_from_factors(h, part)
                return curv.add_shift(prod / idx.numel(), h)
            x, y = curv.data.get(idx)
            return curv.batch_matvec(h, to_device(x, curv.device), y.to(curv.device))
        x, y = batch
        return curv.batch_matvec(h, index_batch(x, rows), y[rows])


class LiSSA(Solver):
    """Stochastic estimate of ``(H + damping I + scale * d I)^-1 v`` for all rows of ``v`` at once.

    Each repeat runs, for the whole ``[k, p]`` block of right-hand sides together,
    ``h_0 = v``, ``h_j = v + (1 - d) h_{j-1} - A_j h_{j-1} / scale``, where ``A_j`` is the
    Hessian (with ``l2`` and the Influence damping) on a fresh mini-batch of ``batch_size``
    training points drawn uniformly with replacement (the same mini-batch for every row). The
    fixed point is ``(A + scale * d * I)^-1 v``: LiSSA's own ``damping`` d is effectively
    ``scale * d``. Convergence needs the spectrum of ``A / scale`` inside (0, 2).

    Depth, two modes:

    - ``depth=None`` (default): chosen per row by a convergence test. Checkpoints fall at
      ``J_0 = 50`` steps and then ``J_m = ceil(1.5 J_{m-1})`` (and at ``max_depth``). The
      estimate at ``J_m`` is the mean of ``h_j / scale`` over ``J_{m-1} < j <= J_m`` (the
      iterates since the previous checkpoint: with mini-batches the last iterate alone keeps
      the full sampling noise however long the chain runs, their mean does not), or
      ``h_{J_m} / scale`` for the deterministic full batch. A row stops at the first
      checkpoint where ``||e_m - e_{m-1}|| <= tol ||e_m||`` and keeps ``e_m``; rows still
      moving at ``max_depth`` keep their last estimate and an :class:`InflensWarning` says by
      how much they missed. The two estimates are built from disjoint stretches of the chain,
      so their difference measures both the remaining drift and the sampling noise (the tests
      check the result within ``tol`` of the exact solve for the full batch and ``2 tol`` with
      mini-batches).
    - ``depth=T``: exactly ``T`` steps, estimate ``h_T / scale`` (the paper's code).

    The result is averaged over ``repeats`` independent chains. Rows are independent: a solve
    of ``k`` rows equals ``k`` one-row solves with the same seed (same mini-batches, same
    stopping checkpoints) to round-off.

    Before any solve, ``fit`` estimates the extreme eigenvalues of ``A`` (20 Lanczos steps)
    and refuses an indefinite or singular ``A`` with a :class:`CurvatureError` that names a
    damping that fixes it, as :class:`~inflens.solvers.Exact` does.

    Args:
        depth: ``None`` (automatic, above) or a fixed recursion depth (paper: 5000).
        repeats: independent chains averaged (paper: 10).
        scale: divides the loss so that ``||A|| / scale < 1`` (paper: 25). ``None``: the larger
            of 1.5 times a Lanczos estimate (20 full-data products) of the largest eigenvalue
            of ``A`` and, with mini-batches, the largest eigenvalue of ``A_j`` over
            ``scale_probes`` random mini-batches (power iteration) divided by 1.5: each step
            multiplies ``h`` by ``I - A_j / scale``, which must not expand it, and a single
            example's Hessian can be far larger than the average (on MNIST-LR with batch 1, 1.5
            times the average's top eigenvalue was 3.5 and diverged; the paper used 25).
        damping: LiSSA's own damping d (paper: 0).
        batch_size: training points per Hessian sample (paper: 1; ``None``: the full data, a
            deterministic Neumann iteration, run once whatever ``repeats`` says).
        seed: seed of the sampling generators (a fixed depth: one generator for all repeats, as
            in the paper's code; the automatic depth: one per repeat, derived from it).
        tol: relative change of the estimate between checkpoints at which a row stops
            (``depth=None`` only).
        max_depth: most steps per chain with ``depth=None``.
        estimate_spectrum: also when ``scale`` is given, estimate the extreme eigenvalues at
            ``fit`` (20 full-data products): the curvature diagnosis, the contraction per step
            and the warning when ``depth`` is too small to converge.
        scale_probes: at most this many mini-batches are probed for the automatic scale
            (``scale=None``): ``min(scale_probes, max(8, 1024 // batch_size))``.

    Speed: all rows share each product (one ``[k, p]`` block through the mini-batch), a top
    Linear layer's products come from per-example factors computed once per solve, the
    indices of 256 steps are drawn at once, the model stays in eval mode for the whole solve,
    and a single right-hand side of another model uses reverse-over-reverse autograd.
    """

    name = "lissa"

    def __init__(
        self,
        depth: int | None = None,
        repeats: int = 1,
        scale: float | None = None,
        damping: float = 0.0,
        batch_size: int | None = 64,
        seed: int = 0,
        *,
        tol: float = 0.05,
        max_depth: int = 10_000,
        estimate_spectrum: bool = True,
        scale_probes: int = 128,
    ) -> None:
        super().__init__()
        if (depth is not None and int(depth) < 1) or int(repeats) < 1:
            raise InputError(f"depth and repeats must be >= 1, got {depth}, {repeats}")
        if scale is not None and not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        if not 0 <= damping < 1:
            raise InputError(f"LiSSA damping d must lie in [0, 1), got {damping}")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer or None, got {batch_size}")
        if not (0 < tol < 1):
            raise InputError(f"tol must lie in (0, 1), got {tol}")
        if int(max_depth) < 1:
            raise InputError(f"max_depth must be >= 1, got {max_depth}")
        if not (isinstance(scale_probes, int) and scale_probes >= 0):
            raise InputError(f"scale_probes must be a non-negative integer, got {scale_probes!r}")
        self.depth = None if depth is None else int(depth)
        self.repeats = int(repeats)
        self.scale, self.damping = scale, float(damping)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)
        self.tol, self.max_depth = float(tol), int(max_depth)
        self.estimate_spectrum = bool(estimate_spectrum)
        self.scale_probes = scale_probes

    @classmethod
    def paper(cls, seed: int = 17) -> LiSSA:
        """The values of the paper's Fig. 2: depth 5000, repeats 10, scale 25, batch 1."""
        return cls(depth=5000, repeats=10, scale=25.0, damping=0.0, batch_size=1, seed=seed)

    # ------------------------------------------------------------------ fit
    def fit(self, curvature: Curvature) -> LiSSA:
        # only a successful fit marks the solver as fitted (a refused Hessian must not leave a
        # solver whose solve() runs on it)
        self.curvature_ = None
        self.info_ = {}
        ext: dict[str, float] = {}
        op = None
        if self.scale is None or self.estimate_spectrum:
            # 20 Lanczos steps: the largest eigenvalue to a few digits (for the scale) and an
            # upper estimate of the smallest (for the diagnosis and the convergence check)
            with curvature.reusing():
                ext = curvature.extreme_eigenvalues(iters=20, seed=self.seed)
            self.info_["estimated_max_eigenvalue"] = ext["max_eigenvalue"]
            self.info_["estimated_min_eigenvalue"] = ext["min_eigenvalue"]
            self._check_curvature(curvature, ext)
        if self.scale is None:
            self.scale_ = 1.5 * ext["max_eigenvalue"]
            op = _BatchOperator(curvature) if self._sampled(curvature.n) else None
            batch_max = self._batch_top_eigenvalue(curvature, op=op)
            if batch_max is not None:
                self.info_["estimated_max_batch_eigenvalue"] = batch_max
                self.scale_ = max(self.scale_, batch_max / 1.5)
        else:
            self.scale_ = float(self.scale)
        self.info_["scale"] = self.scale_
        self.info_["effective_damping"] = self.scale_ * self.damping
        if ext:
            # the deterministic part of the error after t steps shrinks like rho^t
            rho = max(
                abs(1 - self.damping - ext["min_eigenvalue"] / self.scale_),
                abs(1 - self.damping - ext["max_eigenvalue"] / self.scale_),
            )
            steps = self.depth if self.depth is not None else self.max_depth
            self.info_["contraction"] = rho
            self.info_["bias_factor"] = rho**steps if rho < 1 else None
        super().fit(curvature)
        return self

    def _sampled(self, n: int) -> bool:
        return self.batch_size is not None and self.batch_size < n

    def _damping_to_converge(
        self, curv: Curvature, lam_min: float, lam_max: float, scale: float | None = None
    ) -> float:
        """The damping (the total, present one included) with which ``A`` is positive definite
        and the series converges: the smallest eigenvalue becomes at least ``-lambda_min``,
        ``1e-3 lambda_max`` and ``2 s ln(10 / tol) / T`` with ``s`` the scale (at least the
        automatic ``1.5 lambda_max``), so that ``rho^(T/2) <= tol / 10`` after ``T = depth``
        or ``max_depth`` steps. Not rounded; at most the present damping when nothing is
        missing."""
        steps = self.depth if self.depth is not None else self.max_depth
        target = max(-lam_min, 1e-3 * lam_max, 1e-12)
        for _ in range(2):  # the damping raises lambda_max too: one more round settles it
            top = lam_max + max(target - lam_min, 0.0)
            s = max(1.5 * top, scale or 0.0)
            target = max(target, 2 * s * math.log(10 / self.tol) / steps)
        return curv.damping + target - lam_min

    def _check_curvature(self, curv: Curvature, ext: dict[str, float]) -> None:
        """Refuse an indefinite or singular ``A`` (Lanczos estimates), naming a damping that
        fixes it; the Neumann series cannot converge to ``A^-1`` there."""
        lam_min, lam_max = ext["min_eigenvalue"], ext["max_eigenvalue"]
        tol = 100 * torch.finfo(curv.dtype).eps * max(abs(lam_max), 1e-30) * curv.p**0.5
        if lam_min < -tol:
            # the smallest Ritz value is an upper bound on lambda_min: sharpen it before
            # suggesting a damping (only on this error path)
            more = min(curv.p, 60)
            if more > ext["lanczos_steps"]:
                with curv.reusing():
                    lam_min = min(lam_min, float(curv.lanczos(iters=more, seed=self.seed)[0][0]))
            suggest = _round_up(self._damping_to_converge(curv, lam_min, lam_max, self.scale))
            raise CurvatureError(
                f"the Hessian plus damping is indefinite: most negative eigenvalue about "
                f"{lam_min:.4g} (Lanczos estimate, largest {lam_max:.4g}); LiSSA's Neumann "
                "series diverges along it and the model is not at a minimum of a convex "
                f"objective. Pass a damping larger than {abs(lam_min) + curv.damping:.3g}, e.g. "
                f"damping={suggest:.3g} (Sec. 4.2), or use curvature='ggn'"
            )
        if lam_min <= tol:
            suggest = _round_up(self._damping_to_converge(curv, lam_min, lam_max, self.scale))
            raise CurvatureError(
                f"the Hessian plus damping is singular: smallest eigenvalue about {lam_min:.3g} "
                f"(Lanczos estimate, largest {lam_max:.4g}); H^-1 does not exist and LiSSA's "
                f"series grows without bound. Pass damping > 0 (e.g. "
                f"damping={suggest:.3g}) or train with l2 > 0"
            )

    def _batch_top_eigenvalue(
        self,
        curv: Curvature,
        iters: int = 15,
        probes: int | None = None,
        op: _BatchOperator | None = None,
    ) -> float | None:
        """Largest eigenvalue of the mini-batch operator ``A_j`` over ``scale_probes`` random
        mini-batches of ``batch_size`` (power iteration, ``iters`` products each), or None
        for full-batch LiSSA."""
        n = curv.n
        probes = self.scale_probes if probes is None else probes
        if not self._sampled(n) or probes == 0:
            return None
        op = op or _BatchOperator(curv)
        bs = int(self.batch_size)  # type: ignore[arg-type]
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        # larger mini-batches concentrate around A: fewer probes (about 1,024 examples in all,
        # at least 8 batches), so the probe stays a small fraction of the solve
        probes = min(probes, max(8, 1024 // bs), max(1, n // bs))
        idx = torch.randperm(n, generator=g)[: probes * bs]
        batch = op.gather(idx)
        top = 0.0
        with curv.objective.evaluating():
            for b in range(probes):
                rows = slice(b * bs, (b + 1) * bs)
                v = torch.randn(curv.p, generator=g, dtype=curv.dtype).to(curv.device)
                lam = power_iteration(
                    lambda u, rows=rows: op.product(u[None], batch, rows)[0], v, iters
                )
                top = max(top, abs(lam))
        return top

    # ------------------------------------------------------------------ sampling
    def _generators(self) -> list[torch.Generator]:
        """The generator of each repeat. A fixed depth draws every repeat from one generator
        seeded with ``seed``, in the order of the paper's code (and of earlier inflens
        releases, whose results it reproduces); the automatic depth gives each repeat its own
        generator, seeded from ``seed``, so that its index stream does not depend on when the
        previous repeats stopped."""
        if self.depth is not None:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            return [g] * self.repeats
        master = torch.Generator(device="cpu").manual_seed(self.seed)
        seeds = torch.randint(2**62, (self.repeats,), generator=master).tolist()
        return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def _index_blocks(self, g: torch.Generator, n: int, steps: int) -> Iterator[torch.Tensor]:
        """Mini-batch indices ``[min(BLOCK, steps - j0), batch_size]`` for the steps
        ``j0, j0 + 1, ...`` of a chain of at most ``steps`` steps, drawn lazily."""
        bs = min(int(self.batch_size), n)  # type: ignore[arg-type]
        for j0 in range(0, steps, BLOCK):
            yield torch.randint(n, (min(BLOCK, steps - j0), bs), generator=g)

    def sample_indices(self, repeat: int, steps: int | None = None) -> torch.Tensor:
        """``[steps, batch_size]``: the training indices of the first ``steps`` mini-batches
        (default: all ``depth`` or ``max_depth``) of chain ``repeat``, the ones :meth:`solve`
        uses (after :meth:`fit`)."""
        curv = self._check_fitted()
        if not self._sampled(curv.n):
            raise InputError("full-batch LiSSA (batch_size=None or >= n) samples nothing")
        if not 0 <= repeat < self.repeats:
            raise InputError(f"repeat must lie in [0, {self.repeats - 1}], got {repeat}")
        length = self.depth if self.depth is not None else self.max_depth
        gens = self._generators()
        # a fixed depth shares one generator: the earlier repeats' draws come first
        first = 0 if self.depth is None else repeat
        for r in range(first, repeat + 1):
            chain = torch.cat(list(self._index_blocks(gens[r], curv.n, length)))
        return chain[: length if steps is None else steps]

    # ------------------------------------------------------------------ errors and warnings
    def _diverged(self, curv: Curvature, step: int, norm: float) -> SolverDivergedError:
        lam = self.info_.get("estimated_max_eigenvalue")
        if lam is None:
            with curv.reusing():
                ext = curv.extreme_eigenvalues(iters=20, seed=self.seed)
            lam = ext["max_eigenvalue"]
            self._check_curvature(curv, ext)  # an indefinite A is the cause, not the scale
        batch = self.info_.get("estimated_max_batch_eigenvalue")
        if batch is None:  # probe the mini-batches now, for a scale that covers them
            batch = self._batch_top_eigenvalue(curv, probes=max(self.scale_probes, 32))
        suggest = max(1.5 * lam, 2 * self.scale_, (batch or 0.0) / 1.5)
        seen = f" (mini-batch Hessians up to about {batch:.4g} in a sample)" if batch else ""
        hint = (
            "the automatic choice missed mini-batches with larger curvature"
            if self.scale is None
            else "or scale=None to choose it automatically"
        )
        return SolverDivergedError(
            f"LiSSA diverged at step {step} (||h|| = {norm:.3g}): the scale {self.scale_:.4g} "
            f"is too small for a Hessian whose largest eigenvalue is about {lam:.4g}{seen}; "
            f"try scale >= {suggest:.3g} ({hint}), or a larger batch_size"
        )

    def _warn_fixed_depth(self) -> None:
        bias = self.info_.get("bias_factor")
        if "contraction" not in self.info_ or (bias is not None and bias <= 0.05):
            return
        rho = self.info_["contraction"]
        if bias is None:
            # rho >= 1: the iteration cannot converge even if ||h|| has not yet grown past the
            # blow-up check (short depth)
            lam = self.info_["estimated_max_eigenvalue"]
            raise SolverDivergedError(
                f"LiSSA cannot converge: with scale {self.scale_:.4g} the error is multiplied by "
                f"about {rho:.3g} >= 1 per step (estimated eigenvalues of the Hessian from "
                f"{self.info_['estimated_min_eigenvalue']:.3g} to {lam:.4g}); try scale >= "
                f"{max(1.5 * lam, 2 * self.scale_):.3g} (or scale=None), or add damping if the "
                "smallest eigenvalue is not positive"
            )
        need = math.ceil(math.log(0.01) / math.log(rho)) if 0 < rho < 1 else None
        lam_min = self.info_["estimated_min_eigenvalue"]
        fix = f"raise depth to about {need}" if need else "raise scale"
        warnings.warn(
            f"LiSSA is far from converged: after depth={self.depth} steps the Neumann series "
            f"still misses about {100 * bias:.0f}% of the component along the smallest "
            f"eigenvalue (~{lam_min:.3g}) of the Hessian (contraction {rho:.6f} per step with "
            f"scale {self.scale_:.4g}); {fix}, add damping, or use solver='cg' / 'arnoldi'",
            InflensWarning,
            stacklevel=3,
        )

    def _warn_not_converged(self, curv: Curvature, missed: torch.Tensor) -> None:
        k = int(missed.numel())
        if k == 0:
            return
        worst = float(missed.max())
        lam_min = self.info_.get("estimated_min_eigenvalue")
        lam_max = self.info_.get("estimated_max_eigenvalue")
        damping = (
            self._damping_to_converge(curv, lam_min, lam_max, self.scale_)
            if lam_min is not None and lam_max is not None
            else curv.damping
        )
        if damping > curv.damping:
            fix = (
                f"the series converges too slowly for the smallest eigenvalue (about "
                f"{lam_min:.3g}, scale {self.scale_:.4g}): add damping (e.g. damping="
                f"{_round_up(damping):.3g} converges within max_depth) or raise max_depth"
            )
        else:
            # the deterministic part converges well within max_depth: what is left is the
            # sampling noise of the last stretch of the chain
            fix = (
                f"raise batch_size (now {self.batch_size}; the noise falls like "
                "1/sqrt(batch_size * depth)), raise max_depth, or loosen tol"
            )
        warnings.warn(
            f"LiSSA did not converge within max_depth={self.max_depth} steps for {k} "
            f"right-hand side(s): the estimate still changed by {worst:.2e} (relative) between "
            f"the last checkpoints, tol {self.tol:.0e}; {fix}, or use solver='cg' / 'arnoldi'",
            InflensWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ solve
    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``[k, p] -> [k, p]``: the estimate of ``(A + scale d I)^-1`` applied to each row."""
        curv = self._check_fitted()
        v = rhs.to(curv.dtype)
        n = curv.n
        sampled = self._sampled(n)
        repeats = self.repeats if sampled else 1  # identical repeats would only cost time
        depth = getattr(self, "depth", None)
        adaptive = depth is None
        steps = self.max_depth if adaptive else depth
        op = _BatchOperator(curv) if sampled else None
        total = torch.zeros_like(v)
        depths = torch.zeros(v.shape[0], dtype=torch.long)
        changes = torch.zeros(v.shape[0], dtype=v.dtype)
        bar = tqdm(total=repeats * steps, desc="LiSSA", disable=not curv.progress, leave=False)
        t0 = time.perf_counter()
        done_steps = 0
        gens = self._generators() if sampled else [None] * repeats
        with curv.objective.evaluating(), curv.reusing():
            for g in gens:
                est, used, change = self._chain(curv, v, g, op, steps, adaptive, bar)
                total += est
                depths = torch.maximum(depths, used)
                changes = torch.maximum(changes, change)
                done_steps += int(used.max()) if used.numel() else 0
        bar.close()
        self.info_["seconds_per_step"] = (time.perf_counter() - t0) / max(done_steps, 1)
        if adaptive:
            self.info_.setdefault("depths", []).extend(depths.tolist())
            self.info_.setdefault("relative_changes", []).extend(changes.tolist())
            self.info_["depth"] = int(depths.max()) if depths.numel() else 0
            self._warn_not_converged(curv, changes[changes > self.tol])
        else:
            self._warn_fixed_depth()
        return total / repeats

    def _chain(
        self,
        curv: Curvature,
        v: torch.Tensor,
        g: torch.Generator | None,
        op: _BatchOperator | None,
        steps: int,
        adaptive: bool,
        bar,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chain for every row of ``v``: ``(estimate, steps used, last relative change)``
        per row (the change is 0 in the fixed-depth mode)."""
        k = v.shape[0]
        scale, damp = self.scale_, 1 - self.damping
        out = torch.zeros_like(v)
        used = torch.full((k,), steps, dtype=torch.long)
        change = torch.zeros(k, dtype=v.dtype)
        # the rows still running, compacted: ``rows`` maps them to the rows of ``v``
        rows = torch.arange(k)
        va, h = v.clone(), v.clone()
        # sum of the iterates since the last checkpoint (sampled chains, automatic depth)
        acc = torch.zeros_like(v) if op is not None and adaptive else None
        prev: torch.Tensor | None = None  # estimate at the previous checkpoint
        last_check, next_check = 0, min(FIRST_CHECK, steps)
        vnorm = v.norm(dim=1).clamp_min(1e-30)
        last_norm = vnorm.clone()
        guard_every = 64 if adaptive else max(1, steps // 50)
        blocks = self._index_blocks(g, curv.n, steps) if op is not None else None  # type: ignore[arg-type]
        batch, bs, pos, batch_len = None, 0, 0, 0
        for j in range(1, steps + 1):
            if op is not None:
                if batch is None or pos * bs == batch_len:
                    idx = next(blocks)  # type: ignore[arg-type]
                    bs, batch_len = idx.shape[1], idx.numel()
                    batch, pos = op.gather(idx.reshape(-1)), 0
                ah = op.product(h, batch, slice(pos * bs, (pos + 1) * bs))
                pos += 1
            else:
                ah = curv.matvec(h)
            h = va + damp * h - ah / scale
            if acc is not None:
                acc += h
            if j % guard_every == 0 or j == steps:
                norm = h.norm(dim=1)
                bar.update(guard_every if j % guard_every == 0 else j % guard_every)
                # a convergent series grows at most linearly; geometric growth is divergence
                blown = ~torch.isfinite(norm) | ((norm > 1e6 * vnorm) & (norm > 4 * last_norm))
                if bool(blown.any()):
                    bar.close()
                    raise self._diverged(curv, j, float(norm.max()))
                last_norm = norm
            if adaptive and j == next_check:
                est = h / scale if acc is None else acc / ((j - last_check) * scale)
                if prev is None:
                    change[rows] = float("inf")
                    stop = torch.full((rows.numel(),), j == steps)
                else:
                    tiny = torch.finfo(v.dtype).tiny
                    rel = (est - prev).norm(dim=1) / est.norm(dim=1).clamp_min(tiny)
                    change[rows] = rel
                    stop = (rel <= self.tol) | (j == steps)
                out[rows[stop]] = est[stop]
                used[rows[stop]] = j
                if bool(stop.any()):
                    keep = ~stop
                    rows, va, h, est = rows[keep], va[keep], h[keep], est[keep]
                    vnorm, last_norm = vnorm[keep], last_norm[keep]
                    if acc is not None:
                        acc = acc[keep]
                if rows.numel() == 0:
                    bar.update(steps - j)
                    break
                prev = est
                if acc is not None:
                    acc.zero_()
                last_check, next_check = j, min(math.ceil(GROWTH * j), steps)
        if not adaptive:
            out = h / scale
        return out, used, change
