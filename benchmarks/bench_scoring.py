"""Time influence scoring against one forward pass over the same training set.

For each model (multinomial logistic regression 784x10 without bias, and the paper's small
CNN, :class:`inflens.models.PaperCNN`) on a synthetic MNIST-shaped training set of ``--n``
points (timings do not depend on the pixel values), this measures, in one process:

- ``forward``: one forward pass (loss values, no gradients) over the training set, in chunks
  (timed at chunk sizes 256, 1024, 4096 and the memory-based default; the fastest is kept);
- ``pe_grad``: one per-example-gradient pass with autograd (``vmap(grad)``) over the set
  (likewise the fastest chunk size);
- ``loss_influence(k)`` for ``k`` in 1, 10 and 100 test points, end to end (test gradients,
  ``s_test`` with a fitted K-FAC solver whose solve is a few small products, and the scoring
  pass over every training point; the solver's fit is excluded).

Every time is the median of ``--repeats`` runs, the measurements interleaved so that load from
other processes affects all of them alike. Ratios are printed beside the targets:

- issue 2: ``loss_influence(1) <= 4 x forward``;
- issue 5: ``loss_influence(1) <= 3 x forward`` and ``loss_influence(100) <= 1.5 x pe_grad``.

Run: ``python benchmarks/bench_scoring.py [--n 20000] [--repeats 5] [--dtype float32]
[--threads 2] [--json out.json] [--chunk-sweep] [--lissa]``. ``--chunk-sweep`` also times the
passes at chunk sizes 256, 512 and 1024 (the CPU chunk cap); ``--lissa`` times LiSSA with the
paper's settings (50,000 batch-1 steps) on an MNIST-LR-shaped problem.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from inflens import InflensWarning, Influence, Objective
from inflens.backends import VmapBackend
from inflens.curvature import auto_chunk_size
from inflens.models import PaperCNN
from inflens.solvers import KFAC

TEST_COUNTS = (1, 10, 100)


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_model(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> dict:
    """Median times (seconds) and ratios for one model."""
    obj = Objective(model, "cross_entropy", l2=0.01)
    n = x.shape[0]
    xt, yt = x[: max(TEST_COUNTS)], y[: max(TEST_COUNTS)]  # test points (any will do)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def forward(chunk: int) -> None:
        with torch.no_grad(), obj.evaluating():
            for s in range(0, n, chunk):
                obj.losses(obj.theta, x[s : s + chunk], y[s : s + chunk])
        sync()

    autograd = VmapBackend(obj)  # vmap(grad) whatever backend the model would get

    def pe_grad(chunk: int) -> None:
        with obj.evaluating():
            for s in range(0, n, chunk):
                autograd.per_example_grads(obj.theta, x[s : s + chunk], y[s : s + chunk])
        sync()

    # the baselines are timed at several chunk sizes and the fastest is kept: the most
    # demanding honest reference for "one forward pass" / "one per-example-gradient pass"
    chunks = sorted({256, 1024, 4096, auto_chunk_size(n, obj.p, x.element_size())})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        t_fit = time.perf_counter()
        inf = Influence(obj, (x, y), solver=KFAC(), damping=0.01, progress=False).fit()
        t_fit = time.perf_counter() - t_fit

    jobs: dict[str, Callable[[], object]] = {}
    for c in chunks:
        jobs[f"forward@{c}"] = lambda c=c: forward(c)
        jobs[f"pe_grad@{c}"] = lambda c=c: pe_grad(c)

    def query(k: int) -> None:
        inf.loss_influence((xt[:k], yt[:k]))
        sync()

    for k in TEST_COUNTS:
        jobs[f"loss_influence({k})"] = lambda k=k: query(k)
    for fn in jobs.values():  # warm-up (lazy imports, allocator, closed-form probe, auto timing)
        fn()
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(args.repeats):
        for key, fn in jobs.items():
            times[key].append(_time(fn))
    allmed = {key: statistics.median(v) for key, v in times.items()}
    best_fwd = min((k for k in allmed if k.startswith("forward@")), key=allmed.__getitem__)
    best_pe = min((k for k in allmed if k.startswith("pe_grad@")), key=allmed.__getitem__)
    med = {"forward": allmed[best_fwd], "pe_grad": allmed[best_pe]}
    med.update({k: v for k, v in allmed.items() if k.startswith("loss_influence")})
    out = {
        "model": name,
        "p": obj.p,
        "n": n,
        "backend": obj.backend.name,
        "linear_head_closed_form": obj.backend.closed_form_scoring,
        "kfac_fit_s": t_fit,
        "scoring_chunk_size": inf._scoring_chunk_size(1),
        "best_forward_chunk": int(best_fwd.split("@")[1]),
        "best_pe_grad_chunk": int(best_pe.split("@")[1]),
        "all_seconds": allmed,
        "seconds": med,
        "ratio_to_forward": {k: v / med["forward"] for k, v in med.items()},
        "ratio_to_pe_grad": {k: v / med["pe_grad"] for k, v in med.items()},
    }
    out["targets"] = {
        "issue2: loss_influence(1) <= 4x forward": out["ratio_to_forward"]["loss_influence(1)"]
        <= 4,
        "issue5: loss_influence(1) <= 3x forward": out["ratio_to_forward"]["loss_influence(1)"]
        <= 3,
        "issue5: loss_influence(100) <= 1.5x pe_grad": out["ratio_to_pe_grad"][
            "loss_influence(100)"
        ]
        <= 1.5,
    }
    return out


def chunk_sweep(x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of forward / JVP / per-example-gradient / closed-form passes over ``x`` at
    chunk sizes 256, 512 and 1024 (interleaved), for the CNN and logistic regression."""
    n = x.shape[0]
    out: dict[str, float] = {}
    jobs = []
    for name, model in (("cnn", PaperCNN(seed=0, dtype=x.dtype)), ("lr", nn.Linear(784, 10))):
        obj = Objective(model.to(x.dtype).to(x.device), "cross_entropy", l2=0.01)
        kinds = (("fwd", 1), ("jvp", 1), ("pe", 1)) if name == "cnn" else (
            ("fwd", 1), ("jvp", 1), ("jvp", 100))  # fmt: skip
        for kind, k in kinds:
            vecs = torch.randn(k, obj.p, dtype=x.dtype, device=x.device)

            def run(c: int, obj=obj, kind=kind, vecs=vecs) -> None:
                with obj.evaluating():
                    for i in range(0, n, c):
                        xx, yy = x[i : i + c], y[i : i + c]
                        if kind == "fwd":
                            with torch.no_grad():
                                obj.losses(obj.theta, xx, yy)
                        elif kind == "jvp":
                            obj.loss_jvp(vecs, xx, yy)
                        else:
                            vecs @ VmapBackend(obj).per_example_grads(obj.theta, xx, yy).T

            for c in (256, 512, 1024):
                jobs.append((f"{name}.{kind}{k}@{c}", run, c))
    for _, fn, c in jobs:
        fn(c)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for key, fn, c in jobs:
            times.setdefault(key, []).append(_time(lambda fn=fn, c=c: fn(c)))
    for key, v in times.items():
        out[key] = statistics.median(v)
    return out


