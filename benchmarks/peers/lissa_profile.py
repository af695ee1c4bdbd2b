"""inflens ``LiSSA`` on task (b) on its own: fit and query seconds, agreement with the oracle,
the chosen scale and depths, and a profile of the query.

Run from the repository root after ``run.py --task b`` has written its task and oracle:
``OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/lissa_profile.py
[--batch-size 64]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch
from safetensors.torch import load_file
from scipy import stats
from torch import nn

from inflens import Influence, Objective
from inflens.solvers import LiSSA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=None, help="default: LiSSA()'s")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = "runs/bench_peers_b"
    t = load_file(f"{out}/task.safetensors")
    exact = np.load(f"{out}/oracle.npy")
    model = nn.Sequential(nn.Linear(784, 10, bias=False)).double()
    obj = Objective(model, "cross_entropy", l2=0.01)
    obj.load_into_model(t["theta"])
    solver = LiSSA() if args.batch_size is None else LiSSA(batch_size=args.batch_size)
    t0 = time.perf_counter()
    inf = Influence(obj, (t["xtr"], t["ytr"]), solver=solver, progress=False).fit()
    t1 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    s = inf.loss_influence((t["xte"], t["yte"])).numpy()
    prof.disable()
    t2 = time.perf_counter()
    pear = np.mean([stats.pearsonr(s[j], exact[j])[0] for j in range(len(s))])
    spear = np.mean([stats.spearmanr(s[j], exact[j])[0] for j in range(len(s))])
    d = inf.diagnostics()
    keys = ("scale", "estimated_max_eigenvalue", "estimated_max_batch_eigenvalue", "depth",
            "seconds_per_step", "depths")  # fmt: skip
    print(f"fit {t1 - t0:.1f} s, query {t2 - t1:.1f} s, Pearson {pear:.4f}, Spearman {spear:.4f}")
    print({k: d.get(k) for k in keys})
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
