import numpy as np
import pytest
from scipy import stats

from inflens.errors import InputError
from inflens.plots import ScatterStyle, new_figure, scatter_predicted_actual


def test_scatter_annotates_the_correlations_and_applies_the_style(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    p = 0.5 * a + 0.1 * rng.normal(size=40)
    path = tmp_path / "s.png"
    scatter_predicted_actual(a, p, path, style=ScatterStyle(title="T", limit=7.0))
    assert path.stat().st_size > 0
    _, (ax,) = new_figure()
    scatter_predicted_actual(a, p, ax=ax, style=ScatterStyle(title="T", limit=7.0))
    assert ax.get_title() == "T"
    assert ax.get_xlim() == pytest.approx((-7.0, 7.0))
    (text,) = ax.texts
    assert f"Pearson R = {stats.pearsonr(a, p)[0]:.3f}" in text.get_text()


def test_scatter_separate_axes_and_no_annotation():
    a = np.array([-1.0, 0.5, 2.0])
    p = 10 * a
    _, (ax,) = new_figure()
    scatter_predicted_actual(a, p, ax=ax, style=ScatterStyle(annotate=False, equal_axes=False))
    assert ax.get_xlim() == pytest.approx((-2.1, 2.1))
    assert ax.get_ylim() == pytest.approx((-21.0, 21.0))
    assert not ax.texts


def test_scatter_style_rejects_a_non_positive_limit():
    with pytest.raises(InputError, match="limit"):
        ScatterStyle(limit=0.0)
