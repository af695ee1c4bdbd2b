"""Peers' attribution methods scored on inflens's LDS ground truth (same subsets, same retrained
models, same attributed model).

    benchmarks/peers/.venv/bin/python benchmarks/peers/lds_peers.py runs/lds-mnist-lr \
        --benchmark lds-mnist-lr --data-dir ../shared/data

reads what ``inflens benchmark NAME --out DIR`` wrote (``DIR/model.safetensors``: the attributed
model; ``DIR/ground_truth.safetensors``: the subset masks and the retrained models' test losses;
for the MLP also ``DIR/models.safetensors``: TRAK's ensemble and TracIn's checkpoints), runs each
peer method in this process with one thread, and writes ``DIR/peers.json`` and
``DIR/peers_table.md``. Every peer's scores are turned into inflens's orientation (``[n_test,
n_train]``, negative = helpful: dattri's and kronfluence's scores are positive for helpful
points, so they are negated) and scored by :func:`inflens.evaluation.lds` with the cached masks
and outputs, so every row of the table shares the ground truth. The orientation is checked, not
assumed: each peer's score matrix is correlated with inflens's gradient dot product
(``-g_test . g_train``), which must come out positive after the flip (printed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kron_task import cross_entropy_task
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inflens import Objective
from inflens.evaluation import bootstrap_interval, lds
from inflens.experiments import lds_bench as lb

SOLVER_TEST = lb.MLP_SOLVER_TEST


def _problem(bench: str, out: Path, data_dir: str):
    xtr, ytr, xte, yte = lb._mnist(data_dir)
    state = load_file(str(out / "model.safetensors"))
    if bench == "lds-mnist-mlp":
        xtr = ((xtr - lb.MNIST_MEAN) / lb.MNIST_STD).float()
        xte = ((xte - lb.MNIST_MEAN) / lb.MNIST_STD).float()
        model = lb.MnistMLP()
    else:
        # inside a container: kronfluence wraps the tracked child modules, not the root
        model = nn.Sequential(nn.Linear(784, 10, bias=False)).double()
        state = {f"0.{k}": v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, (xtr, ytr), (xte, yte)


def _loss_func(model):
    def loss(params, data):
        xb, yb = data
        xb = xb if xb.ndim == 2 else xb.unsqueeze(0)
        yb = yb if yb.ndim == 1 else yb.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    return loss


def _margin_funcs(model):
    """TRAK's output function (log-odds of the true class) and the probability of it."""

    def margin(params, data):
        x, y = data
        logp = -F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)),
                                y.unsqueeze(0))  # fmt: skip
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-F.cross_entropy(out, y.unsqueeze(0)))

    return margin, prob


