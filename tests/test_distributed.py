"""Two gloo processes launched with torchrun give the single-process results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from inflens import Influence, Objective
from inflens.distributed import DistributedInfluence, all_gather_columns, shard_range
from inflens.solvers import CG

N, D, C, M = 301, 6, 3, 4  # odd n: the two shards differ in size


def _problem():
    """Softmax regression in float64 at a seeded theta (PD Hessian thanks to l2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + M, D, generator=g, dtype=torch.float64)
    y = torch.randint(C, (N + M,), generator=g)
    model = nn.Linear(D, C, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(C, D, generator=g, dtype=torch.float64))
    return Objective(model, "cross_entropy", l2=0.05), (x[:N], y[:N]), (x[N:], y[N:])


_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[2])
    from test_distributed import _problem
    from inflens import Objective
    from inflens.distributed import DistributedInfluence, init
    from inflens.solvers import CG

    torch.set_num_threads(1)
    out = sys.argv[1]
    rank, world = init()
    obj, train, test = _problem()
    obj = Objective(obj.model, "cross_entropy", l2=0.05, backend="vmap")  # products: hvp_sum
    seen = []
    hvp = obj.hvp_sum
    obj.hvp_sum = lambda v, x, y, theta=None: (seen.append(int(x.shape[0])), hvp(v, x, y))[1]
    res = {}
    for name, solver in (("exact", "exact"), ("cg", CG(tol=1e-12))):
        inf = DistributedInfluence(obj, train, solver=solver, damping=0.01, progress=False).fit()
        res[name + "_loss"] = inf.loss_influence(test)
        res[name + "_self"] = inf.self_influence()
        res[name + "_s_test"] = inf.s_test(test)
    res["folder"] = inf.score_to_folder(test, out + "/folder", chunk_size=40)
    res["ranks"] = torch.tensor([rank, world])
    save_file({k: v.contiguous() for k, v in res.items()}, f"{out}/rank{rank}.safetensors")
    # examples in each HVP chunk (the first ones: the exact solver's passes)
    with open(f"{out}/seen{rank}.json", "w") as f:
        json.dump({"chunks": seen[:4]}, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(tmp_path),
        str(Path(__file__).resolve().parent),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    obj, train, test = _problem()
    ref = {}
    for name, solver in (("exact", "exact"), ("cg", CG(tol=1e-12))):
        inf = Influence(obj, train, solver=solver, damping=0.01, progress=False).fit()
        ref[name + "_loss"] = inf.loss_influence(test)
        ref[name + "_self"] = inf.self_influence()
        ref[name + "_s_test"] = inf.s_test(test)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert [r["ranks"].tolist() for r in ranks] == [[0, 2], [1, 2]]
    for res in ranks:  # every rank holds the full, single-process answer
        for key, want in ref.items():
            assert res[key].shape == want.shape, key
            torch.testing.assert_close(res[key], want, rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(res["folder"], ref["cg_loss"], rtol=1e-9, atol=1e-12)
    # each rank's curvature passes covered only its own shard (151 and 150 points)
    for r in range(2):
        seen = json.loads((tmp_path / f"seen{r}.json").read_text())["chunks"]
        lo, hi = shard_range(N, r, 2)
        assert seen[0] == hi - lo
    # score chunks were written by both ranks into one folder
    assert len(list((tmp_path / "folder" / "scores").glob("chunk_*.safetensors"))) == 8


def test_single_process_fallback_equals_influence() -> None:
    """Without torchrun's environment DistributedInfluence is a plain one-rank Influence."""
    if "WORLD_SIZE" in os.environ:
        pytest.skip("running under torchrun")
    obj, train, test = _problem()
    a = DistributedInfluence(obj, train, progress=False).fit()
    b = Influence(obj, train, progress=False).fit()
    assert a.world_size == 1 and a.rank == 0
    torch.testing.assert_close(a.loss_influence(test), b.loss_influence(test))
    assert all_gather_columns(torch.ones(2, 3), 3, 1).shape == (2, 3)


def test_shard_ranges_cover_everything_once() -> None:
    for n in (1, 2, 7, 301):
        for w in (1, 2, 3, 8):
            ranges = [shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(h - lo for lo, h in ranges) - min(h - lo for lo, h in ranges) <= 1
