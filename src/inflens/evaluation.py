"""Attribution quality the way the field measures it: LDS, brittleness, mislabel detection.

Every function here takes a score matrix from *any* attribution method (inflens's solvers, a
gradient dot product, a peer library), in ``loss_influence`` units and orientation:
``scores[t, i]`` ~ ``I_up,loss(z_i, z_t)``, **negative = helpful** (upweighting ``z_i`` lowers
the loss at ``z_t``). Scale does not matter (everything is rank based), the sign does.

- :func:`lds`: the linear datamodeling score (Park et al., TRAK, 2023). For random training
  subsets ``S_j`` (boolean rows of ``masks``) the datamodel predicts the test loss of a model
  trained on ``S_j`` as ``sum_{i in S_j} scores[t, i]`` (a test loss grows with the summed
  upweighting influence of the kept points); LDS is the Spearman correlation over the subsets
  between that prediction and the measured loss ``outputs[j, t]``, one value per test point.
- :func:`linear_datamodeling_score`: builds the ground truth (retrains on ``m`` random
  subsets, checkpointed one file per finished subset and resumable, in several processes) and
  scores a matrix against it; :func:`lds_ground_truth` builds the ground truth alone so that
  many methods can be scored against the same retrained models.
- :func:`brittleness`: for each test point, the smallest ``k`` on a grid such that removing
  its ``k`` strongest proponents (most negative scores) and retraining changes the prediction.
- :func:`mislabel_detection`: ROC AUC of a per-training-point suspicion score against known
  label noise, and the fraction-found vs fraction-inspected curve.

Retraining functions have the signature ``retrain(keep, seed) -> tensor [n_test]``: ``keep`` is
a boolean ``[n_train]`` mask of the training points to use and ``seed`` an integer for any
randomness of training (ignored by deterministic convex refits). :class:`ObjectiveRetrain` is
one for an :class:`inflens.Objective` (exact refits with :mod:`inflens.train`).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Data, DataLike
from .errors import InflensWarning, InputError, SolverDivergedError
from .fingerprint import json_fingerprint
from .influence import Influence
from .objective import Objective
from .train import fit_lbfgs, fit_newton, loo_weights

__all__ = [
    "BrittlenessConfig",
    "BrittlenessResult",
    "LDSConfig",
    "LDSGroundTruth",
    "LDSResult",
    "MislabelResult",
    "ObjectiveRetrain",
    "bootstrap_interval",
    "brittleness",
    "default_workers",
    "lds",
    "lds_ground_truth",
    "lds_ground_truth_batched",
    "linear_datamodeling_score",
    "mislabel_detection",
    "subset_masks",
]

Retrain = Callable[[torch.Tensor, int], Any]
RetrainBatch = Callable[[torch.Tensor, torch.Tensor], Any]

_GROUND_TRUTH_FORMAT = 1


# ------------------------------------------------------------------------------ helpers
def _matrix(a: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(a.detach().cpu() if isinstance(a, torch.Tensor) else a)
    if t.ndim != 2:
        raise InputError(f"{name} must be a 2-d matrix, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{name} has {bad} NaN/inf entries; LDS needs finite values")
    return t


def _bool_matrix(a: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(a.detach().cpu() if isinstance(a, torch.Tensor) else a)
    if t.ndim != 2:
        raise InputError(f"{name} must be a 2-d matrix, got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise InputError(f"{name} must be boolean (or 0/1), got other values")
        t = t != 0
    return t


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share the mean of their ranks)."""
    from scipy.stats import rankdata

    return rankdata(a, method="average", axis=0)


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each column pair (Pearson of average ranks); NaN where a column is
    constant (its ranks are all equal, so the centred ranks are exactly zero)."""
    ra = _ranks(a)
    rb = _ranks(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    num = (ra * rb).sum(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    out = np.full(a.shape[1], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return np.clip(out, -1.0, 1.0)


def lds(scores: Any, masks: Any, outputs: Any) -> torch.Tensor:
    """Linear datamodeling score per test point.

    ``rho_t = Spearman_j( sum_i masks[j, i] * scores[t, i],  outputs[j, t] )`` over the ``m``
    subsets ``j``, with average ranks for ties. ``scores`` are in ``loss_influence`` units
    (negative = helpful), so a good method has ``rho_t`` near +1: the test loss grows with the
    summed upweighting influence of the kept points.

    Args:
        scores: ``[n_test, n_train]`` scores of any attribution method.
        masks: ``[m, n_train]`` boolean, the training points kept in each subset.
        outputs: ``[m, n_test]`` measured test losses of the models trained on each subset.

    Returns:
        ``[n_test]`` float64. A test point whose predicted or measured column is constant over
        the subsets has no defined rank correlation: it is NaN, and an
        :class:`~inflens.errors.InflensWarning` says how many there are.
    """
    s = _matrix(scores, "scores")
    mk = _bool_matrix(masks, "masks")
    out = _matrix(outputs, "outputs")
    n_test, n_train = s.shape
    m = mk.shape[0]
    if mk.shape[1] != n_train:
        raise InputError(
            f"masks has {mk.shape[1]} columns but scores has {n_train} training points "
            "(masks must be [m, n_train], scores [n_test, n_train])"
        )
    if out.shape != (m, n_test):
        raise InputError(
            f"outputs must be [m, n_test] = [{m}, {n_test}] (one row per subset, one column "
            f"per test point), got {tuple(out.shape)}"
        )
    if m < 3:
        raise InputError(f"a rank correlation needs at least 3 subsets, got {m}")
    predicted = (mk.to(torch.float64) @ s.T).numpy()  # [m, n_test]
    rho = _spearman_columns(predicted, out.numpy())
    bad = int(np.isnan(rho).sum())
    if bad:
        warnings.warn(
            f"{bad} of {n_test} test points have a constant predicted or measured loss over "
            f"the {m} subsets, so their Spearman correlation is undefined; they are NaN in "
            "the result and left out of means (check for all-zero score rows or a retraining "
            "that ignores the subset)",
            InflensWarning,
            stacklevel=2,
        )
    return torch.from_numpy(rho)


def bootstrap_interval(
    values: Any, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the finite entries and its percentile bootstrap interval (resampling entries).

    Returns ``(mean, low, high)``; the interval is NaN with fewer than two finite values.
    """
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    v = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(int(n_boot), v.size))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return mean, float(lo), float(hi)


