"""The curvature operator ``A = H + damping * I`` over the training set, matrix-free.

``H = (1/n) sum_i Hess_theta loss(z_i, theta_hat) + l2 * I`` is the Hessian of the regularised
mean risk (as in the paper's code); ``damping`` (Sec. 4.2) makes a non-convex or not-converged
model's quadratic surrogate convex. Products are exact full-data Hessian-vector products
(Pearlmutter's trick), summed over chunks of the training data.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import Data
from .errors import InputError
from .objective import Objective


def auto_chunk_size(n: int, p: int, itemsize: int, budget_bytes: int = 128 * 2**20) -> int:
    """Largest chunk whose ``[chunk, p]`` per-example gradient block fits ``budget_bytes``."""
    return int(max(1, min(n, budget_bytes // max(1, p * itemsize))))


class Curvature:
    """``A v = (H + damping I) v`` for the training data, with ``H`` as in the module docstring.

    Args:
        objective: the trained objective (model, loss, theta-hat, l2).
        data: the training data.
        damping: ``delta >= 0`` added to the diagonal.
        chunk_size: examples per vectorised chunk (``None``: derived from a memory budget).
        progress: show a progress bar on passes over the training set.
    """

    def __init__(
        self,
        objective: Objective,
        data: Data,
        damping: float = 0.0,
        chunk_size: int | None = None,
        progress: bool = True,
    ) -> None:
        if not (float(damping) >= 0.0):
            raise InputError(f"damping must be a non-negative number, got {damping}")
        self.objective = objective
        self.data = data
        self.damping = float(damping)
        self.n = len(data)
        self.p = objective.p
        self.dtype = objective.dtype
        self.device = objective.device
        self.chunk_size = chunk_size or auto_chunk_size(
            self.n, self.p, torch.finfo(self.dtype).bits // 8
        )
        self.progress = progress
        self.num_matvecs = 0

    @property
    def shift(self) -> float:
        """The multiple of the identity in ``A``: ``l2 + damping``."""
        return self.objective.l2 + self.damping

    def chunks(self, desc: str | None = None, check: bool = False):
        """Yield prepared ``(start, x, y)`` chunks, with a progress bar when ``desc`` is given."""
        it = self.data.chunks(self.chunk_size)
        if desc is not None:
            it = tqdm(
                it,
                total=self.data.num_chunks(self.chunk_size),
                desc=desc,
                disable=not self.progress,
                leave=False,
            )
        for start, x, y in it:
            x, y = (
                self.objective.prepare(x, y, self.data.name, start)
                if check
                else (
                    x.to(self.device),
                    y.to(self.device),
                )
            )
            yield start, x, y

    def matvec(self, vecs: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """``A @ v`` for each row of ``vecs [k, p]`` (or a single ``[p]`` vector)."""
        single = vecs.ndim == 1
        v = vecs.reshape(-1, self.p).to(self.dtype)
        out = torch.zeros_like(v)
        for _, x, y in self.chunks(desc):
            out += self.objective.hvp_sum(v, x, y)
        out = out / self.n + self.shift * v
        self.num_matvecs += v.shape[0]
        return out[0] if single else out

    def batch_matvec(self, vecs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mini-batch estimate ``((1/B) sum_{i in B} Hess loss(z_i) + (l2 + damping) I) v``."""
        return self.objective.hvp_sum(vecs, x, y) / x.shape[0] + self.shift * vecs

    def dense(self, block: int = 256) -> torch.Tensor:
        """The explicit ``[p, p]`` matrix ``A`` (p matrix-free products, blocked)."""
        eye = torch.eye(self.p, dtype=self.dtype, device=self.device)
        cols = []
        bar = tqdm(range(0, self.p, block), desc="Hessian", disable=not self.progress, leave=False)
        for s in bar:
            cols.append(self.matvec(eye[s : s + block]))
        a = torch.cat(cols, 0)
        return 0.5 * (a + a.T)

    def top_eigenvalue(self, iters: int = 30, seed: int = 0, rtol: float = 1e-3) -> float:
        """Largest-magnitude eigenvalue of ``A`` by power iteration (a few full passes)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.p, generator=g, dtype=self.dtype).to(self.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            w = self.matvec(v)
            new = float(v @ w)
            nrm = w.norm()
            if nrm == 0:
                return 0.0
            v = w / nrm
            if abs(new - lam) <= rtol * abs(new):
                return new
            lam = new
        return lam
