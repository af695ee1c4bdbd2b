"""LiSSA's automatic scale on task (b) (MNIST-LR, 55,000 points, batch 1): the old rule, the new
rule and the paper's scale, one repeat of depth 5,000 each, against the oracle's scores.

Run from the repository root after ``run.py --task b`` has written its task and oracle:
``OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/lissa_scale.py``.
Writes ``runs/bench_peers_b/lissa_scale.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy import stats
from torch import nn

from inflens import InflensWarning, Influence, Objective
from inflens.errors import SolverDivergedError
from inflens.solvers import LiSSA


def main(out: Path = Path("runs/bench_peers_b")) -> None:
    torch.set_num_threads(1)
    t = load_file(str(out / "task.safetensors"))
    exact = np.load(out / "oracle.npy")[0]  # test image 8
    model = nn.Sequential(nn.Linear(784, 10, bias=False)).double()
    obj = Objective(model, "cross_entropy", l2=0.01)
    obj.load_into_model(t["theta"])
    rows = {}
    for name, kw in (
        ("old rule (1.5 x top eigenvalue of A)", {"scale": None, "scale_probes": 0}),
        ("automatic (with mini-batch probe)", {"scale": None}),
        ("paper (scale 25)", {"scale": 25.0}),
    ):
        solver = LiSSA(depth=5000, repeats=1, batch_size=1, seed=0, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InflensWarning)  # depth 5000 is short here
            inf = Influence(obj, (t["xtr"], t["ytr"]), solver=solver, progress=False).fit()
            try:
                s = inf.loss_influence((t["xte"][:1], t["yte"][:1]))[0].numpy()
                row = {"pearson": float(stats.pearsonr(s, exact)[0])}
            except SolverDivergedError as exc:
                row = {"diverged": str(exc)}
        info = inf.diagnostics()
        row["scale"] = info["scale"]
        row["estimated_max_batch_eigenvalue"] = info.get("estimated_max_batch_eigenvalue")
        rows[name] = row
        print(name, json.dumps(row))
    (out / "lissa_scale.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