def _subset_generator(seed: int, j: int) -> torch.Generator:
    # one independent stream per subset: subset j does not depend on how many subsets exist,
    # so a run can be extended to more subsets and reuse the finished ones
    state = np.random.SeedSequence([int(seed), int(j)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _job_seed(seed: int, j: int, s: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(j), int(s), 1]).generate_state(1)[0])


def subset_masks(n_train: int, fraction: float, n_subsets: int, seed: int = 0) -> torch.Tensor:
    """``[n_subsets, n_train]`` boolean masks, each keeping ``round(fraction * n_train)``
    points drawn uniformly without replacement; row ``j`` depends only on ``(seed, j)``."""
    k = int(round(fraction * n_train))
    if not 1 <= k < n_train:
        raise InputError(
            f"fraction {fraction} of {n_train} points keeps {k}; it must keep at least one "
            "point and drop at least one"
        )
    out = torch.zeros(int(n_subsets), int(n_train), dtype=torch.bool)
    for j in range(int(n_subsets)):
        out[j, torch.randperm(n_train, generator=_subset_generator(seed, j))[:k]] = True
    return out


# ------------------------------------------------------------------------------ processes
_WORKER_FN: Callable[..., Any] | None = None


def _init_worker(fn: Callable[..., Any], threads: int) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    torch.set_num_threads(threads)


def _call_worker(args: tuple) -> Any:
    assert _WORKER_FN is not None
    return _WORKER_FN(*args)


