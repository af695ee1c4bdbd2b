"""`inflens reproduce fig4 --quick`: RBF SVM vs frozen-CNN features on CIFAR dog/frog."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inflens.experiments import fig4


def test_fig4_quick(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (shared_data / "cifar10_animals").is_dir():
        pytest.skip("cifar10_animals is not in the shared data")
    monkeypatch.setenv("INFLENS_CACHE", str(tmp_path / "cache"))  # train the quick CNN afresh
    out = tmp_path / "out"
    m = fig4.run(shared_data, out, quick=True, progress=False)
    assert (out / "fig4.png").stat().st_size > 10_000
    assert json.loads((out / "metrics.json").read_text())["experiment"] == "fig4"
    assert m["n_train"] == 200 and m["n_test"] == 80
    assert m["cnn_lr"]["grad_norm"] < 1e-8  # the top model is at its optimum
    assert m["rbf_svm"]["fit"]["duality_gap"] < 1e-6
    assert 0.5 < m["rbf_svm"]["train_accuracy"] <= 1.0
    assert m["n_both_correct"] >= 1
    summary = m["summary_over_both_correct"]
    assert set(summary) == {"RBF SVM", "CNN features + LR"}
    for s in summary.values():
        assert s["accuracy"] == 1.0  # only test points both get right
        assert -1 <= s["spearman_abs_influence_vs_distance"] <= 1
        assert math.isfinite(s["top_k_helpful_mean"]) and s["top_k_helpful_mean"] > 0
    # the paper's qualitative claim: the RBF SVM's influence sits on pixel-space neighbours
    assert (
        summary["RBF SVM"]["influence_mass_nearest"]
        > summary["CNN features + LR"]["influence_mass_nearest"]
    )
    shown = m["shown_test_image"]
    assert len(shown["RBF SVM"]["top_helpful"]) == 5


def test_one_thread_when_quick_restores_the_thread_count() -> None:
    import torch

    from inflens.experiments._animals import one_thread_when_quick

    seen = []

    @one_thread_when_quick
    def run(data_dir, out, quick: bool = False, progress: bool = True) -> int:
        seen.append(torch.get_num_threads())
        return 7

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run(None, None, quick=True) == 7 and run(None, None, True) == 7
        assert run(None, None) == 7
        assert seen == [1, 1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fig4_config_is_validated(tmp_path: Path) -> None:
    from inflens.errors import InputError

    with pytest.raises(InputError, match="size"):
        fig4.Fig4Config(size=0)
    with pytest.raises(InputError, match="gamma"):
        fig4.Fig4Config(gamma=-1.0)
    with pytest.raises(InputError, match="two classes"):
        fig4.Fig4Config(classes=("dog",))
    with pytest.raises(InputError, match="Fig4Config"):
        fig4.run(None, tmp_path, quick=True, progress=False, config={"gamma": 1.0})
