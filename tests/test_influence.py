"""Influence queries against ground truth: closed forms, explicit float64 Hessians, finite
differences of exact refits, and actual leave-one-out retraining (PROTOCOL §1, §0.3-0.4).

Every reference here is computed without inflens (``tests/cases.py``): explicit Hessians from
``torch.autograd.functional.hessian``, refits by Newton's method to gradient norm 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import inflens
from cases import Fitted, fitted, rel_err
from inflens.errors import InputError
from inflens.solvers import CG

DT = torch.float64


def _influence(
    case: Fitted, solver="exact", model: nn.Module | None = None, **kw
) -> inflens.Influence:
    c = case.case
    obj = inflens.Objective(
        model or case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t,
        backend=case.backend,
    )  # fmt: skip
    return inflens.Influence(obj, (case.x, case.y), solver=solver, progress=False, **kw).fit()


def _ref_influence(case: Fitted) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H^-1, train-side gradients g_i + l2 theta [n, p], test gradients [m, p])``."""
    ref, th = case.ref, case.theta
    hinv = torch.linalg.inv(case.hess)
    g_train = ref.grad_each(th, case.x, case.y) + case.case.l2 * th
    g_test = ref.grad_each(th, case.xt, case.yt)
    return hinv, g_train, g_test


# ---------------------------------------------------------------------------- 1. closed form (Sec. 2.3)
@pytest.mark.parametrize("name", ["logreg_binary", "logreg_binary_pm1"])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_binary_logistic_closed_form(name: str, solver: str) -> None:
    """PROTOCOL 1.7/1.8: I_up,loss and self-influence of binary logistic regression."""
    case = fitted(name)
    inf = _influence(case, solver if solver == "exact" else CG(tol=1e-13))
    lam, th = case.case.l2, case.theta
    x, xt = case.x, case.xt
    y = case.y.to(DT) if name.endswith("pm1") else 2 * case.y.to(DT) - 1
    yt = case.yt.to(DT) if name.endswith("pm1") else 2 * case.yt.to(DT) - 1
    sig = torch.sigmoid
    m, mt = x @ th, xt @ th
    # H = (1/n) sum_i sigma(theta^T x_i) sigma(-theta^T x_i) x_i x_i^T + l2 I
    h = (x.T * (sig(m) * sig(-m))) @ x / x.shape[0] + lam * torch.eye(4, dtype=DT)
    hinv = torch.linalg.inv(h)
    # I_up,loss(z, z_test) = -y_test y sigma(-y_test theta^T x_test) sigma(-y theta^T x) x_test^T H^-1 x
    pure = -(yt * sig(-yt * mt))[:, None] * (y * sig(-y * m))[None, :] * (xt @ hinv @ x.T)
    # + the l2 theta part of the training gradient: -grad L(z_test)^T H^-1 (l2 theta)
    reg = (yt * sig(-yt * mt))[:, None] * (xt @ hinv @ (lam * th))[:, None]
    want = pure + reg
    got = inf.loss_influence((xt, case.yt))
    assert got.dtype == DT and got.shape == (5, 40)
    assert rel_err(got, want) < 1e-8
    assert rel_err(got, pure) > 1e-3  # the l2 theta term matters here: the test can tell
    # Sec. 5.4: -I_up,loss(z_i, z_i) = sigma(-y_i theta^T x_i)^2 x_i^T H^-1 x_i
    self_want = -(sig(-y * m) ** 2) * ((x @ hinv) * x).sum(1)
    assert rel_err(inf.self_influence(include_l2_gradient=False), self_want) < 1e-8
    self_full = self_want + y * sig(-y * m) * (x @ hinv @ (lam * th))
    assert rel_err(inf.self_influence(), self_full) < 1e-8