def default_workers() -> int:
    """``min(2, usable CPUs)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def _map_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    workers: int,
    on_result: Callable[[int, Any], None],
) -> None:
    """Run ``fn(*job)`` for every job, calling ``on_result(i, result)`` in the parent as each
    finishes. With ``workers > 1`` the jobs run in a process pool; on Linux the pool forks, so
    ``fn`` may be a closure (it is inherited, not pickled). A failing job stops the run after
    the results already finished have been handed to ``on_result``."""
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            on_result(i, fn(*job))
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork") if "fork" in methods else None
    ex = ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(fn, 1),
    )
    try:
        futures = {ex.submit(_call_worker, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            on_result(futures[fut], fut.result())
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _as_outputs(value: Any, n_test: int | None) -> np.ndarray:
    v = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    out = np.asarray(v, dtype=np.float64).reshape(-1)
    if n_test is not None and out.size != n_test:
        raise InputError(
            f"retrain returned {out.size} values, earlier subsets returned {n_test}; it must "
            "return one measured test loss per test point, [n_test]"
        )
    if not np.isfinite(out).all():
        raise InputError("retrain returned NaN/inf test losses")
    return out


# ------------------------------------------------------------------------------ LDS
@dataclass(frozen=True)
class LDSConfig:
    """Settings of :func:`linear_datamodeling_score` / :func:`lds_ground_truth`.

    Attributes:
        fraction: share of the training set kept in each subset (dattri and TRAK use 0.5).
        n_subsets: number of random subsets ``m``.
        seeds_per_subset: models trained per subset (different ``seed``); their test losses
            are averaged (the datamodel predicts the expected loss over training noise).
        seed: seed of the subsets and of the per-model training seeds.
        workers: processes that retrain concurrently (default ``min(2, CPUs)``; 1 = in this
            process).
        checkpoint: folder for the finished retrainings (one safetensors file each); a run
            started again with the same settings only retrains the missing ones, and a run
            with more subsets reuses the earlier ones.
        fingerprint: identity of the retraining problem (data, model, trainer), written into
            the checkpoint; resuming with another value is refused.
        n_boot, level: bootstrap resamples and level of the interval of the mean.
        progress: a progress bar over retrainings.
    """

    fraction: float = 0.5
    n_subsets: int = 100
    seeds_per_subset: int = 1
    seed: int = 0
    workers: int | None = None
    checkpoint: str | os.PathLike | None = None
    fingerprint: str = ""
    n_boot: int = 1000
    level: float = 0.95
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0 < float(self.fraction) < 1:
            raise InputError(f"fraction must be in (0, 1), got {self.fraction}")
        if int(self.n_subsets) < 3:
            raise InputError(f"n_subsets must be at least 3, got {self.n_subsets}")
        if int(self.seeds_per_subset) < 1:
            raise InputError(f"seeds_per_subset must be at least 1, got {self.seeds_per_subset}")
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        if int(self.n_boot) < 1 or not 0 < float(self.level) < 1:
            raise InputError(f"need n_boot >= 1 and 0 < level < 1, got {self.n_boot}, {self.level}")


@dataclass(frozen=True, eq=False)
class LDSResult:
    """The linear datamodeling score of one score matrix.

    Attributes:
        per_test: ``[n_test]`` Spearman correlations (NaN where undefined, see :func:`lds`).
        mean: mean over the finite entries.
        low, high: percentile bootstrap interval of the mean (resampling test points).
        level: the interval's level.
        n_subsets: subsets the correlations are over.
        n_undefined: test points with a NaN correlation.
    """

    per_test: torch.Tensor
    mean: float
    low: float
    high: float
    level: float
    n_subsets: int
    n_undefined: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the per-test values included)."""
        return {
            "lds_mean": self.mean,
            "lds_low": self.low,
            "lds_high": self.high,
            "level": self.level,
            "n_subsets": self.n_subsets,
            "n_test": int(self.per_test.numel()),
            "n_undefined": self.n_undefined,
            "per_test": [None if math.isnan(v) else float(v) for v in self.per_test.tolist()],
        }

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
        """Histogram of the per-test correlations with the mean and its interval; returns the
        figure (saved as PNG when ``path`` is given)."""
        from .plots import new_figure, save_figure

        fig, (ax,) = new_figure(size=(5.0, 3.6))
        v = self.per_test[torch.isfinite(self.per_test)].numpy()
        ax.hist(v, bins=30, range=(-1, 1), color="tab:blue", alpha=0.75)
        ax.axvline(self.mean, color="black", lw=1.5, label=f"mean {self.mean:.3f}")
        ax.axvspan(self.low, self.high, color="gray", alpha=0.3, label=f"{self.level:.0%} CI")
        ax.set_xlabel(f"Spearman rho over {self.n_subsets} subsets, per test point")
        ax.set_ylabel("test points")
        ax.set_title(title or "Linear datamodeling score")
        ax.legend(fontsize=8)
        if path is not None:
            save_figure(fig, path)
        return fig


