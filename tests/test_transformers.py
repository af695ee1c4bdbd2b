"""Transformers: a Hugging Face GPT-2 and a PyTorch TransformerEncoderLayer language model.

Every solver against an explicit damped Gauss-Newton matrix (or Hessian) built here in float64
from autograd Jacobians, per-token influence summing to the loss influence, and dict / tuple /
collated batches giving the scores of the same data as tensors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

import inflens
from cases import rel_err
from inflens import InflensWarning
from inflens.solvers import CG, EKFAC, KFAC, Arnoldi, Exact, LiSSA

transformers = pytest.importorskip("transformers")

DT = torch.float64
V, T, N, M = 13, 6, 12, 3
L2, DAMP = 0.01, 0.1


def _gpt2(dtype: torch.dtype = DT) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def _tokens(seed: int = 0) -> dict[str, torch.Tensor]:
    """``N + M`` sequences of ``T`` tokens, some right-padded (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (N + M, T), generator=g)
    mask = torch.ones_like(ids)
    for i, length in ((2, 4), (5, 3), (N + 1, 5)):
        mask[i, length:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _split(d: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    return {k: v[:N] for k, v in d.items()}, {k: v[N:] for k, v in d.items()}


class _Reference:
    """Explicit float64 quantities of the causal-LM objective, one example at a time."""

    def __init__(self, model: nn.Module, data: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.shapes = [p.shape for p in model.parameters()]
        self.data = data

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(torch.Size(s).numel())
            out[n] = theta[i : i + k].view(s)
            i += k
        return out

    def logits(self, theta: torch.Tensor, i: int, data=None) -> torch.Tensor:
        d = data or self.data
        x = {
            "input_ids": d["input_ids"][i : i + 1],
            "attention_mask": d["attention_mask"][i : i + 1],
        }
        return functional_call(self.model, self._params(theta), (), x).logits[0]  # [T, V]

    def loss(self, theta: torch.Tensor, i: int, data=None) -> torch.Tensor:
        d = data or self.data
        lab = d["labels"][i, 1:]
        keep = lab != -100
        logp = torch.log_softmax(self.logits(theta, i, data)[:-1], -1)
        return -logp[keep, lab[keep]].mean()

    def grad(self, i: int, data=None) -> torch.Tensor:
        return torch.autograd.functional.jacobian(lambda th: self.loss(th, i, data), self.theta)

    def ggn(self) -> torch.Tensor:
        """``(1/n) sum_i J_i^T Lambda_i J_i``, ``Lambda_i`` block-diagonal over positions."""
        p = self.theta.numel()
        total = torch.zeros(p, p, dtype=DT)
        for i in range(N):
            jac = torch.autograd.functional.jacobian(lambda th, i=i: self.logits(th, i), self.theta)
            lab = self.data["labels"][i, 1:]
            keep = lab != -100
            probs = torch.softmax(self.logits(self.theta, i)[:-1], -1)
            for t in range(T - 1):
                if keep[t]:
                    lam = (torch.diag(probs[t]) - torch.outer(probs[t], probs[t])) / keep.sum()
                    total += jac[t].T @ lam @ jac[t]
        return total / N

    def hessian(self) -> torch.Tensor:
        def risk(th: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.loss(th, i) for i in range(N)]).mean()

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            return torch.autograd.functional.hessian(risk, self.theta)

    def scores(self, curvature: torch.Tensor, test: dict) -> torch.Tensor:
        """``-g_test^T (C + (l2 + damping) I)^-1 (g_i + l2 theta)``: ``[M, N]``."""
        p = self.theta.numel()
        a = curvature + (L2 + DAMP) * torch.eye(p, dtype=DT)
        gtr = torch.stack([self.grad(i) for i in range(N)]) + L2 * self.theta
        gte = torch.stack([self.grad(j, test) for j in range(M)])
        return -(gte @ torch.linalg.solve(a, gtr.T))


@pytest.fixture(scope="module")
def gpt2_problem():
    model = _gpt2()
    train, test = _split(_tokens())
    ref = _Reference(model, train)
    return model, train, test, ref, ref.ggn()


def _influence(model, train, solver, curvature="ggn", **kw) -> inflens.Influence:
    obj = inflens.Objective(model, "causal_lm", l2=L2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        return inflens.Influence(
            obj, train, solver=solver, damping=DAMP, curvature=curvature, progress=False, **kw
        ).fit()


@pytest.mark.parametrize(
    "solver,tol",
    [
        (Exact(), 1e-10),
        (CG(tol=1e-12), 1e-8),
        (Arnoldi(rank=10_000, n_iters=10_000), 1e-7),
        (LiSSA(batch_size=N, tol=1e-6, seed=0), 1e-2),
    ],
    ids=["exact", "cg", "arnoldi", "lissa"],
)
def test_gpt2_every_matrix_free_solver_equals_the_explicit_ggn_inverse(gpt2_problem, solver, tol):
    model, train, test, ref, ggn = gpt2_problem
    inf = _influence(model, train, solver)
    assert inf.diagnostics()["backend"] == "jacobian"  # HF attention masks defeat vmap
    want = ref.scores(ggn, test)
    assert rel_err(inf.loss_influence(test), want) < tol


def test_gpt2_exact_hessian_equals_the_explicit_hessian(gpt2_problem):
    model, train, test, ref, _ = gpt2_problem
    hess = ref.hessian()
    lam_min = float(torch.linalg.eigvalsh(hess)[0])
    damping = max(DAMP, 2 * -lam_min)  # a random-init network: damp to positive definite
    obj = inflens.Objective(model, "causal_lm", l2=L2)
    inf = inflens.Influence(obj, train, solver=Exact(), damping=damping, progress=False).fit()
    want = ref.scores(hess + (damping - DAMP) * torch.eye(hess.shape[0], dtype=DT), test)
    assert rel_err(inf.loss_influence(test), want) < 1e-10


@pytest.mark.parametrize("solver", [KFAC(), EKFAC()], ids=["kfac", "ekfac"])
def test_gpt2_kfac_factors_the_attention_projections_and_approximates_the_ggn(gpt2_problem, solver):
    model, train, test, ref, ggn = gpt2_problem
    inf = _influence(model, train, solver)
    layers = inf.diagnostics()["layers"]
    for name in ("transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"):  # fmt: skip
        assert name in layers
    # the tied wte / lm_head weight is not one layer's (output gradient) x (input): diagonal
    assert "transformer.wte.weight" in inf.diagnostics()["diagonal_parameters"]
    got, want = inf.loss_influence(test), ref.scores(ggn, test)
    assert torch.isfinite(got).all()
    r = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
    assert r > 0.5, f"K-FAC scores correlate {float(r):.3f} with the exact GGN ones"


def test_gpt2_float32_runs_every_solver_close_to_float64(gpt2_problem):
    model, train, test, ref, ggn = gpt2_problem
    want = ref.scores(ggn, test)
    m32 = _gpt2(torch.float32)
    for solver in (Exact(), CG(tol=1e-6)):
        got = _influence(m32, train, solver).loss_influence(test)
        assert got.dtype == torch.float32
        assert rel_err(got.double(), want) < 1e-3


def test_token_influence_sums_to_loss_influence_and_is_zero_off_tokens(gpt2_problem):
    model, train, test, _, _ = gpt2_problem
    inf = _influence(model, train, Exact())
    scores = inf.loss_influence(test)
    idx = [0, 2, 5]
    tr = inf.token_influence(test, idx)  # [M, 3, T]
    assert tr.shape == (M, 3, T)
    assert rel_err(tr.sum(2), scores[:, idx]) < 1e-12
    counted = train["labels"][idx] != -100
    counted[:, 0] = False  # position 0 is never a target
    assert (tr[:, ~counted] == 0).all() and (tr[:, counted] != 0).all()
    te = inf.token_influence(test, idx, side="test")  # [M, 3, T]: which test tokens
    assert rel_err(te.sum(2), scores[:, idx]) < 1e-10
    tcount = test["labels"] != -100
    tcount[:, 0] = False
    assert (te.transpose(0, 1)[:, ~tcount] == 0).all()


def test_token_influence_in_chunks_equals_one_pass(gpt2_problem, monkeypatch):
    """A small memory budget splits the sequences into forward-mode chunks; the result must
    not change (one sequence per chunk against the whole set in one pass)."""
    model, train, test, _, _ = gpt2_problem
    inf = _influence(model, train, Exact())
    idx = [0, 2, 5]
    whole_tr = inf.token_influence(test, idx)
    whole_te = inf.token_influence(test, idx, side="test")
    calls = []

    def one_per_chunk(k: int, chunk_size: int) -> int:
        calls.append(k)
        return 1

    monkeypatch.setattr(inflens.Influence, "_token_chunk", staticmethod(one_per_chunk))
    assert rel_err(inf.token_influence(test, idx), whole_tr) < 1e-12
    assert rel_err(inf.token_influence(test, idx, side="test"), whole_te) < 1e-12
    assert calls == [M, len(idx)]  # train side: m test directions; test side: k solves


# ---------------------------------------------------------------------------- batch structures
class _TupleLM(nn.Module):
    """The same GPT-2 called as ``model(ids, mask)`` returning a plain ``[B, T, V]`` tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids, attention_mask=mask).logits


class _Sequences(Dataset):
    """Hugging Face style items of different lengths (the padding removed)."""

    def __init__(self, d: dict[str, torch.Tensor]) -> None:
        self.items = []
        for i in range(d["input_ids"].shape[0]):
            n = int(d["attention_mask"][i].sum())
            self.items.append({k: v[i, :n] for k, v in d.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def _pad(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch: ids 0, mask 0, labels -100."""
    n = max(len(it["input_ids"]) for it in items)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        k: torch.stack([torch.cat([it[k], it[k].new_full((n - len(it[k]),), f)]) for it in items])
        for k, f in fill.items()
    }


def test_dict_tuple_dataset_and_collated_batches_give_the_same_scores(gpt2_problem):
    model, train, test, _, _ = gpt2_problem
    want = _influence(model, train, CG(tol=1e-12)).loss_influence(test)
    # (inputs, targets) with a tuple of tensors and a model returning a plain tensor
    tup = _TupleLM(model)
    pair = ((train["input_ids"], train["attention_mask"]), train["labels"])
    tpair = ((test["input_ids"], test["attention_mask"]), test["labels"])
    got = _influence(tup, pair, CG(tol=1e-12)).loss_influence(tpair)
    assert rel_err(got, want) < 1e-9
    # a Dataset of variable-length dict items through a padding collate_fn, as a DataLoader
    loader = DataLoader(_Sequences(train), batch_size=5, shuffle=False, collate_fn=_pad)
    tloader = DataLoader(_Sequences(test), batch_size=2, shuffle=False, collate_fn=_pad)
    got = _influence(model, loader, CG(tol=1e-12)).loss_influence(tloader)
    assert rel_err(got, want) < 1e-9


def test_hf_style_items_without_labels_are_refused_with_the_fix(gpt2_problem):
    model, train, _, _, _ = gpt2_problem
    no_labels = {k: v for k, v in train.items() if k != "labels"}
    with pytest.raises(inflens.InputError, match="labels = input_ids"):
        _influence(model, no_labels, Exact())


def test_labels_of_minus_100_are_refused_by_a_classification_loss() -> None:
    model = nn.Linear(3, 4).double()
    x = torch.randn(6, 3, dtype=DT)
    y = torch.tensor([0, 1, -100, 2, 3, 1])
    obj = inflens.Objective(model, "cross_entropy", l2=0.1)
    with pytest.raises(inflens.InputError, match="-100.*ignore_index"):
        inflens.Influence(obj, (x, y), progress=False).fit()


# ---------------------------------------------------------------------------- plain PyTorch
class _EncoderLM(nn.Module):
    """A causal language model from ``nn.TransformerEncoderLayer`` (MultiheadAttention)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf"), dtype=self.pos.dtype), 1)
        h = self.layer(self.emb(ids) + self.pos[:t], src_mask=causal)
        return self.head(h)


@pytest.mark.parametrize("solver", ["exact", "cg", "arnoldi", "kfac", "ekfac", "lissa"])
def test_encoder_layer_lm_runs_every_solver(solver: str) -> None:
    torch.manual_seed(0)
    model = _EncoderLM().double()
    d = _tokens(1)
    x, y = d["input_ids"], d["input_ids"].clone()
    obj = inflens.Objective(model, "causal_lm", l2=L2)
    exact = inflens.Influence(obj, (x[:N], y[:N]), solver="exact", damping=DAMP,
                              curvature="ggn", progress=False).fit()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        inf = inflens.Influence(obj, (x[:N], y[:N]), solver=solver, damping=DAMP,
                                curvature="ggn", progress=False).fit()  # fmt: skip
        got = inf.loss_influence((x[N:], y[N:]))
    want = exact.loss_influence((x[N:], y[N:]))
    assert got.shape == (M, N) and torch.isfinite(got).all()
    if solver in ("cg",):
        assert rel_err(got, want) < 1e-8
    else:  # approximations: they must at least rank like the exact scores
        r = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
        assert r > 0.5, f"{solver}: correlation {float(r):.3f} with exact"


def test_token_influence_test_side_refuses_more_sequences_than_the_budget(gpt2_problem):
    """The test side holds one [p] solve per chosen training sequence: too many for the memory
    budget is refused before anything is allocated, with the fix."""
    model, train, test, _, _ = gpt2_problem
    inf = _influence(model, train, Exact())
    p = inf.objective.p
    inf.budget_bytes = 3 * 2 * p * 8  # room for two float64 sequences' vectors, not three
    assert inf.token_influence(test, [0, 1], side="test").shape[1] == 2
    with pytest.raises(inflens.MemoryBudgetError, match="fewer training indices"):
        inf.token_influence(test, [0, 1, 2], side="test")
