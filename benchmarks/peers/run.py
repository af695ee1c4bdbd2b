"""Side-by-side benchmark of inflens and its peers on one task (task (a): scikit-learn digits).

Run from the repository root with the peers' virtualenv (``bash benchmarks/peers/run.sh``):

    python benchmarks/peers/run.py --out runs/bench_peers [--repeats 3] [--methods ...]

1. Setup (this process): 10-class softmax regression without bias on the 8x8 digits
   (p = 64 * 10 = 640), float64, trained by L-BFGS on mean cross-entropy + (l2/2)||theta||^2
   to a gradient norm < 1e-10. Test points: the first 10 of the held-out split.
2. Oracle ("exact influence"): the Hessian is formed in closed form with numpy, independently
   of every library, ``H = (1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + l2 I``, and
   ``I_up,loss(z_i, z_test) = -g_test^T H^-1 (g_i + l2 theta)``.
3. Actual leave-one-out retraining: for test point 0, the 100 training points of largest
   |exact influence| are each removed and the model refit (L-BFGS, warm start, same tolerance);
   the actual change of the test loss is compared with each method's scores.
4. Each method runs in its own subprocess (``--worker``) so that its peak memory (max RSS
   minus the RSS after loading the task) is its own; time = median over ``--repeats`` runs of
   fit + scores of the 10 test points against every training point.

Peers' signs and scalings differ (several return ``+g_test^T H^-1 g_i``, helpful = positive);
each method's scores are multiplied by the sign that best aligns them with the oracle, and that
sign is reported. Pearson/Spearman are means over the 10 test points; top-50 overlap is
``|top50(|method|) & top50(|exact|)| / 50`` averaged over test points.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import stats
from torch import nn

L2 = 1e-3  # on the mean loss; the model is trained with it and inflens uses it
N_TEST = 10
TOP = 50
LOO_K = 100

METHODS = [
    "inflens.exact",
    "inflens.cg",
    "pydvl.direct.default",
    "pydvl.direct.matched",
    "pydvl.cg.default",
    "pydvl.cg.matched",
    "captum.naive.default",
    "captum.naive.matched",
    "dattri.explicit.default",
    "dattri.explicit.matched",
    "dattri.cg.default",
    "dattri.cg.matched",
    "kronfluence.ekfac.default",
    "kronfluence.ekfac.matched",
]


# ---------------------------------------------------------------------------- task
def make_model(d: int = 64, c: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d, c, bias=False)).double()


def build_task(out: Path) -> dict:
    from sklearn.datasets import load_digits

    from inflens import Objective

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = 1500
    xtr, ytr, xte, yte = x[:n], y[:n], x[n : n + N_TEST], y[n : n + N_TEST]
    model = make_model()
    obj = Objective(model, "cross_entropy", l2=L2)
    theta = fit(obj, xtr, ytr, torch.zeros(obj.p, dtype=torch.float64))
    obj.load_into_model(theta)
    save_file(
        {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "theta": theta},
        str(out / "task.safetensors"),
    )
    return {"n": n, "p": obj.p, "l2": L2}


def fit(obj, x, y, theta0: torch.Tensor) -> torch.Tensor:
    """L-BFGS on mean CE + (l2/2)||theta||^2 to a gradient norm < 1e-10 (float64)."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-11,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        r = obj.risk(theta, x, y)
        r.backward()
        return r

    for _ in range(5):
        opt.step(closure)
        if theta.grad.norm() < 1e-10:
            break
    return theta.detach()


