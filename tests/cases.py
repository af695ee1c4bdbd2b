"""Small problems and engine-independent reference computations for the core tests.

Every case is a tiny model + loss + data + seed, fitted to its exact minimum in float64 by
Newton's method with an explicit Hessian. The reference functions here never call inflens:
losses are re-implemented from their formulas, the model is evaluated with
``torch.func.functional_call`` and Hessians come from ``torch.autograd.functional.hessian``.
They are the oracle the engine is compared with (like curvlinops' ``cases.py``).

Conventions (PROTOCOL §0): risk ``R(theta) = mean_i l(z_i) + (l2/2) ||theta||^2`` over the
selected parameters; the upweighted risk of eq. 1 is ``R(theta) + eps * L(z_i)`` with
``L = l + (l2/2)||theta||^2`` (the regulariser is part of every per-point loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

DT = torch.float64


# ---------------------------------------------------------------------------- reference losses
def ref_loss(
    name: str, t: float | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example losses written from their formulas (not from inflens.losses)."""

    def signed(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = y.to(dtype)
        return torch.where(y > 0, 1.0, -1.0).to(dtype)

    def scores(out: torch.Tensor) -> torch.Tensor:
        return out.reshape(out.shape[0])

    if name == "cross_entropy":
        return lambda out, y: -torch.log_softmax(out, 1).gather(1, y[:, None].long())[:, 0]
    if name == "binary_logistic":
        # log(1 + exp(-y s)), Sec. 2.3
        return lambda out, y: torch.log1p(torch.exp(-signed(y, out.dtype) * scores(out)))
    if name == "smooth_hinge":
        tt = float(t)
        return lambda out, y: (
            tt * torch.log1p(torch.exp((1 - signed(y, out.dtype) * scores(out)) / tt))
        )
    if name == "hinge":
        return lambda out, y: torch.clamp(1 - signed(y, out.dtype) * scores(out), min=0)
    if name == "mse":
        return lambda out, y: ((out - y) ** 2).reshape(out.shape[0], -1).mean(1)
    raise KeyError(name)


# ---------------------------------------------------------------------------- models
class MLP(nn.Module):
    """``fc(tanh(hidden(x)))`` with biases: a small non-linear network."""

    def __init__(self, d: int, h: int, c: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, h)
        self.fc = nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(x)))


def linear(d: int, c: int, bias: bool = False) -> nn.Module:
    return nn.Linear(d, c, bias=bias)


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A small problem: ``make_model()`` (seeded), a loss, l2, data shape and seed."""

    name: str
    make_model: Callable[[], nn.Module]
    loss: str
    l2: float
    n: int
    d: int
    classes: int  # number of model outputs; 1 = one logit (binary losses) or 1-d regression
    seed: int = 0
    n_test: int = 5
    params: str | None = None
    t: float | None = None
    labels: str = "01"  # for binary losses: "01" or "pm1"
    mix: float = 0.0  # correlate the features (x <- x (I + mix/d 11^T)): an ill-conditioned H
    meta: dict = field(default_factory=dict)

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X, y, X_test, y_test)`` in float64, deterministic under the seed."""
        g = torch.Generator().manual_seed(1000 + self.seed)
        m = self.n + self.n_test
        x = torch.randn(m, self.d, generator=g, dtype=DT)
        x = x @ (torch.eye(self.d, dtype=DT) + self.mix / self.d)
        w = torch.randn(self.d, max(self.classes, 1), generator=g, dtype=DT)
        logits = x @ w + 0.7 * torch.randn(m, max(self.classes, 1), generator=g, dtype=DT)
        if self.loss == "cross_entropy":
            y = logits.argmax(1)
        elif self.loss == "mse":
            y = logits if self.classes > 1 else logits[:, 0]
        else:
            y = (logits[:, 0] > 0).long()
            if self.labels == "pm1":
                y = 2 * y - 1
        return x[: self.n], y[: self.n], x[self.n :], y[self.n :]

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.make_model().to(DT)


