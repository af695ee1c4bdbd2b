"""A static HTML report of influence explanations, rendered from Jinja2 templates.

The report is one folder with ``index.html``: every figure is embedded (images as PNG data URIs),
the only script is a few lines of inline JavaScript (sortable, filterable tables and a load check),
so it opens from disk without a server and can be sent as a zip.

Sign convention shown at the top of every report (that of :mod:`inflens.influence`):
``I_up,loss(z_i, z_test) < 0`` means upweighting ``z_i`` lowers the test loss (helpful);
``predicted_loss_change = -I_up,loss / n > 0`` means removing ``z_i`` and retraining would raise
the test loss.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

SIGN_SENTENCE = (
    "Scores are I_up,loss(z_i, z_test) (Koh & Liang 2017, eq. 2): negative = helpful "
    "(upweighting the training example lowers this test example's loss), positive = harmful. "
    "Predicted loss change = -I_up,loss / n: the change of the test loss if the training "
    "example were removed and the model retrained; positive means removing it would raise the "
    "test loss (it helped)."
)


@dataclass(frozen=True)
class Example:
    """One example rendered as what it is.

    Attributes:
        index: row number in its data set (training or test).
        label: the label as shown (class name or number).
        kind: ``"image"``, ``"text"`` or ``"table"``.
        image_uri: ``data:image/png;base64,...`` for images (see :func:`image_data_uri`).
        tokens: the tokens of a text example.
        token_scores: one score per token (same sign convention as the example's score), or
            ``None`` when no token-level scores were computed.
        features: ``(name, value)`` pairs for a table row.
    """

    index: int
    label: str
    kind: str
    image_uri: str | None = None
    tokens: tuple[str, ...] | None = None
    token_scores: tuple[float, ...] | None = None
    features: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "text", "table"):
            raise InputError(f"Example.kind must be 'image', 'text' or 'table', got {self.kind!r}")
        if self.kind == "image" and not (self.image_uri or "").startswith("data:image/"):
            raise InputError("an image Example needs image_uri='data:image/png;base64,...'")
        if self.kind == "text" and self.tokens is None:
            raise InputError("a text Example needs its tokens")
        if self.token_scores is not None and (
            self.tokens is None or len(self.token_scores) != len(self.tokens)
        ):
            raise InputError(
                f"token_scores has {len(self.token_scores)} entries but the example has "
                f"{len(self.tokens or ())} tokens"
            )
        if self.kind == "table" and self.features is None:
            raise InputError("a table Example needs its (name, value) features")


@dataclass(frozen=True)
class Scored:
    """A training example with its score against one test example (or its self-influence)."""

    example: Example
    influence: float
    loss_change: float


@dataclass(frozen=True)
class Explanation:
    """One explained prediction: the test example and its most helpful and harmful training data."""

    test: Example
    predicted: str
    loss: float
    helpful: tuple[Scored, ...]
    harmful: tuple[Scored, ...]


@dataclass(frozen=True)
class Certificate:
    """How far the scores can be trusted, stated with its numbers.

    Attributes:
        method: what was compared, in words.
        pearson, spearman: correlations of the compared quantities.
        n_points: how many points entered the correlation.
        rows: ``(label, reference, checked)`` triples shown as a table (may be empty).
        columns: headers of the two numeric columns of ``rows``.
        note: anything a reader must know (e.g. why a check was skipped).
    """

    method: str
    pearson: float | None = None
    spearman: float | None = None
    n_points: int = 0
    rows: tuple[tuple[str, float, float], ...] = ()
    columns: tuple[str, str] = ("reference", "checked")
    note: str = ""


@dataclass(frozen=True)
class ReportInfo:
    """Everything in the report besides the explanations."""

    title: str = "inflens report"
    summary: tuple[tuple[str, str], ...] = ()
    settings: tuple[tuple[str, str], ...] = ()
    fingerprints: tuple[tuple[str, str], ...] = ()
    outliers: tuple[Scored, ...] = ()
    outlier_note: str = ""
    certificate: Certificate | None = None
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- example helpers
def image_data_uri(
    image: np.ndarray, vmin: float | None = None, vmax: float | None = None, scale: int = 1
) -> str:
    """A PNG data URI of an image array ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C in 1, 3, 4).

    Values are mapped linearly from ``[vmin, vmax]`` (default: the image's own range) to 0..255;
    ``scale`` repeats pixels so that tiny images (8x8 digits) stay legible.
    """
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"cannot show an array of shape {image.shape} as an image")
    lo = float(np.nanmin(a)) if vmin is None else float(vmin)
    hi = float(np.nanmax(a)) if vmax is None else float(vmax)
    span = hi - lo if hi > lo else 1.0
    u8 = np.clip(np.round((a - lo) / span * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        u8 = u8.repeat(scale, 0).repeat(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def format_number(v: Any) -> str:
    """Numbers as a person reads them: integers plain, others with 4 significant digits."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isfinite(f) and f == int(f) and abs(f) < 1e9:
            return str(int(f))
        return f"{f:.4g}"
    return str(v)


def _token_style(score: float, scale: float) -> str:
    """Background colour of a token: blue for helpful (negative), red for harmful (positive)."""
    if scale <= 0 or not math.isfinite(score):
        return ""
    a = min(1.0, abs(score) / scale) * 0.75
    rgb = "37,99,235" if score < 0 else "220,38,38"
    return f"background: rgba({rgb},{a:.3f})"


def _sci(v: float | None) -> str:
    if v is None or not math.isfinite(float(v)):
        return "n/a"
    return f"{float(v):+.3e}"


def _corr(v: float | None) -> str:
    if v is None or not math.isfinite(float(v)):
        return "n/a"
    return f"{float(v):.4f}"


def _environment():
    try:
        import jinja2
    except ImportError as exc:  # pragma: no cover - jinja2 ships with inflens's dependencies
        raise InputError("the HTML report needs Jinja2: pip install jinja2") from exc
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("inflens.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sci"] = _sci
    env.filters["corr"] = _corr
    env.globals["token_style"] = _token_style
    return env


def render_report(
    explanations: Sequence[Explanation], folder: str | os.PathLike, info: ReportInfo | None = None
) -> Path:
    """Write ``folder/index.html`` for the given explanations; returns its path.

    Each explanation shows the test example, its predicted and true labels and loss, and its
    most helpful (most negative I_up,loss) and most harmful (most positive) training examples.
    ``info`` adds the self-influence outliers, the accuracy certificate, the run's settings and
    fingerprints. Token scores, when an example carries them, are shown as highlights whose
    scale is shared by all tokens of that example.
    """
    info = info or ReportInfo()
    for e in explanations:
        if not isinstance(e, Explanation):
            raise InputError(f"render_report needs Explanation objects, got {type(e).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html = (
        _environment()
        .get_template("index.html.j2")
        .render(
            explanations=list(explanations),
            info=info,
            sign_sentence=SIGN_SENTENCE,
            n_examples=_count_examples(explanations, info),
            n_images=_count_images(explanations, info),
        )
    )
    path = folder / "index.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _all_examples(explanations: Sequence[Explanation], info: ReportInfo) -> list[Example]:
    out: list[Example] = []
    for e in explanations:
        out.append(e.test)
        out += [s.example for s in e.helpful] + [s.example for s in e.harmful]
    out += [s.example for s in info.outliers]
    return out


def _count_examples(explanations: Sequence[Explanation], info: ReportInfo) -> int:
    return len(_all_examples(explanations, info))


def _count_images(explanations: Sequence[Explanation], info: ReportInfo) -> int:
    return sum(ex.kind == "image" for ex in _all_examples(explanations, info))
