"""Spot check for docs/reproduction/fig5.md: TrainingSetAttack.run() on five real Fig. 5 targets
(three that flipped with one image, two that did not) against the run_many records of attempt 1
in runs/fig5/individual_0.stage0.jsonl. Run after `inflens reproduce fig5`:

    OMP_NUM_THREADS=1 .venv/bin/python tools/fig5_spot_check.py
"""

import json
import time
from pathlib import Path

import numpy as np
import torch

from inflens import Objective
from inflens.apps.attack import PixelBox, TrainingSetAttack, eight_bit_level
from inflens.experiments import _animals

torch.set_num_threads(1)
task = _animals.prepare_task(Path("../shared/data"), False, False)
obj = Objective(task.full_model(torch.float32), "binary_logistic", l2=_animals.L2, params="top.")
atk = TrainingSetAttack(obj, (task.x_train, task.y_train), progress=False)
atk.box = PixelBox.eight_bit(levels=0.5)
z = np.load("runs/fig5/ranking.npz", allow_pickle=False)
targets, ranked = z["targets"].tolist(), torch.from_numpy(z["ranked"])
recs = {r["test_index"]: r for r in map(json.loads, open("runs/fig5/individual_0.stage0.jsonl"))}
ok = [t for t in targets if recs[t]["success"]][:3]
bad = [t for t in targets if not recs[t]["success"]][:2]
for t in ok + bad:
    j = targets.index(t)
    s = time.perf_counter()
    res = atk.run(
        (task.x_test[t : t + 1], task.y_test[t : t + 1]),
        ranked[j, :1],
        iterations=100,
        step=0.02 * eight_bit_level(),
    )
    r = recs[t]
    print(
        t,
        "run():",
        res.iterations,
        res.success,
        f"{float(res.prob_true_after[0]):.6f}",
        f"{float(res.delta_l2()[0]):.5f}",
        "| run_many:",
        r["iterations"],
        r["success"],
        f"{r['p_true_after']:.6f}",
        f"{r['pixel_l2'][0]:.5f}",
        f"({time.perf_counter() - s:.1f} s)",
        flush=True,
    )
