"""K-FAC / EK-FAC against matrices built independently here (explicit loops, float64).

Ground truths:

- a single Linear layer with the squared error: the Gauss-Newton matrix *is* ``S (x) A`` and
  equals the Hessian, so both solvers must equal the exact solve;
- any model: K-FAC must equal the Kronecker-factored matrix assembled here from explicit
  per-example Jacobians (``torch.autograd.functional.jacobian``), hand-extracted conv patches
  and the loss Hessian in the outputs; EK-FAC must equal ``Q diag(Q^T G Q) Q^T`` per layer with
  ``Q`` the eigenbasis of those factors and ``G`` the exact Gauss-Newton block.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from cases import DT, MLP, Reference, fitted, rel_err
from inflens import InflensWarning, Influence, InputError, Objective
from inflens.backends import VmapBackend
from inflens.solvers import EKFAC, KFAC, Arnoldi


# ---------------------------------------------------------------------------- test models
class SmallCNN(nn.Module):
    """conv(1->3, 3x3, pad 1) -> tanh -> conv(3->2, 2x2, stride 2) -> tanh -> linear(18 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 2, stride=2)
        self.fc = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _patches(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """``[T, C*k*k]`` patches of one ``[C, H, W]`` input, by explicit loops (no F.unfold)."""
    xp = F.pad(x, (pad, pad, pad, pad))
    _, h, w = xp.shape
    rows = []
    for i in range(0, h - k + 1, stride):
        for j in range(0, w - k + 1, stride):
            rows.append(xp[:, i : i + k, j : j + k].reshape(-1))
    return torch.stack(rows)


def _layers_mlp(model: MLP, x: torch.Tensor):
    """Per example: ``[(name, a [T, din], jac [C, T, out])]`` for each layer of the MLP."""
    out = []
    for xi in x:
        s1 = model.hidden(xi)
        h = torch.tanh(s1)
        j1 = torch.autograd.functional.jacobian(lambda s: model.fc(torch.tanh(s)), s1)
        j2 = torch.eye(model.fc.out_features, dtype=DT)
        out.append([("hidden", xi[None], j1[:, None, :]), ("fc", h[None], j2[:, None, :])])
    return out


def _layers_cnn(model: SmallCNN, x: torch.Tensor):
    out = []
    for xi in x:
        s1 = model.c1(xi[None])[0]  # [3, 6, 6]
        h1 = torch.tanh(s1)
        s2 = model.c2(h1[None])[0]  # [2, 3, 3]
        h2 = torch.tanh(s2).reshape(-1)

        def tail1(s: torch.Tensor) -> torch.Tensor:
            return model.fc(torch.tanh(model.c2(torch.tanh(s)[None])[0]).reshape(-1))

        def tail2(s: torch.Tensor) -> torch.Tensor:
            return model.fc(torch.tanh(s).reshape(-1))

        j1 = torch.autograd.functional.jacobian(tail1, s1)  # [C, 3, 6, 6]
        j2 = torch.autograd.functional.jacobian(tail2, s2)  # [C, 2, 3, 3]
        c = j1.shape[0]
        out.append(
            [
                ("c1", _patches(xi, 3, 1, 1), j1.reshape(c, 3, -1).transpose(1, 2)),
                ("c2", _patches(h1, 2, 2, 0), j2.reshape(c, 2, -1).transpose(1, 2)),
                ("fc", h2[None], torch.eye(c, dtype=DT)[:, None, :]),
            ]
        )
    return out


def _output_hessians(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor):
    ref = Reference(model, loss, 0.0)
    outs = model(x).detach()
    return [
        torch.autograd.functional.hessian(
            lambda o, i=i: ref.loss(o[None], y[i : i + 1]).sum(), outs[i]
        )
        for i in range(x.shape[0])
    ]


def _theta_index(obj: Objective, layer: str, out: int, din: int) -> torch.Tensor:
    """Theta positions of ``W~ = [W | b]`` in row-major order (weight, then bias column)."""
    starts, s = {}, 0
    for n, k in zip(obj.names, obj.numels):
        starts[n] = s
        s += k
    w0, b0 = starts[f"{layer}.weight"], starts[f"{layer}.bias"]
    idx = torch.empty(out, din + 1, dtype=torch.long)
    idx[:, :din] = w0 + torch.arange(out * din).view(out, din)
    idx[:, din] = b0 + torch.arange(out)
    return idx.reshape(-1)


def _reference(obj: Objective, per_example, hess, x):
    """Independent K-FAC factors ``{layer: (S, A, theta index)}`` and the exact GGN ``[p, p]``."""
    n = len(per_example)
    facs = {}
    for name, _a, jac in per_example[0]:
        out, din = jac.shape[2], _a.shape[1]
        s_fac = torch.zeros(out, out, dtype=DT)
        a_fac = torch.zeros(din + 1, din + 1, dtype=DT)
        facs[name] = [s_fac, a_fac, _theta_index(obj, name, out, din)]
    for ex, lam in zip(per_example, hess):
        for name, a, jac in ex:
            t = a.shape[0]
            at = torch.cat([a, torch.ones(t, 1, dtype=DT)], 1)
            facs[name][1] += at.T @ at / (n * t)
            for tt in range(t):
                jt = jac[:, tt, :]  # [C, out]
                facs[name][0] += jt.T @ lam @ jt / n
    # exact GGN from the Jacobian of the outputs with respect to theta
    params = dict(obj.model.named_parameters())

    def f(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(obj.model, {**params, **obj.unflatten(theta)}, (x,))

    jt = jacrev(f)(obj.theta)  # [B, C, p]
    ggn = sum(jt[i].T @ hess[i] @ jt[i] for i in range(n)) / n
    return facs, ggn


def _problem(kind: str):
    g = torch.Generator().manual_seed(11)
    if kind == "mlp":
        f = fitted("mlp_tanh")
        model = f.fresh_model()
        obj = Objective(model, "cross_entropy", l2=f.case.l2)
        x, y = f.x, f.y
        model.requires_grad_(False)  # the references need no parameter gradients
        per_example = _layers_mlp(model, x)
    else:
        torch.manual_seed(5)
        model = SmallCNN().to(DT)
        x = torch.randn(24, 1, 6, 6, generator=g, dtype=DT)
        y = torch.randint(0, 3, (24,), generator=g)
        obj = Objective(model, "cross_entropy", l2=0.05)
        model.requires_grad_(False)
        per_example = _layers_cnn(model, x)
    hess = _output_hessians(model, "cross_entropy", x, y)
    facs, ggn = _reference(obj, per_example, hess, x)
    return obj, x, y, facs, ggn


def _blockdiag(p: int, blocks) -> torch.Tensor:
    m = torch.zeros(p, p, dtype=DT)
    for idx, blk in blocks:
        m[idx[:, None], idx[None, :]] = blk
    return m


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def problem(request):
    return _problem(request.param)


def test_kfac_equals_the_independent_kronecker_matrix(problem) -> None:
    obj, x, y, facs, _ = problem
    inf = Influence(obj, (x, y), solver=KFAC(), damping=0.01, progress=False).fit()
    shift = obj.l2 + 0.01
    m = _blockdiag(obj.p, [(idx, torch.kron(s, a)) for s, a, idx in facs.values()])
    m += shift * torch.eye(obj.p, dtype=DT)
    rhs = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert rel_err(inf.solver.solve(rhs), torch.linalg.solve(m, rhs.T).T) < 1e-9
    assert rel_err(inf.solver.dense(), m) < 1e-9
    # self-influence: -g_i^T M^-1 (g_i + l2 theta), one explicit solve per point here
    g = VmapBackend(obj).per_example_grads(obj.theta, x, y)
    want = -(g * torch.linalg.solve(m, (g + obj.l2 * obj.theta).T).T).sum(1)
    assert rel_err(inf.self_influence(), want) < 1e-9


def test_ekfac_equals_the_eigenvalue_corrected_matrix(problem) -> None:
    obj, x, y, facs, ggn = problem
    inf = Influence(obj, (x, y), solver=EKFAC(), damping=0.01, progress=False).fit()
    blocks = []
    for s, a, idx in facs.values():
        q = torch.kron(torch.linalg.eigh(s)[1], torch.linalg.eigh(a)[1])
        d = torch.diagonal(q.T @ ggn[idx[:, None], idx[None, :]] @ q)
        blocks.append((idx, q @ torch.diag(d) @ q.T))
    m = _blockdiag(obj.p, blocks) + (obj.l2 + 0.01) * torch.eye(obj.p, dtype=DT)
    assert rel_err(inf.solver.dense(), m) < 1e-8


@pytest.mark.parametrize("rotate_first", [True, False])
def test_ekfac_correction_same_with_either_contraction_order(problem, monkeypatch, rotate_first):
    """Both ways of forming the rotated pseudo-gradients (factors rotated first, used for
    Linear layers, or the formed pseudo-gradient rotated) give the same eigenvalues."""
    from inflens.solvers import kfac

    obj, x, y, _facs, _ggn = problem
    ref = Influence(obj, (x, y), solver=EKFAC(), progress=False).fit().solver.evals_
    monkeypatch.setattr(kfac, "_rotate_factors_first", lambda *a: rotate_first)
    got = Influence(obj, (x, y), solver=EKFAC(), progress=False).fit().solver.evals_
    for a, b in zip(ref, got):
        assert rel_err(b, a) < 1e-12


def test_ekfac_is_at_least_as_close_to_the_ggn_blocks_as_kfac(problem) -> None:
    obj, x, y, facs, ggn = problem
    errs = {}
    for solver in (KFAC(), EKFAC()):
        inf = Influence(obj, (x, y), solver=solver, progress=False).fit()
        dense = inf.solver.dense() - obj.l2 * torch.eye(obj.p, dtype=DT)
        errs[solver.name] = sum(
            float((dense[i[:, None], i[None, :]] - ggn[i[:, None], i[None, :]]).norm() ** 2)
            for _, _, i in facs.values()
        )
    assert errs["ekfac"] <= errs["kfac"] * (1 + 1e-10)


@pytest.mark.parametrize("solver", [KFAC(), EKFAC()], ids=["kfac", "ekfac"])
def test_single_linear_layer_squared_error_is_exact(solver) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 3, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    obj = Objective(model, "mse", l2=0.05)
    hess = Reference(model, "mse", 0.05).hessian(obj.theta, x, y)
    inf = Influence(obj, (x, y), solver=solver, progress=False).fit()
    rhs = torch.randn(4, obj.p, generator=g, dtype=DT)
    assert rel_err(inf.solver.solve(rhs), torch.linalg.solve(hess, rhs.T).T) < 1e-10


def test_single_output_binary_logistic_ekfac_vs_kfac() -> None:
    """One output: EK-FAC is exact in the eigenbasis of A; here the GGN ``mean h_i a a^T`` is not
    diagonal in it, so compare with the independent ``Q diag(Q^T G Q) Q^T``."""
    f = fitted("logreg_binary")
    obj = Objective(f.fresh_model(), "binary_logistic", l2=f.case.l2)
    x = f.x
    s = torch.sigmoid(obj.outputs(obj.theta, x).reshape(-1))
    h = s * (1 - s)
    ggn = (x.T * h) @ x / x.shape[0]
    q = torch.linalg.eigh(x.T @ x / x.shape[0])[1]
    want = q @ torch.diag(torch.diagonal(q.T @ ggn @ q)) @ q.T + obj.l2 * torch.eye(4, dtype=DT)
    inf = Influence(obj, (x, f.y), solver=EKFAC(), progress=False).fit()
    assert rel_err(inf.solver.dense(), want) < 1e-10
    kf = Influence(obj, (x, f.y), solver=KFAC(), progress=False).fit()
    want_k = float(h.mean()) * x.T @ x / x.shape[0] + obj.l2 * torch.eye(4, dtype=DT)
    assert rel_err(kf.solver.dense(), want_k) < 1e-10


def test_empirical_fisher_factors() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(25, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (25,), generator=g)
    torch.manual_seed(1)
    model = nn.Linear(3, 4).to(DT)
    obj = Objective(model, "cross_entropy", l2=0.1)
    inf = Influence(obj, (x, y), solver=KFAC(fisher="empirical"), progress=False).fit()
    e = torch.softmax(model(x), 1) - F.one_hot(y, 4).to(DT)  # d loss / d logits
    at = torch.cat([x, torch.ones(25, 1, dtype=DT)], 1)
    m = torch.kron(e.T @ e / 25, at.T @ at / 25)
    perm = torch.empty(4, 4, dtype=torch.long)
    perm[:, :3] = torch.arange(12).view(4, 3)
    perm[:, 3] = 12 + torch.arange(4)
    perm = perm.reshape(-1)
    want = torch.zeros(16, 16, dtype=DT)
    want[perm[:, None], perm[None, :]] = m
    want += 0.1 * torch.eye(16, dtype=DT)
    assert rel_err(inf.solver.dense(), want) < 1e-10


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.norm(self.a(x))))