def _summarise(per_test: torch.Tensor, m: int, config: LDSConfig) -> LDSResult:
    mean, lo, hi = bootstrap_interval(per_test, config.level, config.n_boot, config.seed)
    return LDSResult(
        per_test=per_test,
        mean=mean,
        low=lo,
        high=hi,
        level=float(config.level),
        n_subsets=m,
        n_undefined=int(torch.isnan(per_test).sum()),
    )


@dataclass(frozen=True, eq=False)
class LDSGroundTruth:
    """Retrained models' test losses on random subsets; score any method against them.

    Attributes:
        masks: ``[m, n_train]`` kept points per subset.
        outputs: ``[m, n_test]`` measured test losses (mean over ``seeds_per_subset`` models).
        config: the settings used.
        retrained: models trained in this call.
        reused: models loaded from the checkpoint.
        seconds: wall time of this call's retraining.
    """

    masks: torch.Tensor
    outputs: torch.Tensor
    config: LDSConfig
    retrained: int
    reused: int
    seconds: float

    def score(self, scores: Any) -> LDSResult:
        """:func:`lds` of ``scores`` ``[n_test, n_train]`` with the mean and its interval."""
        per_test = lds(scores, self.masks, self.outputs)
        return _summarise(per_test, int(self.masks.shape[0]), self.config)


def _run_id(n_train: int, config: LDSConfig) -> dict[str, Any]:
    return {
        "format": _GROUND_TRUTH_FORMAT,
        "kind": "inflens-lds-ground-truth",
        "n_train": int(n_train),
        "kept": int(round(config.fraction * n_train)),
        "seed": int(config.seed),
        "fingerprint": str(config.fingerprint),
    }


def _job_path(folder: Path, j: int, s: int) -> Path:
    return folder / f"subset_{j:06d}_seed_{s:03d}.safetensors"


class _Cache:
    """The on-disk checkpoint of one ground-truth run: a ``ground_truth.json`` naming the run
    and one safetensors file per finished model, written atomically as each one finishes."""

    def __init__(self, n_train: int, config: LDSConfig) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        run = _run_id(n_train, config)
        self.run_hash = json_fingerprint(run)  # canonical JSON: the same bytes on every machine
        self.folder = Path(config.checkpoint) if config.checkpoint is not None else None
        self.results: dict[tuple[int, int], np.ndarray] = {}
        if self.folder is None:
            return
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = folder / "ground_truth.json"
        if cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            if saved.get("run") != run:
                raise InputError(
                    f"the checkpoint folder {folder} holds retrainings of another LDS run "
                    f"({saved.get('run')} != {run}); use another folder or delete it"
                )
        else:
            tmp = cfg_path.with_name(cfg_path.name + ".tmp")
            tmp.write_text(json.dumps({"run": run, "run_sha256": self.run_hash}, indent=2))
            os.replace(tmp, cfg_path)
        for j in range(int(config.n_subsets)):
            for s in range(int(config.seeds_per_subset)):
                path = _job_path(folder, j, s)
                if not path.exists():
                    continue
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                if meta.get("run_sha256") != self.run_hash:
                    raise InputError(f"{path} belongs to another LDS run; delete it")
                self.results[(j, s)] = load_file(str(path))["outputs"].numpy()

    def n_test(self) -> int | None:
        return next(iter(self.results.values())).size if self.results else None

    def put(self, j: int, s: int, value: np.ndarray) -> None:
        from .artifacts import _save_tensors

        self.results[(j, s)] = value
        if self.folder is not None:
            _save_tensors(
                _job_path(self.folder, j, s),
                {"outputs": torch.from_numpy(value)},
                {"run_sha256": self.run_hash, "subset": str(j), "seed_index": str(s)},
            )

    def outputs(self, m: int, r: int) -> torch.Tensor:
        res = self.results
        return torch.from_numpy(
            np.stack([np.mean([res[(j, s)] for s in range(r)], axis=0) for j in range(m)], axis=0)
        )


