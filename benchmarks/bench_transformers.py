"""Every solver on the two transformer models of issue #10, each in its own process: time and
peak memory (VmHWM), scores' agreement with EK-FAC. Settings sized for a 2-core CPU (CG 20 iterations to 1e-2,
LiSSA at most 200 steps, Arnoldi 20 Krylov steps): this measures that every solver runs
within memory, not the accuracy of the matrix-free solvers at this size.

- ``gpt2``: Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (2 layers, n_embd 64,
  vocabulary 100), trained 100 Adam steps on 1,500 sequences of 32 tokens (random tokens with
  a learnable structure: each sequence repeats a short random motif);
- ``encoder``: a causal language model from ``nn.TransformerEncoderLayer`` (2 layers, d 32).

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_transformers.py --out runs/tf``
(``--models gpt2 encoder --solvers exact cg lissa arnoldi kfac ekfac --timeout 600``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from inflens.memory import peak_resident_mib

V, T, N_TRAIN, N_TEST = 100, 32, 1500, 8


def _tokens(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randint(V, (N_TRAIN + N_TEST, 4), generator=g)
    ids = motifs.repeat(1, T // 4)
    noise = torch.rand(ids.shape, generator=g) < 0.15
    return torch.where(noise, torch.randint(V, ids.shape, generator=g), ids)


class EncoderLM(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(0.02 * torch.randn(T, d))
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf")), 1)
        return self.head(self.body(self.emb(ids) + self.pos[:t], mask=causal))


def build(name: str) -> tuple[nn.Module, object, object]:
    """The trained model and its (train, test) data in the form each model takes."""
    torch.manual_seed(0)
    ids = _tokens(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=64, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = GPT2LMHeadModel(cfg)

        def batch(rows: torch.Tensor) -> dict:
            return {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]),
                    "labels": ids[rows]}  # fmt: skip

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            return model(**batch(rows)).loss
    else:
        model = EncoderLM()

        def batch(rows: torch.Tensor) -> tuple:
            return (ids[rows], ids[rows])

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            logits = model(ids[rows])
            return nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, V), ids[rows][:, 1:].reshape(-1)
            )

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(100):
        rows = torch.randint(N_TRAIN, (32,), generator=g)
        opt.zero_grad()
        loss_of(rows).backward()
        opt.step()
    model.eval()
    return model, batch(torch.arange(N_TRAIN)), batch(torch.arange(N_TRAIN, N_TRAIN + N_TEST))


def worker(model_name: str, solver: str, out: Path) -> None:
    import inflens

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, train, test = build(model_name)
    p = sum(q.numel() for q in model.parameters())
    obj = inflens.Objective(model, "causal_lm", l2=1e-4)
    # budgets that finish on a 2-core CPU: each matrix-free product is a full pass over
    # 1,500 x 32 tokens (forward-mode JVP and a backward pass through the model)
    solvers = {
        "cg": inflens.solvers.CG(tol=1e-2, max_iter=20),
        "lissa": inflens.solvers.LiSSA(max_depth=200),
        "arnoldi": inflens.solvers.Arnoldi(n_iters=20),
    }
    t0 = time.perf_counter()
    res: dict = {"model": model_name, "solver": solver, "p": p}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = inflens.Influence(obj, train, solver=solvers.get(solver, solver), damping=1e-2,
                                    curvature="ggn", progress=False).fit()  # fmt: skip
            t1 = time.perf_counter()
            scores = inf.loss_influence(test)
        res.update(fit_s=t1 - t0, query_s=time.perf_counter() - t1,
                   backend=inf.diagnostics()["backend"], ok=True)  # fmt: skip
        torch.save(scores, out.with_suffix(".pt"))
    except inflens.MemoryBudgetError as exc:
        res.update(ok=False, error=f"MemoryBudgetError: {str(exc)[:200]}")
    res["peak_rss_gib"] = peak_resident_mib() / 1024
    out.write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/bench_transformers")
    ap.add_argument("--models", nargs="+", default=["gpt2", "encoder"])
    ap.add_argument("--solvers", nargs="+",
                    default=["ekfac", "kfac", "exact", "cg", "arnoldi", "lissa"])  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker[0], args.worker[1], out / f"{args.worker[0]}-{args.worker[1]}.json")
        return
    rows = []
    for m in args.models:
        for s in args.solvers:
            path = out / f"{m}-{s}.json"
            if not path.exists():
                cmd = [sys.executable, __file__, "--out", str(out), "--worker", m, s]
                try:
                    subprocess.run(cmd, timeout=args.timeout, check=True)
                except subprocess.TimeoutExpired:
                    path.write_text(json.dumps({"model": m, "solver": s, "ok": False,
                                                "error": f"timeout {args.timeout:.0f} s"}))  # fmt: skip
            rows.append(json.loads(path.read_text()))
    print(
        "| model | p | solver | backend | fit s | query s (8 test seqs) | peak RSS GiB | Pearson vs EK-FAC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = out / f"{r['model']}-ekfac.pt"
        mine = out / f"{r['model']}-{r['solver']}.pt"
        corr = ""
        if r.get("ok") and ref.exists() and mine.exists():
            a, b = torch.load(ref).flatten(), torch.load(mine).flatten()
            corr = f"{float(torch.corrcoef(torch.stack([a, b]))[0, 1]):.4f}"
        if r.get("ok"):
            print(f"| {r['model']} | {r['p']:,} | {r['solver']} | {r['backend']} | {r['fit_s']:.1f} | "
                  f"{r['query_s']:.1f} | {r['peak_rss_gib']:.2f} | {corr} |")  # fmt: skip
        else:
            print(f"| {r['model']} | {r.get('p', '')} | {r['solver']} | | | | "
                  f"{r.get('peak_rss_gib', float('nan')):.2f} | {r['error']} |")  # fmt: skip


if __name__ == "__main__":
    main()
