"""`inflens reproduce fig1 --quick`: components of influence on MNIST 1 vs 7 (2,000 points)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inflens.experiments import fig1


def test_fig1_quick(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "mnist").is_dir():
        pytest.skip("mnist is not in the shared data")
    m = fig1.run(shared_data, tmp_path, quick=True, progress=False)
    assert (tmp_path / "fig1_components.png").stat().st_size > 10_000
    assert (tmp_path / "fig1_harmful.png").stat().st_size > 2_000
    assert json.loads((tmp_path / "metrics.json").read_text())["experiment"] == "fig1"
    assert m["n_train"] == 2000 and m["n_test"] == 2163 and m["p"] == 784
    assert m["fit"]["converged"] and m["fit"]["grad_norm"] <= 1e-10
    # the library's influence equals the closed form of Sec. 2.3 (with l2 theta), numpy H
    assert m["closed_form_max_rel_error"] < 1e-8
    c = m["claims"]
    # exact sign rules (all pixels >= 0): the bare loss-gradient products split by label
    assert c["without_both_sign_by_label"]
    assert c["without_H_without_l2_term_sign_by_label"]
    # with the l2 theta term, only values within the constant shift can violate the rule
    assert c["without_H_violations_max_abs"] <= abs(c["without_H_l2_shift"]) + 1e-12
    # the paper's point: with H and the train loss, some same-label points are harmful
    assert c["full_some_same_label_harmful"]
    h = m["harmful_example"]
    assert h["full_influence"] < 0 and h["rank_among_same_label"] == 5
    lo, hi = m["ranges"]["without_H"]
    assert lo < 0 < hi


@pytest.mark.slow
def test_fig1_full_protocol(shared_data: Path, tmp_path: Path) -> None:
    """The full run (n = 11,894; about 10 s here) against PROTOCOL section 7, T1-T3.

    Reference values from `inflens reproduce all --full --only fig1` at commit 1f09087
    (docs/reproduction/fig1/metrics.json): ranges without the train loss [-133.5, 198.4],
    without H [-15.1, 18.6], without both [-22.9, 25.1]; 4,522 harmful sevens; the 5th most
    harmful seven is training index 2989 at -37.3.
    """
    if not (shared_data / "mnist").is_dir():
        pytest.skip("mnist is not in the shared data")
    m = fig1.run(shared_data, tmp_path, quick=False, progress=False)
    assert (m["n_train"], m["n_test"]) == (11894, 2163)
    assert m["fit"]["converged"] and m["closed_form_max_rel_error"] < 1e-8
    c = m["claims"]
    # T1: without H the sign follows label agreement up to the constant l2 shift
    assert c["without_both_sign_by_label"] and c["without_H_without_l2_term_sign_by_label"]
    assert c["without_H_violations_max_abs"] <= abs(c["without_H_l2_shift"]) + 1e-12
    # T2: with H and the train loss, many same-label points are harmful
    assert c["full_some_same_label_harmful"] and c["full_same_label_harmful_count"] > 1000
    assert m["harmful_example"]["rank_among_same_label"] == 5
    assert m["harmful_example"]["full_influence"] < 0
    # T3: each ablation's x range within 15% of the release figure's (read off the figure)
    for name, (lo, hi) in m["paper_x_ranges"].items():
        got_lo, got_hi = m["ranges"][name]
        assert got_lo == pytest.approx(lo, rel=0.15) and got_hi == pytest.approx(hi, rel=0.15)
