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
