"""`inflens reproduce fig3 --quick`: hinge vs smooth-hinge influence, 2,000 points, 20 refits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflens.experiments import fig3


def test_fig3_quick(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "mnist").is_dir():
        pytest.skip("mnist is not in the shared data")
    m = fig3.run(shared_data, tmp_path, quick=True, progress=False)
    for name in ("fig3a_smooth_hinge.png", "fig3b_scatter.png", "fig3_sweep.png"):
        assert (tmp_path / name).stat().st_size > 5_000
    assert json.loads((tmp_path / "metrics.json").read_text())["experiment"] == "fig3"
    assert m["n_train"] == 2000 and m["n_test"] == 2100 and m["k"] == 20
    assert m["test_misclassified"]
    assert m["svm_fit"]["duality_gap"] < 1e-12
    prec = m["refit_precision"]
    # exact refits: the certified error of every actual change is far below the changes
    assert prec["max_test_loss_error_bound"] < 0.01 * prec["min_abs_actual"]
    assert abs(prec["reference_change"]) < 1e-9
    r = {t: v["pearson"] for t, v in m["by_t"].items()}
    # the paper's claim: smoothing the hinge makes the prediction far more accurate
    assert r["0.001"] > r["0"] + 0.1 and r["0.1"] > r["0"]
    assert r["0.001"] > 0.85
    # the hinge influence (H = l2 I) overestimates the magnitude of the changes
    assert m["by_t"]["0"]["median_abs_pred_over_abs_actual"] > 3
