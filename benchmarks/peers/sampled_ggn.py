"""Exploration on task (c): the dense damped Gauss-Newton matrix estimated from per-example
gradients at labels sampled from the model (``E[g g^T] = J^T Lambda J`` for softmax
cross-entropy), S samples per image, Cholesky; Pearson/Spearman against the oracle of
``run.py --task c`` (whose task and oracle it reads from runs/bench_peers_c).

Run from the repository root after task (c):
``OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python -W ignore benchmarks/peers/sampled_ggn.py``.
"""

import sys
import time

import numpy as np
import torch

sys.path.insert(0, "benchmarks/peers")
from run import cnn_model
from safetensors.torch import load_file
from scipy import stats

from inflens import Objective

torch.set_num_threads(1)
out = "runs/bench_peers_c"
t = load_file(f"{out}/task.safetensors")
exact = np.load(f"{out}/oracle.npy")
l2, damp = 1e-3, 0.01
model = cnn_model(t["theta"])
obj = Objective(model, "cross_entropy", l2=l2)
x, y, xte, yte = t["xtr"], t["ytr"], t["xte"], t["yte"]
n = len(y)
for S in (1, 2):
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(obj.p, obj.p, dtype=torch.float64)
    gtr = torch.empty(n, obj.p, dtype=torch.float64)
    with obj.evaluating():
        for s in range(0, n, 512):
            xb, yb = x[s : s + 512], y[s : s + 512]
            with torch.no_grad():
                pr = torch.softmax(obj.outputs(obj.theta, xb), 1)
            gtr[s : s + 512] = obj.per_example_grads(xb, yb)
            for _ in range(S):
                ys = torch.multinomial(pr, 1, generator=g).flatten()
                gs = obj.per_example_grads(xb, ys)
                a += gs.T @ gs
    a /= n * S
    a.diagonal().add_(l2 + damp)
    with obj.evaluating():
        gte = obj.per_example_grads(xte, yte)
    st = torch.cholesky_solve(gte.T.contiguous(), torch.linalg.cholesky(a)).T
    sc = -(st @ (gtr + l2 * obj.theta).T).numpy()
    sec = time.perf_counter() - t0
    pr_ = np.mean([stats.pearsonr(sc[j], exact[j])[0] for j in range(10)])
    sp_ = np.mean([stats.spearmanr(sc[j], exact[j])[0] for j in range(10)])
    print(f"S={S}: {sec:.1f} s, Pearson {pr_:.4f}, Spearman {sp_:.4f}", flush=True)
