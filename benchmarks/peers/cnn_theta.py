"""Train the theta-tilde of task (c) when ``runs/fig2-cnn`` is gone: the fig2-cnn ``reduced``
schedule (``inflens.experiments.fig2_cnn.PROTOCOLS["reduced"]``: 4,000 Adam steps of 500
examples, lr 1e-3 then 1e-4 after step 3,000, seeds 0) on the 10 % MNIST subset, float32, theta
= the PaperCNN's 2,556 weights (biases frozen at 0), l2 = 0.001, as the experiment trains it.

Run from the repository root (one thread):
``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/cnn_theta.py [--out PATH]``; then
``run.py --task c --cnn-theta PATH``. Writes ``{"theta": [2556]}`` (safetensors).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from inflens import Objective
from inflens.datasets import load_mnist, mnist_paper_split, small_subset
from inflens.experiments.fig2_cnn import L2, PROTOCOLS
from inflens.models import PaperCNN
from inflens.train import AdamConfig, fit_adam, piecewise_constant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path("runs/bench_peers_c_theta/theta_tilde.safetensors")
    )
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = PROTOCOLS["reduced"]
    split = mnist_paper_split(load_mnist(args.data_dir, download=False), dtype=np.float32)
    small = small_subset(split, fraction=0.1, seed=0)
    x = torch.from_numpy(small["x_train"])
    y = torch.from_numpy(small["y_train"]).long()
    model = PaperCNN(seed=cfg.init_seed, dtype=torch.float32)
    obj = Objective(model, "cross_entropy", l2=L2, params=model.weight_names)
    t0 = time.perf_counter()
    fit = fit_adam(
        obj,
        (x, y),
        AdamConfig(
            cfg.train_steps,
            cfg.batch_size,
            cfg.lr,
            schedule=piecewise_constant(list(cfg.boundaries), list(cfg.factors)),
            seed=cfg.train_seed,
            log_every=max(1, cfg.train_steps // 50),
            progress=False,
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"protocol": cfg.name, "steps": str(cfg.train_steps)}
    save_file({"theta": fit.theta.detach().contiguous()}, str(args.out), metadata=meta)
    with torch.no_grad():
        risk = float(obj.risk(fit.theta, x, y))
    print(f"trained {cfg.train_steps} steps in {time.perf_counter() - t0:.0f} s: train risk "
          f"{risk:.4f}; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