# ---------------------------------------------------------------------------- 2. explicit Hessian
def test_exact_matches_explicit_hessian(case: Fitted) -> None:
    """Exact's param/loss/self influence against H from torch.autograd.functional.hessian."""
    inf = _influence(case)
    hinv, g_train, g_test = _ref_influence(case)
    assert rel_err(inf.param_influence(None), -g_train @ hinv) < 1e-8
    assert rel_err(inf.param_influence([3, 0, 3]), -g_train[[3, 0, 3]] @ hinv) < 1e-8
    li = inf.loss_influence((case.xt, case.yt))
    assert rel_err(li, -g_test @ hinv @ g_train.T) < 1e-8
    g_loss = g_train - case.case.l2 * case.theta
    assert rel_err(inf.self_influence(), -((g_loss @ hinv) * g_train).sum(1)) < 1e-8
    assert rel_err(inf.self_influence(False), -((g_loss @ hinv) * g_loss).sum(1)) < 1e-8
    assert rel_err(inf.s_test((case.xt, case.yt)), g_test @ hinv) < 1e-8
    assert rel_err(inf.s_test((case.xt, case.yt), mean=True)[0], g_test.mean(0) @ hinv) < 1e-8
    assert rel_err(inf.train_gradients([1, 2]), g_train[[1, 2]]) < 1e-12


def test_damping_is_added_to_the_hessian() -> None:
    case = fitted("mlp_tanh")
    inf = _influence(case, damping=0.3)
    hinv = torch.linalg.inv(case.hess + 0.3 * torch.eye(case.theta.numel(), dtype=DT))
    _, g_train, g_test = _ref_influence(case)
    assert rel_err(inf.loss_influence((case.xt, case.yt)), -g_test @ hinv @ g_train.T) < 1e-8


# ---------------------------------------------------------------------------- 3. finite differences
def _refit(case: Fitted, x=None, y=None, extra=()) -> torch.Tensor:
    x = case.x if x is None else x
    y = case.y if y is None else y
    return case.ref.fit(case.theta, x, y, extra, tol=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        "logreg_binary",
        "logreg_multiclass",
        "mlp_tanh",
        "smooth_hinge_svm",
        "mlp_mse",
        "mlp_top_layer",
    ],
)
def test_param_influence_is_derivative_of_upweighted_optimum(name: str) -> None:
    """eq. 1: d theta_eps / d eps with theta_eps = argmin (1/n) sum_j L(z_j) + eps L(z_i)."""
    case = fitted(name)
    inf = _influence(case)
    eps = 2e-5
    for i in (0, 7):
        zi = (case.x[i : i + 1], case.y[i : i + 1])
        plus = _refit(case, extra=[(eps, *zi)])
        minus = _refit(case, extra=[(-eps, *zi)])
        fd = (plus - minus) / (2 * eps)
        # central differences: O(eps^2) ~ 1e-8..1e-6 relative error; a missing l2 theta term
        # or a wrong sign would be O(1)
        assert rel_err(inf.param_influence([i])[0], fd) < 3e-6


@pytest.mark.parametrize("name", ["logreg_binary", "mlp_tanh", "mlp_top_layer", "mlp_mse"])
def test_input_influence_is_derivative_of_refit_test_loss(name: str) -> None:
    """eq. 5: replacing x_i by x_i + delta and refitting moves the mean test loss by
    I_pert,loss . delta / n (central differences along each input coordinate).

    ``mlp_top_layer`` has ``params="fc."``: the input gradient flows through a frozen layer.
    """
    case = fitted(name)
    inf = _influence(case)
    n, h, i = case.x.shape[0], 1e-3, 4
    got = inf.input_influence((case.xt, case.yt), [i, 9])
    assert got.shape == (2, case.case.d)
    fd = torch.zeros(case.case.d, dtype=DT)
    for j in range(case.case.d):
        vals = []
        for sign in (1.0, -1.0):
            xp = case.x.clone()
            xp[i, j] += sign * h
            vals.append(case.ref.losses(_refit(case, x=xp), case.xt, case.yt).mean())
        fd[j] = (vals[0] - vals[1]) / (2 * h)
    assert rel_err(got[0] / n, fd) < 1e-5


