"""Several processes (``torch.distributed``), one answer: the training set split across ranks.

Launch the same script on every rank (``torchrun --nproc_per_node=N script.py``); in it::

    inflens.distributed.init()                       # gloo on CPU, NCCL when theta is on a GPU
    inf = DistributedInfluence(obj, (X, y)).fit()    # same arguments as Influence
    scores = inf.loss_influence(test)                # [n_test, n] on every rank

Rank ``r`` of ``W`` owns the contiguous training range ``[r n / W, (r + 1) n / W)``.

- Curvature: :class:`DistributedCurvature` computes ``sum_{i in shard} Hess loss(z_i) v`` on
  its range and all-reduces the sums before dividing by ``n``, so every rank sees the full-data
  product; the solvers (Exact, CG, LiSSA, any that use ``matvec``) run unchanged and identically
  on every rank. LiSSA samples mini-batches from the whole data with its own seeded generator,
  so it is simply repeated on every rank.
- Scoring: each rank scores its range; the blocks are all-gathered into the full ``[k, n]``
  matrix (or, with :func:`inflens.artifacts.score_to_folder` and
  :meth:`DistributedInfluence.my_chunks`, each rank writes its own chunk files).

The user's model is never wrapped in ``DistributedDataParallel``: only sums of Hessian-vector
products and score blocks cross process boundaries. Results equal the single-process ones up to
the order of floating-point summation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .curvature import Curvature
from .data import Data, to_device
from .errors import InputError
from .influence import Influence
from .objective import Objective


def init(backend: str | None = None, device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world).

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``device`` is a CUDA device
    (or ``LOCAL_RANK`` is set with CUDA available), else ``"gloo"``. A group that is already
    initialised is kept. Without torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) this is a single process: ``(0, 1)`` and nothing is initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        on_gpu = torch.cuda.is_available() and (
            device is None or torch.device(device).type == "cuda"
        )
        backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[lo, hi)`` of rank ``rank``: sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _shard_data(data: Data, lo: int, hi: int) -> Data:
    return data.subset(lo, hi)


def all_gather_columns(block: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``[k, n_r]`` block along columns, in rank order -> ``[k, n]``.

    Blocks are padded to the largest shard for ``all_gather`` (which needs equal shapes).
    """
    if world_size == 1:
        return block
    width = max(hi - lo for lo, hi in (shard_range(n, r, world_size) for r in range(world_size)))
    pad = block.new_zeros(block.shape[0], width)
    pad[:, : block.shape[1]] = block
    parts = [torch.empty_like(pad) for _ in range(world_size)]
    dist.all_gather(parts, pad.contiguous())
    out = []
    for r, part in enumerate(parts):
        lo, hi = shard_range(n, r, world_size)
        out.append(part[:, : hi - lo])
    return torch.cat(out, 1)


