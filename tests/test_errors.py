"""Every bad input gets a clear, named error (or warning) that says what is wrong and how to fix it."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import inflens
from cases import fitted, rel_err
from inflens.errors import (
    CurvatureError,
    InflensWarning,
    InputError,
    MemoryBudgetError,
    NotFittedError,
    VmapError,
)
from inflens.solvers import CG, Exact

DT = torch.float64


def _obj(name: str = "logreg_multiclass", **kw) -> tuple[inflens.Objective, object]:
    case = fitted(name)
    c = case.case
    obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, **kw)
    return obj, case


def _fit(obj: inflens.Objective, train, **kw) -> inflens.Influence:
    return inflens.Influence(obj, train, progress=False, **kw).fit()


# ---------------------------------------------------------------------------- data vs model
def test_feature_shape_mismatch() -> None:
    obj, case = _obj()
    with pytest.raises(
        InputError, match=r"could not process training data inputs of shape \(\d+, 5\).*4x3"
    ):
        _fit(obj, (torch.randn(40, 5, dtype=DT), case.y))
    inf = _fit(obj, (case.x, case.y))
    with pytest.raises(InputError, match="could not process test data"):
        inf.loss_influence((torch.randn(3, 7, dtype=DT), case.yt[:3]))


def test_dtype_mismatch() -> None:
    obj, case = _obj()
    with pytest.raises(InputError, match="training data inputs are torch.float32 but the model"):
        _fit(obj, (case.x.float(), case.y))
    inf = _fit(obj, (case.x, case.y))
    with pytest.raises(InputError, match="test data inputs are torch.float32"):
        inf.loss_influence((case.xt.float(), case.yt))


def test_cross_entropy_labels_out_of_range_anywhere() -> None:
    obj, case = _obj()
    y = case.y.clone()
    y[30] = 3  # beyond the first chunk check of 16 examples
    with pytest.raises(InputError, match=r"training label 3 of example 30 is outside \[0, 2\]"):
        _fit(obj, (case.x, y))
    y[30] = -1
    with pytest.raises(InputError, match=r"training label -1 of example 30"):
        _fit(obj, (case.x, y))
    with pytest.raises(InputError, match="integer class labels"):
        _fit(obj, (case.x, case.y.to(DT)))
    inf = _fit(obj, (case.x, case.y))
    yt = case.y[:20].clone()
    yt[18] = 5
    with pytest.raises(InputError, match=r"test label 5 of example 18 is outside \[0, 2\]"):
        inf.loss_influence((case.x[:20], yt))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        inf.label_influence((case.xt, case.yt), [0], [3])


def test_binary_labels_not_in_01_or_pm1() -> None:
    obj, case = _obj("logreg_binary")
    y = case.y.clone()
    y[25] = 2
    with pytest.raises(
        InputError, match=r"training label 2 of example 25 is not in \{0, 1\} or \{-1, \+1\}"
    ):
        _fit(obj, (case.x, y))
    with pytest.raises(InputError, match=r"values such as \[2\]"):
        _fit(obj, (case.x, torch.full_like(y, 2)))
    # a mix of conventions: 0 and -1 would both be the negative class
    y[25] = -1
    with pytest.raises(InputError, match=r"mix the \{0, 1\} and \{-1, \+1\} conventions"):
        _fit(obj, (case.x, y))
    inf = _fit(obj, (case.x, case.y))
    yt = case.y[:20].clone()
    yt[19] = 2
    with pytest.raises(InputError, match="test label 2 of example 19"):
        inf.loss_influence((case.x[:20], yt))
    yt[19] = -1
    with pytest.raises(InputError, match="test labels mix"):
        inf.loss_influence((case.x[:20], yt))


def test_lengths_differ() -> None:
    obj, case = _obj()
    with pytest.raises(InputError, match="40 inputs but 39 targets"):
        _fit(obj, (case.x, case.y[:-1]))
    inf = _fit(obj, (case.x, case.y))
    with pytest.raises(InputError, match="5 inputs but 4 targets"):
        inf.loss_influence((case.xt, case.yt[:-1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_data(bad: float) -> None:
    obj, case = _obj()
    x = case.x.clone()
    x[33, 1] = bad
    with pytest.raises(
        InputError, match="training data inputs contain 1 NaN/inf values .first in example 33"
    ):
        _fit(obj, (x, case.y))
    with pytest.raises(InputError, match="first in example 33"):
        _fit(obj, (x, case.y), batch_size=8)  # found in a later chunk too
    inf = _fit(obj, (case.x, case.y))
    xt = case.xt.clone()
    xt[2, 0] = bad
    with pytest.raises(InputError, match="test data inputs contain 1 NaN/inf"):
        inf.loss_influence((xt, case.yt))
    # mse targets are checked as well
    obj, case = _obj("mlp_mse")
    y = case.y.clone()
    y[4, 1] = bad
    with pytest.raises(InputError, match="training data targets contain 1 NaN/inf"):
        _fit(obj, (case.x, y))


def test_nan_in_parameters() -> None:
    case = fitted("mlp_tanh")
    model = case.fresh_model()
    with torch.no_grad():
        model.hidden.bias[1] = float("nan")
    with pytest.raises(InputError, match="parameters contain 1 NaN/inf"):
        inflens.Objective(model, "cross_entropy")


def test_empty_training_set() -> None:
    obj, case = _obj()
    with pytest.raises(InputError, match="training data is empty"):
        inflens.Influence(obj, (case.x[:0], case.y[:0]))
    with pytest.raises(InputError, match="training data is empty"):
        inflens.Influence(obj, TensorDataset(case.x[:0], case.y[:0]))


# ---------------------------------------------------------------------------- curvature
def _quadratic_problem(eigs: list[float], sign: float, l2: float = 0.0):
    """A linear model whose loss ``sign * s^2 / 2`` has Hessian ``sign * diag(eigs) + l2 I``.

    With ``n = d`` rows ``x_i = sqrt(n * eig_i) e_i``: ``(1/n) X^T X = diag(eigs)``.
    """
    d = len(eigs)
    x = torch.diag(torch.tensor(eigs, dtype=DT).mul(d).sqrt())
    y = torch.zeros(d, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.fill_(0.1)

    def quad(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sign * 0.5 * out[:, 0] ** 2

    return inflens.Objective(model, quad, l2=l2), (x, y)


@pytest.mark.parametrize(
    "eigs,l2,damping",
    [
        ([3.0, 1.0, 0.5], 0.0, 0.0),  # H = -diag: most negative -3
        ([10.001, 1.0, 0.5], 0.0, 10.0),  # A's most negative eigenvalue -0.001 next to damping 10
    ],
)
@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_indefinite_hessian_exact(eigs: list[float], l2: float, damping: float, method) -> None:
    obj, train = _quadratic_problem(eigs, -1.0, l2)
    lam_min = -max(eigs) + l2 + damping
    with pytest.raises(CurvatureError, match="indefinite") as err:
        _fit(obj, train, damping=damping, solver=Exact(method=method))
    msg = str(err.value)
    found = float(re.search(r"most negative eigenvalue (\S+)", msg).group(1))
    assert found == pytest.approx(lam_min, rel=1e-3)
    suggested = float(re.search(r"damping=(\S+?)[\s)]", msg).group(1))
    inf = _fit(obj, train, damping=suggested)  # the suggestion works
    h = -torch.diag(torch.tensor(eigs, dtype=DT)) + (l2 + suggested) * torch.eye(3, dtype=DT)
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    assert rel_err(inf.solver.solve(v), torch.linalg.solve(h, v.T).T) < 1e-12
    assert inf.diagnostics()["min_eigenvalue"] > 0


def test_indefinite_hessian_cg() -> None:
    obj, train = _quadratic_problem([3.0, 1.0, 0.5], -1.0)
    inf = _fit(obj, train, solver="cg")
    with pytest.raises(CurvatureError, match="non-positive curvature.*Add damping"):
        inf.s_test(train)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_singular_hessian(method: str) -> None:
    obj, train = _quadratic_problem([2.0, 1.0, 0.0], 1.0)  # third direction: no curvature, l2 = 0
    with pytest.raises(CurvatureError, match="singular") as err:
        _fit(obj, train, solver=Exact(method=method))
    suggested = float(re.search(r"damping=(\S+?)\)", str(err.value)).group(1))
    assert suggested > 0
    inf = _fit(obj, train, damping=suggested)
    assert inf.diagnostics()["min_eigenvalue"] == pytest.approx(suggested, rel=1e-6)


def test_failed_exact_fit_leaves_solver_unfitted() -> None:
    obj, train = _quadratic_problem([2.0, 1.0, 0.0], 1.0)
    solver = Exact()
    with pytest.raises(CurvatureError):
        _fit(obj, train, solver=solver)
    with pytest.raises(NotFittedError):
        solver.solve(torch.ones(1, 3, dtype=DT))


def test_cg_not_converging_warns_with_residual() -> None:
    obj, case = _obj("mlp_tanh")
    inf = _fit(obj, (case.x, case.y), solver=CG(tol=1e-10, max_iter=3))
    with pytest.warns(
        InflensWarning, match=r"CG stopped after 3 iterations with relative residual"
    ):
        inf.loss_influence((case.xt, case.yt))


def test_exact_memory_budget() -> None:
    obj, case = _obj("mlp_tanh")
    with pytest.raises(MemoryBudgetError, match=r"31x31 Hessian.*Exact\(max_memory_gb=1e-06\)"):
        _fit(obj, (case.x, case.y), solver=Exact(max_memory_gb=1e-6))
    # the Influence's budget applies too
    with pytest.raises(MemoryBudgetError, match=r"31x31 Hessian.*Influence\(max_memory_gb"):
        _fit(obj, (case.x, case.y), solver=Exact(), max_memory_gb=2e-5)


# ---------------------------------------------------------------------------- API misuse
def test_query_before_fit() -> None:
    obj, case = _obj()
    inf = inflens.Influence(obj, (case.x, case.y), progress=False)
    test = (case.xt, case.yt)
    queries = [
        lambda: inf.loss_influence(test),
        lambda: inf.param_influence([0]),
        lambda: inf.predicted_loss_change(test),
        lambda: inf.self_influence(),
        lambda: inf.input_influence(test, [0]),
        lambda: inf.label_influence(test, [0], [1]),
        lambda: inf.s_test(test),
        lambda: inf.test_gradients(test),
        lambda: inf.train_gradients([0]),
        lambda: inf.score(torch.zeros(1, obj.p, dtype=DT)),
        lambda: inf.diagnostics(),
    ]
    for q in queries:
        with pytest.raises(NotFittedError, match=r"call \.fit\(\)"):
            q()


def test_unknown_names_and_bad_settings() -> None:
    obj, case = _obj()
    with pytest.raises(InputError, match="unknown loss 'crossentropy'.*cross_entropy"):
        inflens.Objective(case.fresh_model(), "crossentropy")
    with pytest.raises(ValueError, match="unknown solver 'newton'.*exact"):
        inflens.Influence(obj, (case.x, case.y), solver="newton")
    with pytest.raises(InputError, match="'head.' matches no parameter; the model has: weight"):
        inflens.Objective(case.fresh_model(), "cross_entropy", params="head.")
    with pytest.raises(InputError, match="damping must be a non-negative"):
        inflens.Influence(obj, (case.x, case.y), damping=-0.1)
    with pytest.raises(InputError, match="batch_size must be a positive"):
        inflens.Influence(obj, (case.x, case.y), batch_size=0)
    with pytest.raises(InputError, match="scoring must be"):
        inflens.Influence(obj, (case.x, case.y), scoring="fast")
    with pytest.raises(InputError, match="objective must be an inflens.Objective"):
        inflens.Influence(case.fresh_model(), (case.x, case.y))
    inf = _fit(obj, (case.x, case.y))
    with pytest.raises(InputError, match=r"indices must lie in \[0, 39\]"):
        inf.param_influence([40])
    with pytest.raises(InputError, match="new_labels has shape"):
        inf.label_influence((case.xt, case.yt), [0, 1], [1])


def test_input_influence_needs_float_inputs() -> None:
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    x = torch.randint(0, 5, (12, 2))
    y = torch.randint(0, 2, (12,))
    inf = _fit(inflens.Objective(emb, "cross_entropy", l2=0.1), (x, y), damping=1.0)
    with pytest.raises(InputError, match="floating-point inputs"):
        inf.input_influence((x[:2], y[:2]), [0])


# ---------------------------------------------------------------------------- vmap failures
class ItemInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        if out.abs().max().item() > 1e6:  # data-dependent Python control flow
            out = out / 2
        return out


class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # in-place on the input
        return self.fc(x)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_in_place_write_to_the_inputs_gives_vmap_error(solver: str) -> None:
    case = fitted("logreg_multiclass")
    torch.manual_seed(0)
    obj = inflens.Objective(InPlaceOnInput().to(DT), "cross_entropy", l2=0.1)
    with pytest.raises(VmapError, match=r"torch.func.vmap.*in-place"):
        inf = _fit(obj, (case.x.clone(), case.y), solver=solver)
        inf.loss_influence((case.xt.clone(), case.yt))


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_data_dependent_control_flow_runs_on_whole_batches(solver: str) -> None:
    """``.item()`` in forward defeats vmap over examples: the Jacobian backend is chosen (and
    reported), with the same scores as the same function without the ``.item()`` check; a
    forced ``backend="vmap"`` gives the VmapError with the hint."""

    class ItemInMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.body(x)
            return out / 2 if out.abs().max().item() > 1e6 else out

    case = fitted("logreg_multiclass")
    torch.manual_seed(0)
    model = ItemInMLP().to(DT)
    plain = copy.deepcopy(model.body)
    test = (case.xt, case.yt)
    inf = _fit(inflens.Objective(model, "cross_entropy", l2=0.1), (case.x, case.y),
               solver=solver, damping=0.5)  # fmt: skip
    ref = _fit(inflens.Objective(plain, "cross_entropy", l2=0.1, backend="vmap"),
               (case.x, case.y), solver=solver, damping=0.5)  # fmt: skip
    d = inf.diagnostics()
    assert d["backend"] == "jacobian" and ".item()" in d["backend_reason"]
    assert rel_err(inf.loss_influence(test), ref.loss_influence(test)) < 1e-10
    forced = inflens.Objective(ItemInForward().to(DT), "cross_entropy", l2=0.1, backend="vmap")
    with pytest.raises(VmapError, match=r"torch.func.vmap.*\.item\(\)"):
        _fit(forced, (case.x, case.y), solver=solver).loss_influence(test)