@pytest.mark.parametrize("name", ["logreg_multiclass", "mlp_tanh", "logreg_binary_pm1"])
def test_label_influence_is_derivative_of_moving_mass_to_new_label(name: str) -> None:
    """Move eps weight from (x_i, y_i) to (x_i, y_new): d L(z_test) / d eps (Sec. 2.2)."""
    case = fitted(name)
    inf = _influence(case)
    idx = [2, 11]
    if case.case.loss == "cross_entropy":
        new = (case.y[idx] + 1) % case.case.classes
    else:
        new = -case.y[idx]
    got = inf.label_influence((case.xt, case.yt), idx, new)
    assert got.shape == (case.xt.shape[0], 2)
    eps = 1e-4
    for k, i in enumerate(idx):
        xi = case.x[i : i + 1]
        extra_p = [(eps, xi, new[k : k + 1]), (-eps, xi, case.y[i : i + 1])]
        extra_m = [(-eps, xi, new[k : k + 1]), (eps, xi, case.y[i : i + 1])]
        lp = case.ref.losses(_refit(case, extra=extra_p), case.xt, case.yt)
        lm = case.ref.losses(_refit(case, extra=extra_m), case.xt, case.yt)
        assert rel_err(got[:, k], (lp - lm) / (2 * eps)) < 1e-5
    # an unchanged label has no influence
    assert inf.label_influence((case.xt, case.yt), idx, case.y[idx]).abs().max() == 0


def test_predicted_loss_change_matches_leave_one_out_refits() -> None:
    """Removing z_i and refitting the mean risk over n-1 points (same l2): the actual test-loss
    change is about -I_up,loss / n (PROTOCOL §0.4, §3)."""
    case = fitted("logreg_binary_n200")
    inf = _influence(case)
    n = case.x.shape[0]
    pred = inf.predicted_loss_change((case.xt[:1], case.yt[:1]))[0]
    base = case.ref.losses(case.theta, case.xt[:1], case.yt[:1])[0]
    actual = torch.empty(n, dtype=DT)
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        keep[i] = False
        th = _refit(case, x=case.x[keep], y=case.y[keep])
        actual[i] = case.ref.losses(th, case.xt[:1], case.yt[:1])[0] - base
        keep[i] = True
    r = torch.corrcoef(torch.stack([pred, actual]))[0, 1]
    slope = (pred @ actual) / (actual @ actual)
    assert r > 0.99 and abs(slope - 1) < 0.05