def _checkpoints(bench: str, out: Path, kind: str, model) -> list[dict[str, torch.Tensor]]:
    if bench != "lds-mnist-mlp":  # convex: one model is every model
        return [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    models = load_file(str(out / "models.safetensors"))
    if kind == "trak":
        return [
            {k[6:]: v[m] for k, v in models.items() if k.startswith("final.")}
            for m in range(1, lb.TRAK_MODELS + 1)
        ]
    return [
        {k[len(f"epoch{e}.") :]: v for k, v in models.items() if k.startswith(f"epoch{e}.")}
        for e in lb.TRACIN_EPOCHS
    ]


def run_method(name: str, bench: str, out: Path, model, train, test, l2: float) -> torch.Tensor:
    """``[n_test, n_train]`` scores of a peer method in inflens's orientation."""
    xtr, ytr = train
    xte, yte = test
    n = len(ytr)
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=n)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=len(yte))
    if name == "dattri.if-cg":
        from dattri.algorithm.influence_function import IFAttributorCG
        from dattri.task import AttributionTask

        task = AttributionTask(loss_func=_loss_func(model), model=model,
                               checkpoints=model.state_dict())  # fmt: skip
        # one batch of all n points: dattri sums its inverse-HVPs over the cache loader's
        # batches; the l2 term of the trained objective (LR) / the damping (MLP) as
        # regularisation, so that its H matches the one inflens inverts
        attr = IFAttributorCG(task=task, device="cpu", regularization=l2, max_iter=10)
        if bench == "lds-mnist-mlp":  # inflens's CG setting: H on the first 1,000 points
            h = lb.MLP_CG_HESSIAN_POINTS
            attr.cache(DataLoader(TensorDataset(xtr[:h], ytr[:h]), batch_size=h))
            rows = DataLoader(TensorDataset(xtr, ytr), batch_size=500)
            return -attr.attribute(rows, test_loader).T
        attr.cache(train_loader)
        return -attr.attribute(train_loader, test_loader).T
    if name in ("dattri.trak", "dattri.tracin"):
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask

        kind = name.split(".")[1]
        ckpts = _checkpoints(bench, out, kind, model)
        small = DataLoader(TensorDataset(xtr, ytr), batch_size=256)
        small_test = DataLoader(TensorDataset(xte, yte), batch_size=256)
        if kind == "trak":
            margin, prob = _margin_funcs(model)
            task = AttributionTask(loss_func=margin, model=model, checkpoints=ckpts)
            attr = TRAKAttributor(
                task=task,
                correct_probability_func=prob,
                device="cpu",
                projector_kwargs={"proj_dim": lb.PROJECTION_DIM, "device": "cpu"},
            )
            attr.cache(small)
            return -attr.attribute(small_test).T
        task = AttributionTask(loss_func=_loss_func(model), model=model, checkpoints=ckpts)
        attr = TracInAttributor(
            task=task,
            weight_list=torch.full((len(ckpts),), 0.01),
            normalized_grad=False,
            projector_kwargs={"proj_dim": lb.PROJECTION_DIM, "device": "cpu"},
        )
        return -attr.attribute(small, small_test).T
    if name == "kronfluence.ekfac":
        import tempfile

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import ScoreArguments

        task = cross_entropy_task()
        pm = prepare_model(model, task)
        with tempfile.TemporaryDirectory() as tmp:
            an = Analyzer("lds", pm, task, cpu=True, disable_tqdm=True, output_dir=tmp)
            an.fit_all_factors("f", TensorDataset(xtr, ytr), per_device_batch_size=256,
                               overwrite_output_dir=True)  # fmt: skip
            an.compute_pairwise_scores(
                "s",
                "f",
                TensorDataset(xte, yte),
                TensorDataset(xtr, ytr),
                per_device_query_batch_size=len(yte),
                per_device_train_batch_size=256,
                score_args=ScoreArguments(damping_factor=l2),
                overwrite_output_dir=True,
            )
            return -an.load_pairwise_scores("s")["all_modules"]
    raise ValueError(f"unknown method {name}")


METHODS = ("dattri.if-cg", "dattri.trak", "dattri.tracin", "kronfluence.ekfac")
SETTINGS = {
    "dattri.if-cg": "IFAttributorCG, max_iter 10, regularization = l2 (LR) / damping (MLP; "
    f"H on the first {lb.MLP_CG_HESSIAN_POINTS} train points)",
    "dattri.trak": f"TRAKAttributor, projection {lb.PROJECTION_DIM}; MLP: the "
    f"{lb.TRAK_MODELS} models of inflens's TRAK",
    "dattri.tracin": f"TracInAttributor, lr 0.01, projection {lb.PROJECTION_DIM}; MLP: "
    "inflens's TracIn checkpoints",
    "kronfluence.ekfac": "EK-FAC, damping_factor = l2 (LR) / damping (MLP)",
}


#: the inflens method each peer method is compared with, pairwise over test points
COUNTERPART = {
    "dattri.if-cg": "cg",
    "dattri.trak": "trak",
    "dattri.tracin": "tracin",
    "kronfluence.ekfac": "ekfac",
}


def _paired(per_test: torch.Tensor, out: Path, name: str) -> dict | None:
    """Mean and bootstrap interval of ``peer - inflens`` per-test LDS over the test points
    where both are defined (``OUT/lds.json`` of the same ground truth)."""
    path = out / "lds.json"
    if not path.exists():
        return None
    mine = json.loads(path.read_text())["per_test"]
    method = COUNTERPART[name]
    if method == "tracin" and method not in mine:
        method = "grad-dot"  # the LR benchmark's TracIn: one checkpoint, the gradient dot
    if method not in mine:
        return None
    ours = torch.tensor([float("nan") if v is None else v for v in mine[method]])
    ours = ours.to(torch.float64)[: per_test.numel()]
    diff = per_test - ours
    mean, lo, hi = bootstrap_interval(diff)
    return {"inflens": method, "n": int(torch.isfinite(diff).sum()), "diff": [mean, lo, hi]}


def _table(results: dict, n_test: int) -> str:
    lines = [
        f"| peer method | settings | LDS mean ({n_test} test) | 95% interval | "
        f"LDS (first {SOLVER_TEST} test) | time | peak RSS | undefined | minus inflens (paired) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {SETTINGS.get(name, '')} | failed: {r['error'][:80]} |||||||")
            continue
        full = "n/a | n/a" if "full" not in r else (
            f"{r['full'][0]:.3f} | [{r['full'][1]:.3f}, {r['full'][2]:.3f}]")  # fmt: skip
        pd = r.get("paired_vs_inflens")
        paired = "" if not pd else (
            f"{pd['diff'][0]:+.3f} [{pd['diff'][1]:+.3f}, {pd['diff'][2]:+.3f}] vs "
            f"{pd['inflens']} ({pd['n']} test)")  # fmt: skip
        lines.append(
            f"| {name} | {r['settings']} | {full} | {r['sub'][0]:.3f} | {r['seconds']:.1f} s | "
            f"{r['peak_mb']:.0f} MB | {r.get('undefined', '')} | {paired} |"
        )
    return "\n".join(lines) + "\n"