def lds_ground_truth(
    retrain: Retrain, n_train: int, config: LDSConfig = LDSConfig()
) -> LDSGroundTruth:
    """Retrain on ``config.n_subsets`` random subsets and record the test losses.

    Args:
        retrain: ``retrain(keep [n_train] bool, seed) -> [n_test]`` measured test losses of a
            model trained on the kept points (e.g. :class:`ObjectiveRetrain`).
        n_train: size of the full training set.
        config: an :class:`LDSConfig`.

    Returns:
        An :class:`LDSGroundTruth`. With ``config.checkpoint`` each finished model is written
        at once (atomically), so a run killed at any point resumes where it stopped, and the
        result is identical to an uninterrupted run.
    """
    if not callable(retrain):
        raise InputError(f"retrain must be a callable (keep, seed) -> [n_test], got {retrain!r}")

    def fit_one(keeps: torch.Tensor, seeds: torch.Tensor) -> np.ndarray:
        (keep,), (seed,) = keeps, seeds.tolist()
        return _as_outputs(retrain(keep.clone(), seed), None)[None]

    return _ground_truth(fit_one, int(n_train), config, 1, "LDS retraining")


def lds_ground_truth_batched(
    retrain_batch: RetrainBatch,
    n_train: int,
    config: LDSConfig = LDSConfig(),
    batch_size: int = 50,
) -> LDSGroundTruth:
    """:func:`lds_ground_truth` for a trainer that fits many models at once.

    ``retrain_batch(keeps [K, n_train] bool, seeds [K] int64) -> [K, n_test]`` trains one model
    per row (e.g. ``K`` convex refits whose matrix products are batched, or ``K`` networks with
    stacked parameters) and returns each model's test losses. The missing ``(subset, seed)``
    models are handed over in groups of at most ``batch_size`` (groups run in ``config.workers``
    processes); the seeds and the checkpoint files are those of :func:`lds_ground_truth`, so
    the two entry points share a cache, and a run killed part-way loses at most the groups in
    flight and resumes to the identical result.
    """
    if not callable(retrain_batch):
        raise InputError(
            f"retrain_batch must be a callable (keeps, seeds) -> [K, n_test], got {retrain_batch!r}"
        )
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return _ground_truth(
        retrain_batch, int(n_train), config, int(batch_size), "LDS retraining (batched)"
    )


def _ground_truth(
    retrain_batch: RetrainBatch, n_train: int, config: LDSConfig, batch_size: int, desc: str
) -> LDSGroundTruth:
    """The missing ``(subset, seed)`` models of ``config``, trained in groups of ``batch_size``
    by ``retrain_batch`` (in ``config.workers`` processes), each written to the cache."""
    masks = subset_masks(n_train, config.fraction, config.n_subsets, config.seed)
    m, r = int(config.n_subsets), int(config.seeds_per_subset)
    cache = _Cache(n_train, config)
    reused = len(cache.results)
    n_test = cache.n_test()
    todo = [(j, s) for j in range(m) for s in range(r) if (j, s) not in cache.results]
    groups = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc)

    def one(group: list[tuple[int, int]]) -> np.ndarray:
        keeps = masks[[j for j, _ in group]].clone()
        seeds = torch.tensor([_job_seed(config.seed, j, s) for j, s in group], dtype=torch.long)
        out = retrain_batch(keeps, seeds)
        out = out.detach().cpu() if isinstance(out, torch.Tensor) else out
        out = np.asarray(out, dtype=np.float64)
        if out.ndim != 2 or out.shape[0] != len(group):
            raise InputError(
                f"retrain_batch returned shape {out.shape} for {len(group)} models; it must "
                "return [K, n_test], one row of test losses per model"
            )
        return out

    def on_result(i: int, value: np.ndarray) -> None:
        nonlocal n_test
        for (j, s), row in zip(groups[i], value):
            row = _as_outputs(row, n_test)
            n_test = row.size
            cache.put(j, s, row)
        if bar is not None:
            bar.update(len(groups[i]))

    t0 = time.perf_counter()
    workers = default_workers() if config.workers is None else int(config.workers)
    try:
        _map_jobs(one, [(g,) for g in groups], workers, on_result)
    finally:
        if bar is not None:
            bar.close()
    return LDSGroundTruth(
        masks=masks,
        outputs=cache.outputs(m, r),
        config=config,
        retrained=len(todo),
        reused=reused,
        seconds=time.perf_counter() - t0,
    )


