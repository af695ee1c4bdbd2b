"""Fast paths give the same numbers as the plain ones: closed-form top Linear layer, JVP vs
per-example-gradient scoring, the automatic choice, single-vector HVPs, the LiSSA loop, and the
diagnostics (checked against explicit float64 Hessians from ``cases``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cases import DT, MLP, fitted, rel_err
from inflens import InflensWarning, Influence, Objective
from inflens.backends import LinearHeadBackend, VmapBackend
from inflens.solvers import CG, Exact, LiSSA


def _obj(name: str, **kw) -> tuple[Objective, object]:
    f = fitted(name)
    c = f.case
    return Objective(f.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, **kw), f


def _autograd(obj: Objective, x, y, which: str) -> torch.Tensor:
    """Per-example gradients by plain torch.func autograd (the reference for closed forms)."""
    return VmapBackend(obj).per_example_grads(obj.theta, x, y, which)


# ---------------------------------------------------------------------------- linear head
def test_top_layer_closed_form_matches_autograd_and_the_reference() -> None:
    obj, f = _obj("mlp_top_layer")  # params = "fc.": a Linear layer on frozen tanh features
    assert isinstance(obj.select_backend(f.x, f.y), LinearHeadBackend)
    ref = f.ref.grad_each(f.theta, f.x, f.y)
    assert rel_err(obj.per_example_grads(f.x, f.y), ref) < 1e-12
    v = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert rel_err(obj.loss_jvp(v, f.x, f.y), v @ ref.T) < 1e-12
    # the measurement too (here: the logit of class 0)
    obj_m = Objective(
        f.fresh_model(), "cross_entropy", params="fc.", measurement=lambda o, y: o[:, 0]
    )
    auto = _autograd(obj_m, f.x, f.y, "measurement")
    assert rel_err(obj_m.per_example_grads(f.x, f.y, "measurement"), auto) < 1e-12


def test_influence_scores_with_and_without_the_closed_form() -> None:
    f = fitted("mlp_top_layer")
    gtr = f.ref.grad_each(f.theta, f.x, f.y) + f.case.l2 * f.theta
    gte = f.ref.grad_each(f.theta, f.xt, f.yt)
    want = -(gte @ torch.linalg.solve(f.hess, gtr.T))
    for use in (True, False):
        obj, _ = _obj("mlp_top_layer", backend="auto" if use else "vmap")
        for scoring in ("jvp", "grad"):
            inf = Influence(obj, (f.x, f.y), scoring=scoring, progress=False).fit()
            assert rel_err(inf.loss_influence((f.xt, f.yt)), want) < 1e-10
        assert (obj.backend.name == "linear_head") == use


@pytest.mark.parametrize("out_shape", ["[B,1]", "[B]"])
def test_binary_logit_outputs(out_shape: str) -> None:
    class Logit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.lin(x)
            return s if out_shape == "[B,1]" else s[:, 0]

    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=DT)
    y = torch.randint(0, 2, (9,), generator=g)
    obj = Objective(Logit().to(DT), "binary_logistic")
    assert obj.select_backend(x, y).name == "linear_head"
    auto = _autograd(obj, x, y, "loss")
    assert rel_err(obj.per_example_grads(x, y), auto) < 1e-12


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.view(x.shape[0], 2, 3)).sum(1)  # features [B, 2, 3]: not 2-D


def test_a_first_layer_under_a_frozen_network_also_has_the_closed_form() -> None:
    """theta = the first Linear layer, the rest frozen: its inputs do not depend on theta and
    ``e_i = d l_i / d s_i`` back-propagates through the frozen layers above."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (6,), generator=g)
    obj = Objective(MLP(3, 4, 2).to(DT), "cross_entropy", params="hidden.")
    assert obj.select_backend(x, y).name == "linear_head"
    auto = _autograd(obj, x, y, "loss")
    assert rel_err(obj.per_example_grads(x, y), auto) < 1e-12


@pytest.mark.parametrize(
    "model,params",
    [(MLP(3, 4, 2), None), (_Twice(), None), (_Seq(), None)],
    ids=["whole_mlp", "layer_called_twice", "3d_features"],
)
def test_no_closed_form_where_it_does_not_apply(model: nn.Module, params) -> None:
    g = torch.Generator().manual_seed(2)
    model = model.to(DT)
    x = torch.randn(6, 6 if isinstance(model, _Seq) else 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (6,), generator=g)
    obj = Objective(model, "cross_entropy", params=params)
    assert obj.select_backend(x, y).name == "vmap"
    auto = _autograd(obj, x, y, "loss")
    assert rel_err(obj.per_example_grads(x, y), auto) < 1e-12


