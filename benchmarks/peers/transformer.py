"""Peer benchmark, transformer task: EK-FAC influence on a tiny GPT-2 in inflens and kronfluence.

One command trains the models here (the corpus, tokenizer and model builder of
:mod:`inflens.experiments.gpt2_demo`: the Python language reference shipped with CPython,
word-level tokens, a Hugging Face ``GPT2LMHeadModel`` from a config), then runs every method in
its own subprocess on the same trained weights and reports agreement, time and peak memory
(``VmHWM`` of that subprocess, read from ``/proc/self/status``).

Tasks:

- ``ref``: a GPT-2 small enough for an exact reference (1 layer, ``n_embd`` 16, vocabulary 64,
  300 sequences of 16 words): the damped Gauss-Newton matrix is formed explicitly in float64
  (``inflens`` ``Exact`` on ``curvature="ggn"``) and every method is compared with it.
- ``issue``: the model of issue #10 (2 layers, ``n_embd`` 64, 1,500 sequences of 32 words).
- ``large``: 4 layers, ``n_embd`` 128, 10,000 sequences of 32 words (optional; long). The
  corpus has 2,394 non-overlapping 32-word windows, so these windows start every 7 words and
  overlap (test windows share words with training windows).

The same theta for every library: the weights and biases of every linear map (attention
``c_attn``/``c_proj``, MLP ``c_fc``/``c_proj``, the untied ``lm_head``). GPT-2's ``Conv1D``
layers are converted to the equivalent ``nn.Linear`` before training (kronfluence tracks only
``nn.Linear`` and ``nn.Conv2d``); embeddings and LayerNorms are frozen. No l2 term; damping
``--damping`` added to the curvature in every method (kronfluence: ``damping_factor``).
Per-example loss: next-token cross-entropy, mean over the sequence's tokens (inflens
``"causal_lm"``; the same function written as a kronfluence ``Task``). Scores are reported in
inflens's convention (``I_up,loss``, negative = helpful): kronfluence's pairwise scores are
``+g_test^T H^-1 g_i`` and are negated.

Usage (run with the peers' virtualenv, where inflens is installed editable):

    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/peers/transformer.py --out runs/peers-transformer

Bergson (``pip install bergson``) is not run: see docs/benchmarks.md for why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inflens.memory import peak_resident_mib

TASKS = {
    "ref": dict(
        vocab_size=64,
        seq_len=16,
        n_train=300,
        n_test=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        train_steps=150,
        batch_size=32,
        lr=1e-2,
    ),
    "issue": dict(
        vocab_size=400,
        seq_len=32,
        n_train=1500,
        n_test=8,
        n_embd=64,
        n_layer=2,
        n_head=4,
        train_steps=300,
        batch_size=32,
        lr=5e-3,
    ),
    "large": dict(
        vocab_size=1000,
        seq_len=32,
        n_train=10000,
        n_test=8,
        n_embd=128,
        n_layer=4,
        n_head=4,
        train_steps=600,
        batch_size=32,
        lr=3e-3,
        stride=7,
    ),
}
METHODS = ("exact-ggn", "inflens-ekfac", "kronfluence-ekfac")


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every Hugging Face ``Conv1D`` (``x @ W + b``, ``W`` [in, out]) by the equal
    ``nn.Linear`` (weight ``W^T``), in place."""
    from transformers.pytorch_utils import Conv1D

    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                w = child.weight.detach()
                lin = nn.Linear(w.shape[0], w.shape[1], dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w.T)
                    lin.bias.copy_(child.bias.detach())
                setattr(mod, child_name, lin)
    return model


def linear_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def theta_names(model: nn.Module) -> list[str]:
    return [f"{m}.{p}" for m in linear_modules(model) for p in ("weight", "bias")
            if getattr(dict(model.named_modules())[m], p, None) is not None]  # fmt: skip


