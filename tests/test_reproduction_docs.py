"""docs/reproduction.md and docs/reproduction/*.md against the committed metrics files.

Two checks.

1. The results table of docs/reproduction.md (keyed sources, below).
2. Every other number in those documents (prose and tables, outside headings, code spans, code
   blocks, link targets and references such as "Fig 2", "Sec. 5.2", "PROTOCOL 4.3", "§7")
   must sit in a labelled block:

   - ``<!-- checked: PATH[, PATH...] -->`` ... ``<!-- /checked -->``: each number must equal, at
     its printed precision, some numeric value in one of the named JSON files (paths relative
     to ``docs/``). This is weaker than the table's keyed sources: it proves the number occurs
     in the committed metrics, not that it is the value of the key the sentence means.
   - ``<!-- unchecked: REASON -->`` ... ``<!-- /unchecked -->``: numbers the test skips (older
     runs whose metrics are not committed, exploratory scripts, the paper's values, settings).
     The reason is required, so an unsourced number is at least labelled as such.

   A number outside any block fails the test. The per-experiment sections of
   docs/reproduction.md must equal docs/reproduction/<name>.md, so the labels hold for both.

The table sits between ``<!-- results-table:begin -->`` and ``<!-- results-table:end -->`` with
the columns ``target | paper | ours | source | commit | met?``. Every number (and every
``true``/``false``) in an "ours" cell must have a source, in order: the source cell lists
``path#key`` entries separated by ``;`` (path relative to ``docs/``, key a dotted path with
``[i]`` list indices and ``["..."]`` for keys containing dots). The number must equal the JSON
value to the precision it is printed with. The commit cell is the file's provenance commit
(``provenance.git.commit``, or a top-level ``git.commit``; first 7 hex digits), or contains
``not re-run`` for a file without either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inflens.experiments.reproduce_all import compact

DOCS = Path(__file__).resolve().parents[1] / "docs"
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
COLUMNS = ["target", "paper", "ours", "source", "commit", "met?"]
# a number as printed: optional sign (ASCII or Unicode minus), digits with thousands commas,
# decimals, exponent; or a JSON boolean
TOKEN = re.compile(
    r"(?<![\w.])(?P<num>[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-−+]?\d+)?)(?![\w])"
    r"|\b(?P<bool>true|false)\b"
)
KEY = re.compile(r'\.?([A-Za-z_][\w\-]*)|\[(\d+)\]|\["([^"]+)"\]')


@dataclass(frozen=True)
class Row:
    target: str
    ours: str
    sources: list[tuple[str, str]]
    commit: str


def parse_table(text: str) -> list[Row]:
    """The rows of the marked results table in ``text``; a malformed table raises ValueError."""
    if BEGIN not in text or END not in text:
        raise ValueError("no results table markers")
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if header != COLUMNS:
        raise ValueError(f"columns {header}, expected {COLUMNS}")
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(COLUMNS):
            raise ValueError(f"row has {len(cells)} cells: {ln}")
        src = cells[3].replace("`", "")
        sources = []
        for part in filter(None, (p.strip() for p in src.split(";"))):
            if "#" not in part:
                raise ValueError(f"source {part!r} is not path#key ({cells[0]})")
            path, key = part.split("#", 1)
            sources.append((path.strip(), key.strip()))
        rows.append(Row(cells[0], cells[2], sources, cells[4].replace("`", "")))
    return rows


def lookup(obj: Any, key: str) -> Any:
    """The value at a dotted key path (``a.b[2]["0.05"]``)."""
    pos = 0
    while pos < len(key):
        m = KEY.match(key, pos)
        if not m or m.end() == pos:
            raise KeyError(f"bad key path {key!r} at {pos}")
        name, index, quoted = m.groups()
        obj = obj[int(index)] if index is not None else obj[name if name else quoted]
        pos = m.end()
    return obj


def tokens(cell: str) -> list[str]:
    """Numbers and booleans printed in a cell (markdown emphasis ignored)."""
    return [m.group(0) for m in TOKEN.finditer(cell.replace("*", ""))]


def matches(printed: str, value: Any) -> bool:
    """Whether ``value`` rounds to ``printed`` at the printed precision."""
    if printed in ("true", "false"):
        return isinstance(value, bool) and value == (printed == "true")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    s = printed.replace("−", "-").replace(",", "")
    mant, _, exp = s.lower().partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    half_ulp = 0.5 * 10.0 ** (-decimals) * (10.0 ** int(exp) if exp else 1.0)
    return abs(float(s) - float(value)) <= half_ulp * (1 + 1e-9) + 1e-300


def check(rows: list[Row], docs: Path) -> list[str]:
    """Every problem in ``rows`` (empty when every number is backed by its metrics file)."""
    problems = []
    cache: dict[str, Any] = {}
    for row in rows:
        toks = tokens(row.ours)
        if len(toks) != len(row.sources):
            problems.append(
                f"{row.target}: {len(toks)} numbers in 'ours' ({toks}) but "
                f"{len(row.sources)} sources"
            )
            continue
        commits = set()
        for tok, (path, key) in zip(toks, row.sources):
            if path not in cache:
                file = docs / path
                if not file.is_file():
                    problems.append(f"{row.target}: {path} does not exist")
                    cache[path] = None
                    continue
                cache[path] = json.loads(file.read_text())
            metrics = cache[path]
            if metrics is None:
                continue
            try:
                value = lookup(metrics, key)
            except (KeyError, IndexError, TypeError) as exc:
                problems.append(f"{row.target}: {path}#{key} not found ({exc})")
                continue
            if not matches(tok, value):
                problems.append(f"{row.target}: printed {tok}, {path}#{key} = {value!r}")
            # a run's provenance block, or (metrics_paper_protocol_trend.json) its top-level git
            prov = metrics.get("provenance") or (
                {"git": metrics["git"]} if "git" in metrics else None
            )
            commits.add(prov["git"]["commit"][:7] if prov else "not re-run")
        for c in commits:
            if c not in row.commit:
                problems.append(f"{row.target}: commit cell {row.commit!r}, source says {c}")
    return problems


def test_every_number_in_the_results_table_is_backed_by_committed_metrics() -> None:
    rows = parse_table((DOCS / "reproduction.md").read_text())
    assert len(rows) >= 29  # one row per PROTOCOL section 7 target at least
    targets = {r.target.split()[0] for r in rows}
    assert {f"T{i}" for i in range(1, 30)} <= targets
    assert check(rows, DOCS) == []


def _bad_docs(tmp_path: Path) -> Path:
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "metrics.json").write_text(
        json.dumps(
            {
                "r": 0.73412,
                "n": 11894,
                "tiny": 1.06e-14,
                "ok": True,
                "by": {"0.05": [0.1, 0.376]},
                "provenance": {"git": {"commit": "abcdef0123"}},
            }
        )
    )
    return tmp_path


def _table(ours: str, source: str, commit: str = "abcdef0") -> str:
    return "\n".join(
        [
            BEGIN,
            "| " + " | ".join(COLUMNS) + " |",
            "|---|---|---|---|---|---|",
            f"| T7 R | 0.86 | {ours} | {source} | {commit} | no |",
            END,
        ]
    )


def test_checker_accepts_correct_numbers(tmp_path: Path) -> None:
    docs = _bad_docs(tmp_path)
    text = _table(
        "R **0.734**, n = 11,894, err 1.1e-14, ok true, 0.38",
        '`exp/metrics.json#r`; exp/metrics.json#n; exp/metrics.json#tiny; exp/metrics.json#ok; exp/metrics.json#by["0.05"][1]',
    )
    assert check(parse_table(text), docs) == []


@pytest.mark.parametrize(
    ("ours", "source", "commit", "why"),
    [
        ("R 0.736", "exp/metrics.json#r", "abcdef0", "printed 0.736"),  # wrong number
        ("R 0.7342", "exp/metrics.json#r", "abcdef0", "printed 0.7342"),  # last digit off by one
        ("R 0.734 and 12", "exp/metrics.json#r", "abcdef0", "2 numbers"),  # no source
        ("n 11,895", "exp/metrics.json#n", "abcdef0", "printed 11,895"),
        ("ok false", "exp/metrics.json#ok", "abcdef0", "printed false"),
        ("R 0.734", "exp/metrics.json#missing", "abcdef0", "not found"),
        ("R 0.734", "nope/metrics.json#r", "abcdef0", "does not exist"),
        ("R 0.734", "exp/metrics.json#r", "1234567", "commit cell"),
        ("1.2e-14", "exp/metrics.json#tiny", "abcdef0", "printed 1.2e-14"),
    ],
)
def test_checker_fails_on_a_wrong_or_unbacked_number(
    tmp_path: Path, ours: str, source: str, commit: str, why: str
) -> None:
    docs = _bad_docs(tmp_path)
    problems = check(parse_table(_table(ours, source, commit)), docs)
    assert len(problems) == 1 and why in problems[0], problems


def test_committed_metrics_are_small_and_have_provenance() -> None:
    files = sorted((DOCS / "reproduction").glob("*/metrics.json"))
    assert files, "no committed metrics under docs/reproduction/<name>/"
    for f in files:
        m = json.loads(f.read_text())
        prov = m["provenance"]
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"]), f
        assert prov["wall_seconds"] > 0 and prov["versions"]["torch"] and prov["command"]
        assert prov["machine"]["cpu_model"] and prov["machine"]["torch_threads"] >= 1
        assert compact(m) == m, f"{f} has a list longer than 50: run compact() on it"
        assert f.stat().st_size < 200_000, f


def test_reproduce_all_wraps_runs_records_provenance_and_resumes(tmp_path: Path) -> None:
    """Fake experiments: provenance is added, a finished run is skipped, a failure is isolated."""
    from types import SimpleNamespace

    from inflens.experiments import reproduce_all as ra

    calls: list[tuple[str, bool]] = []

    def make(name: str, fail: bool = False):
        def run(data_dir, out, quick, progress):
            calls.append((name, quick))
            if fail:
                raise RuntimeError("data missing")
            m = {"experiment": name, "r": 0.5, "curve": list(range(120))}
            (out / "metrics.json").write_text(json.dumps(m))
            return m

        return SimpleNamespace(run=run)

    exps = {"a": make("a"), "b": make("b", fail=True)}
    cfg = ra.ReproduceAllConfig(tmp_path / "out", mode="quick", command="inflens reproduce all")
    res = ra.run_all(exps, cfg, log=lambda _: None)
    assert res["a"]["status"] == "ran" and res["b"]["status"] == "failed"
    assert "data missing" in (tmp_path / "out" / "b" / "error.txt").read_text()
    m = json.loads((tmp_path / "out" / "a" / "metrics.json").read_text())
    assert m["r"] == 0.5 and len(m["curve"]) == 120  # the run's metrics are kept whole
    prov = m["provenance"]
    assert prov["mode"] == "quick" and prov["command"] == "inflens reproduce all"
    assert prov["equivalent_command"].endswith("--quick") and prov["wall_seconds"] >= 0
    assert prov["machine"]["cpu_count"] >= 1 and prov["versions"]["numpy"]
    commit = prov["git"]["commit"]
    # resume: same commit and mode -> skipped; another mode or force -> run again
    calls.clear()
    res = ra.run_all(exps, cfg, log=lambda _: None)
    if commit is not None:
        assert res["a"]["status"] == "skipped" and ("a", True) not in calls
    assert ("b", True) in calls  # the failed one is retried
    calls.clear()
    full = ra.ReproduceAllConfig(tmp_path / "out", mode="full", only=("a",))
    assert ra.run_all(exps, full, log=lambda _: None)["a"]["status"] == "ran"
    assert calls == [("a", False)]
    # export: compact copies, only of finished runs
    written = ra.export(tmp_path / "out", tmp_path / "docs")
    assert [p.parent.name for p in written] == ["a"]
    small = json.loads(written[0].read_text())
    assert small["curve"]["list_length"] == 120 and small["curve"]["max"] == 119
    with pytest.raises(ra.InputError, match="unknown experiment"):
        ra.run_all(exps, ra.ReproduceAllConfig(tmp_path, only=("zz",)), log=lambda _: None)
    with pytest.raises(ra.InputError, match="mode"):
        ra.ReproduceAllConfig(tmp_path, mode="fast")


def test_reproduce_all_passes_fig5_max_targets_and_records_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from inflens.experiments import reproduce_all as ra
    from inflens.experiments.fig5 import Fig5Config

    seen: list[object] = []

    def run(data_dir, out, quick, progress, config=None):
        seen.append(config)
        return {"experiment": "fig5"}

    exps = {"fig5": SimpleNamespace(run=run)}
    cfg = ra.ReproduceAllConfig(tmp_path / "out", mode="full", fig5_max_targets=7)
    assert ra.run_all(exps, cfg, log=lambda _: None)["fig5"]["status"] == "ran"
    assert seen == [Fig5Config(max_targets=7)]
    prov = json.loads((tmp_path / "out" / "fig5" / "metrics.json").read_text())["provenance"]
    assert prov["options"] == {"max_targets": 7}
    assert prov["equivalent_command"].endswith("--max-targets 7")
    if prov["git"]["commit"] is not None:  # same options: skipped; other options: run again
        assert ra.run_all(exps, cfg, log=lambda _: None)["fig5"]["status"] == "skipped"
        other = ra.ReproduceAllConfig(tmp_path / "out", mode="full", fig5_max_targets=9)
        assert ra.run_all(exps, other, log=lambda _: None)["fig5"]["status"] == "ran"
        assert seen[-1] == Fig5Config(max_targets=9)
    with pytest.raises(ra.InputError, match="fig5_max_targets"):
        ra.ReproduceAllConfig(tmp_path, fig5_max_targets=0)


# ------------------------------------------------------------------ prose outside the table

# markers stand on lines of their own
CHECKED = re.compile(
    r"^<!--\s*checked:(?P<arg>[^\n]*?)-->\s*$(?P<body>.*?)^<!--\s*/checked\s*-->\s*$", re.S | re.M
)
UNCHECKED = re.compile(
    r"^<!--\s*unchecked:(?P<arg>[^\n]*?)-->\s*$(?P<body>.*?)^<!--\s*/unchecked\s*-->\s*$",
    re.S | re.M,
)
CODE = [re.compile(r"```.*?```", re.S), re.compile(r"`[^`\n]*`")]
TABLE = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
# what is not a quoted number: code, comments, link targets, anchors, and references to the
# paper's figures/sections/equations and to PROTOCOL.md sections
NOT_QUOTED = [
    re.compile(r"```.*?```", re.S),
    re.compile(r"`[^`\n]*`"),
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<a id=[^>]*>"),
    re.compile(r"\]\([^)]*\)"),
    re.compile(
        r"\b(?:Figs?\.?|Figures?|Sec\.|Sections?|PROTOCOL(?:\.md)?|Appendix|eqs?\.|issue)"
        r"\s*#?\d+(?:\.\d+)*(?:\s*(?:and|,|-|–|/)\s*\d+(?:\.\d+)*)*",
        re.I,
    ),
    re.compile(r"§\s*\d+(?:\.\d+)*"),
    re.compile(r"^#+ .*$", re.M),  # headings name a setting ("MNIST 1 vs 7"), quote no result
    re.compile(r"Koh (?:&|and) Liang,? \(?2017\)?"),
]
SECTIONS = ["fig1", "fig2-linear", "fig2-cnn", "fig3", "fig4", "fig5", "hospital", "fig6"]


def quoted_numbers(text: str) -> list[str]:
    """The numbers ``text`` quotes (booleans, code, links and references left out)."""
    for pattern in NOT_QUOTED:
        text = pattern.sub(" ", text)
    return [t for t in tokens(text) if t not in ("true", "false")]


def _numeric_leaves(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _numeric_leaves(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _numeric_leaves(x)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [obj]
    return []


def check_prose(text: str, docs: Path, where: str) -> list[str]:
    """Every problem with the numbers of ``text`` outside the results table (see the module
    docstring); empty when each is in a checked block and found there, or labelled unchecked."""
    problems = []
    for pattern in CODE:  # a marker quoted in code is not a marker
        text = pattern.sub(" ", text)
    for m in CHECKED.finditer(text):
        paths = [p.strip() for p in m["arg"].split(",") if p.strip()]
        values: list[float] = []
        for path in paths:
            file = docs / path
            if not file.is_file():
                problems.append(f"{where}: checked block names {path}, which does not exist")
                continue
            values += _numeric_leaves(json.loads(file.read_text()))
        if not paths:
            problems.append(f"{where}: checked block without a metrics file")
        if "checked:" in m["body"]:
            problems.append(f"{where}: nested labelled block inside a checked block")
        for tok in quoted_numbers(m["body"]):
            if not any(matches(tok, v) for v in values):
                problems.append(f"{where}: {tok} (checked block) is in none of {paths}")
    for m in UNCHECKED.finditer(text):
        if len(m["arg"].strip()) < 10:
            problems.append(f"{where}: unchecked block without a reason")
    rest = UNCHECKED.sub(" ", CHECKED.sub(" ", TABLE.sub(" ", text)))
    for marker in ("checked:", "/checked", "unchecked:", "/unchecked"):
        if marker in rest:
            problems.append(f"{where}: unbalanced {marker!r} marker")
    for line in rest.splitlines():
        nums = quoted_numbers(line)
        if nums:
            problems.append(f"{where}: unlabelled numbers {nums} in: {line.strip()[:100]}")
    return problems


def section_copies(text: str) -> dict[str, str]:
    """The per-experiment sections of docs/reproduction.md, figure links as in the section files."""
    out = {}
    anchors = [
        (text.index(f'<a id="{n}"></a>'), n) for n in SECTIONS if f'<a id="{n}"></a>' in text
    ]
    anchors.sort()
    for j, (start, name) in enumerate(anchors):
        end = anchors[j + 1][0] if j + 1 < len(anchors) else len(text)
        body = text[start:end].split("</a>", 1)[1].strip()
        out[name] = body.replace("](reproduction/figures/", "](figures/")
    return out


def test_reproduction_sections_are_the_section_files() -> None:
    copies = section_copies((DOCS / "reproduction.md").read_text())
    assert set(copies) == set(SECTIONS)
    for name, body in copies.items():
        assert body == (DOCS / "reproduction" / f"{name}.md").read_text().strip(), name


@pytest.mark.parametrize(
    "doc", ["reproduction.md", *[f"reproduction/{n}.md" for n in SECTIONS]], ids=str
)
def test_every_number_in_the_docs_is_checked_or_labelled_unchecked(doc: str) -> None:
    assert check_prose((DOCS / doc).read_text(), DOCS, doc) == []


def test_prose_checker_catches_wrong_unlabelled_and_unreasoned_numbers(tmp_path: Path) -> None:
    docs = _bad_docs(tmp_path)
    good = (
        "Intro, see Fig 2 and Sec. 5.2 and PROTOCOL 4.3 (Koh & Liang 2017), `run --steps 500`.\n"
        "<!-- checked: exp/metrics.json -->\nR was 0.734 on 11,894 points.\n<!-- /checked -->\n"
        "<!-- unchecked: older exploratory run, metrics not committed -->\nR 0.5\n"
        "<!-- /unchecked -->\n"
    )
    assert check_prose(good, docs, "d") == []
    cases = {
        "R was 0.735 here": "none of",  # wrong number in a checked block
        "R was 12 here": "none of",
    }
    for body, why in cases.items():
        text = f"<!-- checked: exp/metrics.json -->\n{body}\n<!-- /checked -->"
        problems = check_prose(text, docs, "d")
        assert len(problems) == 1 and why in problems[0], problems
    problems = check_prose(good + "and then R = 0.9 unlabelled\n", docs, "d")
    assert len(problems) == 1 and "unlabelled numbers ['0.9']" in problems[0], problems
    problems = check_prose("<!-- unchecked: x -->\n3\n<!-- /unchecked -->", docs, "d")
    assert problems == ["d: unchecked block without a reason"]
    problems = check_prose("<!-- checked: nope.json -->\n1\n<!-- /checked -->", docs, "d")
    assert any("does not exist" in p for p in problems)
    problems = check_prose("<!-- unchecked: a good reason here -->\n3\n", docs, "d")
    assert any("unbalanced" in p for p in problems) and any("['3']" in p for p in problems)