def linear_datamodeling_score(
    scores: Any, retrain: Retrain, config: LDSConfig = LDSConfig()
) -> LDSResult:
    """Retrain on random subsets (:func:`lds_ground_truth`) and score ``scores`` (:func:`lds`).

    ``scores`` is ``[n_test, n_train]`` in ``loss_influence`` units (negative = helpful), from
    any method; ``retrain(keep, seed)`` returns the ``[n_test]`` test losses of a model trained
    on the kept points. To compare several methods on the same retrained models, build the
    ground truth once with :func:`lds_ground_truth` and call its ``score``.
    """
    s = _matrix(scores, "scores")
    gt = lds_ground_truth(retrain, s.shape[1], config)
    if gt.outputs.shape[1] != s.shape[0]:
        raise InputError(
            f"retrain returns {gt.outputs.shape[1]} test losses but scores has {s.shape[0]} "
            "test rows"
        )
    return gt.score(s)


# ------------------------------------------------------------------------------ retraining
class ObjectiveRetrain:
    """``retrain(keep, seed)`` for an :class:`inflens.Objective`: an exact refit on the kept
    points, returning the test losses (no regulariser) ``[n_test]``.

    The refit minimises ``(1/|S|) sum_{i in S} loss_i + (l2/2)||theta||^2`` (``l2`` relative
    to the mean over the kept points, as :func:`inflens.train.loo_weights`), warm-started
    from the objective's theta, to ``||grad|| <= tol``. ``method="newton"``: chord-Newton steps
    (:func:`inflens.train.fit_newton`) preconditioned by the exact inverse Hessian at theta-hat,
    factorised once here (small ``p``); ``"lbfgs"``: :func:`inflens.train.fit_lbfgs`. A refit
    that does not reach ``tol`` raises :class:`~inflens.errors.SolverDivergedError` (ground
    truth must be exact). ``seed`` is unused: convex refits are deterministic.
    """

    def __init__(
        self,
        objective: Objective,
        train: DataLike,
        test: DataLike,
        method: str = "newton",
        tol: float = 1e-10,
        max_iter: int = 500,
    ) -> None:
        if method not in ("newton", "lbfgs"):
            raise InputError(f"method must be 'newton' or 'lbfgs', got {method!r}")
        self.objective = objective
        self.train = train
        self.n = len(Data(train, "training data"))
        test_data = Data(test, "test data")
        x, y = test_data.get(torch.arange(len(test_data)))
        self.x_test, self.y_test = objective.prepare(x, y, "test data")
        self.theta_hat = objective.theta.detach().clone()
        self.method = method
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self._solve = None
        if method == "newton":
            inf = Influence(objective, self.train, solver="exact", progress=False).fit()
            self._solve = inf.solver.solve

    def __call__(self, keep: torch.Tensor, seed: int = 0) -> torch.Tensor:
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        if keep.numel() != self.n:
            raise InputError(f"keep must have {self.n} entries, got {keep.numel()}")
        w = loo_weights(self.n, ~keep, self.objective.dtype)
        if self.method == "newton":
            theta, info = fit_newton(
                self.objective,
                self.train,
                self._solve,
                theta0=self.theta_hat,
                weights=w,
                tol=self.tol,
                max_iter=self.max_iter,
            )
        else:
            theta, info = fit_lbfgs(
                self.objective,
                self.train,
                theta0=self.theta_hat,
                weights=w,
                tol=self.tol,
                max_iter=self.max_iter,
                on_fail="ignore",
            )
        if not info.converged:
            raise SolverDivergedError(
                f"the {self.method} refit on {int(keep.sum())} points stopped at ||grad|| = "
                f"{info.grad_norm:.2e} > tol = {self.tol:.0e} after {info.iterations} "
                "iterations; raise max_iter, loosen tol, or use the other method"
            )
        with torch.no_grad():
            return self.objective.losses(theta, self.x_test, self.y_test).detach().cpu()


