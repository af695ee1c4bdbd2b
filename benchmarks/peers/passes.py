"""Time single passes over a peer-benchmark task's training set, to bound what any method costs.

For task (c) (the paper's CNN, 5,500 images, float64, one thread) this measures, in one process,
the median of ``--repeats`` interleaved runs of: one forward pass (loss values, no gradients),
one per-example-gradient pass (``vmap(grad)``; the scoring pass for several test points) and one
forward-mode pass for a single vector (``Objective.loss_jvp``), in 512-example chunks. It also
names the aten convolution kernel PyTorch runs in float64 and in float32.

Run from the repository root after ``run.py --task c`` has written its task:
``OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/passes.py
--out runs/bench_peers_c``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import cnn_model  # noqa: E402


def conv_kernel(dtype: torch.dtype) -> str:
    """The aten convolution kernel one forward of the CNN runs in ``dtype``."""
    from torch.profiler import profile

    from inflens.models import PaperCNN

    model = PaperCNN(seed=0, dtype=dtype)
    with torch.no_grad(), profile() as prof:
        model(torch.rand(512, 1, 28, 28, dtype=dtype))
    names = [e.key for e in prof.key_averages() if "conv" in e.key]
    leaf = [
        n for n in names if n not in ("aten::conv2d", "aten::convolution", "aten::_convolution")
    ]
    return leaf[-1] if leaf else names[-1]


def main() -> None:
    from inflens import Objective

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_peers_c"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = load_file(str(args.out / "task.safetensors"))
    obj = Objective(cnn_model(t["theta"]), "cross_entropy", l2=1e-3)
    x, y, n, c = t["xtr"], t["ytr"], len(t["ytr"]), args.chunk
    v = torch.randn(1, obj.p, dtype=obj.dtype, generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.no_grad(), obj.evaluating():
            for s in range(0, n, c):
                obj.losses(obj.theta, x[s : s + c], y[s : s + c])

    def per_example_grads() -> None:
        with obj.evaluating():
            for s in range(0, n, c):
                obj.per_example_grads(x[s : s + c], y[s : s + c])

    def jvp_one_vector() -> None:
        with obj.evaluating():
            for s in range(0, n, c):
                obj.loss_jvp(v, x[s : s + c], y[s : s + c])

    jobs = [forward, per_example_grads, jvp_one_vector]
    for f in jobs:  # warm-up
        f()
    times: dict[str, list[float]] = {f.__name__: [] for f in jobs}
    for _ in range(args.repeats):
        for f in jobs:
            t0 = time.perf_counter()
            f()
            times[f.__name__].append(time.perf_counter() - t0)
    out = {
        "n": n,
        "p": obj.p,
        "dtype": str(obj.dtype),
        "chunk": c,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "conv_kernel": {
            "float64": conv_kernel(torch.float64),
            "float32": conv_kernel(torch.float32),
        },
    }
    print(json.dumps(out, indent=1))
    (args.out / "passes.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