class DistributedCurvature(Curvature):
    """:class:`Curvature` whose full-data passes cover only this rank's shard, then all-reduce.

    ``matvec`` (and so ``dense``, ``top_eigenvalue`` and every solver built on them) returns
    the full-data product on every rank. ``chunks()`` yields the shard's chunks with *global*
    start indices; with ``check=True`` it yields the whole data set (input validation).
    """

    def __init__(
        self,
        objective: Objective,
        data: Data,
        damping: float = 0.0,
        chunk_size: int | None = None,
        progress: bool = True,
        group: dist.ProcessGroup | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        super().__init__(objective, data, damping, chunk_size, progress, budget_bytes=budget_bytes)
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        self.lo, self.hi = shard_range(self.n, self.rank, self.world_size)
        self.shard = _shard_data(data, self.lo, self.hi) if self.hi > self.lo else None
        # only rank 0 draws progress bars
        self.progress = progress and self.rank == 0

    def chunks(self, desc: str | None = None, check: bool = False, chunk_size: int | None = None):
        if check or self.world_size == 1:
            yield from super().chunks(desc, check, chunk_size)
            return
        yield from self._shard_chunks(chunk_size)

    def _shard_chunks(
        self, chunk_size: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if self.shard is None:
            return
        for start, x, y in self.shard.chunks(chunk_size or self.chunk_size):
            yield self.lo + start, to_device(x, self.device), y.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (no-op for one process)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


class DistributedInfluence(Influence):
    """:class:`Influence` over ``torch.distributed`` ranks; every query returns the full result.

    Takes the same arguments as :class:`Influence` (call :func:`init` first, or launch with
    torchrun and let it be called on ``fit``). Each rank must pass the *same* model and the
    same full training data; each uses only its shard for curvature passes and scoring.
    """

    curvature_class = DistributedCurvature

    def fit(self) -> DistributedInfluence:
        init(device=self.objective.device)
        super().fit()
        if not isinstance(self.curvature_, DistributedCurvature):
            raise InputError(
                "DistributedInfluence needs an Influence.fit that builds self.curvature_class"
            )
        return self

    @property
    def rank(self) -> int:
        return self._dist().rank

    @property
    def world_size(self) -> int:
        return self._dist().world_size

    def _dist(self) -> DistributedCurvature:
        curv = self._fitted()
        assert isinstance(curv, DistributedCurvature)
        return curv

    def score(self, vecs: torch.Tensor, indices=None) -> torch.Tensor:
        """As :meth:`Influence.score`; without ``indices`` each rank scores its shard, gathered."""
        if indices is not None:
            return super().score(vecs, indices)
        curv = self._dist()
        if curv.world_size == 1:
            return super().score(vecs)
        vecs = vecs.reshape(-1, self.objective.p).to(self.objective.dtype)
        if curv.hi > curv.lo:
            block = super().score(vecs, torch.arange(curv.lo, curv.hi))
        else:
            block = vecs.new_zeros(vecs.shape[0], 0)
        return all_gather_columns(block, curv.n, curv.world_size)

    def self_influence(self, include_l2_gradient: bool = True) -> torch.Tensor:
        """As :meth:`Influence.self_influence`, each rank on its shard, gathered to ``[n]``."""
        curv = self._dist()
        if curv.world_size == 1:
            return super().self_influence(include_l2_gradient)
        obj, c, w = self.objective, curv.chunk_size, curv.world_size
        sizes = [hi - lo for lo, hi in (shard_range(curv.n, r, w) for r in range(w))]
        out = []
        # a solver may all-reduce inside solve (CG's matvecs), so every rank must solve the
        # same right-hand sides: in round t the ranks pool their t-th chunks and solve together
        for t in range(-(-max(sizes) // c)):
            rows = [max(0, min(c, s - t * c)) for s in sizes]
            lo = curv.lo + t * c
            if rows[curv.rank]:
                x, y = self._get_train(torch.arange(lo, lo + rows[curv.rank]))
                g = obj.per_example_grads(x, y, "loss")
            else:
                g = obj.theta.new_zeros(0, obj.p)
            gt = g + obj.regularizer_grad(obj.theta) if include_l2_gradient else g
            pad = obj.theta.new_zeros(c, obj.p)
            pad[: gt.shape[0]] = gt
            parts = [torch.empty_like(pad) for _ in range(w)]
            dist.all_gather(parts, pad, group=curv.group)
            sol = self.solver.solve(torch.cat([p_[:r] for p_, r in zip(parts, rows)]))
            off = sum(rows[: curv.rank])
            out.append(-(g * sol[off : off + rows[curv.rank]]).sum(1))
        return all_gather_columns(torch.cat(out)[None], curv.n, w)[0]

    def my_chunks(self, chunk_size: int) -> list[int]:
        """Score-chunk numbers this rank writes in :func:`inflens.artifacts.score_to_folder`."""
        curv = self._dist()
        num = -(-curv.n // int(chunk_size))
        return list(range(curv.rank, num, curv.world_size))
