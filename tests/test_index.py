"""The gradient index: exactness without projection, resume after a kill, reopening elsewhere."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import inflens
from inflens import Influence, InputError, MemoryBudgetError, Objective
from inflens.artifacts import ArtifactMismatchError
from inflens.index import GradientIndex, TopK
from inflens.solvers import CG, KFAC, Arnoldi, Exact

DT = torch.float64
N, D, H, C, M = 150, 5, 6, 3, 4
L2, DAMPING = 0.05, 0.5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(D, H)
        self.fc = nn.Linear(H, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(x)))


def _problem(n: int = N, seed: int = 0):
    """A small tanh network in float64 at a seeded theta (damping keeps H + delta I PD)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + M, D, generator=g, dtype=DT)
    y = torch.randint(C, (n + M,), generator=g)
    torch.manual_seed(seed)
    model = Net().double()
    return Objective(model, "cross_entropy", l2=L2), (x[:n], y[:n]), (x[n:], y[n:])


def _explicit_influence(obj: Objective, train, test) -> tuple[torch.Tensor, torch.Tensor]:
    """``-g_test^T (H + delta I)^-1 (g_i + l2 theta)`` and self-influence from an explicit
    autograd Hessian and per-example autograd gradients (no inflens derivative code)."""
    x, y = train
    theta = obj.theta.clone()

    def risk(th):
        return obj.losses(th, x, y).mean() + 0.5 * L2 * (th * th).sum()

    hess = torch.autograd.functional.hessian(risk, theta) + DAMPING * torch.eye(obj.p, dtype=DT)

    def grads(xs, ys):
        rows = []
        for i in range(xs.shape[0]):
            th = theta.clone().requires_grad_(True)
            (gi,) = torch.autograd.grad(obj.losses(th, xs[i : i + 1], ys[i : i + 1]).sum(), th)
            rows.append(gi)
        return torch.stack(rows)

    g_train = grads(x, y)
    g_test = grads(*test)
    inv = torch.linalg.inv(hess)
    scores = -(g_test @ inv @ (g_train + L2 * theta).T)
    self_inf = -((g_train @ inv) * (g_train + L2 * theta)).sum(1)
    return scores, self_inf