def test_unsupported_layers_get_the_exact_ggn_diagonal_or_an_error() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (20,), generator=g)
    torch.manual_seed(0)
    model = _Normed().to(DT)
    obj = Objective(model, "cross_entropy", l2=0.01)
    with pytest.raises(InputError, match="'norm' \\(LayerNorm"):
        Influence(obj, (x, y), solver=KFAC(unsupported="error"), progress=False).fit()
    with pytest.warns(InflensWarning, match="norm"):
        inf = Influence(obj, (x, y), solver=KFAC(), progress=False).fit()
    assert inf.diagnostics()["diagonal_parameters"] == ["norm.weight", "norm.bias"]
    # the exact GGN diagonal of the LayerNorm parameters
    hess = _output_hessians(model, "cross_entropy", x, y)
    params = dict(model.named_parameters())
    jt = jacrev(lambda th: functional_call(model, {**params, **obj.unflatten(th)}, (x,)))(obj.theta)
    ggn = sum(jt[i].T @ hess[i] @ jt[i] for i in range(20)) / 20
    idx = torch.arange(16, 24)  # a: 12 + 4, then norm: 4 + 4
    e = torch.eye(obj.p, dtype=DT)[idx]
    got = inf.solver.solve(e)[:, idx].diagonal()
    assert rel_err(got, 1 / (ggn.diagonal()[idx] + 0.01)) < 1e-10


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_a_layer_called_twice_is_named_and_falls_back() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (20,), generator=g)
    torch.manual_seed(0)
    obj = Objective(_Shared().to(DT), "cross_entropy", l2=0.01)
    with pytest.warns(InflensWarning, match="'lin' \\(called 2 times"):
        inf = Influence(obj, (x, y), solver=EKFAC(), progress=False).fit()
    assert inf.diagnostics()["layers"] == ["out"]
    with pytest.raises(InputError, match="lin"):
        Influence(obj, (x, y), solver=KFAC(unsupported="error"), progress=False).fit()


