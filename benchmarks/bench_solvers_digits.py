"""Time the inverse-HVP solvers' defaults against the exact solver on scikit-learn's digits.

The demo's problem (``inflens.experiments.demo``): 10-class logistic regression without bias,
float64, ``l2 = 0.01``, p = 640, trained on 1,347 digits to ``||grad|| <= 1e-12``. The query is
``loss_influence`` of the ``--test-points`` misclassified test digits with the highest test
loss against every training point (``[10, 1347]`` scores). For each solver the time is the fit
plus that query (a fresh ``Influence`` each run, median of ``--repeats`` runs), and the
agreement is the Pearson correlation with the exact scores, over all scores and per test point
(the smallest), and the relative error of ``s_test``.

Rows: ``Exact()``, ``LiSSA()`` and ``Arnoldi()`` with their defaults, and ``LiSSA.paper()``
(depth 5000, 10 repeats, scale 25, batch 1), which runs in a child process stopped after
``--paper-limit`` seconds (0 skips it).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_solvers_digits.py [--test-points 10]
[--repeats 3] [--threads 1] [--paper-limit 120] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
import warnings

import torch
from torch import nn

from inflens import InflensWarning, Influence, Objective
from inflens.experiments.demo import L2, load_digits_split
from inflens.solvers import Arnoldi, Exact, LiSSA, Solver
from inflens.train import fit_lbfgs, fit_newton


def digits_problem(test_points: int) -> tuple[Objective, tuple, tuple]:
    """The trained digits model, its training set and the misclassified test digits with the
    highest test loss."""
    xtr, ytr, xte, yte = load_digits_split(0)
    model = nn.Linear(xtr.shape[1], 10, bias=False).double()
    nn.init.zeros_(model.weight)
    obj = Objective(model, "cross_entropy", l2=L2)
    obj.load_into_model(fit_lbfgs(obj, (xtr, ytr), tol=1e-8).theta)
    obj = Objective(model, "cross_entropy", l2=L2)
    pre = Influence(obj, (xtr, ytr), solver="exact", progress=False).fit()
    theta, _ = fit_newton(obj, (xtr, ytr), pre.solver.solve, tol=1e-12)
    obj.load_into_model(theta)
    obj = Objective(model, "cross_entropy", l2=L2)
    with torch.no_grad():
        wrong = (model(xte).argmax(1) != yte).nonzero()[:, 0]
        losses = obj.losses(obj.theta, xte[wrong], yte[wrong])
    pick = wrong[torch.argsort(losses, descending=True)[:test_points]]
    return obj, (xtr, ytr), (xte[pick], yte[pick])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def run_solver(obj: Objective, train, test, solver: Solver) -> dict:
    """Fit and query once: seconds, scores, s_test, warnings and the solver's settings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InflensWarning)
        t0 = time.perf_counter()
        inf = Influence(obj, train, solver=solver, progress=False).fit()
        t1 = time.perf_counter()
        scores = inf.loss_influence(test)
        t2 = time.perf_counter()
        s_test = inf.s_test(test)  # for its error (a second solve, not timed)
    d = inf.diagnostics()
    keys = (
        "scale",
        "depth",
        "rank",
        "n_iters",
        "complement_eigenvalue",
        "captured_trace_fraction",
        "trace_estimate",
        "matvecs",
    )
    return {
        "fit_s": t1 - t0,
        "query_s": t2 - t1,
        "total_s": t2 - t0,
        "scores": scores,
        "s_test": s_test,
        "warnings": [str(w.message) for w in caught],
        "settings": {k: d[k] for k in keys if d.get(k) is not None},
    }


def _paper_child(test_points: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    obj, train, test = digits_problem(test_points)
    out = run_solver(obj, train, test, LiSSA.paper())
    queue.put({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in out.items()})


def run_paper(test_points: int, threads: int, limit: float) -> dict | None:
    """``LiSSA.paper()`` in a child process, stopped after ``limit`` seconds (None then)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_paper_child, args=(test_points, threads, queue))
    proc.start()
    try:
        out = queue.get(timeout=limit)
    except Exception:  # noqa: BLE001 - queue.Empty: over the limit
        out = None
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if out is None:
        return None
    out["scores"] = torch.tensor(out["scores"], dtype=torch.float64)
    out["s_test"] = torch.tensor(out["s_test"], dtype=torch.float64)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test-points", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per solver (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument(
        "--paper-limit", type=float, default=120.0, help="seconds for LiSSA.paper() (0: skip)"
    )
    ap.add_argument("--json", default=None, help="write the table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    obj, train, test = digits_problem(args.test_points)
    makers = {
        "Exact()": Exact,
        "LiSSA()": LiSSA,
        "Arnoldi()": Arnoldi,
    }
    runs: dict[str, list[dict]] = {name: [] for name in makers}
    for _ in range(args.repeats):  # interleaved, so that load affects every solver alike
        for name, make in makers.items():
            runs[name].append(run_solver(obj, train, test, make()))
    exact_scores = runs["Exact()"][0]["scores"]
    exact_s = runs["Exact()"][0]["s_test"]
    rows = []

    def row(name: str, results: list[dict]) -> dict:
        last = results[-1]
        got = last["scores"]
        per_point = [_pearson(got[i], exact_scores[i]) for i in range(got.shape[0])]
        return {
            "solver": name,
            "settings": last["settings"],
            "fit_s": statistics.median(r["fit_s"] for r in results),
            "query_s": statistics.median(r["query_s"] for r in results),
            "total_s": statistics.median(r["total_s"] for r in results),
            "pearson": _pearson(got, exact_scores),
            "min_pearson_per_point": min(per_point),
            "s_test_rel_error": float((last["s_test"] - exact_s).norm() / exact_s.norm()),
            "warnings": last["warnings"],
        }

    for name in makers:
        rows.append(row(name, runs[name]))
    if args.paper_limit > 0:
        paper = run_paper(args.test_points, args.threads, args.paper_limit)
        if paper is None:
            rows.append({"solver": "LiSSA.paper()", "total_s": None, "limit_s": args.paper_limit})
        else:
            rows.append(row("LiSSA.paper()", [paper]))

    print(
        f"digits, 10-class logistic regression: n = {len(train[1])}, p = {obj.p}, l2 = {L2}, "
        f"float64, {args.test_points} test points, {args.threads} thread(s), median of "
        f"{args.repeats} runs (LiSSA.paper(): one run)"
    )
    print(
        f"{'solver':16s}{'fit s':>9s}{'query s':>9s}{'total s':>9s}{'Pearson':>10s}"
        f"{'min/point':>11s}{'s_test err':>12s}  settings"
    )
    for r in rows:
        if r.get("total_s") is None:
            print(f"{r['solver']:16s}  stopped after {r['limit_s']:.0f} s (--paper-limit)")
            continue
        settings = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["settings"].items()
        )
        print(
            f"{r['solver']:16s}{r['fit_s']:9.3f}{r['query_s']:9.3f}{r['total_s']:9.3f}"
            f"{r['pearson']:10.4f}{r['min_pearson_per_point']:11.4f}"
            f"{r['s_test_rel_error']:12.2e}  {settings}"
        )
        for w in dict.fromkeys(r["warnings"]):  # once each (s_test is a second solve)
            print(f"{'':16s}warning: {w[:150]}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
