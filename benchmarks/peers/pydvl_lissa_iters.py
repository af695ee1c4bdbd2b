"""pyDVL's LissaInfluence on task (b) with a given ``maxiter``: seconds for fit + the influence
factors of the 10 test points (the inverse-Hessian solve), to extrapolate its default 1,000
iterations when a full run does not fit the benchmark's time limit.

Run from the repository root after ``run.py --task b`` has written its task:
``OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/pydvl_lissa_iters.py 10 40``.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main(maxiters: list[int]) -> None:
    from pydvl.influence.torch import LissaInfluence

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    t = load_file("runs/bench_peers_b/task.safetensors")
    model = nn.Sequential(nn.Linear(784, 10, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(t["theta"].view(10, 784))
    loader = DataLoader(TensorDataset(t["xtr"], t["ytr"]), batch_size=5000)  # as run.py
    for m in maxiters:
        t0 = time.perf_counter()
        inf = LissaInfluence(
            model, F.cross_entropy, regularization=0.01, maxiter=m, warn_on_max_iteration=False
        ).fit(loader)
        inf.influence_factors(t["xte"], t["yte"])
        print(f"maxiter={m}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 40])