def rescore(out: Path, other: Path) -> None:
    """Score the peer scores saved in ``out`` against ``other``'s ground truth (same subsets:
    its first rows must be ``out``'s masks); writes ``other/peers.json`` and the table."""
    results = json.loads((out / "peers.json").read_text())
    gt = load_file(str(other / "ground_truth.safetensors"))
    masks, outputs = gt["masks"].bool(), gt["outputs"]
    mine = load_file(str(out / "ground_truth.safetensors"))["masks"].bool()
    if not torch.equal(masks[: len(mine)], mine):
        raise SystemExit(f"{other} has other subsets than {out}")
    for name, row in results.items():
        if "error" in row:
            continue
        scores = load_file(str(out / f"peer_scores_{name}.safetensors"))["scores"]
        sub = lds(scores[:SOLVER_TEST], masks, outputs[:, :SOLVER_TEST])
        row["sub"] = bootstrap_interval(sub)
        per_test = sub
        if "full" in row:
            per_test = lds(scores, masks, outputs)
            row["full"] = bootstrap_interval(per_test)
        row["undefined"] = int(torch.isnan(per_test).sum())
        row["paired_vs_inflens"] = _paired(per_test, other, name)
    (other / "peers.json").write_text(json.dumps(results, indent=2))
    table = _table(results, outputs.shape[1])
    (other / "peers_table.md").write_text(table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the --out folder of `inflens benchmark`")
    ap.add_argument("--benchmark", choices=("lds-mnist-lr", "lds-mnist-mlp"), required=True)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument(
        "--rescore-against",
        type=Path,
        default=None,
        help="another --out folder of the same benchmark (e.g. more seeds per subset): score "
        "the peer scores saved in OUT against its ground truth, without running the peers",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rescore_against is not None:
        rescore(args.out, args.rescore_against)
        return
    mlp = args.benchmark == "lds-mnist-mlp"
    model, train, test = _problem(args.benchmark, args.out, args.data_dir)
    gt = load_file(str(args.out / "ground_truth.safetensors"))
    masks, outputs = gt["masks"].bool(), gt["outputs"]
    reg = lb.MLP_DAMPING if mlp else lb.L2
    obj = Objective(model, "cross_entropy", l2=0.0 if mlp else lb.L2)
    gdot = lb._grad_dot(obj, train, test)
    results_path = args.out / "peers.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.methods:
        few = mlp and name == "dattri.if-cg"  # its cost is per test point, as inflens's CG
        tst = (test[0][:SOLVER_TEST], test[1][:SOLVER_TEST]) if few else test
        lb._reset_peak()  # the peak below is this method's (with the data already loaded)
        t0 = time.perf_counter()
        try:
            scores = run_method(name, args.benchmark, args.out, model, train, tst, reg)
        except Exception as exc:  # a peer that fails is a row of the table, not a crash
            import traceback

            traceback.print_exc(limit=-12)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            print(f"{name}: failed: {results[name]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        scores = scores.detach().to(torch.float64)
        # kept so that a larger ground truth (more subsets or seeds) re-scores without rerunning
        save_file(
            {"scores": scores.contiguous()}, str(args.out / f"peer_scores_{name}.safetensors")
        )
        g = gdot[: scores.shape[0]].to(torch.float64)
        agree = float(torch.corrcoef(torch.stack([scores.flatten(), g.flatten()]))[0, 1])
        row = {"settings": SETTINGS[name], "seconds": seconds, "peak_mb": lb._peak_mb(),
               "corr_with_grad_dot": agree}  # fmt: skip
        sub = lds(scores[:SOLVER_TEST], masks, outputs[:, :SOLVER_TEST])
        row["sub"] = bootstrap_interval(sub)
        per_test = sub
        if not few:
            per_test = lds(scores, masks, outputs)
            row["full"] = bootstrap_interval(per_test)
        row["undefined"] = int(torch.isnan(per_test).sum())
        row["paired_vs_inflens"] = _paired(per_test, args.out, name)
        results[name] = row
        print(f"{name}: {row}", flush=True)
        results_path.write_text(json.dumps(results, indent=2))
    table = _table(results, len(test[1]))
    (args.out / "peers_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
