"""Compare how two (or more) models use their training data (Koh & Liang 2017, Sec. 5.1, Fig. 4).

For the same test images, each model's influence of every training point is set against the
distance between that training point and the test image in a shared raw space (pixels). The
paper's finding: an RBF SVM's influence is concentrated on training images close in pixel
space, while a network on learned features draws on images far away in pixel space, including
images of the other class.

Scores are :meth:`inflens.Influence.predicted_loss_change` values,
``-I_up,loss(z_i, z_test) / n``: the predicted change of the test loss when ``z_i`` is removed.
**Positive = helpful** (removing it would raise the test loss), negative = harmful; these are
the paper's Fig. 4 axes.

Example:
    >>> svm = rbf_svm(x_train, y_train, x_test, gamma=1e-3)            # the paper's "RBF SVM"
    >>> inf_svm = Influence(svm.objective, (svm.f_train, y_train)).fit()
    >>> inf_net = Influence(top_obj, (feat_train, y_train)).fit()       # LR on frozen features
    >>> cmp = compare_models(
    ...     {"RBF SVM": (inf_svm, (svm.f_test, y_test)),
    ...      "CNN + LR": (inf_net, (feat_test, y_test))},
    ...     x_train, x_test, y_train, y_test)
    >>> cmp.summary()["RBF SVM"]["spearman_abs_influence_vs_distance"]
    >>> cmp.plot("fig4.png", test=0, images=(x_train, x_test), class_names=["dog", "frog"])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import DataLike
from ..errors import InputError
from ..features import rbf_kernel_features
from ..influence import Influence
from ..models import LinearSVM
from ..objective import Objective
from .labels import as_classes, outputs_to_labels

__all__ = ["Comparison", "RBFSVM", "compare_models", "pixel_distances", "rbf_svm", "spearman"]


def pixel_distances(x_train: torch.Tensor, x_test: torch.Tensor) -> torch.Tensor:
    """``[m, n]`` Euclidean distances between every test and training input (flattened, float64)."""
    a = x_test.reshape(x_test.shape[0], -1).double()
    b = x_train.reshape(x_train.shape[0], -1).double()
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_min(0.0).sqrt()


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), along the last axis."""
    order = np.argsort(a, axis=-1, kind="stable")
    ranks = np.empty_like(order, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(a.shape[-1], dtype=np.float64)[None, :], axis=-1)
    # ties: replace by the mean rank within each group of equal values
    out = ranks.copy()
    for r in range(a.shape[0]):
        vals, inv, counts = np.unique(a[r], return_inverse=True, return_counts=True)
        if len(vals) < a.shape[-1]:
            sums = np.bincount(inv, weights=ranks[r])
            out[r] = (sums / counts)[inv]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (``[m]``)."""
    a2 = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b2 = np.atleast_2d(np.asarray(b, dtype=np.float64))
    ra, rb = _ranks(a2), _ranks(b2)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


@dataclass
class Comparison:
    """Influence of every training point on the same test points under several models.

    Attributes:
        scores: model name -> ``[m, n]`` predicted loss change when removing each training
            point (``-I_up,loss / n``; positive = helpful).
        correct: model name -> ``[m]`` whether the model predicts each test point correctly.
        distance: ``[m, n]`` raw-space (pixel) distances between test and training inputs.
        y_train: ``[n]`` training labels; y_test: ``[m]`` test labels.
        test_index: ``[m]`` the test points' positions in the caller's test set.
    """

    scores: dict[str, np.ndarray]
    correct: dict[str, np.ndarray]
    distance: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    test_index: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.scores)

    def _row(self, test: int) -> int:
        hits = np.flatnonzero(self.test_index == test)
        if not len(hits):
            raise InputError(
                f"test point {test} is not in this comparison; it holds {self.test_index.tolist()[:10]}..."
            )
        return int(hits[0])

    def subset(self, tests: Sequence[int] | np.ndarray | torch.Tensor) -> Comparison:
        """The comparison restricted to the given test points (by test index), e.g. those
        every model classifies correctly."""
        wanted = np.asarray(torch.as_tensor(tests).cpu()).reshape(-1)
        rows = np.flatnonzero(np.isin(self.test_index, wanted))
        return Comparison(
            scores={k: v[rows] for k, v in self.scores.items()},
            correct={k: v[rows] for k, v in self.correct.items()},
            distance=self.distance[rows],
            y_train=self.y_train,
            y_test=self.y_test[rows],
            test_index=self.test_index[rows],
            meta=dict(self.meta),
        )

    def all_correct(self) -> np.ndarray:
        """Test indices every model classifies correctly."""
        ok = np.logical_and.reduce([np.asarray(c, dtype=bool) for c in self.correct.values()])
        return self.test_index[ok]

    def top_helpful(self, name: str, test: int, k: int = 5, label: int | None = None) -> np.ndarray:
        """Indices of the ``k`` most helpful training points (largest score), optionally only
        those with training label ``label``."""
        row = self.scores[name][self._row(test)]
        order = np.argsort(-row, kind="stable")
        if label is not None:
            order = order[self.y_train[order] == label]
        return order[:k]

    def summary(self, k: int = 5, near_fraction: float = 0.1) -> dict[str, dict[str, float]]:
        """Per model, averaged over the test points:

        - ``spearman_abs_influence_vs_distance``: Spearman correlation between ``|score|`` and
          pixel distance (strongly negative: influence is carried by nearby images);
        - ``influence_mass_nearest``: share of ``sum |score|`` carried by the nearest
          ``near_fraction`` of training images;
        - ``top_k_distance_percentile``: mean distance percentile (0 = nearest) of the top-k
          helpful training images;
        - ``top_k_other_class``: share of the top-k helpful images whose label differs from
          the test label;
        - ``top_k_helpful_mean``: mean score of the top-k helpful images;
        - ``accuracy``: on these test points.

        Test points at which a model's scores are all exactly zero are left out for that model
        (``n_without_influence``).
        """
        n = self.distance.shape[1]
        pct_all = np.argsort(np.argsort(self.distance, axis=1, kind="stable"), axis=1)
        pct_all = pct_all / max(n - 1, 1)
        out: dict[str, dict[str, float]] = {}
        for name, s_all in self.scores.items():
            # A test point whose scores are all exactly zero (e.g. far outside a hinge-type
            # model's margin, where the smooth hinge's gradient underflows) has no ranking.
            keep = np.abs(s_all).max(1) > 0
            s, dist, pct = s_all[keep], self.distance[keep], pct_all[keep]
            near = pct < near_fraction
            mag = np.abs(s)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            other = self.y_train[top] != self.y_test[keep][:, None]
            if not keep.any():
                out[name] = {"n_test_points": 0, "n_without_influence": int(s_all.shape[0])}
                continue
            out[name] = {
                "n_test_points": int(s.shape[0]),
                "n_without_influence": int((~keep).sum()),
                "spearman_abs_influence_vs_distance": float(np.nanmean(spearman(mag, dist))),
                "influence_mass_nearest": float(
                    np.mean((mag * near).sum(1) / np.maximum(mag.sum(1), 1e-300))
                ),
                "near_fraction": near_fraction,
                "top_k": k,
                "top_k_distance_percentile": float(np.take_along_axis(pct, top, 1).mean()),
                "top_k_other_class": float(other.mean()),
                "top_k_helpful_mean": float(np.take_along_axis(s, top, 1).mean()),
                "accuracy": float(self.correct[name][keep].mean()),
            }
        return out

    def test_summary(self, test: int, k: int = 5) -> dict[str, Any]:
        """Top-k helpful training points of each model for one test point (index, score,
        label, pixel distance), and the most helpful ones of the other class."""
        r = self._row(test)
        out: dict[str, Any] = {"test": test, "label": int(self.y_test[r])}
        for name in self.names:
            top = self.top_helpful(name, test, k)
            other = [c for c in np.unique(self.y_train) if c != self.y_test[r]]
            oth = self.top_helpful(name, test, k, label=int(other[0])) if other else top[:0]
            order = np.argsort(-self.scores[name][r], kind="stable")
            rank_of = np.empty_like(order)
            rank_of[order] = np.arange(len(order))
            out[name] = {
                "correct": bool(self.correct[name][r]),
                "top_helpful": [
                    {
                        "index": int(i),
                        "score": float(self.scores[name][r, i]),
                        "label": int(self.y_train[i]),
                        "distance": float(self.distance[r, i]),
                    }
                    for i in top
                ],
                "top_helpful_other_class": [
                    {
                        "index": int(i),
                        "rank": int(rank_of[i]),
                        "score": float(self.scores[name][r, i]),
                        "distance": float(self.distance[r, i]),
                    }
                    for i in oth
                ],
            }
        return out

    def plot(
        self,
        path: str | os.PathLike[str],
        test: int,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        k: int = 5,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        """Fig. 4: influence against pixel distance per model (coloured by training label, same
        class as the test point in green), and, when ``images=(x_train, x_test)`` (NCHW; the
        rows of ``x_test`` indexed by the comparison's ``test_index``, i.e. your full test set)
        are given, the test image with each model's ``k`` most helpful training images."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        r = self._row(test)
        names = self.names
        label = int(self.y_test[r])
        cname = (lambda c: class_names[c]) if class_names else (lambda c: str(c))
        rows = 1 + (len(names) if images is not None else 0)
        width = 2.0 * max(k + 1, 2 * len(names))
        fig = plt.figure(figsize=(width, 3.4 + 2.0 * (rows - 1)))
        grid = fig.add_gridspec(
            rows,
            2 * len(names) if images is None else k + 1,
            height_ratios=[1.7] + [1.0] * (rows - 1),
        )
        ncols_sc = (k + 1) // len(names) if images is not None else 2
        for j, name in enumerate(names):
            if images is not None:
                ax = fig.add_subplot(grid[0, j * ncols_sc : (j + 1) * ncols_sc])
            else:
                ax = fig.add_subplot(grid[0, 2 * j : 2 * j + 2])
            s = self.scores[name][r]
            same = self.y_train == label
            ax.scatter(
                self.distance[r, ~same],
                s[~same],
                s=5,
                c="tab:red",
                alpha=0.5,
                label=f"{cname(1 - label) if len(np.unique(self.y_train)) == 2 else 'other'}",
            )
            ax.scatter(
                self.distance[r, same], s[same], s=5, c="tab:green", alpha=0.5, label=cname(label)
            )
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_xlabel("pixel distance to the test image")
            ax.set_ylabel("influence (-I_up,loss / n)")
            ax.set_title(name, fontsize=10)
            ax.legend(fontsize=7, markerscale=2)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if images is not None:
            x_train, x_test = images
            lo, hi = value_range

            def show(ax, img, title):
                a = img.detach().cpu().double().numpy().transpose(1, 2, 0)
                ax.imshow(np.clip((a - lo) / (hi - lo), 0, 1), interpolation="nearest")
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])

            for j, name in enumerate(names):
                ax = fig.add_subplot(grid[1 + j, 0])
                show(ax, x_test[test], f"test #{test}\n({cname(label)})")
                ax.set_ylabel(name, fontsize=8)
                for c, i in enumerate(self.top_helpful(name, test, k)):
                    ax = fig.add_subplot(grid[1 + j, 1 + c])
                    show(
                        ax,
                        x_train[i],
                        f"{cname(int(self.y_train[i]))} #{i}\n"
                        f"{self.scores[name][r, i]:.2e}, d={self.distance[r, i]:.1f}",
                    )
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def compare_models(
    models: Mapping[str, tuple[Influence, DataLike]],
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    test_index: Sequence[int] | None = None,
) -> Comparison:
    """Influence of every training point on the same test points under several fitted models.

    Args:
        models: name -> ``(fitted Influence, that model's view of the m test points)``; each
            model may see different inputs (kernel features, CNN features, pixels), but row
            ``i`` of every training set must be the same training example.
        x_train, x_test: the shared raw inputs (e.g. pixels in ``[-1, 1]``) used for
            distances, ``[n, ...]`` and ``[m, ...]``.
        y_train, y_test: labels ``[n]`` and ``[m]``.
        test_index: positions of the m test points in your test set (for labels in plots);
            default ``0..m-1``.

    Returns:
        A :class:`Comparison` (scores are ``predicted_loss_change``, positive = helpful).
    """
    if not models:
        raise InputError("models is empty: pass at least one name -> (Influence, test data)")
    n, m = x_train.shape[0], x_test.shape[0]
    scores: dict[str, np.ndarray] = {}
    correct: dict[str, np.ndarray] = {}
    for name, (inf, test) in models.items():
        if not isinstance(inf, Influence):
            raise InputError(f"models[{name!r}] must be (fitted Influence, test data)")
        if inf.n != n:
            raise InputError(
                f"model {name!r} has {inf.n} training points, the raw inputs have {n}; row i of "
                "every training set must be the same example"
            )
        s = inf.predicted_loss_change(test).detach().cpu().double().numpy()
        if s.shape != (m, n):
            raise InputError(f"model {name!r}: scores of shape {s.shape}, expected {(m, n)}")
        scores[name] = s
        xt, yt = test if isinstance(test, (tuple, list)) else (None, None)
        if xt is None:
            raise InputError("test data must be an (X, y) pair of tensors")
        obj = inf.objective
        with torch.no_grad():
            out = obj.outputs(obj.theta, torch.as_tensor(xt).to(obj.dtype))
        pred, truth = outputs_to_labels(out), as_classes(torch.as_tensor(yt))
        correct[name] = (pred == truth).cpu().numpy()
    return Comparison(
        scores=scores,
        correct=correct,
        distance=pixel_distances(x_train, x_test).cpu().numpy(),
        y_train=np.asarray(torch.as_tensor(y_train).cpu()),
        y_test=np.asarray(torch.as_tensor(y_test).cpu()),
        test_index=np.arange(m) if test_index is None else np.asarray(test_index),
    )


