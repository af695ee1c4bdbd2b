"""The one conjugate-gradient iteration: batched, optionally preconditioned, matrix-free.

:class:`inflens.solvers.CG` solves with the curvature operator of a fitted
:class:`~inflens.Influence`; callers that hold their own symmetric positive definite operator
(an explicit matrix, a closed form on features, a sparse design matrix) use
:func:`conjugate_gradient` directly instead of writing the iteration again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CurvatureError

__all__ = ["CGResult", "conjugate_gradient"]

#: ``(v [a, p], rows [a]) -> A_rows v``: the operator applied to the rows ``rows`` of the batch
#: (each row of ``b`` may have its own operator; most callers ignore ``rows``).
MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CGResult:
    """``x [k, p]``, iterations per row ``[k]`` and the recursive residual norms ``[k]``."""

    x: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor

    def converged(self, b: torch.Tensor, tol: float) -> torch.Tensor:
        """``[k]`` True where ``||r|| <= tol ||b||`` (the recursive residual)."""
        return self.residual_norm <= tol * b.norm(dim=1)


def conjugate_gradient(
    matvec: MatVec,
    b: torch.Tensor,
    tol: float,
    max_iter: int,
    precondition: MatVec | None = None,
    x0: torch.Tensor | None = None,
) -> CGResult:
    """Solve ``A_j x_j = b_j`` for every row ``j`` of ``b [k, p]`` by (preconditioned) CG.

    Each row stops on its own once ``||b_j - A_j x_j|| <= tol ||b_j||`` (the recursive
    residual); converged rows are not multiplied again. ``A_j`` must be symmetric positive
    definite, and so must the preconditioner ``M_j ~ A_j^-1`` (``z = M r``) when given.

    Args:
        matvec: ``(v [a, p], rows [a]) -> [a, p]``, the operator of the rows ``rows``.
        b: right-hand sides ``[k, p]`` (a ``[p]`` vector is treated as one row).
        tol: relative residual tolerance.
        max_iter: iteration cap; rows not converged by then are returned as they are (check
            :meth:`CGResult.converged`).
        precondition: ``(r [a, p], rows [a]) -> M r``; ``None``: plain CG.
        x0: starting point ``[k, p]`` (warm start); default zero.

    Raises:
        CurvatureError: a search direction with ``d^T A d <= 0`` (``A`` is not positive
            definite).
    """
    single = b.ndim == 1
    b2 = b.reshape(1, -1) if single else b
    k = b2.shape[0]
    all_rows = torch.arange(k, device=b2.device)
    if x0 is None:
        x = torch.zeros_like(b2)
        r = b2.clone()
    else:
        x = x0.reshape(b2.shape).to(b2).clone()
        r = b2 - matvec(x, all_rows)
    z = r if precondition is None else precondition(r, all_rows)
    d = z.clone()
    rz = (r * z).sum(1)
    rnorm = r.norm(dim=1)
    bound = float(tol) * b2.norm(dim=1)
    iters = torch.zeros(k, dtype=torch.long, device=b2.device)
    for _ in range(int(max_iter)):
        active = rnorm > bound
        if not bool(active.any()):
            break
        rows = active.nonzero()[:, 0]
        ad = matvec(d[rows], rows)
        dad = (d[rows] * ad).sum(1)
        if bool((dad <= 0).any()):
            raise CurvatureError(
                "conjugate gradients met a direction of non-positive curvature (d^T A d = "
                f"{float(dad.min()):.3g}): the operator is not positive definite; add damping "
                "or l2 regularisation"
            )
        alpha = rz[rows] / dad
        x[rows] += alpha[:, None] * d[rows]
        r[rows] -= alpha[:, None] * ad
        r_a = r[rows]
        z_a = r_a if precondition is None else precondition(r_a, rows)
        rz_new = (r_a * z_a).sum(1)
        d[rows] = z_a + (rz_new / rz[rows])[:, None] * d[rows]
        rz[rows] = rz_new
        rnorm[rows] = r_a.norm(dim=1)
        iters[rows] += 1
    if single:
        return CGResult(x[0], iters, rnorm)
    return CGResult(x, iters, rnorm)