# ---------------------------------------------------------------------------- scoring paths
def test_jvp_grad_and_auto_scoring_agree() -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    n = 72 * 256  # long enough that "auto" times the two methods on a probe of 256
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    obj = Objective(MLP(3, 4, 3).to(DT), "cross_entropy", l2=0.1)
    v = torch.randn(5, obj.p, generator=g, dtype=DT)
    res = {}
    for scoring in ("jvp", "grad", "auto"):
        inf = Influence(obj, (x, y), solver=Exact(), damping=0.5, scoring=scoring, progress=False)
        inf.fit()
        res[scoring] = inf.score(v)
        assert res[scoring].shape == (5, n)
    assert rel_err(res["jvp"], res["grad"]) < 1e-12
    assert rel_err(res["auto"], res["grad"]) < 1e-12
    costs = inf.diagnostics()["scoring_costs"]
    assert costs["per_example_grad_s"] > 0 and costs["probe_examples"] == 256
    # the probe is at most 1/72 of the pass (9 passes over it cost at most an eighth) ...
    mid = Influence(obj, (x[:1500], y[:1500]), solver=Exact(), damping=0.5, progress=False)
    mid.fit().score(v)
    assert mid.diagnostics()["scoring_costs"]["probe_examples"] == 1500 // 72
    # ... and a pass too short for a probe of 16 examples goes by the rule of thumb
    short = Influence(obj, (x[:1000], y[:1000]), solver=Exact(), damping=0.5, progress=False)
    short.fit().score(v)
    assert "scoring_costs" not in short.diagnostics()
    # and against explicit per-example gradients
    ge = _autograd(obj, x, y, "loss") + 0.1 * obj.theta
    assert rel_err(res["grad"], -(v @ ge.T)) < 1e-12


def test_single_vector_hvp_matches_batched_and_explicit_hessian() -> None:
    obj, f = _obj("mlp_tanh")
    v = torch.randn(2, obj.p, generator=torch.Generator().manual_seed(4), dtype=DT)
    one = obj.hvp_sum(v[:1], f.x, f.y)  # reverse-over-reverse path
    two = obj.hvp_sum(v, f.x, f.y)  # vmap(jvp(grad)) path
    assert rel_err(one[0], two[0]) < 1e-12
    h_loss = f.hess - f.case.l2 * torch.eye(obj.p, dtype=DT)
    assert rel_err(two, v @ h_loss * f.x.shape[0]) < 1e-10
    # the hinge loss has zero curvature almost everywhere: both paths give zeros
    lin = Objective(nn.Linear(3, 1).to(DT), "hinge")
    yb = (f.x[:, 0] > 0).long()
    assert lin.hvp_sum(torch.ones(1, 4, dtype=DT), f.x, yb).abs().max() == 0


def test_evaluating_is_reentrant_and_restores_training_flags() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1)).to(DT)
    model.train()
    obj = Objective(model, "mse")
    x = torch.randn(4, 2, dtype=DT)
    with obj.evaluating():
        with obj.evaluating():
            a = obj.outputs(obj.theta, x)
        assert not model.training
        b = obj.outputs(obj.theta, x)
    assert torch.equal(a, b) and model.training and model[1].training


