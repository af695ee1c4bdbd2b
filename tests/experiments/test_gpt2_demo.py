"""The GPT-2 demo (``inflens demo --model gpt2-tiny``) and influence restricted to LoRA adapters.

LoRA: a minimal low-rank adapter (two bias-free ``nn.Linear`` layers beside each frozen GPT-2
``Conv1D``, as PEFT builds them) on a tiny float64 GPT-2; theta = the adapter matrices only
(``Objective(params=[...])``). Every solver is compared with ``-g_test^T (G + (l2 + damping)
I)^-1 (g_i + l2 theta)`` where ``G`` is the Gauss-Newton matrix of those parameters built here
from autograd Jacobians, one example at a time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

import inflens
from cases import rel_err
from inflens import InflensWarning
from inflens.solvers import CG, EKFAC, KFAC, Arnoldi, Exact, LiSSA

transformers = pytest.importorskip("transformers")

from inflens.experiments import gpt2_demo  # noqa: E402 - needs transformers

DT = torch.float64
V, T, N, M, RANK = 11, 6, 10, 3, 2
L2, DAMP = 0.01, 0.05


# ---------------------------------------------------------------------------- LoRA
class LoRA(nn.Module):
    """``base(x) + B(A(x)) * scale`` with ``base`` frozen; ``A``: d_in -> r, ``B``: r -> d_out."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.3)  # nonzero, as after some fine-tuning
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def _lora_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=8, n_embd=4, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    block = model.transformer.h[0]
    block.attn.c_attn = LoRA(block.attn.c_attn, 4, 12, RANK)
    block.mlp.c_fc = LoRA(block.mlp.c_fc, 4, 16, RANK)
    return model.to(DT).eval()


def _adapter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