# ------------------------------------------------------------------------------ brittleness
@dataclass(frozen=True)
class BrittlenessConfig:
    """Settings of :func:`brittleness`.

    Attributes:
        k_grid: increasing numbers of proponents to remove.
        test_indices: test points to examine (default: all rows of the score matrix).
        seed: training seed passed to ``retrain``.
        workers: processes (one test point's scan per job; default 1).
    """

    k_grid: tuple[int, ...] = (10, 20, 40, 80, 160)
    test_indices: tuple[int, ...] | None = None
    seed: int = 0
    workers: int | None = 1

    def __post_init__(self) -> None:
        grid = tuple(int(k) for k in self.k_grid)
        if not grid or any(k < 1 for k in grid) or list(grid) != sorted(set(grid)):
            raise InputError(f"k_grid must be strictly increasing positive ints, got {grid}")
        if self.workers is not None and int(self.workers) < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")


@dataclass(frozen=True, eq=False)
class BrittlenessResult:
    """Smallest removal that flips each prediction.

    Attributes:
        test_indices: ``[T]`` rows of the score matrix examined.
        k_grid: the grid.
        smallest_k: ``[T]`` smallest ``k`` on the grid that flipped the prediction, ``-1``
            when none did.
        base_prediction: ``[T]`` predictions of the model trained on all points.
    """

    test_indices: torch.Tensor
    k_grid: tuple[int, ...]
    smallest_k: torch.Tensor
    base_prediction: torch.Tensor

    @property
    def flipped(self) -> torch.Tensor:
        """``[T]`` whether some ``k`` on the grid flipped the prediction."""
        return self.smallest_k >= 0

    def fraction_flipped(self) -> torch.Tensor:
        """``[len(k_grid)]``: share of test points flipped by removing at most ``k`` points."""
        sk = self.smallest_k
        return torch.tensor(
            [float(((sk >= 0) & (sk <= k)).float().mean()) for k in self.k_grid],
            dtype=torch.float64,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "k_grid": list(self.k_grid),
            "test_indices": self.test_indices.tolist(),
            "smallest_k": self.smallest_k.tolist(),
            "fraction_flipped": self.fraction_flipped().tolist(),
        }


class _Scan:
    """One test point's scan over the grid (a class so that it pickles where fork is absent)."""

    def __init__(self, retrain: Callable[[torch.Tensor, int], Any], n: int, grid, seed: int):
        self.retrain, self.n, self.grid, self.seed = retrain, n, grid, seed

    def __call__(self, t: int, order: torch.Tensor, base: float) -> int:
        for k in self.grid:
            keep = torch.ones(self.n, dtype=torch.bool)
            keep[order[:k]] = False
            pred = torch.as_tensor(self.retrain(keep, self.seed)).reshape(-1)
            if float(pred[t]) != base:
                return int(k)
        return -1