# ---------------------------------------------------------------------------- 10. signs and scaling
def test_predicted_loss_change_is_minus_influence_over_n(case: Fitted) -> None:
    inf = _influence(case)
    test = (case.xt, case.yt)
    li = inf.loss_influence(test)
    n = case.x.shape[0]
    torch.testing.assert_close(inf.predicted_loss_change(test), -li / n, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(
        inf.predicted_loss_change(test, [5, 1]), -li[:, [5, 1]] / n, rtol=1e-12, atol=1e-16
    )
    s = inf.s_test(test)
    torch.testing.assert_close(inf.score(s), li, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(inf.score(s, [0, 3]), li[:, [0, 3]], rtol=1e-12, atol=1e-16)


def test_duplicate_of_test_point_in_training_set_is_helpful() -> None:
    """A training copy of the test point lowers its loss: I_up,loss < 0, predicted change > 0."""
    case = fitted("mlp_tanh")
    k = 6
    xt, yt = case.x[k : k + 1], case.y[k : k + 1]
    inf = _influence(case)
    change = inf.predicted_loss_change((xt, yt))[0]
    assert change[k] > 0
    assert inf.loss_influence((xt, yt))[0, k] < 0
    assert change[k] > change.median()
    # removing the copy really raises the test loss (exact refit)
    keep = torch.arange(case.x.shape[0]) != k
    th = _refit(case, x=case.x[keep], y=case.y[keep])
    assert case.ref.losses(th, xt, yt)[0] > case.ref.losses(case.theta, xt, yt)[0]


# ---------------------------------------------------------------------------- 5. invariances
def test_batch_size_and_scoring_invariance() -> None:
    case = fitted("mlp_tanh")
    test = (case.xt, case.yt)
    runs = {}
    for bs in (1, 7, None):
        for scoring in ("jvp", "grad"):
            inf = _influence(case, batch_size=bs, scoring=scoring)
            runs[bs, scoring] = (
                inf.loss_influence(test),
                inf.self_influence(),
                inf.param_influence([1, 8]),
            )
    base = runs[None, "grad"]
    for key, vals in runs.items():
        for a, b in zip(vals, base):
            assert rel_err(a, b) < 1e-12, key


def test_dataset_and_dataloader_inputs_equal_tensors() -> None:
    case = fitted("logreg_multiclass")
    test = (case.xt, case.yt)
    want = _influence(case).loss_influence(test)
    c = case.case
    for train, tst in [
        (TensorDataset(case.x, case.y), TensorDataset(*test)),
        (
            DataLoader(TensorDataset(case.x, case.y), batch_size=6),
            DataLoader(TensorDataset(*test), batch_size=2),
        ),
        ((case.x.numpy(), case.y.numpy()), test),
    ]:
        obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, backend=case.backend)
        inf = inflens.Influence(obj, train, progress=False).fit()
        assert rel_err(inf.loss_influence(tst), want) < 1e-12
        assert (
            rel_err(
                inf.input_influence(tst, [0, 3]), _influence(case).input_influence(test, [0, 3])
            )
            < 1e-12
        )


def test_shuffling_dataloader_is_refused() -> None:
    case = fitted("logreg_multiclass")
    obj = inflens.Objective(case.fresh_model(), "cross_entropy", l2=0.05)
    with pytest.raises(InputError, match="shuffle=False"):
        inflens.Influence(
            obj, DataLoader(TensorDataset(case.x, case.y), batch_size=4, shuffle=True)
        )


# ---------------------------------------------------------------------------- 7. dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_results_follow_model_dtype(dtype: torch.dtype, solver: str) -> None:
    case = fitted("mlp_tanh")
    model = case.fresh_model().to(dtype)
    obj = inflens.Objective(model, "cross_entropy", l2=0.05)
    x, xt = case.x.to(dtype), case.xt.to(dtype)
    inf = inflens.Influence(obj, (x, case.y), solver=solver, progress=False).fit()
    test = (xt, case.yt)
    outs = [
        inf.loss_influence(test),
        inf.predicted_loss_change(test),
        inf.self_influence(),
        inf.param_influence([0]),
        inf.input_influence(test, [0]),
        inf.label_influence(test, [0], [(int(case.y[0]) + 1) % 3]),
        inf.s_test(test),
    ]
    assert all(o.dtype == dtype for o in outs)
    want = _influence(case).loss_influence((case.xt, case.yt))
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    assert rel_err(outs[0].double(), want) < tol


# ---------------------------------------------------------------------------- 6. train-mode BatchNorm
class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.hidden(x))))


def test_batchnorm_in_train_mode_is_evaluated_in_eval_mode() -> None:
    case = fitted("logreg_multiclass")  # only its data is used
    x, y = case.x[:, :3], case.y
    torch.manual_seed(0)
    model = BNNet().to(DT)
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.copy_(torch.tensor([0.5, -0.2, 0.1, 0.3]))
        model.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 0.8]))
    stats = [b.clone() for b in model.buffers()]
    model.train()
    args = {"loss": "cross_entropy", "l2": 0.05}
    inf_kw = {"damping": 1.0, "progress": False}
    test = (case.xt[:, :3], case.yt)
    got = inflens.Influence(inflens.Objective(model, **args), (x, y), **inf_kw).fit()
    scores = got.loss_influence(test)
    pert = got.input_influence(test, [0, 1])
    assert model.training and model.bn.training  # the user's flags are restored
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # stats unchanged
    eval_model = BNNet().to(DT)
    eval_model.load_state_dict(model.state_dict())
    eval_model.eval()
    ref = inflens.Influence(inflens.Objective(eval_model, **args), (x, y), **inf_kw).fit()
    torch.testing.assert_close(scores, ref.loss_influence(test), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pert, ref.input_influence(test, [0, 1]), rtol=1e-12, atol=1e-15)
    assert not eval_model.training
    # and train-mode BatchNorm would have given different outputs (the test can tell)
    with torch.no_grad():
        assert not torch.allclose(model(x), eval_model(x))