def build(task: str, seed: int = 0):
    """The trained model and data of ``task`` (float32), built with the demo's code."""
    from inflens import Objective
    from inflens.experiments.gpt2_demo import make_sequences, tiny_gpt2
    from inflens.train import AdamConfig, fit_adam

    c = TASKS[task]
    seqs = make_sequences(
        c["vocab_size"], c["seq_len"], c["n_train"], c["n_test"], seed, c.get("stride")
    )
    model = conv1d_to_linear(
        tiny_gpt2(c["vocab_size"], c["seq_len"], c["n_embd"], c["n_layer"], c["n_head"], seed)
    )
    obj = Objective(model, "causal_lm")
    cfg = AdamConfig(c["train_steps"], c["batch_size"], c["lr"], seed=seed, log_every=50)
    fit = fit_adam(obj, (seqs.train, seqs.train), cfg)
    obj.load_into_model(fit.theta)
    return model, seqs, fit.state["losses"]


# ---------------------------------------------------------------------------- workers
def _load(folder: Path):
    from safetensors.torch import load_file

    from inflens.experiments.gpt2_demo import tiny_gpt2

    meta = json.loads((folder / "task.json").read_text())
    c = TASKS[meta["task"]]
    model = conv1d_to_linear(
        tiny_gpt2(c["vocab_size"], c["seq_len"], c["n_embd"], c["n_layer"], c["n_head"], 0)
    )
    model.load_state_dict(load_file(folder / "model.safetensors"))
    data = load_file(folder / "data.safetensors")
    return model.eval(), data["train"], data["test"], meta


def run_inflens(folder: Path, solver: str) -> np.ndarray:
    import warnings

    import inflens

    model, train, test, meta = _load(folder)
    if solver == "exact":
        model = model.double()
    obj = inflens.Objective(model, "causal_lm", params=theta_names(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", inflens.InflensWarning)
        inf = inflens.Influence(obj, (train, train), solver=solver, damping=meta["damping"],
                                curvature="ggn", progress=False).fit()  # fmt: skip
    return inf.loss_influence((test, test)).double().numpy()


class _Items(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def run_kronfluence(folder: Path, out: Path) -> np.ndarray:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    model, train, test, meta = _load(folder)
    tracked = linear_modules(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(theta_names(model)))

    def seq_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lg, lab = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), reduction="none")
        return nll.view(lab.shape).mean(1)  # per sequence: mean over its tokens (causal_lm)

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits
            if not sample:
                return seq_losses(logits, ids).sum()
            with torch.no_grad():  # labels drawn from the model: the true Fisher (= GGN)
                probs = torch.softmax(logits.detach(), -1)
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(ids.shape)
            return seq_losses(logits, torch.cat([ids[:, :1], drawn[:, :-1]], 1)).sum()

        def compute_measurement(self, batch, model):
            ids = batch["input_ids"]
            return seq_losses(model(input_ids=ids).logits, ids).sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return None

    task = LM()
    model = prepare_model(model, task)
    analyzer = Analyzer("gpt2", model, task, cpu=True, disable_tqdm=True,
                        output_dir=str(out / "kronfluence"))  # fmt: skip
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=False)
    analyzer.fit_all_factors("ekfac", _Items(train), per_device_batch_size=64,
                             factor_args=fargs, overwrite_output_dir=True)  # fmt: skip
    sargs = ScoreArguments(damping_factor=meta["damping"])
    analyzer.compute_pairwise_scores("scores", "ekfac", _Items(test), _Items(train),
                                     per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=64, score_args=sargs,
                                     overwrite_output_dir=True)  # fmt: skip
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return -scores.double().numpy()  # kronfluence: +g_test^T H^-1 g_i; inflens: negative