@dataclass
class RBFSVM:
    """The paper's "RBF SVM" (PROTOCOL 4.5): a hinge-trained linear SVM on exact kernel features.

    Attributes:
        objective: :class:`~inflens.Objective` of the SVM at the hinge-trained weights with the
            smooth hinge of temperature ``t`` (for influence; Sec. 4.3).
        f_train, f_test: Cholesky kernel features (float64).
        w: the hinge-trained weights; gamma, l2, t: the settings; fit_info: the trainer's report.
    """

    objective: Objective
    f_train: torch.Tensor
    f_test: torch.Tensor
    w: torch.Tensor
    gamma: float
    l2: float
    t: float
    fit_info: dict[str, Any]


def rbf_svm(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    gamma: float,
    l2: float = 0.001,
    t: float = 0.001,
) -> RBFSVM:
    """Build the paper's RBF SVM: Cholesky features of ``exp(-gamma ||x - x'||^2)`` on
    ``[train; test]``, a bias-free hinge SVM with ``l2`` fitted exactly
    (:func:`inflens.train.fit_linear_svm`), influence through ``SmoothHinge(t)`` at the hinge
    weights (not refitted at ``t``). The paper: ``gamma = 0.05 / n_train`` on raw [-1, 1]
    pixels of 299x299 images, ``l2 = t = 0.001``.
    """
    from ..train import fit_linear_svm

    f_train, f_test = rbf_kernel_features(x_train, x_test, gamma)
    w, info = fit_linear_svm(f_train, y_train, l2=l2)
    model = LinearSVM(f_train.shape[1], dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.copy_(w.reshape(1, -1))
    obj = Objective(model, "smooth_hinge", l2=l2, t=t)
    return RBFSVM(obj, f_train, f_test, w, float(gamma), float(l2), float(t), info.to_dict())
