"""Influence that never fails silently: the bad inputs users hit, memory limits, killed runs.

Each case of the table in docs/scale.md ("Bad input") has a test here (or names the test that
covers it elsewhere); memory faults run in a subprocess with a lowered address-space limit and
must end in MemoryBudgetError, never in a crash; a scoring run killed at seeded random points
resumes to the numbers of a clean run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import inflens
from cases import fitted, rel_err
from inflens import InputError

DT = torch.float64


def _linear_problem(n: int = 40, seed: int = 0):
    case = fitted("logreg_multiclass")
    obj = inflens.Objective(case.fresh_model(), "cross_entropy", l2=0.05)
    return obj, (case.x, case.y), (case.xt, case.yt)


# ---------------------------------------------------------------------------- bad inputs
def test_float_and_one_hot_labels_are_refused_with_the_fix() -> None:
    obj, (x, y), _ = _linear_problem()
    with pytest.raises(InputError, match="y.long"):
        inflens.Influence(obj, (x, y.double()), progress=False).fit()
    onehot = torch.nn.functional.one_hot(y, 3)
    with pytest.raises(InputError, match="one-hot targets: convert with y.argmax"):
        inflens.Influence(obj, (x, onehot), progress=False).fit()


def test_ignore_index_labels_refused_for_classification() -> None:
    obj, (x, y), _ = _linear_problem()
    y1, y2 = y.clone(), y.clone()
    y1[7] = -100  # among the first examples, which check_batch runs through the model
    with pytest.raises(InputError, match="-100.*ignore_index.*causal_lm"):
        inflens.Influence(obj, (x, y1), progress=False).fit()
    y2[30] = -100  # found by the pass over every label
    with pytest.raises(InputError, match="example 30 is -100"):
        inflens.Influence(obj, (x, y2), progress=False).fit()


def test_a_model_left_in_train_mode_is_explained_in_eval_mode_and_restored() -> None:
    """Dropout and BatchNorm: influence is defined for the deterministic eval-mode function;
    the module flags are restored afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(),
                          nn.Linear(6, 3)).double()  # fmt: skip
    case = fitted("logreg_multiclass")
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model(case.x)
    model.train()
    obj = inflens.Objective(model, "cross_entropy", l2=0.1)
    inf = inflens.Influence(obj, (case.x, case.y), damping=0.5, progress=False).fit()
    a = inf.loss_influence((case.xt, case.yt))
    b = inf.loss_influence((case.xt, case.yt))
    assert torch.equal(a, b)  # dropout is off: deterministic
    assert all(m.training for m in model.modules())
    model.eval()
    obj2 = inflens.Objective(model, "cross_entropy", l2=0.1)
    ref = inflens.Influence(obj2, (case.x, case.y), damping=0.5, progress=False).fit()
    assert rel_err(ref.loss_influence((case.xt, case.yt)), a) < 1e-12


def test_parameters_changed_after_fit_are_refused() -> None:
    obj, train, test = _linear_problem()
    inf = inflens.Influence(obj, train, progress=False).fit()
    inf.loss_influence(test)
    with torch.no_grad():
        next(obj.model.parameters()).add_(1e-3)  # e.g. one more optimizer step
    with pytest.raises(InputError, match="changed after fit"):
        inf.loss_influence(test)
    obj.model.load_state_dict(obj.model.state_dict())  # copy_: a new version as well
    with pytest.raises(InputError, match="changed after fit"):
        inf.self_influence()


def test_test_data_of_another_dtype_is_refused() -> None:
    obj, train, (xt, yt) = _linear_problem()
    inf = inflens.Influence(obj, train, progress=False).fit()
    with pytest.raises(InputError, match="test data inputs are torch.float32"):
        inf.loss_influence((xt.float(), yt))


def test_drop_last_and_iterable_datasets_are_refused() -> None:
    obj, (x, y), _ = _linear_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True)
    with pytest.raises(InputError, match="drop_last=True"):
        inflens.Influence(obj, loader, progress=False)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    with pytest.raises(InputError, match="IterableDataset"):
        inflens.Influence(obj, Stream(), progress=False)
    with pytest.raises(InputError, match="IterableDataset"):
        inflens.Influence(obj, DataLoader(Stream(), batch_size=4), progress=False)


def test_duplicated_training_points_are_separate_points_with_equal_scores() -> None:
    """Documented behaviour: duplicates are kept; each is one training point whose removal
    (of that copy alone) the scores predict, so copies score identically."""
    obj, (x, y), test = _linear_problem()
    xd, yd = torch.cat([x, x[:3]]), torch.cat([y, y[:3]])
    inf = inflens.Influence(obj, (xd, yd), damping=0.01, progress=False).fit()
    s = inf.loss_influence(test)
    assert s.shape[1] == len(yd)
    assert rel_err(s[:, -3:], s[:, :3]) < 1e-12