def brittleness(
    scores: Any,
    retrain: Callable[[torch.Tensor, int], Any],
    config: BrittlenessConfig = BrittlenessConfig(),
) -> BrittlenessResult:
    """Smallest ``k`` whose removal of the top-``k`` proponents flips each prediction.

    For test point ``t`` the proponents are the training points with the most negative
    ``scores[t]`` (``loss_influence`` units: upweighting them lowers the test loss, i.e. they
    support the label the loss is measured at; use the model's predicted label, or the true
    label of correctly classified points). For each ``k`` of the grid in increasing order they
    are removed, the model retrained with ``retrain(keep, seed) -> [n_test]`` predictions
    (class labels, compared for equality), and the scan stops at the first ``k`` whose
    prediction at ``t`` differs from that of the model trained on all points. Lower is better
    (a method that finds the truly supporting points flips predictions with fewer removals).
    """
    s = _matrix(scores, "scores")
    n_test, n = s.shape
    if config.test_indices is None:
        idx = torch.arange(n_test)
    else:
        idx = torch.as_tensor(config.test_indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_test):
            raise InputError(f"test_indices must lie in [0, {n_test - 1}]")
    if config.k_grid[-1] >= n:
        raise InputError(f"k_grid reaches {config.k_grid[-1]} but there are only {n} points")
    base = torch.as_tensor(retrain(torch.ones(n, dtype=torch.bool), config.seed)).reshape(-1)
    if base.numel() != n_test:
        raise InputError(f"retrain returned {base.numel()} predictions, scores has {n_test} rows")
    scan = _Scan(retrain, n, config.k_grid, config.seed)
    jobs = [
        (int(t), torch.argsort(s[t], stable=True)[: config.k_grid[-1]], float(base[t]))
        for t in idx.tolist()
    ]
    smallest = torch.full((len(jobs),), -1, dtype=torch.long)

    def on_result(i: int, k: int) -> None:
        smallest[i] = k

    _map_jobs(scan, jobs, 1 if config.workers is None else int(config.workers), on_result)
    return BrittlenessResult(
        test_indices=idx,
        k_grid=tuple(int(k) for k in config.k_grid),
        smallest_k=smallest,
        base_prediction=base[idx].clone(),
    )


# ------------------------------------------------------------------------------ mislabels
@dataclass(frozen=True, eq=False)
class MislabelResult:
    """Detection of known mislabeled training points by a suspicion score.

    Attributes:
        auc: probability that a random mislabeled point scores above a random clean one
            (ties count one half; the ROC AUC).
        fraction_inspected: ``[n + 1]`` ``0, 1/n, ..., 1``.
        fraction_found: ``[n + 1]`` share of the mislabeled points among the first
            ``fraction_inspected * n`` points in decreasing score order (ties by index).
    """

    auc: float
    fraction_inspected: torch.Tensor
    fraction_found: torch.Tensor

    def found_at(self, fraction: float) -> float:
        """Share of mislabeled points found after inspecting ``floor(fraction * n)`` points."""
        n = self.fraction_inspected.numel() - 1
        return float(self.fraction_found[int(math.floor(float(fraction) * n + 1e-9))])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (found at 5%, 10%, 20%, 30% inspected)."""
        return {
            "auc": self.auc,
            **{f"found_at_{q:.2f}": self.found_at(q) for q in (0.05, 0.1, 0.2, 0.3)},
        }


def mislabel_detection(scores_per_train_point: Any, is_mislabeled: Any) -> MislabelResult:
    """AUC and the fraction-found curve of a per-training-point suspicion score.

    Higher score = inspect first. For inflens's self-influence, which is ``I_up,loss(z_i, z_i)
    <= 0`` with the most negative values the most suspicious, pass ``-inf.self_influence()``;
    a training loss can be passed as is. ``AUC = (R_+ - n_+(n_+ + 1)/2) / (n_+ n_-)`` with
    ``R_+`` the sum of the average ranks of the mislabeled points (Mann-Whitney).
    """
    s = torch.as_tensor(scores_per_train_point).detach().cpu().to(torch.float64).reshape(-1)
    lab = torch.as_tensor(is_mislabeled).detach().cpu().reshape(-1)
    if lab.dtype != torch.bool:
        if not bool(((lab == 0) | (lab == 1)).all()):
            raise InputError("is_mislabeled must be boolean (or 0/1)")
        lab = lab != 0
    if s.numel() != lab.numel():
        raise InputError(f"{s.numel()} scores but {lab.numel()} is_mislabeled entries")
    if not bool(torch.isfinite(s).all()):
        raise InputError("scores contain NaN/inf")
    n_pos = int(lab.sum())
    n = s.numel()
    if n_pos == 0 or n_pos == n:
        raise InputError("is_mislabeled must contain both mislabeled and clean points")
    ranks = _ranks(s.numpy())
    r_pos = float(ranks[lab.numpy()].sum())
    auc = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    order = torch.argsort(-s, stable=True)
    found = torch.cat([torch.zeros(1), torch.cumsum(lab[order].to(torch.float64), 0)]) / n_pos
    inspected = torch.arange(n + 1, dtype=torch.float64) / n
    return MislabelResult(auc=float(auc), fraction_inspected=inspected, fraction_found=found)