CASES: list[Case] = [
    Case("logreg_binary", lambda: linear(4, 1), "binary_logistic", l2=0.05, n=40, d=4, classes=1),
    Case(
        "logreg_binary_pm1",
        lambda: linear(4, 1),
        "binary_logistic",
        l2=0.05,
        n=40,
        d=4,
        classes=1,
        labels="pm1",
        seed=1,
    ),
    Case("logreg_multiclass", lambda: linear(4, 3), "cross_entropy", l2=0.05, n=40, d=4, classes=3),
    Case("mlp_tanh", lambda: MLP(3, 4, 3), "cross_entropy", l2=0.05, n=30, d=3, classes=3, seed=2),
    Case(
        "smooth_hinge_svm",
        lambda: linear(4, 1),
        "smooth_hinge",
        l2=0.05,
        n=40,
        d=4,
        classes=1,
        t=0.1,
        seed=3,
    ),
    Case("mlp_mse", lambda: MLP(3, 3, 2), "mse", l2=0.05, n=30, d=3, classes=2, seed=4),
    Case(
        "mlp_top_layer",
        lambda: MLP(3, 4, 3),
        "cross_entropy",
        l2=0.05,
        n=30,
        d=3,
        classes=3,
        seed=5,
        params="fc.",
    ),
]
#: Cases that are not run by the ``case`` fixture (too large to run everywhere).
EXTRA_CASES: list[Case] = [
    # n = 200 so that leave-one-out (eps = -1/n) is in the first-order regime
    Case(
        "logreg_binary_n200",
        lambda: linear(4, 1),
        "binary_logistic",
        l2=0.01,
        n=200,
        d=4,
        classes=1,
        seed=6,
    ),
    # correlated features: H^-1 matters (scores without H correlate only ~0.9 with the true ones)
    # yet one Hessian sample is cheap, for stochastic LiSSA
    Case(
        "lissa_logreg",
        lambda: linear(3, 1),
        "binary_logistic",
        l2=0.05,
        n=30,
        d=3,
        classes=1,
        seed=13,
        mix=1.5,
        n_test=1,
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES + EXTRA_CASES}
#: cases whose theta is one Linear layer on frozen features: the closed-form backend applies
LINEAR_HEAD_CASES = {
    "logreg_binary",
    "logreg_binary_pm1",
    "logreg_multiclass",
    "smooth_hinge_svm",
    "mlp_top_layer",
}


def backends_claiming(name: str) -> list[str]:
    """Every derivatives backend that claims case ``name`` (each shared test runs on each)."""
    return (["linear_head"] if name in LINEAR_HEAD_CASES else []) + ["vmap", "jacobian"]


# ---------------------------------------------------------------------------- reference maths
def selected_names(model: nn.Module, params: str | None) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    return names if params is None else [n for n in names if n.startswith(params)]


def flat_params(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names]).clone()


def set_flat(model: nn.Module, names: Sequence[str], theta: torch.Tensor) -> None:
    named = dict(model.named_parameters())
    i = 0
    with torch.no_grad():
        for n in names:
            k = named[n].numel()
            named[n].copy_(theta[i : i + k].view_as(named[n]))
            i += k