def worker(method: str, folder: Path) -> None:
    """Run one method, write ``METHOD.npy`` and ``METHOD.json`` (seconds, peak memory)."""
    t0 = time.perf_counter()
    if method == "exact-ggn":
        scores = run_inflens(folder, "exact")
    elif method == "inflens-ekfac":
        scores = run_inflens(folder, "ekfac")
    elif method == "kronfluence-ekfac":
        scores = run_kronfluence(folder, folder)
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - t0
    np.save(folder / f"{method}.npy", scores)
    info = {
        "seconds": seconds,
        "peak_rss_mb": peak_resident_mib(),
        "threads": torch.get_num_threads(),
    }
    (folder / f"{method}.json").write_text(json.dumps(info))


# ---------------------------------------------------------------------------- driver
def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    a, b = a.reshape(-1), b.reshape(-1)
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/peers-transformer"))
    ap.add_argument("--tasks", default="ref,issue", help="comma-separated: ref, issue, large")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per method")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.dir)
        return 0
    from safetensors.torch import save_file

    rows = []
    for task in args.tasks.split(","):
        folder = args.out / task
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model, seqs, losses = build(task)
        p = sum(dict(model.named_parameters())[n].numel() for n in theta_names(model))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  folder / "model.safetensors")  # fmt: skip
        save_file({"train": seqs.train, "test": seqs.test}, folder / "data.safetensors")
        meta = {"task": task, "damping": args.damping, "p": p, "train_losses": losses,
                "model_parameters": sum(q.numel() for q in model.parameters()),
                "train_seconds": time.perf_counter() - t0, **TASKS[task]}  # fmt: skip
        (folder / "task.json").write_text(json.dumps(meta, indent=2))
        print(f"[{task}] trained in {meta['train_seconds']:.1f} s, p = {p}, losses {losses}",
              flush=True)  # fmt: skip
        done = {}
        for method in args.methods.split(","):
            if method == "exact-ggn" and task != "ref":
                continue  # a dense [p, p] Gauss-Newton matrix only for the small model
            cmd = [sys.executable, __file__, "--worker", method, "--dir", str(folder)]
            try:
                r = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
                ok = r.returncode == 0
                err = r.stderr[-2000:]
            except subprocess.TimeoutExpired:
                ok, err = False, f"timed out after {args.timeout} s"
            if not ok:
                print(f"[{task}] {method} failed: {err}", flush=True)
                rows.append({"task": task, "method": method, "error": err})
                continue
            info = json.loads((folder / f"{method}.json").read_text())
            done[method] = np.load(folder / f"{method}.npy")
            rows.append({"task": task, "method": method, **info})
            print(f"[{task}] {method}: {info['seconds']:.1f} s, peak {info['peak_rss_mb']:.0f} "
                  "MiB", flush=True)  # fmt: skip
        for row in rows:
            if row["task"] != task or row["method"] not in done:
                continue
            s = done[row["method"]]
            for other in ("exact-ggn", "inflens-ekfac", "kronfluence-ekfac"):
                if other in done and other != row["method"]:
                    pr, sr = _corr(s, done[other])
                    row[f"pearson_vs_{other}"], row[f"spearman_vs_{other}"] = pr, sr
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| task | method | seconds | peak MiB | Pearson / Spearman vs exact GGN | "
          "Pearson / Spearman vs the other library's EK-FAC |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['task']} | {r['method']} | failed | | | |")
            continue
        other = "kronfluence-ekfac" if r["method"] == "inflens-ekfac" else "inflens-ekfac"
        ex = (f"{r['pearson_vs_exact-ggn']:.4f} / {r['spearman_vs_exact-ggn']:.4f}"
              if "pearson_vs_exact-ggn" in r else "-")  # fmt: skip
        ot = (f"{r[f'pearson_vs_{other}']:.4f} / {r[f'spearman_vs_{other}']:.4f}"
              if f"pearson_vs_{other}" in r and r["method"] != "exact-ggn" else "-")  # fmt: skip
        print(f"| {r['task']} | {r['method']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{ex} | {ot} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    raise SystemExit(main())
