"""The HTML report in a real browser (headless Chromium): examples, images, scripts, errors.

The page's own inline script records, on ``load``, how many images decoded
(``naturalWidth > 0``), how many ``.example`` elements exist and how many script or resource
errors fired, as attributes of ``<html>``; ``--dump-dom`` returns the DOM after that script ran.
Console errors are read from Chromium's log as well. A broken page (a missing image, a thrown
error) is rendered too, to show the checks can fail.

Set ``INFLENS_SAVE_SCREENSHOT=1`` (or a path) to write the digits report's screenshot to
``docs/images/report.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from inflens import cli
from inflens.report import (
    Certificate,
    Example,
    Explanation,
    ReportInfo,
    Scored,
    image_data_uri,
    render_report,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next(
    (
        p
        for p in (
            shutil.which("chromium"),
            "/usr/bin/chromium",
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p and Path(p).exists()
    ),  # fmt: skip
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium); the browser "
    "checks of the HTML report need it",
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]  # fmt: skip


def _chromium(page: Path, tmp: Path, *extra: str) -> tuple[str, str]:
    """Run Chromium on ``page``; return (stdout, console lines of stderr)."""
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    proc = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *extra,
            page.resolve().as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    return proc.stdout, "\n".join(console)


def _root_attrs(dom: str) -> dict[str, str]:
    m = re.search(r"<html([^>]*)>", dom)
    assert m, dom[:300]
    return dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', m.group(1)))


def _check_page(dom: str, console: str, examples: int, images: int) -> dict[str, str]:
    attrs = _root_attrs(dom)
    assert attrs.get("data-ready") == "1", attrs  # the load handler ran
    assert int(attrs["data-examples"]) == examples == int(attrs["data-expected-examples"])
    assert int(attrs["data-images-total"]) == images == int(attrs["data-expected-images"])
    assert int(attrs["data-images-loaded"]) == images  # every image decoded
    assert attrs["data-errors"] == "0"
    bad = [ln for ln in console.splitlines() if "Uncaught" in ln or "Error" in ln]
    assert not bad, bad
    return attrs


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits-report")
    assert cli.main(["explain", "--example", "digits", "--out", str(out), "--quiet",
                     "--certificate-k", "6"]) == 0  # fmt: skip
    return out / "report" / "index.html"


def test_digits_report_renders(digits_report: Path, tmp_path: Path) -> None:
    dom, console = _chromium(digits_report, tmp_path, "--dump-dom")
    # 3 test digits, 5 helpful + 5 harmful each, 10 self-influence outliers: all images
    _check_page(dom, console, examples=43, images=43)
    assert "negative = helpful" in dom
    assert dom.count('class="card explanation"') == 3
    assert re.search(r"Pearson R 0\.99\d\d", dom)  # the leave-one-out certificate is stated
    save = os.environ.get("INFLENS_SAVE_SCREENSHOT")
    if save:
        target = ROOT / "docs" / "images" / "report.png" if save == "1" else Path(save)
        target.parent.mkdir(parents=True, exist_ok=True)
        _chromium(digits_report, tmp_path, "--hide-scrollbars", "--window-size=1200,1250",
                  f"--screenshot={target}")  # fmt: skip
        assert target.stat().st_size > 10_000


def test_sorting_and_filtering_work(digits_report: Path, tmp_path: Path) -> None:
    """Click a header and type into a filter box in the browser; read the result back."""
    probe = """<script>