def lissa_paper(threads: int | None) -> dict[str, float]:
    """Seconds for LiSSA with the paper's settings (depth 5000, 10 repeats, batch 1, scale 25)
    on an MNIST-LR-shaped problem: n = 55,000 synthetic points, 784 x 10, float64, one vector."""
    from inflens.solvers import LiSSA

    g = torch.Generator().manual_seed(0)
    n = 55000
    x = torch.rand(n, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    model = nn.Linear(784, 10, bias=False).double()
    nn.init.normal_(model.weight, std=0.01, generator=g)
    obj = Objective(model, "cross_entropy", l2=0.01)
    # LiSSA.paper() (batch 1: the default mini-batch of 64 would time another protocol)
    # without its spectrum estimate at fit, which is not part of the timed solve anyway
    paper = LiSSA.paper()
    solver = LiSSA(depth=paper.depth, repeats=paper.repeats, scale=paper.scale,
                   batch_size=paper.batch_size, seed=paper.seed,
                   estimate_spectrum=False)  # fmt: skip
    inf = Influence(obj, (x, y), solver=solver, progress=False).fit()
    v = torch.randn(1, obj.p, generator=g, dtype=torch.float64)
    warm = LiSSA(depth=50, repeats=1, scale=25.0, batch_size=1, estimate_spectrum=False)
    warm.fit(inf.curvature_).solve(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)  # the paper's depth is not converged
        sec = _time(lambda: inf.solver.solve(v))
    return {"steps": 50000, "seconds": sec, "ms_per_step": 1e3 * sec / 50000}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="training points")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="lr,cnn", help="comma-separated: lr, cnn")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--chunk-sweep", action="store_true", help="also time chunk sizes 256-1024")
    ap.add_argument("--lissa", action="store_true", help="also time LiSSA's paper settings")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, 784, generator=g, dtype=dt).to(args.device)
    y = torch.randint(0, 10, (args.n,), generator=g).to(args.device)
    results = []
    for name in args.models.split(","):
        if name == "lr":
            model = nn.Linear(784, 10, bias=False).to(dt)
            nn.init.normal_(model.weight, std=0.01, generator=g)
        elif name == "cnn":
            model = PaperCNN(seed=0, dtype=dt)
        else:
            raise SystemExit(f"unknown model {name!r}; use lr or cnn")
        results.append(bench_model(name, model.to(args.device), x, y, args))
    print(
        f"n={args.n} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"device={args.device} repeats={args.repeats} (median seconds; ratios)"
    )
    for r in results:
        print(f"\n{r['model']} (p={r['p']}, closed-form linear head: "
              f"{r['linear_head_closed_form']}, backend {r['backend']}, K-FAC fit {r['kfac_fit_s']:.2f}s, scoring "
              f"chunk {r['scoring_chunk_size']}, forward chunk {r['best_forward_chunk']}, "
              f"pe_grad chunk {r['best_pe_grad_chunk']})")  # fmt: skip
        print(f"  {'measurement':<22}{'seconds':>9}{'x forward':>11}{'x pe_grad':>11}")
        for key, sec in r["seconds"].items():
            print(
                f"  {key:<22}{sec:>9.3f}{r['ratio_to_forward'][key]:>11.2f}"
                f"{r['ratio_to_pe_grad'][key]:>11.2f}"
            )
        for target, ok in r["targets"].items():
            print(f"  {'MET ' if ok else 'MISS'} {target}")
    extra: dict[str, dict[str, float]] = {}
    if args.chunk_sweep:
        n = min(args.n, 8192)
        extra["chunk_sweep"] = chunk_sweep(x[:n], y[:n], args.repeats)
        print(f"\nchunk sweep over {n} points (median seconds):")
        for key, sec in extra["chunk_sweep"].items():
            print(f"  {key:<22}{sec:>9.3f}")
    if args.lissa:
        extra["lissa_paper"] = lissa_paper(args.threads)
        r = extra["lissa_paper"]
        print(f"\nLiSSA, paper settings (50,000 batch-1 steps, n=55,000, p=7,840, float64): "
              f"{r['seconds']:.1f} s = {r['ms_per_step']:.3f} ms/step")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, **extra}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