class Reference:
    """Engine-independent functions of a flat theta for one model / loss / parameter selection."""

    def __init__(self, model: nn.Module, loss: str, l2: float, params: str | None = None, t=None):
        self.model = model
        self.loss = ref_loss(loss, t)
        self.l2 = l2
        self.names = selected_names(model, params)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.names}

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(torch.Size(s).numel())
            out[n] = theta[i : i + k].view(s)
            i += k
        return {**self.frozen, **out}

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(functional_call(self.model, self.params(theta), (x,)), y)

    def reg(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.l2 * (theta * theta).sum()

    def risk(self, theta, x, y, extra: Sequence[tuple[float, torch.Tensor, torch.Tensor]] = ()):
        """``mean_j l_j + (l2/2)||theta||^2 + sum_(eps, x_e, y_e) eps * L(z_e)``."""
        r = self.losses(theta, x, y).mean() + self.reg(theta)
        for eps, xe, ye in extra:
            r = r + eps * (self.losses(theta, xe, ye).sum() + self.reg(theta) * xe.shape[0])
        return r

    def hessian(self, theta, x, y, extra=()) -> torch.Tensor:
        """Explicit ``[p, p]`` Hessian of :meth:`risk` (torch.autograd.functional.hessian)."""
        return torch.autograd.functional.hessian(
            lambda th: self.risk(th, x, y, extra), theta, vectorize=True
        )

    def grad_each(self, theta, x, y) -> torch.Tensor:
        """``[B, p]`` per-example loss gradients, one autograd call per example (no vmap)."""
        rows = []
        for i in range(x.shape[0]):
            th = theta.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.losses(th, x[i : i + 1], y[i : i + 1]).sum(), th)
            rows.append(g)
        return torch.stack(rows)

    def fit(
        self, theta0, x, y, extra=(), tol: float = 1e-12, max_iter: int = 200, mu: float = 0.0
    ) -> torch.Tensor:
        """Minimise :meth:`risk` to ``||grad|| <= tol`` by Levenberg-damped Newton steps."""
        return newton(lambda th: self.risk(th, x, y, extra), theta0, tol, max_iter, mu)


def newton(f: Callable[[torch.Tensor], torch.Tensor], theta0, tol=1e-12, max_iter=200, mu=0.0):
    """Damped Newton with the explicit Hessian; raises if ``||grad f|| <= tol`` is not reached.

    ``mu`` is the initial Levenberg damping: 0 (pure Newton) for refits that start next to the
    minimum, > 0 for fits from a random start.
    """
    theta = theta0.detach().clone()
    for _ in range(max_iter):
        th = theta.clone().requires_grad_(True)
        val = f(th)
        (g,) = torch.autograd.grad(val, th)
        gn = float(g.norm())
        if gn <= tol:
            return theta
        h = torch.autograd.functional.hessian(f, theta, vectorize=True)
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        while True:
            step = torch.linalg.solve(h + mu * eye, -g)
            new = theta + step
            # accept non-increasing steps (up to rounding) and shrink the damping towards pure
            # Newton, which converges quadratically near a strict minimum
            v0 = float(val.detach())
            if float(f(new)) <= v0 + 1e-15 * abs(v0):
                theta = new
                mu = mu / 10 if mu > 1e-14 else 0.0
                break
            mu = max(mu * 10, 1e-6)
            if mu > 1e12:
                raise RuntimeError("Newton line search failed")
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(th), th)
    if float(g.norm()) > tol:
        raise RuntimeError(f"Newton did not reach ||grad|| <= {tol}: {float(g.norm()):.3g}")
    return theta


@dataclass
class Fitted:
    """A case fitted to its minimum: model (at theta-hat), reference, data, theta-hat, H."""

    case: Case
    model: nn.Module
    ref: Reference
    x: torch.Tensor
    y: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    theta: torch.Tensor
    hess: torch.Tensor
    #: the derivatives backend the tests run this case with (the ``case`` fixture sets it)
    backend: str = "auto"

    def fresh_model(self) -> nn.Module:
        """A new copy of the model at theta-hat (tests may mutate theirs)."""
        m = self.case.model()
        m.load_state_dict(self.model.state_dict())
        return m


@functools.cache
def fitted(name: str) -> Fitted:
    """Fit case ``name`` to gradient norm 1e-12 (cached for the session)."""
    case = CASES_BY_NAME[name]
    model = case.model()
    x, y, xt, yt = case.data()
    ref = Reference(model, case.loss, case.l2, case.params, case.t)
    theta = ref.fit(flat_params(model, ref.names), x, y, mu=1e-3)
    set_flat(model, ref.names, theta)
    hess = ref.hessian(theta, x, y)
    lam_min = float(torch.linalg.eigvalsh(hess)[0])
    assert lam_min > 1e-3, f"case {name}: theta-hat is not a strict minimum ({lam_min})"
    return Fitted(case, model, ref, x, y, xt, yt, theta, hess)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius), the relative error used throughout."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