window.addEventListener("load", function () {
  var t = document.getElementById("helpful-1");
  var th = t.tHead.rows[0].cells[4];           /* I_up,loss */
  th.click(); th.click();                      /* ascending, then descending */
  var vals = Array.prototype.map.call(t.tBodies[0].rows, function (r) {
    return r.cells[4].getAttribute("data-v"); });
  document.documentElement.setAttribute("data-sorted", vals.join(" "));
  var f = document.querySelector('input[data-table="helpful-1"]');
  f.value = t.tBodies[0].rows[0].cells[1].textContent;  /* one train row number */
  f.dispatchEvent(new Event("input"));
  var shown = Array.prototype.filter.call(t.tBodies[0].rows, function (r) {
    return r.style.display !== "none"; }).length;
  document.documentElement.setAttribute("data-shown", String(shown));
});
</script></body>"""
    page = tmp_path / "probe.html"
    page.write_text(digits_report.read_text().replace("</body>", probe))
    dom, console = _chromium(page, tmp_path, "--dump-dom")
    attrs = _root_attrs(dom)
    vals = [float(v) for v in attrs["data-sorted"].split()]
    assert len(vals) == 5 and vals == sorted(vals, reverse=True) and vals != sorted(vals)
    assert attrs["data-shown"] == "1"
    assert attrs["data-errors"] == "0"


def _text_report(folder: Path) -> Path:
    """A text model's report with synthetic per-token scores on the training examples."""
    tokens = [("[CLS]", "a", "great", "film", "[SEP]"), ("[CLS]", "awful", "plot", "[SEP]"),
              ("[CLS]", "fun", "movie", "[SEP]")]  # fmt: skip
    synthetic = [(0.0, -0.5, -2.0, 0.1, 0.0), (0.0, 1.5, 0.3, 0.0), (0.0, -0.2, -0.1, 0.0)]
    helpful = tuple(
        Scored(
            Example(i, "positive", "text", tokens=tokens[i], token_scores=synthetic[i]),
            -1.0 / (i + 1),
            0.1 / (i + 1),
        )  # fmt: skip
        for i in (0, 2)
    )
    harmful = (Scored(Example(1, "negative", "text", tokens=tokens[1], token_scores=synthetic[1]),
                      0.7, -0.07),)  # fmt: skip
    test = Example(0, "positive", "text", tokens=("[CLS]", "great", "movie", "[SEP]"))
    digit = Example(5, "3", "image", image_uri=image_data_uri([[0, 1], [1, 0]], scale=8))
    info = ReportInfo(
        title="text report",
        outliers=(Scored(digit, -3.0, 0.3),),
        certificate=Certificate(
            "synthetic", pearson=0.5, spearman=0.4, n_points=3, rows=(("a", 1.0, 2.0),)
        ),  # fmt: skip
        settings=(("solver", "exact"),),
        fingerprints=(("model", "abc"),),
    )
    e = Explanation(test, "positive", 0.25, helpful, harmful)
    return render_report([e], folder, info)


def test_text_report_with_token_highlights(tmp_path: Path) -> None:
    page = _text_report(tmp_path / "text")
    dom, console = _chromium(page, tmp_path, "--dump-dom")
    _check_page(dom, console, examples=5, images=1)
    # every token of the three scored training texts carries a highlight; the test text none
    assert len(re.findall(r'class="tok" style="background: rgba', dom)) == 5 + 4 + 4
    # the largest |score| of an example gets the strongest colour; negative = blue (helpful)
    assert 'title="-2.000e+00">great' in dom and "rgba(37,99,235,0.750)" in dom
    assert "rgba(220,38,38,0.750)" in dom  # "awful": the largest positive score, red


def test_checks_catch_a_broken_page(tmp_path: Path) -> None:
    page = _text_report(tmp_path / "broken")
    html = page.read_text()
    html = html.replace('src="data:image/png;base64,', 'src="missing-file.png#', 1)
    html = html.replace("</body>", "<script>undefinedFunction();</script></body>")
    page.write_text(html)
    dom, console = _chromium(page, tmp_path, "--dump-dom")
    attrs = _root_attrs(dom)
    assert attrs["data-images-loaded"] == "0" and attrs["data-images-total"] == "1"
    assert int(attrs["data-errors"]) >= 2  # the image and the script
    with pytest.raises(AssertionError):
        _check_page(dom, console, examples=5, images=1)
