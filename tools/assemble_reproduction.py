"""Assemble docs/reproduction.md from the per-experiment sections in docs/reproduction/*.md."""

from __future__ import annotations

from pathlib import Path

ORDER = ["fig1", "fig2-linear", "fig2-cnn", "fig3", "fig4", "fig5", "hospital", "fig6"]
HEADER = """# Reproducing Koh & Liang (2017) with inflens

Every number below was measured on this project's 2-core development machine with the command
given in its section; the paper's values (and the original release notebooks', from
`../shared/paper/PROTOCOL.md`) stand beside them. Figures are in `docs/reproduction/figures/`.
Each experiment also has a `--quick` variant (a subsample, under a minute) that CI runs.

"""


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "docs"
    parts = [HEADER]
    found = {p.stem: p for p in (root / "reproduction").glob("*.md")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    parts.append("Contents: " + ", ".join(f"[{n}](#{n})" for n in names) + "\n")
    for name in names:
        text = found[name].read_text()
        # section files reference figures relative to docs/reproduction/
        text = text.replace("](figures/", "](reproduction/figures/")
        parts.append(f'\n<a id="{name}"></a>\n\n' + text.strip() + "\n")
    (root / "reproduction.md").write_text("\n".join(parts))
    print(f"wrote {root / 'reproduction.md'} with {len(names)} sections: {', '.join(names)}")


if __name__ == "__main__":
    main()