def test_diagnostics_report_the_problem() -> None:
    case = fitted("mlp_tanh")
    inf = _influence(case, damping=0.01)
    d = inf.diagnostics()
    assert d["solver"] == "exact" and d["n_train"] == 30 and d["p"] == case.theta.numel()
    assert d["l2"] == 0.05 and d["damping"] == 0.01
    eig = torch.linalg.eigvalsh(case.hess)
    assert d["min_eigenvalue"] == pytest.approx(float(eig[0]) + 0.01, rel=1e-8)
    assert d["max_eigenvalue"] == pytest.approx(float(eig[-1]) + 0.01, rel=1e-8)


# ---------------------------------------------------------------------------- per-parameter l2
# mean_i loss_i + (1/2) sum_j l2_j theta_j^2 with l2 = 0 on the biases (the paper's CNN): every
# result is checked against an explicit float64 Hessian of that objective built by autograd from
# a forward pass written out here, independent of inflens.
_D, _HID, _C, _N = 3, 5, 3, 24
_DAMPING = 0.5  # the random network is not at a minimum: enough damping for a PD matrix


def _mlp_problem(seed: int = 0, dtype: torch.dtype = DT):
    """A 2-layer tanh MLP with biases, data, and a per-parameter l2 (weights 0.02-0.2, biases 0)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(_D, _HID), nn.Tanh(), nn.Linear(_HID, _C)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(_N + 3, _D, generator=g, dtype=dtype)
    y = torch.randint(0, _C, (_N + 3,), generator=g)
    p = sum(t.numel() for t in model.parameters())
    l2 = torch.zeros(p, dtype=dtype)
    for lo, hi in ((0, _HID * _D), (_HID * _D + _HID, _HID * _D + _HID + _C * _HID)):  # weights
        l2[lo:hi] = torch.linspace(0.02, 0.2, hi - lo, dtype=dtype)
    return model, (x[:_N], y[:_N]), (x[_N:], y[_N:]), l2


def _ref_losses(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of the MLP at a flat theta (named_parameters order)."""
    w1, b1, w2, b2 = torch.split(theta, [_HID * _D, _HID, _C * _HID, _C])
    out = torch.tanh(x @ w1.view(_HID, _D).T + b1) @ w2.view(_C, _HID).T + b2
    return nn.functional.cross_entropy(out, y, reduction="none")


def _ref_l2(model: nn.Module, train, test, l2: torch.Tensor, damping: float):
    """``(A, g_train + l2 theta [n, p], g_test [m, p])`` with ``A`` the explicit Hessian of
    ``mean loss + (1/2) sum l2_j theta_j^2`` plus ``damping I``."""
    theta = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
    (x, y), (xt, yt) = train, test

    def risk(th: torch.Tensor) -> torch.Tensor:
        return _ref_losses(th, x, y).mean() + 0.5 * (l2 * th * th).sum()

    a = torch.autograd.functional.hessian(risk, theta)
    a = a + damping * torch.eye(theta.numel(), dtype=theta.dtype)
    jac = torch.autograd.functional.jacobian
    g_train = jac(lambda th: _ref_losses(th, x, y), theta) + l2 * theta
    g_test = jac(lambda th: _ref_losses(th, xt, yt), theta)
    return a, g_train, g_test