def test_paper_cnn_runs_and_is_positive_definite() -> None:
    from inflens.models import PaperCNN

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 784, generator=g, dtype=DT)
    y = torch.randint(0, 10, (16,), generator=g)
    obj = Objective(PaperCNN(seed=0, dtype=DT), "cross_entropy", l2=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)  # every layer is factored
        inf = Influence(obj, (x, y), solver=EKFAC(), damping=0.01, progress=False).fit()
    d = inf.diagnostics()
    assert len(d["layers"]) == 7 and d["min_eigenvalue"] >= 0.011 - 1e-12
    s = inf.loss_influence((x[:2], y[:2]))
    assert s.shape == (2, 16) and torch.isfinite(s).all()


@pytest.mark.parametrize(
    "solver", [KFAC(), EKFAC(), Arnoldi(rank=8)], ids=["kfac", "ekfac", "arnoldi"]
)
def test_save_and_load_keep_the_fitted_solver(solver, tmp_path) -> None:
    f = fitted("mlp_tanh")
    obj = Objective(f.fresh_model(), "cross_entropy", l2=f.case.l2)
    inf = Influence(obj, (f.x, f.y), solver=solver, progress=False).fit()
    want = inf.loss_influence((f.xt, f.yt))
    inf.save(tmp_path / "fit")
    back = Influence.load(tmp_path / "fit", obj, (f.x, f.y), progress=False)
    assert rel_err(back.loss_influence((f.xt, f.yt)), want) < 1e-12


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_sampled_fisher_is_exact_for_one_output(cls) -> None:
    """With one output, ``u = xi u_1`` has ``u u^T = Lambda`` for either sign: the sampled
    factors equal the exact ones (for any number of samples)."""
    f = fitted("logreg_binary")
    obj = Objective(f.fresh_model(), "binary_logistic", l2=f.case.l2)
    exact = Influence(obj, (f.x, f.y), solver=cls(), progress=False).fit().solver.dense()
    for samples in (1, 3):
        solver = cls(fisher="sampled", samples=samples, seed=5)
        got = Influence(obj, (f.x, f.y), solver=solver, progress=False).fit().solver.dense()
        assert rel_err(got, exact) < 1e-10


def test_sampled_fisher_is_unbiased_and_seeded(problem) -> None:
    """Several outputs: the sampled factors scatter around the exact ones (with many samples
    the K-FAC matrix is within a few per cent), the same seed gives the same fit, another
    seed a different one."""
    obj, x, y, _facs, _ggn = problem

    def dense(**kw):
        return Influence(obj, (x, y), solver=KFAC(**kw), progress=False).fit().solver.dense()

    exact = dense()
    many = dense(fisher="sampled", samples=400, seed=0)
    assert rel_err(many, exact) < 0.05
    one = dense(fisher="sampled", samples=1, seed=1)
    assert rel_err(one, exact) > 1e-6  # random, not the exact factors
    assert torch.equal(one, dense(fisher="sampled", samples=1, seed=1))
    assert not torch.equal(one, dense(fisher="sampled", samples=1, seed=2))


def test_sampled_fisher_arguments_are_checked() -> None:
    with pytest.raises(InputError, match="samples must be"):
        KFAC(fisher="sampled", samples=0)
    with pytest.raises(InputError, match="fisher must be"):
        KFAC(fisher="mc")
