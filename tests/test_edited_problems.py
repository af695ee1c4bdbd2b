"""Many problems at once (EditedProblems) against each problem written out on its own data.

Every shared case runs on every backend that claims it (``case`` fixture); the reference is
the case's own loss (written from its formula) on the explicitly edited training set, its
autograd gradient and its explicit float64 Hessian.
"""

from __future__ import annotations

import pytest
import torch

import inflens
from cases import DT, Fitted
from inflens.edited_problems import EditedProblems
from inflens.errors import InputError

K, k = 3, 2


def _setup(case: Fitted, thetas_noise: float = 0.3):
    c = case.case
    obj = inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend
    )
    g = torch.Generator().manual_seed(7)
    rows = torch.stack([torch.randperm(c.n, generator=g)[:k] for _ in range(K)])
    problems = EditedProblems(obj, (case.x, case.y), rows)
    new_x = case.x[rows] + torch.randn(K, k, c.d, generator=g, dtype=DT)
    problems.replace(torch.arange(K), new_x)
    thetas = case.theta + thetas_noise * torch.randn(K, case.theta.numel(), generator=g, dtype=DT)
    return obj, problems, rows, new_x, thetas


def _edited(case: Fitted, rows: torch.Tensor, new_x: torch.Tensor, t: int) -> torch.Tensor:
    x = case.x.clone()
    x[rows[t]] = new_x[t]
    return x


def test_risk_gradient_and_curvature_match_each_problem_alone(case: Fitted) -> None:
    _, problems, rows, new_x, thetas = _setup(case)
    which = torch.tensor([2, 0])  # any subset, in any order
    th = thetas[which]
    vecs = torch.randn(2, th.shape[1], generator=torch.Generator().manual_seed(3), dtype=DT)
    if case.backend == "linear_head":  # the cases' heads are the models' outputs
        assert problems.backend.head.output_shape is not None
    risk = problems.risk(th, which)
    grad = problems.gradient(th, which)
    prod = problems.curvature_product(vecs, th, which, damping=0.01)
    ref = case.ref
    for j, t in enumerate(which.tolist()):
        x = _edited(case, rows, new_x, t)
        theta = th[j].clone().requires_grad_(True)
        r = ref.risk(theta, x, case.y)
        (g,) = torch.autograd.grad(r, theta)
        h = ref.hessian(th[j], x, case.y)
        scale = float(h.abs().max())
        assert float(risk[j]) == pytest.approx(float(r.detach()), rel=1e-12, abs=1e-14)
        assert torch.allclose(grad[j], g, rtol=1e-10, atol=1e-12 * float(g.abs().max() + 1))
        want = h @ vecs[j] + 0.01 * vecs[j]
        assert torch.allclose(prod[j], want, rtol=1e-10, atol=1e-11 * scale)


def test_unedited_problem_is_the_training_risk(case: Fitted) -> None:
    """With the original rows back in place, problem ``t`` is the training objective itself:
    the gradient vanishes at theta-hat and the product is ``H v``."""
    obj, problems, rows, _, _ = _setup(case)
    problems.replace(torch.arange(K), case.x[rows])
    th = case.theta.expand(K, -1).clone()
    grad = problems.gradient(th, torch.arange(K))
    assert float(grad.abs().max()) < 1e-9
    v = torch.eye(th.shape[1], dtype=DT)[:K] if th.shape[1] >= K else torch.ones(K, th.shape[1])
    prod = problems.curvature_product(v.to(DT), th, torch.arange(K))
    assert torch.allclose(prod, v.to(DT) @ case.hess, rtol=1e-10, atol=1e-11)


def test_memory_budget_splits_the_pass_without_changing_it(case: Fitted) -> None:
    """A budget that forces one-example chunks and one theta at a time gives the same sums."""
    obj, problems, rows, new_x, thetas = _setup(case)
    tiny = EditedProblems(obj, (case.x, case.y), rows, budget_bytes=1)
    tiny.replace(torch.arange(K), new_x)
    tiny.budget = problems.backend.sums_bytes(1, 1, obj.p, 8, problems._act)  # one by one
    which = torch.arange(K)
    assert torch.allclose(
        tiny.gradient(thetas, which), problems.gradient(thetas, which), rtol=1e-11, atol=1e-13
    )
    v = torch.ones_like(thetas)
    assert torch.allclose(
        tiny.curvature_product(v, thetas, which),
        problems.curvature_product(v, thetas, which),
        rtol=1e-11,
        atol=1e-13,
    )


