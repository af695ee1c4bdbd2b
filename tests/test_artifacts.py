"""Saving, loading and resuming: fingerprints refuse the wrong model/data; a killed run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from inflens import Influence, Objective
from inflens.artifacts import (
    ArtifactMismatchError,
    load_scores,
    load_vectors,
    save_vectors,
    score_to_folder,
)
from inflens.solvers import CG, Exact, LiSSA

# reloaded and resumed runs must give the same bits: `make test` runs these with 1 and 2 threads
pytestmark = pytest.mark.determinism


def _problem(seed: int = 0, n: int = 120, d: int = 5, classes: int = 3):
    """Softmax regression in float64 at a random theta: with l2 > 0 its Hessian is PD."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 7, d, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (n + 7,), generator=g)
    model = nn.Linear(d, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(classes, d, generator=g, dtype=torch.float64))
    obj = Objective(model, "cross_entropy", l2=0.05)
    return obj, (x[:n], y[:n]), (x[n:], y[n:])


@pytest.mark.filterwarnings("ignore::inflens.InflensWarning")  # a short LiSSA is enough here
@pytest.mark.parametrize(
    "solver",
    [
        "exact",
        Exact(method="cholesky"),
        CG(tol=1e-12),
        CG(tol=1e-12, preconditioner="kfac"),
        LiSSA(depth=30, repeats=2, batch_size=8, seed=3),
    ],
)
def test_save_load_roundtrip_gives_identical_scores(tmp_path: Path, solver) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, solver=solver, damping=0.01, progress=False).fit()
    expected = inf.loss_influence(test)
    inf.save(tmp_path / "fit")
    files = sorted(p.name for p in (tmp_path / "fit").iterdir())
    assert files == ["config.json", "curvature.safetensors", "solver.json"]  # no pickle
    cfg = json.loads((tmp_path / "fit" / "config.json").read_text())
    assert cfg["damping"] == 0.01 and cfg["n_train"] == 120 and cfg["p"] == 15
    assert len(cfg["model_fingerprint"]) == 64 and len(cfg["data_fingerprint"]) == 64

    obj2, train2, _ = _problem()  # rebuilt from scratch: same bytes, same fingerprints
    loaded = Influence.load(tmp_path / "fit", obj2, train2, progress=False)
    assert type(loaded.solver) is type(inf.solver)
    assert loaded.curvature_ is not None and loaded.curvature_.num_matvecs == 0
    torch.testing.assert_close(loaded.loss_influence(test), expected, rtol=0, atol=0)


