"""`inflens reproduce hospital --quick`: the children domain mismatch on 4,020 patients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflens.experiments import hospital


def test_hospital_quick(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "diabetes130").is_dir():
        pytest.skip("diabetes130 is not in the shared data")
    m = hospital.run(shared_data, tmp_path, quick=True, progress=False)
    for name in ("hospital_influence.png", "hospital_input_influence.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "harmful" in (tmp_path / "report.txt").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["experiment"] == "hospital"
    # data facts of the paper's split (the quick subsample keeps every training child)
    assert m["n_features"] == 127 and m["n_test"] == 81766
    assert m["train_children"] == 24 and m["train_children_readmitted"] == 3
    assert m["train_children_after"] == 4 and m["train_children_after_readmitted"] == 3
    assert m["test_children"] == 137 and m["test_children_readmitted"] == 0
    assert m["fit_original"]["grad_norm"] <= 1e-10 and m["fit_modified"]["grad_norm"] <= 1e-10
    # the mismatch: no test child is wrong before, some are after
    assert m["test_children_misclassified_original"] == 0
    assert m["test_children_misclassified_modified"] > 0
    assert m["child_coefficient_original"] < 0 < m["child_coefficient"]
    t = m["target"]
    assert t["p_correct_original"] > 0.5 > t["p_correct_modified"]
    # the 4 training children are the 4 most influential points, with the paper's signs
    assert t["top4_are_the_children"] and t["signs_as_paper"]
    assert t["ratio_range"][0] > 5
    # the Hessian is that of the regularised risk: smallest eigenvalue >= l2
    assert m["hessian"]["min_eigenvalue"] >= 1e-4 * (1 - 1e-6)
    # the non-readmitted child's input influence: the child indicator among its top features
    inputs = m["input_influence_code_sign"]
    kept = [v for v in inputs.values() if v["label"] == 0]
    assert len(kept) == 1 and kept[0]["child_feature_rank_by_abs"] <= 3


@pytest.mark.slow
def test_hospital_full_protocol(shared_data: Path, tmp_path: Path) -> None:
    """The full run (20,000 patients, LOO and scikit-learn checks; about 30 s), T21-T25.

    Reference values from `inflens reproduce all --full --only hospital` at commit 1f09087
    (docs/reproduction/hospital/metrics.json): children 24 (3) -> 4 (3), 0 -> 30 misclassified
    test children (capped scikit-learn fit: 14, notebook 13), 12 larger coefficients (capped:
    14, paper 14), children 24.6-37.0x the next point, LOO Pearson 0.9996.
    """
    if not (shared_data / "diabetes130").is_dir():
        pytest.skip("diabetes130 is not in the shared data")
    m = hospital.run(shared_data, tmp_path, quick=False, progress=False)
    # T21
    assert (m["train_children"], m["train_children_readmitted"]) == (24, 3)
    assert (m["train_children_after"], m["train_children_after_readmitted"]) == (4, 3)
    assert m["n_features"] == 127 and m["n_train_after"] == 19980
    # T22, T24 with the original (capped) protocol, which matches the notebook
    mod = m["original_protocol"]["modified"]
    assert abs(mod["features_larger_than_child"] - 14) <= 1
    assert abs(mod["test_children_misclassified"] - 13) <= 2
    assert m["test_children_misclassified_original"] == 0
    assert m["test_children_misclassified_modified"] > 10
    # T23: the 4 children are the top 4, 3 harmful and 1 helpful, > 20x the next point
    t = m["target"]
    assert t["top4_are_the_children"] and t["signs_as_paper"]
    assert min(t["ratio_range"]) > 20
    assert (
        m["all_misclassified_children"]["signs_as_paper"]
        == m["all_misclassified_children"]["count"]
    )
    # T25: the input influence of the kept non-readmitted child points at the child indicator
    saved = json.loads((tmp_path / "metrics.json").read_text())  # JSON keys are strings
    assert saved["input_influence_code_sign"]["19590"]["largest_positive"][0][0] == "age_[0-10)"
    # influence against exact refits
    assert m["leave_one_out"]["pearson"] > 0.999