def test_bad_rows_are_refused() -> None:
    model = torch.nn.Linear(3, 1).double()
    obj = inflens.Objective(model, "binary_logistic", l2=0.1)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 2, (10,))
    with pytest.raises(InputError, match="repeats"):
        EditedProblems(obj, (x, y), torch.tensor([[1, 1]]))
    with pytest.raises(InputError, match=r"\[0, 9\]"):
        EditedProblems(obj, (x, y), torch.tensor([[1, 10]]))
    with pytest.raises(InputError, match="non-empty"):
        EditedProblems(obj, (x, y), torch.tensor([1, 2]))
    problems = EditedProblems(obj, (x, y), torch.tensor([[1, 2]]))
    with pytest.raises(InputError, match="NaN"):
        problems.replace(torch.tensor([0]), torch.full((1, 2, 3), float("nan"), dtype=DT))


class _Scaled(torch.nn.Module):
    """A Linear layer followed by a frozen computation (not a view of the layer's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.fc(x)[:, 0]


def test_closed_form_for_many_thetas_only_when_the_output_is_the_layers() -> None:
    """A view after the layer (``[:, 0]``) keeps the closed form; a computation after it
    does not, and the vmap default then gives the right numbers."""
    from inflens.models import LogisticRegression

    x, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    for model, direct in ((LogisticRegression(3).double(), True), (_Scaled().double(), False)):
        obj = inflens.Objective(model, "binary_logistic", l2=0.1)
        problems = EditedProblems(obj, (x, y), torch.tensor([[0, 5]]))
        assert problems.backend.name == "linear_head"
        assert (problems.backend.head.output_shape is not None) is direct
        th = obj.theta.detach()[None] + 0.5
        risk = lambda t, o=obj: o.losses(t, x, y).mean() + o.regularizer(t)  # noqa: E731
        want = torch.func.grad(risk)(th[0])
        got = problems.gradient(th, torch.tensor([0]))[0]
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_curvature_operator_at_fixed_thetas_equals_the_product(case: Fitted) -> None:
    """The operator (factors of the shared set computed once) on any subset of rows gives
    :meth:`EditedProblems.curvature_product`."""
    _, problems, _, _, thetas = _setup(case)
    which = torch.tensor([1, 2, 0])
    op = problems.curvature_operator(thetas[which], which, damping=0.02)
    g = torch.Generator().manual_seed(5)
    for rows in (torch.arange(3), torch.tensor([2, 0])):
        v = torch.randn(len(rows), thetas.shape[1], generator=g, dtype=DT)
        want = problems.curvature_product(v, thetas[which][rows], which[rows], damping=0.02)
        assert torch.allclose(op(v, rows), want, rtol=1e-12, atol=1e-13)


def test_solve_refit_and_target_gradients_match_each_problem_alone(case: Fitted) -> None:
    """Batched CG solves (plain and preconditioned) against the explicit Hessian's solve, the
    batched exact refits against the reference Newton fit on each edited set, and the
    targets' mean gradients against autograd."""
    c, ref = case.case, case.ref
    obj = inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend
    )
    g = torch.Generator().manual_seed(11)
    rows = torch.stack([torch.randperm(c.n, generator=g)[:k] for _ in range(K)])
    problems = EditedProblems(obj, (case.x, case.y), rows)
    # small edits: the refit starts next to each edited minimum (the MLP cases are non-convex)
    new_x = case.x[rows] + 0.1 * torch.randn(K, k, c.d, generator=g, dtype=DT)
    problems.replace(torch.arange(K), new_x)
    which = torch.arange(K)
    thetas = case.theta.expand(K, -1).clone()
    fit = problems.refit(thetas, which, tol=1e-11, inverse=torch.linalg.inv(case.hess))
    b = torch.randn(K, thetas.shape[1], generator=g, dtype=DT)
    plain = problems.solve(b, fit.theta, which, damping=0.01)
    pre = problems.solve(b, fit.theta, which, 0.01, torch.linalg.inv(case.hess))
    targets = [(case.xt[t : t + 2], case.yt[t : t + 2]) for t in range(K)]
    tg = problems.target_gradients(fit.theta, targets)
    for t in range(K):
        x = _edited(case, rows, new_x, t)
        want = ref.fit(case.theta, x, case.y, tol=1e-11)
        h = ref.hessian(fit.theta[t], x, case.y)
        cond = float(torch.linalg.cond(h))
        assert torch.allclose(fit.theta[t], want, rtol=0, atol=1e-9 * cond)
        sol = torch.linalg.solve(h + 0.01 * torch.eye(h.shape[0], dtype=DT), b[t])
        for got in (plain[t], pre[t]):
            assert torch.allclose(got, sol, rtol=0, atol=1e-8 * cond * float(sol.abs().max()))
        th = fit.theta[t].clone().requires_grad_(True)
        (gt,) = torch.autograd.grad(ref.losses(th, *targets[t]).mean(), th)
        assert torch.allclose(tg[t], gt, rtol=1e-10, atol=1e-12)