def test_exact_artifact_holds_the_eigensystem(tmp_path: Path) -> None:
    obj, train, _ = _problem()
    inf = Influence(obj, train, solver="exact", progress=False).fit()
    inf.save(tmp_path)
    t = load_file(str(tmp_path / "curvature.safetensors"))
    a = inf.curvature_.dense()
    q, lam = t["evecs_"], t["evals_"]
    torch.testing.assert_close(q @ torch.diag(lam) @ q.T, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver,key", [("exact", "chol_"), (CG(tol=1e-12), "preconditioner")])
def test_artifact_written_before_a_new_attribute_still_loads(tmp_path: Path, solver, key) -> None:
    """Artifacts from before Exact's Cholesky path (no ``chol_``) or CG's preconditioner (no
    ``preconditioner``) load and give the same scores."""
    obj, train, test = _problem()
    inf = Influence(obj, train, solver=solver, progress=False).fit()
    expected = inf.loss_influence(test)
    inf.save(tmp_path)
    values = json.loads((tmp_path / "solver.json").read_text())
    assert values.pop(key) is None
    (tmp_path / "solver.json").write_text(json.dumps(values))
    loaded = Influence.load(tmp_path, obj, train, progress=False)
    torch.testing.assert_close(loaded.loss_influence(test), expected, rtol=0, atol=0)


def test_load_refuses_other_model_or_data(tmp_path: Path) -> None:
    obj, train, _ = _problem()
    Influence(obj, train, progress=False).fit().save(tmp_path)

    other, _, _ = _problem(seed=1)
    with pytest.raises(ArtifactMismatchError, match="different model parameters"):
        Influence.load(tmp_path, other, train, progress=False)
    obj_l2 = Objective(obj.model, "cross_entropy", l2=0.06)  # same weights, other l2
    with pytest.raises(ArtifactMismatchError, match="model parameters"):
        Influence.load(tmp_path, obj_l2, train, progress=False)

    x, y = train
    y2 = y.clone()
    y2[5] = (y2[5] + 1) % 3
    with pytest.raises(ArtifactMismatchError, match="different training data"):
        Influence.load(tmp_path, obj, (x, y2), progress=False)
    with pytest.raises(ArtifactMismatchError, match="119"):
        Influence.load(tmp_path, obj, (x[:119], y[:119]), progress=False)


def test_vectors_roundtrip_and_refusal(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, progress=False).fit()
    s = inf.s_test(test)
    save_vectors(inf, tmp_path, "s_test", s)
    torch.testing.assert_close(load_vectors(inf, tmp_path, "s_test"), s, rtol=0, atol=0)
    other_obj, _, _ = _problem(seed=2)
    other = Influence(other_obj, train, progress=False).fit()
    with pytest.raises(ArtifactMismatchError, match="model parameters"):
        load_vectors(other, tmp_path, "s_test")
    damped = Influence(obj, train, damping=0.1, progress=False).fit()
    with pytest.raises(ArtifactMismatchError, match="damping"):
        load_vectors(damped, tmp_path, "s_test")


def test_chunked_scores_resume_in_process(tmp_path: Path) -> None:
    obj, train, test = _problem()
    inf = Influence(obj, train, progress=False).fit()
    s = inf.s_test(test)
    full = inf.score(s)
    first = score_to_folder(inf, s, tmp_path, chunk_size=25, chunks=[0, 2])
    assert first == {"num_chunks": 5, "computed": 2, "skipped": 0}
    with pytest.raises(Exception, match="missing 3 of 5"):
        load_scores(tmp_path)
    rest = score_to_folder(inf, s, tmp_path, chunk_size=25)
    assert rest == {"num_chunks": 5, "computed": 3, "skipped": 2}
    torch.testing.assert_close(load_scores(tmp_path), full, rtol=1e-12, atol=1e-14)
    with pytest.raises(ArtifactMismatchError, match="query vectors"):
        score_to_folder(inf, 2 * s, tmp_path, chunk_size=25)
    with pytest.raises(ArtifactMismatchError, match="chunk_size=25"):
        score_to_folder(inf, s, tmp_path, chunk_size=30)


_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from torch import nn
    from inflens import Influence, Objective
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    folder, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    n, d, c = 600, 6, 3
    x = torch.randn(n + 4, d, generator=g, dtype=torch.float64)
    y = torch.randint(c, (n + 4,), generator=g)
    model = nn.Linear(d, c, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(c, d, generator=g, dtype=torch.float64))
    obj = Objective(model, "cross_entropy", l2=0.05)
    # CG: the s_test vectors are saved on the first run and reused by the resumed one
    inf = Influence(obj, (x[:n], y[:n]), solver="cg", progress=False).fit()
    computed = []

    def callback(j, num):
        computed.append(j)
        print("chunk", j, flush=True)
        time.sleep(delay)

    scores = inf.score_to_folder((x[n:], y[n:]), folder, chunk_size=20, callback=callback)
    save_file({"scores": scores.contiguous()}, out)
    print(json.dumps({"computed": len(computed)}), flush=True)
    """
)


def _run(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def test_killed_scoring_run_resumes_and_matches(tmp_path: Path) -> None:
    script = tmp_path / "score.py"
    script.write_text(_SCRIPT)
    run_dir = tmp_path / "killed"
    chunks = run_dir / "scores"

    # 1. a real run, killed with SIGKILL once a few chunks are on disk
    proc = _run(script, str(run_dir), str(tmp_path / "a.safetensors"), "0.15")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(chunks.glob("chunk_*.safetensors"))) < 3:
        assert proc.poll() is None, "the scoring run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(chunks.glob("chunk_*.safetensors")))
    assert 3 <= done_before < 30, done_before
    assert not (tmp_path / "a.safetensors").exists()

    # 2. started again: computes only the missing chunks; 3. beside it, an uninterrupted run
    # in a fresh folder, which must give the same numbers bit for bit
    resumed = _run(script, str(run_dir), str(tmp_path / "a.safetensors"), "0")
    clean = _run(script, str(tmp_path / "clean"), str(tmp_path / "b.safetensors"), "0")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["computed"] == 30 - done_before
    out, _ = clean.communicate(timeout=120)
    assert clean.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["computed"] == 30
    a = load_file(str(tmp_path / "a.safetensors"))["scores"]
    b = load_file(str(tmp_path / "b.safetensors"))["scores"]
    assert a.shape == (4, 600)
    assert torch.equal(a, b)


def test_gauss_newton_artifact_reloads_as_gauss_newton(tmp_path: Path) -> None:
    """The curvature kind is part of the artifact: a CG fit on the GGN, reloaded, solves with
    the GGN again (the Hessian would give other scores on this non-linear model)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = torch.randint(3, (60,), generator=g)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    obj = Objective(model, "cross_entropy", l2=0.05)
    test = (x[:3], y[:3])
    ggn = Influence(obj, (x, y), solver=CG(tol=1e-12), damping=0.5, curvature="ggn",
                    progress=False).fit()  # fmt: skip
    hess = Influence(obj, (x, y), solver=CG(tol=1e-12), damping=0.5, progress=False).fit()
    expected, other = ggn.loss_influence(test), hess.loss_influence(test)
    assert float((expected - other).abs().max()) > 1e-3 * float(expected.abs().max())
    ggn.save(tmp_path / "ggn")
    assert json.loads((tmp_path / "ggn" / "config.json").read_text())["curvature"] == "ggn"
    loaded = Influence.load(tmp_path / "ggn", obj, (x, y), progress=False)
    assert loaded.curvature == "ggn" and loaded.curvature_.curvature == "ggn"
    torch.testing.assert_close(loaded.loss_influence(test), expected, rtol=1e-9, atol=1e-12)