def oracle(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form Hessian (numpy) -> exact I_up,loss [N_TEST, n] and per-example grads."""
    x, y, xte, yte = (t[k].numpy() for k in ("xtr", "ytr", "xte", "yte"))
    w = t["theta"].numpy().reshape(10, 64)  # row c: weights of class c (nn.Linear layout)
    n, d = x.shape

    def probs(a):
        z = a @ w.T
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def grads(a, lab):
        r = probs(a)
        r[np.arange(len(lab)), lab] -= 1.0
        return np.einsum("ic,id->icd", r, a).reshape(len(lab), -1)

    pr = probs(x)
    h = np.zeros((10, d, 10, d))
    for c in range(10):
        for c2 in range(10):
            a = pr[:, c] * ((c == c2) - pr[:, c2])
            h[c, :, c2, :] = (x * a[:, None]).T @ x / n
    h = h.reshape(10 * d, 10 * d) + L2 * np.eye(10 * d)
    gtr = grads(x, y) + L2 * w.reshape(-1)
    gte = grads(xte, yte)
    return -(np.linalg.solve(h, gte.T).T @ gtr.T), gtr


def leave_one_out(t: dict, exact: np.ndarray, out: Path) -> dict:
    from inflens import Objective

    model = make_model()
    obj = Objective(model, "cross_entropy", l2=L2)
    xtr, ytr, theta = t["xtr"], t["ytr"], t["theta"]
    xte, yte = t["xte"][:1], t["yte"][:1]
    base = float(obj.losses(theta, xte, yte)[0])
    idx = np.argsort(-np.abs(exact[0]))[:LOO_K]
    actual = []
    for i in idx:
        keep = torch.ones(len(ytr), dtype=torch.bool)
        keep[int(i)] = False
        th = fit(obj, xtr[keep], ytr[keep], theta)
        actual.append(float(obj.losses(th, xte, yte)[0]) - base)
    res = {"indices": idx.tolist(), "actual": actual}
    (out / "loo.json").write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------------------- methods
def _loaded_model(t: dict) -> nn.Module:
    from inflens import Objective

    model = make_model()
    Objective(model, "cross_entropy", l2=L2).load_into_model(t["theta"])
    return model


def run_method(name: str, t: dict, tmp: Path) -> torch.Tensor:
    """One fit + scoring of the N_TEST test points against all training points: [N_TEST, n]."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    lib, algo, reg = (name.split(".") + ["default"])[:3]
    xtr, ytr, xte, yte = t["xtr"], t["ytr"], t["xte"], t["yte"]
    n = len(ytr)
    model = _loaded_model(t)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=n)
    matched = reg == "matched"
    if lib == "inflens":
        from inflens import Influence, Objective

        obj = Objective(model, "cross_entropy", l2=L2)
        inf = Influence(obj, (xtr, ytr), solver=algo, progress=False).fit()
        return inf.loss_influence((xte, yte))
    if lib == "pydvl":
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import CgInfluence, DirectInfluence

        cls = DirectInfluence if algo == "direct" else CgInfluence
        inf = cls(model, F.cross_entropy, regularization=L2 if matched else None)
        inf = inf.fit(loader)
        return inf.influences(xte, yte, xtr, ytr, mode=InfluenceMode.Up)
    if lib == "captum":
        from captum.influence import NaiveInfluenceFunction

        kw = {"projection_dim": 640, "hessian_reg": L2} if matched else {}
        inf = NaiveInfluenceFunction(
            model,
            loader,
            checkpoint="in-memory",
            checkpoints_load_func=lambda m, path: 1.0,  # the model is already loaded
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=n,
            **kw,
        )
        return inf.influence((xte, yte))
    if lib == "dattri":
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
        from dattri.task import AttributionTask

        def loss_func(params, data):
            xb, yb = data
            xb = xb if xb.ndim == 2 else xb.unsqueeze(0)
            yb = yb if yb.ndim == 1 else yb.unsqueeze(0)
            out = torch.func.functional_call(model, params, (xb,))
            return F.cross_entropy(out, yb)

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        cls = IFAttributorExplicit if algo == "explicit" else IFAttributorCG
        kw = {"regularization": L2} if matched else {}
        attr = cls(task=task, device="cpu", **kw)
        attr.cache(loader)
        test_loader = DataLoader(TensorDataset(xte, yte), batch_size=len(yte))
        return attr.attribute(loader, test_loader).T
    if lib == "kronfluence":
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import ScoreArguments
        from kronfluence.task import Task

        class CETask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                xb, yb = batch
                logits = model(xb)
                if sample:  # true Fisher: labels drawn from the model
                    with torch.no_grad():
                        yb = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
                return F.cross_entropy(logits, yb, reduction="sum")

            def compute_measurement(self, batch, model):
                xb, yb = batch
                return F.cross_entropy(model(xb), yb, reduction="sum")

        task = CETask()
        model = prepare_model(model, task)
        an = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp))
        an.fit_all_factors(
            "f", TensorDataset(xtr, ytr), per_device_batch_size=n, overwrite_output_dir=True
        )
        sa = ScoreArguments(damping_factor=L2) if matched else ScoreArguments()
        an.compute_pairwise_scores(
            "s",
            "f",
            TensorDataset(xte, yte),
            TensorDataset(xtr, ytr),
            per_device_query_batch_size=len(yte),
            per_device_train_batch_size=n,
            score_args=sa,
            overwrite_output_dir=True,
        )
        return an.load_pairwise_scores("s")["all_modules"]
    raise ValueError(name)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(name: str, out: Path, repeats: int) -> None:
    torch.set_num_threads(1)
    t = load_file(str(out / "task.safetensors"))
    base = _rss_mb()
    times = []
    scores = None
    for r in range(repeats):
        tmp = out / "tmp" / f"{name}-{r}"
        tmp.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        scores = run_method(name, t, tmp)
        times.append(time.perf_counter() - start)
    save_file({"scores": scores.detach().double().contiguous()}, str(out / f"{name}.safetensors"))
    info = {"times": times, "peak_mb": _rss_mb() - base}
    (out / f"{name}.json").write_text(json.dumps(info))