def _tokens() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(V, (N + M, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[N, 3:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _AdapterReference:
    """Explicit float64 damped Gauss-Newton scores over the adapter parameters only."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        named = dict(model.named_parameters())
        self.model, self.names = model, names
        self.shapes = [named[n].shape for n in names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = s.numel()
            out[n] = theta[i : i + k].view(s)
            i += k
        return out  # the other parameters: the model's own (functional_call keeps them)

    def logits(self, theta: torch.Tensor, d: dict, i: int) -> torch.Tensor:
        x = {
            "input_ids": d["input_ids"][i : i + 1],
            "attention_mask": d["attention_mask"][i : i + 1],
        }
        return functional_call(self.model, self._params(theta), (), x).logits[0]

    def loss(self, theta: torch.Tensor, d: dict, i: int) -> torch.Tensor:
        lab = d["labels"][i, 1:]
        keep = lab != -100
        return -torch.log_softmax(self.logits(theta, d, i)[:-1], -1)[keep, lab[keep]].mean()

    def scores(self, train: dict, test: dict) -> torch.Tensor:
        p = self.theta.numel()
        ggn = torch.zeros(p, p, dtype=DT)
        for i in range(N):
            jac = torch.autograd.functional.jacobian(
                lambda th, i=i: self.logits(th, train, i), self.theta
            )  # [T, V, p]
            lab = train["labels"][i, 1:]
            keep = lab != -100
            probs = torch.softmax(self.logits(self.theta, train, i)[:-1], -1)
            for t in range(T - 1):
                if keep[t]:
                    lam = (torch.diag(probs[t]) - torch.outer(probs[t], probs[t])) / keep.sum()
                    ggn += jac[t].T @ lam @ jac[t]
        ggn /= N
        grad = torch.autograd.functional.jacobian
        gtr = torch.stack([grad(lambda th, i=i: self.loss(th, train, i), self.theta)
                           for i in range(N)]) + L2 * self.theta  # fmt: skip
        gte = torch.stack([grad(lambda th, j=j: self.loss(th, test, j), self.theta)
                           for j in range(M)])  # fmt: skip
        a = ggn + (L2 + DAMP) * torch.eye(p, dtype=DT)
        return -(gte @ torch.linalg.solve(a, gtr.T))


@pytest.fixture(scope="module")
def lora_problem():
    model = _lora_gpt2()
    d = _tokens()
    train = {k: v[:N] for k, v in d.items()}
    test = {k: v[N:] for k, v in d.items()}
    names = _adapter_names(model)
    want = _AdapterReference(model, names).scores(train, test)
    return model, names, train, test, want


@pytest.mark.parametrize(
    "solver,tol",
    [
        (Exact(), 1e-10),
        (CG(tol=1e-12), 1e-8),
        (Arnoldi(rank=10_000, n_iters=10_000), 1e-7),
        (LiSSA(batch_size=N, tol=1e-6, seed=0), 1e-2),
        (KFAC(), None),
        (EKFAC(), None),
    ],
    ids=["exact", "cg", "arnoldi", "lissa", "kfac", "ekfac"],
)
def test_influence_on_lora_adapters_only_equals_the_explicit_damped_ggn(lora_problem, solver, tol):
    model, names, train, test, want = lora_problem
    obj = inflens.Objective(model, "causal_lm", l2=L2, params=names)
    assert obj.p == RANK * (4 + 12) + RANK * (4 + 16)  # A and B of c_attn and c_fc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        inf = inflens.Influence(
            obj, train, solver=solver, damping=DAMP, curvature="ggn", progress=False
        ).fit()
    got = inf.loss_influence(test)
    assert got.shape == (M, N) and torch.isfinite(got).all()
    if tol is not None:
        assert rel_err(got, want) < tol
    else:  # Kronecker factors of the adapter layers: an approximation, it must rank alike
        layers = inf.diagnostics()["layers"]
        assert any("lora_A" in name for name in layers), layers
        r = torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]
        assert r > 0.8, f"{solver.name}: correlation {float(r):.3f} with the explicit GGN"
    # the frozen base weights did not move and are not part of theta
    assert not any("base" in n for n in obj.names)


def test_lora_scores_differ_from_full_model_scores(lora_problem):
    """Restricting theta changes the answer: the selection is honoured, not ignored."""
    model, names, train, test, want = lora_problem
    obj = inflens.Objective(model, "causal_lm", l2=L2)
    full = inflens.Influence(obj, train, solver="exact", damping=DAMP, curvature="ggn",
                             progress=False).fit().loss_influence(test)  # fmt: skip
    assert obj.p > 2 * len(names)
    assert rel_err(full, want) > 1e-2


# ---------------------------------------------------------------------------- the demo
def test_word_tokenizer_round_trip_and_deterministic_vocabulary() -> None:
    texts = [["b", "a", "c", "a"], ["b", "d"]]
    tok = gpt2_demo.WordTokenizer(texts, 3)
    assert tok.vocab == ["<unk>", "a", "b"]  # a and b twice; c, d once: cut
    assert tok.encode(["a", "c", "b"]) == [1, 0, 2]
    assert tok.decode([1, 0, 2]) == ["a", "<unk>", "b"]
    with pytest.raises(inflens.InputError, match="vocab_size"):
        gpt2_demo.WordTokenizer(texts, 1)


def test_sequences_come_from_the_shipped_corpus_deterministically() -> None:
    s = gpt2_demo.make_sequences(vocab_size=50, seq_len=8, n_train=40, n_test=10, seed=1)
    assert s.train.shape == (40, 8) and s.test.shape == (10, 8)
    assert s.train.max() < 50 and s.train.min() >= 0
    again = gpt2_demo.make_sequences(vocab_size=50, seq_len=8, n_train=40, n_test=10, seed=1)
    assert torch.equal(s.train, again.train) and s.train_topics == again.train_topics
    with pytest.raises(inflens.InputError, match="windows"):
        gpt2_demo.make_sequences(50, 8, 10**7, 1, 0)


def test_config_is_validated() -> None:
    with pytest.raises(inflens.InputError, match="multiple of n_head"):
        gpt2_demo.GPT2DemoConfig(n_embd=10, n_head=4)
    with pytest.raises(inflens.InputError, match="group_sizes"):
        gpt2_demo.GPT2DemoConfig(n_train=20, group_sizes=(10,))


def test_small_demo_run_writes_metrics_and_report(tmp_path: Path, capsys) -> None:
    cfg = gpt2_demo.GPT2DemoConfig(
        vocab_size=40, seq_len=8, n_train=60, n_test=6, n_embd=8, n_layer=1, n_head=2,
        train_steps=20, batch_size=16, lr=1e-2, finetune_steps=5, group_sizes=(5,),
        random_groups=1, top=2,
    )  # fmt: skip
    m = gpt2_demo.run_gpt2_demo(cfg, tmp_path)
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["p"] == m["p"] and saved["backend"] == m["backend"]
    assert not any(".ln_" not in n and "ln_f" not in n for n in m["excluded_from_theta"])
    # per-token terms sum to the sequence scores (float32 round-off of ~30 terms)
    assert m["token_sum_max_abs_error"] < 1e-4 * max(abs(r["influence"]) for r in m["helpful"])
    for r in m["helpful"] + m["harmful"]:
        assert abs(sum(r["token_terms"]) - r["influence"]) < 1e-4 * abs(r["influence"]) + 1e-7
        assert r["token_terms"][0] == 0.0  # position 0 is never predicted
    assert m["helpful"][0]["influence"] <= m["harmful"][0]["influence"]
    chk = m["retraining_check"]
    assert len(chk["groups"]) == 3 and all("actual" in g for g in chk["groups"])
    html = (tmp_path / "report" / "index.html").read_text()
    assert 'class="tok"' in html and "fine-tuning" in html
    assert "retraining check" in printed and f"{chk['pearson']:.3f}" in printed


def test_cli_demo_model_gpt2_tiny_dispatches_with_its_own_default_folder(monkeypatch) -> None:
    from inflens import cli

    seen = {}

    def record(config, out):
        seen.update(config=config, out=out)
        return {}

    monkeypatch.setattr(gpt2_demo, "run_gpt2_demo", record)
    assert cli.main(["demo", "--model", "gpt2-tiny", "--seed", "3", "--quiet"]) == 0
    assert seen["out"] == Path("inflens-demo-gpt2") and seen["config"].seed == 3
    assert not seen["config"].progress
    assert cli.main(["demo", "--model", "gpt2-tiny", "--out", "elsewhere"]) == 0
    assert seen["out"] == Path("elsewhere")
