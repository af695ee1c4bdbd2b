"""Time the training-set attack sweep (Sec. 5.2) on the fig5 task: ``run_many`` over K targets.

The task is the reproduction's (CIFAR-10 dog vs frog, frozen SmallCNN features, binary
logistic regression on 1,024 features; ``../shared/data`` and the cached feature CNN). Each
target poisons one training image (seeded random: the timing does not depend on which), for a
fixed number of iterations without early stopping being needed (the paper's 0.5-level box
rarely flips a target). Run it once per source tree to compare engines in the same
conditions, e.g. against the batched engine of commit 29ad70e::

    git worktree add /tmp/old 29ad70e
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old/src python benchmarks/bench_attack.py --k 4 128 558
    OMP_NUM_THREADS=1 python benchmarks/bench_attack.py --k 4 128 558

Prints one line per K: seconds in total, per target, and per target and iteration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import inflens
from inflens import Objective
from inflens.apps.attack import PixelBox, TrainingSetAttack, eight_bit_level
from inflens.experiments import _animals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 128])
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = _animals.prepare_task(Path(args.data_dir), False, False)
    obj = Objective(
        task.full_model(torch.float32), "binary_logistic", l2=_animals.L2, params="top."
    )
    train = (task.x_train, task.y_train)
    try:  # the current API (AttackConfig); older engines took keyword arguments
        from inflens.apps.attack import AttackConfig

        atk = TrainingSetAttack(obj, train, AttackConfig(progress=False))
        kw = {"box": PixelBox.eight_bit(levels=0.5)}
    except ImportError:
        atk = TrainingSetAttack(obj, train, progress=False)
        kw = {}
    g = torch.Generator().manual_seed(0)
    print(f"inflens from {Path(inflens.__file__).parent}, {args.iterations} iterations")
    for k in args.k:
        targets = torch.randperm(task.x_test.shape[0], generator=g)[:k]
        poison = torch.randint(0, task.x_train.shape[0], (k, 1), generator=g)
        t0 = time.perf_counter()
        atk.run_many(
            (task.x_test[targets], task.y_test[targets]),
            poison,
            iterations=args.iterations,
            step=0.02 * eight_bit_level(),
            **kw,
        )
        dt = time.perf_counter() - t0
        print(
            f"K {k:4d}: {dt:8.2f} s, {dt / k:7.3f} s per target, "
            f"{1e3 * dt / k / args.iterations:7.2f} ms per target and iteration"
        )


if __name__ == "__main__":
    main()