def test_unprojected_index_equals_explicit_influence(tmp_path: Path) -> None:
    """dim=None, exact solver, float64: the index reproduces I_up,loss (sign, l2 theta term,
    units) and self-influence to round-off, against an explicit Hessian."""
    obj, train, test = _problem()
    ref, ref_self = _explicit_influence(obj, train, test)
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", chunk_size=40)
    assert isinstance(index, inflens.GradientIndex)
    assert index.header["method_config"]["mode"] == "train"  # rows P^T g_i
    assert index.header["dtype"] == "float64" and index.n == N
    scores = index.loss_influence(test)
    assert scores.shape == (M, N)
    torch.testing.assert_close(scores, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores, inf.loss_influence(test), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(index.self_influence(), ref_self, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "solver",
    [
        Exact(method="cholesky"),
        Arnoldi(rank=20, n_iters=57, residual="shift"),
        Arnoldi(rank=10, n_iters=40),
        Arnoldi(rank=10, n_iters=40, residual="none"),
        KFAC(),
    ],
    ids=["cholesky", "arnoldi-shift", "arnoldi", "arnoldi-none", "kfac"],
)
def test_unprojected_index_equals_each_factorised_solver(tmp_path: Path, solver) -> None:
    """Each direct solver's P with P P^T = its A^-1 gives the solver's own scores."""
    obj, train, test = _problem()
    inf = Influence(obj, train, solver=solver, damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix")
    torch.testing.assert_close(
        index.loss_influence(test), inf.loss_influence(test), rtol=1e-8, atol=1e-11
    )
    torch.testing.assert_close(index.self_influence(), inf.self_influence(), rtol=1e-8, atol=1e-11)


def test_iterative_solver_needs_the_influence_at_query_time(tmp_path: Path) -> None:
    """CG has no factorisation: rows are g_i + l2 theta, the test side is solved by CG; a
    reopened index without the Influence says what to pass."""
    obj, train, test = _problem()
    inf = Influence(obj, train, solver=CG(tol=1e-12), damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix")
    assert index.header["method_config"]["mode"] == "test"
    want = inf.loss_influence(test)
    torch.testing.assert_close(index.loss_influence(test), want, rtol=1e-8, atol=1e-11)
    bare = GradientIndex.open(tmp_path / "ix", obj)
    with pytest.raises(InputError, match="influence=inf"):
        bare.loss_influence(test)
    with pytest.raises(InputError, match="self-influence"):
        bare.self_influence()
    again = GradientIndex.open(tmp_path / "ix", obj, influence=inf)
    torch.testing.assert_close(again.loss_influence(test), want, rtol=1e-8, atol=1e-11)


def test_kronecker_index_scores_are_the_projected_inner_products(tmp_path: Path) -> None:
    """Kronecker rows R (g_i + l2 theta) against queries R A^-1 g_test (A^-1 from the stored
    eigensystem), checked against the projection applied to explicit full gradients."""
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", dim=12, projection="kronecker", seed=5)
    proj = index.method.projection
    assert proj.kind == "kronecker" and index.dim == proj.dim <= 12
    g_train = obj.per_example_grads(*train) + L2 * obj.theta
    s = inf.s_test(test)
    want = -(proj.project(s) @ proj.project(g_train).T)
    torch.testing.assert_close(index.loss_influence(test), want, rtol=1e-9, atol=1e-12)


def test_projected_quality_and_exact_quality(tmp_path: Path) -> None:
    obj, train, test = _problem(n=400)
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    exact = inf.build_index(tmp_path / "exact").quality(test, k=5)
    assert exact.pearson > 1 - 1e-12 and exact.recall_helpful == exact.recall_harmful == 1.0
    assert exact.spearman > 1 - 1e-12 and exact.n_test == M
    small = inf.build_index(tmp_path / "d8", dim=8, dtype="float32").quality(test, k=5)
    big = inf.build_index(tmp_path / "d48", dim=48, dtype="float32").quality(test, k=5)
    # more dimensions, less distortion (JL error ~ sqrt(2/dim)); the values are seeded
    assert big.pearson > small.pearson and big.pearson > 0.8, (small, big)
    assert set(big.per_test) == {"pearson", "spearman", "recall_helpful", "recall_harmful"}


def test_topk_matches_argsort_of_dense_scores(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", chunk_size=32)
    dense = index.loss_influence(test)
    index.max_memory_gb = 2e-6  # ~2 KiB: blocks of a few rows, so the running top-k merges
    top = index.topk(test, k=7)
    assert isinstance(top, TopK) and top.helpful_indices.shape == (M, 7)
    order = dense.argsort(1)
    assert torch.equal(top.helpful_indices, order[:, :7])
    assert torch.equal(top.harmful_indices, order.flip(1)[:, :7])
    torch.testing.assert_close(top.helpful_scores, dense.gather(1, order[:, :7]))
    torch.testing.assert_close(top.harmful_scores, dense.gather(1, order.flip(1)[:, :7]))
    with pytest.raises(InputError, match="k must lie"):
        index.topk(test, k=N + 1)


def test_memory_budget_is_checked_before_allocating(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", max_memory_gb=1e-9)
    with pytest.raises(MemoryBudgetError, match="max_memory_gb"):
        index.loss_influence(test)
    with pytest.raises(MemoryBudgetError, match="max_memory_gb"):
        index.topk(test, k=3)


def test_faiss_backend_matches_exact(tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss is not installed (optional backend)")
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", dtype="float32")
    a, b = index.topk(test, 5), index.topk(test, 5, backend="faiss")
    assert torch.equal(a.helpful_indices, b.helpful_indices)
    assert torch.equal(a.harmful_indices, b.harmful_indices)


def test_faiss_backend_without_faiss_says_how_to_install(tmp_path: Path) -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("faiss is installed")
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix")
    with pytest.raises(InputError, match="faiss-cpu"):
        index.topk(test, 3, backend="faiss")


def test_open_refuses_other_model_other_data_and_unfinished(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    inf.build_index(tmp_path / "ix", dim=10)
    GradientIndex.open(tmp_path / "ix", obj, train=train)  # the same: fine
    other, _, _ = _problem(seed=1)
    with pytest.raises(ArtifactMismatchError, match="different model parameters"):
        GradientIndex.open(tmp_path / "ix", other)
    x, y = train
    with pytest.raises(ArtifactMismatchError, match="different training data"):
        GradientIndex.open(tmp_path / "ix", obj, train=(x.flip(0), y.flip(0)))
    # resuming with other settings is refused too
    with pytest.raises(ArtifactMismatchError, match="projection"):
        inf.build_index(tmp_path / "ix", dim=11)
    (tmp_path / "ix" / "complete.json").unlink()
    with pytest.raises(InputError, match="unfinished"):
        GradientIndex.open(tmp_path / "ix", obj)


def _chunk_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


@pytest.mark.determinism
@pytest.mark.parametrize("stop_after", [0, 2])
def test_interrupted_build_resumes_with_identical_chunks(tmp_path: Path, stop_after: int) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    clean = inf.build_index(tmp_path / "clean", dim=16, chunk_size=25)

    class Kill(Exception):
        pass

    def stop(j: int, num: int) -> None:
        if j == stop_after:
            raise Kill

    with pytest.raises(Kill):
        inf.build_index(tmp_path / "run", dim=16, chunk_size=25, callback=stop)
    assert len(list((tmp_path / "run").glob("rows_*.npy"))) == stop_after + 1
    done = []
    resumed = inf.build_index(
        tmp_path / "run", dim=16, chunk_size=25, callback=lambda j, n: done.append(j)
    )
    assert done == list(range(stop_after + 1, 6))
    assert _chunk_bytes(tmp_path / "run") == _chunk_bytes(tmp_path / "clean")
    assert torch.equal(resumed.loss_influence(test), clean.loss_influence(test))


_WORKER = textwrap.dedent(
    """
    import sys, time
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[1])
    from test_index import _problem, DAMPING
    from inflens import Influence, GradientIndex

    torch.set_num_threads(1)
    mode, folder = sys.argv[2], sys.argv[3]
    obj, train, test = _problem()
    if mode == "build":
        inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
        print("start", flush=True)
        inf.build_index(folder, dim=16, chunk_size=25, callback=lambda j, n: time.sleep(0.05))
        print("done", flush=True)
    else:  # reopen in this new process: no training data, no fit
        index = GradientIndex.open(folder, obj)
        top = index.topk(test, 5)
        save_file({"scores": index.loss_influence(test), "self": index.self_influence(),
                   "top": top.helpful_indices}, sys.argv[4])
    """
)


def _python(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).resolve().parent)
    return subprocess.Popen(
        [sys.executable, str(script), here, *args], stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.determinism
@pytest.mark.parametrize(
    "trial", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_sigkilled_build_resumes_with_identical_chunks(tmp_path: Path, trial: int) -> None:
    """A build killed with SIGKILL at a random moment (seeded), then resumed, leaves the same
    bytes as an uninterrupted build: whole chunks only, stale temporary files removed."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = _python(script, "build", str(tmp_path / "run"))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    time.sleep(random.Random(trial).uniform(0.0, 0.3))  # 6 chunks, ~0.05 s apart
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list((tmp_path / "run").glob("rows_*.npy")))
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    done: list[int] = []
    inf.build_index(tmp_path / "run", dim=16, chunk_size=25, callback=lambda j, n: done.append(j))
    assert len(done) == 6 - before
    inf.build_index(tmp_path / "clean", dim=16, chunk_size=25)
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert _chunk_bytes(tmp_path / "run") == _chunk_bytes(tmp_path / "clean")


@pytest.mark.determinism
def test_reopened_index_in_a_new_process_gives_identical_scores(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    index = inf.build_index(tmp_path / "ix", dim=16, chunk_size=40)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = _python(script, "query", str(tmp_path / "ix"), str(tmp_path / "out.safetensors"))
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    got = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got["scores"], index.loss_influence(test))
    assert torch.equal(got["self"], index.self_influence())
    assert torch.equal(got["top"], index.topk(test, 5).helpful_indices)


_RANKS = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_index import _problem, DAMPING
    from inflens.distributed import DistributedInfluence, init

    torch.set_num_threads(1)
    rank, world = init()
    obj, train, test = _problem()
    inf = DistributedInfluence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    written = []
    index = inf.build_index(sys.argv[2], chunk_size=25, callback=lambda j, n: written.append(j))
    open(sys.argv[2] + f"/../rank{rank}.txt", "w").write(",".join(map(str, written)))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes: ~15 s on two shared cores
def test_two_ranks_write_their_own_chunks_of_one_index(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script),
        str(Path(__file__).resolve().parent), str(tmp_path / "ix"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "0,2,4"
    assert (tmp_path / "rank1.txt").read_text() == "1,3,5"
    assert json.loads((tmp_path / "ix" / "complete.json").read_text())["num_chunks"] == 6
    obj, train, test = _problem()
    inf = Influence(obj, train, solver="exact", damping=DAMPING, progress=False).fit()
    both = GradientIndex.open(tmp_path / "ix", obj)
    # unprojected, so equal to the single-process influence up to the summation order of the
    # all-reduced curvature (a projected index depends on the signs of the eigenvectors)
    torch.testing.assert_close(
        both.loss_influence(test), inf.loss_influence(test), rtol=1e-9, atol=1e-12
    )