# ---------------------------------------------------------------------------- metrics
def metrics(scores: np.ndarray, exact: np.ndarray, loo: dict) -> dict:
    flat_r = np.corrcoef(scores.ravel(), exact.ravel())[0, 1]
    sign = -1.0 if flat_r < 0 else 1.0
    s = sign * scores
    pear = [stats.pearsonr(s[j], exact[j])[0] for j in range(len(s))]
    spear = [stats.spearmanr(s[j], exact[j])[0] for j in range(len(s))]
    over = []
    for j in range(len(s)):
        a = set(np.argsort(-np.abs(s[j]))[:TOP].tolist())
        b = set(np.argsort(-np.abs(exact[j]))[:TOP].tolist())
        over.append(len(a & b) / TOP)
    # predicted change of the test loss on removal: -I_up,loss / n (Pearson is scale-free)
    pred = -s[0, loo["indices"]]
    loo_r = stats.pearsonr(pred, loo["actual"])[0]
    return {
        "sign": int(sign),
        "pearson": float(np.mean(pear)),
        "spearman": float(np.mean(spear)),
        "top50": float(np.mean(over)),
        "loo_pearson": float(loo_r),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_peers"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per method (all repeats)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args.out, args.repeats)
        return
    torch.set_num_threads(1)
    info = build_task(args.out)
    t = load_file(str(args.out / "task.safetensors"))
    exact, _ = oracle(t)
    loo = leave_one_out(t, exact, args.out)
    # the LOO retrains must agree with the oracle for it to be a fair yardstick
    oracle_loo = float(stats.pearsonr(exact[0, loo["indices"]] / -info["n"], loo["actual"])[0])
    rows = []
    for name in args.methods:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--out", str(args.out), "--repeats", str(args.repeats)]
        try:
            proc = subprocess.run(
                [*cmd, "--worker", name],
                capture_output=True,
                text=True,
                env=env,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            rows.append({"method": name, "error": f"did not finish in {args.timeout:.0f} s"})
            print(f"{name}: TIMEOUT", flush=True)
            continue
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            rows.append({"method": name, "error": err})
            print(f"{name}: FAILED {err}", flush=True)
            continue
        w = json.loads((args.out / f"{name}.json").read_text())
        sc = load_file(str(args.out / f"{name}.safetensors"))["scores"].numpy()
        if sc.shape != exact.shape or not np.isfinite(sc).all():
            rows.append({"method": name, "error": f"scores of shape {sc.shape}, finite: "
                         f"{bool(np.isfinite(sc).all())}"})  # fmt: skip
            continue
        row = {
            "method": name,
            "time_s": statistics.median(w["times"]),
            "times": w["times"],
            "peak_mb": w["peak_mb"],
        }
        row.update(metrics(sc, exact, loo))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"task": "digits", **info, "n_test": N_TEST, "oracle_loo_pearson": oracle_loo,
              "rows": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    lines = [
        f"Task (a) digits: n = {result['n']}, p = {result['p']}, l2 = {result['l2']}, "
        f"{result['n_test']} test points; oracle vs actual LOO Pearson = "
        f"{result['oracle_loo_pearson']:.3f}",
        "",
        "| method | time (s, median) | peak RSS (MB) | sign | Pearson | Spearman | top-50 "
        "| LOO Pearson (top 100) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['time_s']:.3f} | {r['peak_mb']:.0f} | {r['sign']:+d} | "
            f"{r['pearson']:.4f} | {r['spearman']:.4f} | {r['top50']:.2f} | "
            f"{r['loo_pearson']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