def test_per_parameter_l2_curvature_is_the_explicit_hessian() -> None:
    """A = H + diag(l2) + damping I on every path: products, dense from products, the GGN's
    Jacobian shortcut and a Linear head's closed form."""
    from inflens.curvature import Curvature
    from inflens.data import Data

    model, train, test, l2 = _mlp_problem()
    a, _, _ = _ref_l2(model, train, test, l2, _DAMPING)
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    curv = Curvature(obj, Data(train), _DAMPING, chunk_size=7, progress=False)
    v = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(1), dtype=DT)
    # float64, entries O(1), sums of 24 examples: round-off far below 1e-12 relative
    assert rel_err(curv.matvec(v), v @ a) < 1e-12
    assert rel_err(curv.dense(block=5), a) < 1e-12
    assert rel_err(curv.dense(method="products"), a) < 1e-12
    with pytest.raises(InputError, match="per-parameter l2"):
        _ = curv.shift  # a scalar shift does not exist here
    assert torch.equal(curv.shift_diag, l2 + _DAMPING)

    # GGN: the Jacobian shortcut and the products both add exactly diag(l2) to the l2 = 0 GGN
    def ggn(lam) -> Curvature:
        o = inflens.Objective(model, "cross_entropy", l2=lam)
        c = Curvature(o, Data(train), _DAMPING, progress=False, curvature="ggn")
        return c

    base = ggn(0.0).dense()
    for method in ("auto", "products"):
        assert rel_err(ggn(l2).dense(method=method) - base, torch.diag(l2)) < 1e-12

    # a Linear head on frozen features: its closed-form dense matrix is the block of A
    head = inflens.Objective(model, "cross_entropy", l2=l2[_HID * _D + _HID :], params="2.")
    hc = Curvature(head, Data(train), _DAMPING, progress=False)
    assert hc.backend.name == "linear_head"
    block = a[_HID * _D + _HID :, _HID * _D + _HID :]
    assert rel_err(hc.dense(), block) < 1e-12