# ---------------------------------------------------------------------------- memory faults
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    import inflens
    from inflens.errors import MemoryBudgetError

    # lower the address-space limit to what the process holds now + 1.5 GiB
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * 4096
    limit = used + int(1.5 * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    case = sys.argv[1]
    try:
        if case == "exact_hessian":  # p = 20,000: an explicit Hessian would need 3.2 GB
            model = nn.Linear(2000, 10, bias=False).double()
            x, y = torch.randn(50, 2000, dtype=torch.float64), torch.randint(10, (50,))
            obj = inflens.Objective(model, "cross_entropy", l2=0.1)
            inflens.Influence(obj, (x, y), solver="exact", progress=False).fit()
        elif case == "budget_default":  # no max_memory_gb: the default follows the rlimit
            model = nn.Sequential(nn.Linear(400, 400), nn.Tanh(), nn.Linear(400, 10)).double()
            x, y = torch.randn(64, 400, dtype=torch.float64), torch.randint(10, (64,))
            obj = inflens.Objective(model, "cross_entropy", l2=0.1)
            inflens.Influence(obj, (x, y), solver="exact", progress=False).fit()
        print(json.dumps({"result": "no error"}))
    except MemoryBudgetError as exc:
        print(json.dumps({"result": "MemoryBudgetError", "message": str(exc)}))
    """
)


@pytest.mark.parametrize("case", ["exact_hessian", "budget_default"])
def test_memory_faults_raise_memory_budget_error_not_a_crash(tmp_path: Path, case: str) -> None:
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), case], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["result"] == "MemoryBudgetError", res
    assert "GiB" in res["message"] and "max_memory_gb" in res["message"]


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    import inflens

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = 300
    model = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 10)).double()  # p = 93,310
    x, y = torch.randn(3000, d, dtype=torch.float64), torch.randint(10, (3000,))
    obj = inflens.Objective(model, "cross_entropy", l2=0.1)
    # the same code paths once on a tiny problem first: library start-up (BLAS buffers,
    # torch.func) is not what the budget governs
    tiny = inflens.Objective(nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 10)).double(),
                             "cross_entropy", l2=0.1)
    inflens.Influence(tiny, (x[:40], y[:40]), solver=inflens.solvers.CG(tol=1e-3, max_iter=3),
                      curvature="ggn", progress=False).fit().loss_influence((x[:20], y[:20]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inf = inflens.Influence(obj, (x, y), solver=inflens.solvers.CG(tol=1e-3, max_iter=3),
                            curvature="ggn", max_memory_gb=float(sys.argv[1]), progress=False)
    inf.fit()
    s = inf.loss_influence((x[:20], y[:20]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"chunk": inf.curvature_.chunk_size, "growth": peak - before,
                      "finite": bool(torch.isfinite(s).all())}))
    """
)


def test_measured_peak_stays_under_the_budget(tmp_path: Path) -> None:
    """The peak resident memory a fit and a 20-point query add stays under max_memory_gb, and
    a smaller budget gives smaller chunks."""
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    # large blocks straight from mmap, so that freed memory leaves the resident set at once and
    # the peak measures what was alive together, not the allocator's retained arenas
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = {}
    for gb in ("0.25", "1.0"):
        out = subprocess.run([sys.executable, str(script), gb], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        res[gb] = json.loads(out.stdout.strip().splitlines()[-1])
        assert res[gb]["finite"]
        assert res[gb]["growth"] < float(gb) * 2**30, res
    assert res["0.25"]["chunk"] < res["1.0"]["chunk"]


# ---------------------------------------------------------------------------- killed runs
_SCORE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_reliability import _scoring_setup

    torch.set_num_threads(1)
    inf, test = _scoring_setup()
    inf.score_to_folder(test, sys.argv[1], chunk_size=10)
    print("done", flush=True)
    """
)


def _scoring_setup():
    g = torch.Generator().manual_seed(0)
    n, d, c = 400, 6, 3
    x = torch.randn(n + 4, d, generator=g, dtype=DT)
    y = torch.randint(c, (n + 4,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c)).double()
    obj = inflens.Objective(model, "cross_entropy", l2=0.05)
    inf = inflens.Influence(obj, (x[:n], y[:n]), solver="cg", damping=0.1, curvature="ggn",
                            progress=False).fit()  # fmt: skip
    return inf, (x[n:], y[n:])


def test_scoring_killed_at_seeded_random_points_resumes_to_the_clean_result(tmp_path: Path):
    """10 trials: a scoring run is SIGKILLed after a seeded random number of chunks (or before
    any, or while s_test is being saved); the resumed run finishes with the numbers of a clean
    run, and the chunks that were on disk before the resume keep their bytes."""
    script = tmp_path / "score.py"
    script.write_text(_SCORE_SCRIPT)
    inf, test = _scoring_setup()
    clean = inf.score_to_folder(test, tmp_path / "clean", chunk_size=10)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    for trial in range(10):
        folder = tmp_path / f"trial{trial}"
        target = rng.randint(0, 30)  # chunks on disk when the kill comes (of 40)
        proc = subprocess.Popen([sys.executable, str(script), str(folder), tests_dir],
                                stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        deadline = time.time() + 120
        chunks = folder / "scores"
        while time.time() < deadline and proc.poll() is None:
            if len(list(chunks.glob("chunk_*.safetensors"))) >= target:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {p.name: p.read_bytes() for p in chunks.glob("chunk_*.safetensors")}
        resumed = inf.score_to_folder(test, folder, chunk_size=10)
        torch.testing.assert_close(resumed, clean, rtol=0, atol=0)
        for name, data in before.items():
            assert (chunks / name).read_bytes() == data, f"trial {trial}: {name} was rewritten"