# ---------------------------------------------------------------------------- LiSSA
def test_lissa_full_batch_is_the_exact_neumann_iteration() -> None:
    obj, f = _obj("logreg_multiclass")
    inf = Influence(
        obj, (f.x, f.y), solver=LiSSA(depth=400, repeats=5, batch_size=None), progress=False
    )
    inf.fit()
    rhs = torch.randn(2, obj.p, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert rel_err(inf.solver.solve(rhs), torch.linalg.solve(f.hess, rhs.T).T) < 1e-8
    d = inf.diagnostics()
    lam = torch.linalg.eigvalsh(f.hess)
    # p = 12 <= 20 Lanczos steps: the extreme eigenvalues are exact
    assert d["estimated_max_eigenvalue"] == pytest.approx(float(lam[-1]), rel=1e-8)
    assert d["estimated_min_eigenvalue"] == pytest.approx(float(lam[0]), rel=1e-8)
    assert d["scale"] == pytest.approx(1.5 * float(lam[-1]), rel=1e-8)
    assert d["bias_factor"] < 1e-8 and d["advice"] == []


def test_lissa_sampled_steps_are_seeded_and_close_to_the_solve() -> None:
    obj, f = _obj("logreg_binary")
    rhs = torch.randn(1, obj.p, generator=torch.Generator().manual_seed(6), dtype=DT)
    want = torch.linalg.solve(f.hess, rhs.T).T
    runs = []
    for seed in (0, 0, 1):
        solver = LiSSA(depth=150, repeats=8, batch_size=10, seed=seed)
        inf = Influence(obj, (f.x, f.y), solver=solver, progress=False)
        runs.append(inf.fit().solver.solve(rhs))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # a stochastic estimate (8 chains of 150 steps on 10 sampled points each); the
    # deterministic part has converged (bias factor < 1e-20), the rest is sampling noise
    assert inf.diagnostics()["bias_factor"] < 1e-20
    assert rel_err(runs[0], want) < 0.1 and rel_err(runs[2], want) < 0.1
    assert inf.diagnostics()["seconds_per_step"] > 0


def test_lissa_warns_with_what_to_change_when_far_from_converged() -> None:
    obj, f = _obj("logreg_multiclass")
    inf = Influence(obj, (f.x, f.y), solver=LiSSA(depth=5, repeats=1, scale=100.0), progress=False)
    inf.fit()
    with pytest.warns(InflensWarning, match="raise depth to about"):
        inf.solver.solve(torch.ones(1, obj.p, dtype=DT))
    assert any("depth" in tip for tip in inf.diagnostics()["advice"])


# ---------------------------------------------------------------------------- diagnostics
def test_diagnostics_report_extreme_eigenvalues_and_advice() -> None:
    obj, f = _obj("mlp_tanh")
    inf = Influence(obj, (f.x, f.y), solver=CG(tol=1e-12), damping=0.01, progress=False).fit()
    inf.s_test((f.xt, f.yt))
    d = inf.diagnostics(eigenvalues=True)
    lam = torch.linalg.eigvalsh(f.hess) + 0.01
    assert d["curvature_max_eigenvalue"] == pytest.approx(float(lam[-1]), rel=1e-8)
    assert d["curvature_min_eigenvalue"] == pytest.approx(float(lam[0]), rel=1e-6)
    assert max(d["relative_residuals"]) < 1e-10 and d["advice"] == []
    assert d["curvature"] == "hessian"


def test_self_influence_with_an_iterative_solver_warns_on_large_n() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1100, 2, generator=g, dtype=DT)
    y = torch.randint(0, 2, (1100,), generator=g)
    obj = Objective(nn.Linear(2, 1, bias=False).to(DT), "binary_logistic", l2=0.1)
    inf = Influence(obj, (x, y), solver=CG(), progress=False).fit()
    with pytest.warns(InflensWarning, match="one system per training point"):
        si = inf.self_influence()
    ex = Influence(obj, (x, y), solver=Exact(), progress=False).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)
        assert rel_err(si, ex.self_influence()) < 1e-8


def test_linear_head_scores_in_large_chunks_with_the_same_result(monkeypatch) -> None:
    """A closed-form Linear head is scored in chunks of up to MAX_SCORING_CHUNK examples
    whatever the curvature's chunk size; the scores equal those of 7-example chunks."""
    f = fitted("logreg_multiclass")
    obj = Objective(f.fresh_model(), f.case.loss, l2=f.case.l2)
    inf = Influence(obj, (f.x, f.y), progress=False).fit()
    inf.curvature_.chunk_size = 7
    s = inf.s_test((f.xt, f.yt))
    assert inf._scoring_chunk_size(s.shape[0]) == len(f.y)  # n < 4096: one chunk
    big = inf.score(s)
    sub = inf.score(s, torch.arange(len(f.y)))
    monkeypatch.setattr(LinearHeadBackend, "MAX_SCORING_CHUNK", 1)
    assert inf._scoring_chunk_size(s.shape[0]) == 7
    small = inf.score(s)
    assert rel_err(big, small) < 1e-12 and rel_err(sub, small) < 1e-12
    # a hidden-layer model keeps the curvature's chunk size
    g = fitted("mlp_tanh")
    inf2 = Influence(Objective(g.fresh_model(), g.case.loss, l2=g.case.l2), (g.x, g.y),
                     progress=False).fit()  # fmt: skip
    inf2.curvature_.chunk_size = 7
    assert inf2._scoring_chunk_size(3) == 7