@pytest.mark.parametrize(
    "solver",
    [
        "exact",
        "cg",
        "arnoldi_full",  # every eigenpair kept: the exact inverse
        "lissa_full_batch",  # deterministic Neumann series, converged
    ],
)
def test_per_parameter_l2_influence_matches_explicit_hessian(solver: str) -> None:
    from inflens.solvers import Arnoldi, Exact, LiSSA

    model, train, test, l2 = _mlp_problem()
    a, g_train, g_test = _ref_l2(model, train, test, l2, _DAMPING)
    evals = torch.linalg.eigvalsh(a)
    assert evals.min() > 0.05  # a well-posed reference
    p = a.shape[0]
    sol = {
        "exact": Exact(),
        "cg": CG(tol=1e-12),
        "arnoldi_full": Arnoldi(rank=p, n_iters=p),
        # rho = 1 - lambda_min / (1.5 lambda_max) = 0.855 per step (cond(A) = 4.6, measured);
        # 300 steps take the truncation below 1e-20
        "lissa_full_batch": LiSSA(depth=300, batch_size=None),
    }[solver]
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    inf = inflens.Influence(obj, train, solver=sol, damping=_DAMPING, progress=False).fit()
    ref = -g_test @ torch.linalg.solve(a, g_train.T)  # [m, n], negative = helpful
    # float64 with cond(A) below 1e3: the direct solves agree to ~1e-13; CG stops at 1e-12
    # relative residual; LiSSA's truncation and the Krylov round-off stay below 1e-9
    tol = 1e-10 if solver in ("exact", "cg") else 1e-8
    assert float(evals.max() / evals.min()) < 1e3
    assert rel_err(inf.train_gradients(None), g_train) < 1e-12
    assert rel_err(inf.loss_influence(test), ref) < tol
    if solver == "lissa_full_batch":
        return  # the per-training-point queries below would take one series each
    self_ref = -(g_train - l2 * obj.theta) @ torch.linalg.solve(a, g_train.T)
    assert rel_err(inf.self_influence(), self_ref.diagonal()) < tol
    assert rel_err(inf.param_influence([0, 5]), -torch.linalg.solve(a, g_train[[0, 5]].T).T) < tol
    d = inf.diagnostics()
    assert d["l2"] is None and d["l2_range"] == [0.0, pytest.approx(0.2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constant_l2_vector_gives_the_scalar_scores(dtype: torch.dtype) -> None:
    """A scalar l2 and the same value as a [p] vector are one objective (to round-off)."""
    model, train, test, _ = _mlp_problem(dtype=dtype)
    lam = 0.07

    def scores(l2) -> tuple[torch.Tensor, float]:
        obj = inflens.Objective(model, "cross_entropy", l2=l2)
        inf = inflens.Influence(obj, train, damping=_DAMPING, progress=False).fit()
        return inf.loss_influence(test), inf.diagnostics()["condition_number"]

    p = sum(t.numel() for t in model.parameters())
    scalar, cond = scores(lam)
    vector, _ = scores(torch.full((p,), lam, dtype=dtype))
    # backward-stable solve: relative error about eps * cond(A), with a factor 100 for the
    # sums over examples and parameters in the Hessian products
    tol = 100 * torch.finfo(dtype).eps * cond
    assert rel_err(vector, scalar) < tol
    # and the vector is not ignored: l2 = 0 gives other scores
    zero, _ = scores(torch.zeros(p, dtype=dtype))
    assert rel_err(zero, scalar) > 100 * tol


@pytest.mark.parametrize("solver", ["kfac", "ekfac", "pcg", "arnoldi_shift"])
def test_solvers_needing_a_scalar_l2_refuse_a_per_parameter_l2(solver: str) -> None:
    from inflens.solvers import Arnoldi, make_solver

    model, train, _, l2 = _mlp_problem()
    sol = Arnoldi(residual="shift") if solver == "arnoldi_shift" else make_solver(solver)
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    inf = inflens.Influence(obj, train, solver=sol, damping=_DAMPING, progress=False)
    with pytest.raises(InputError, match="per-parameter l2.*Exact, CG"):
        inf.fit()
    # the same solver fits the objective with a scalar l2
    scalar = inflens.Objective(model, "cross_entropy", l2=0.1)
    sol2 = Arnoldi(residual="shift") if solver == "arnoldi_shift" else make_solver(solver)
    inflens.Influence(scalar, train, solver=sol2, damping=_DAMPING, progress=False).fit()


def test_per_parameter_l2_artifacts_round_trip(tmp_path) -> None:
    from inflens.artifacts import ArtifactMismatchError

    model, train, test, l2 = _mlp_problem()
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    inf = inflens.Influence(obj, train, damping=_DAMPING, progress=False).fit()
    inf.save(tmp_path / "a")
    back = inflens.Influence.load(tmp_path / "a", obj.with_l2(l2.clone()), train, progress=False)
    assert rel_err(back.loss_influence(test), inf.loss_influence(test)) < 1e-14
    other = l2.clone()
    other[3] += 1e-3
    for wrong in (obj.with_l2(other), obj.with_l2(0.0), obj.with_l2(torch.zeros_like(l2))):
        with pytest.raises(ArtifactMismatchError, match="model parameters"):
            inflens.Influence.load(tmp_path / "a", wrong, train, progress=False)


@pytest.mark.parametrize("mode", ["exact", "cg"])
def test_per_parameter_l2_gradient_index_matches_explicit_hessian(tmp_path, mode: str) -> None:
    """The stored training side of an index carries ``g_i + l2 * theta`` elementwise: its
    scores and self-influence equal the explicit formula (precondition 'train' for the
    factorising solver, 'test' for CG)."""
    model, train, test, l2 = _mlp_problem()
    a, g_train, g_test = _ref_l2(model, train, test, l2, _DAMPING)
    want = -g_test @ torch.linalg.solve(a, g_train.T)
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    sol = "exact" if mode == "exact" else CG(tol=1e-12)
    inf = inflens.Influence(obj, train, solver=sol, damping=_DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", chunk_size=10)
    # float64, cond(A) = 4.6: round-off far below 1e-9 relative
    assert rel_err(index.loss_influence(test), want) < 1e-9
    if mode == "exact":
        g_plain = g_train - l2 * torch.cat([t.detach().reshape(-1) for t in model.parameters()])
        self_want = -(torch.linalg.solve(a, g_plain.T).T * g_train).sum(1)
        assert rel_err(index.self_influence(), self_want) < 1e-9
