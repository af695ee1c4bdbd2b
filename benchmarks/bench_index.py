"""Benchmark the gradient index: build cost, disk size, query latency and top-10 recall.

Two problems, float32, exact solver (Cholesky/eigh of the explicit Hessian):

- ``synthetic``: binary logistic regression, ``--n`` points (default 1,000,000) in ``--d``
  dimensions (default 300), labels from a random linear rule with noise, theta from 30
  L-BFGS iterations (influence does not need the exact optimum), ``l2 = 0.01``.
- ``mnist``: the paper's Fig. 2 model, 10-class logistic regression without bias on the
  55,000 MNIST training images (``inflens.datasets``, read from ``--data-dir``; skipped when
  absent), ``l2 = 0.01``, theta from ``--mnist-iters`` L-BFGS iterations.

For each index dimension (``none`` = no projection, exact; ``none:test`` = no projection with
``precondition="test"``: rows ``g_i + l2 theta``, ``A^-1`` applied to the query) it measures:

- ``build_s``: :meth:`Influence.build_index` wall time, and its ratio to one
  per-example-gradient pass over the same data (``pe_grad_s``: ``obj.per_example_grads`` on
  chunks of 16,384, nothing stored);
- ``disk_mb``: the index folder's size;
- ``open_s``: ``GradientIndex.open`` (header, fingerprints, stored factors, projection check);
- ``q1_s`` / ``q100_s``: ``topk(test, 10)`` latency for 1 and 100 test points on the reopened
  index, test gradients included; each call reads every chunk again through its memory map
  (the files are in the page cache, having just been written); best of 3 after the first;
- ``recall@10``: top-10 recall (most helpful and most harmful, averaged) and Pearson R of the
  index's scores against ``Influence.loss_influence`` on 100 test points.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_index.py [--n 1000000] [--d 300]
[--dims none,32,64,128] [--mnist-dims 256,1024,2048,4096,none:test] [--data-dir ../shared/data]
[--out /tmp/inflens-bench-index] [--json results.json] [--skip-synthetic] [--skip-mnist]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inflens import GradientIndex, Influence, Objective
from inflens.index import compare_scores
from inflens.train import fit_lbfgs


def _dims(text: str) -> list[tuple[int | None, str]]:
    """``"none,1024,none:test"`` -> ``[(None, "auto"), (1024, "auto"), (None, "test")]``
    (``:test``: rows ``g_i``, ``A^-1`` applied on the query side)."""
    out = []
    for t in text.split(","):
        if t.strip():
            d, _, mode = t.strip().partition(":")
            out.append((None if d == "none" else int(d), mode or "auto"))
    return out


def _pe_grad_pass(obj: Objective, x: torch.Tensor, y: torch.Tensor, chunk: int = 16384) -> float:
    t = time.perf_counter()
    with obj.evaluating():
        for s in range(0, x.shape[0], chunk):
            obj.per_example_grads(x[s : s + chunk], y[s : s + chunk], "loss")
    return time.perf_counter() - t


def _latency(index: GradientIndex, test, repeats: int = 3) -> tuple[float, float]:
    """(first, best of the next ``repeats``) seconds of ``index.topk(test, 10)``; every call
    reads the whole store again through the memory maps."""
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        index.topk(test, 10)
        times.append(time.perf_counter() - t)
    return times[0], min(times[1:])


def bench(name: str, obj: Objective, train, test, dims, out: Path, log) -> list[dict]:
    x, y = train
    xt, yt = test
    pe = min(_pe_grad_pass(obj, x, y) for _ in range(2))
    log(f"[{name}] n={x.shape[0]}, p={obj.p}: per-example-gradient pass {pe:.2f} s")
    t = time.perf_counter()
    inf = Influence(obj, train, solver="exact", progress=False).fit()
    log(f"[{name}] exact solver fit {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    exact = inf.loss_influence((xt, yt))
    log(
        f"[{name}] Influence.loss_influence for {xt.shape[0]} test points {time.perf_counter() - t:.1f} s"
    )
    rows = []
    for dim, mode in dims:
        folder = out / f"{name}_{dim}_{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        index = inf.build_index(
            folder, dim=dim, dtype="float32", chunk_size=65536, precondition=mode
        )
        build = time.perf_counter() - t
        t = time.perf_counter()
        index = GradientIndex.open(folder, obj)  # as another process would
        opened = time.perf_counter() - t
        q1 = _latency(index, (xt[:1], yt[:1]))
        q100 = _latency(index, (xt, yt), repeats=2)
        qual = compare_scores(index.loss_influence((xt, yt)), exact, 10, index.dim)
        row = {
            "problem": name,
            "n": int(x.shape[0]),
            "p": obj.p,
            "dim": dim,
            "precondition": index.header["method_config"]["mode"],
            "stored_width": index.dim,
            "projection": index.header["projection"]["kind"],
            "pe_grad_s": pe,
            "build_s": build,
            "build_over_pe_grad": build / pe,
            "disk_mb": index.disk_bytes / 2**20,
            "open_s": opened,
            "q1_first_s": q1[0],
            "q1_s": q1[1],
            "q100_first_s": q100[0],
            "q100_s": q100[1],
            "recall_helpful@10": qual.recall_helpful,
            "recall_harmful@10": qual.recall_harmful,
            "recall@10": 0.5 * (qual.recall_helpful + qual.recall_harmful),
            "pearson": qual.pearson,
            "spearman": qual.spearman,
        }
        log(json.dumps(row))
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def synthetic(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 100, d, generator=g) / d**0.5
    w = torch.randn(d, generator=g) * 3
    logits = x @ w + 0.5 * torch.randn(n + 100, generator=g)
    y = (logits > 0).long()
    model = nn.Linear(d, 1, bias=False)
    obj = Objective(model, "binary_logistic", l2=0.01)
    fit_lbfgs(obj, (x[:n], y[:n]), max_iter=30, on_fail="ignore", load=True)
    obj = Objective(model, "binary_logistic", l2=0.01)
    return obj, (x[:n], y[:n]), (x[n:], y[n:])


def mnist(data_dir: str | None, iters: int):
    from inflens.datasets import load_mnist, mnist_paper_split

    split = mnist_paper_split(load_mnist(data_dir, download=False), dtype=np.float32)
    x, y = torch.from_numpy(split["x_train"]), torch.from_numpy(split["y_train"]).long()
    xt = torch.from_numpy(split["x_test"][:100])
    yt = torch.from_numpy(split["y_test"][:100]).long()
    model = nn.Linear(784, 10, bias=False)
    nn.init.zeros_(model.weight)
    obj = Objective(model, "cross_entropy", l2=0.01)
    fit_lbfgs(obj, (x, y), max_iter=iters, on_fail="ignore", load=True)
    return Objective(model, "cross_entropy", l2=0.01), (x, y), (xt, yt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=300)
    ap.add_argument("--dims", default="none,32,64,128")
    ap.add_argument("--mnist-dims", default="256,1024,2048,4096")
    ap.add_argument("--mnist-iters", type=int, default=300)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="/tmp/inflens-bench-index")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-mnist", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    rows: list[dict] = []
    if not args.skip_mnist:
        try:
            problem = mnist(args.data_dir, args.mnist_iters)
        except Exception as exc:  # noqa: BLE001 - missing data: skip with the reason
            log(f"[mnist] skipped: {type(exc).__name__}: {exc}")
        else:
            rows += bench("mnist_lr", *problem, _dims(args.mnist_dims), out, log)
    if not args.skip_synthetic:
        rows += bench("synthetic", *synthetic(args.n, args.d), _dims(args.dims), out, log)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    log(
        "\n| problem | dim | stored | build (x pe-grad pass) | disk | open | 1 test | 100 tests | recall@10 | Pearson |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['problem']} (n={r['n']:,}, p={r['p']:,}) | {r['dim']} | {r['stored_width']} "
            f"({r['projection']}, {r['precondition']}) | {r['build_s']:.1f} s ({r['build_over_pe_grad']:.1f}x) | "
            f"{r['disk_mb']:.0f} MiB | {r['open_s']:.2f} s | {r['q1_s'] * 1000:.0f} ms | {r['q100_s'] * 1000:.0f} ms | "
            f"{r['recall@10']:.3f} | {r['pearson']:.3f} |"
        )


if __name__ == "__main__":
    main()
