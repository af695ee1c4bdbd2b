"""Assemble docs/reproduction.md: its own header (up to the contents line), then the
per-experiment sections in docs/reproduction/*.md."""

from __future__ import annotations

from pathlib import Path

ORDER = ["fig1", "fig2-linear", "fig2-cnn", "fig3", "fig4", "fig5", "hospital", "fig6"]


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "docs"
    # the header (introduction and results table) is edited in reproduction.md itself and kept
    old = (root / "reproduction.md").read_text()
    parts = [old[: old.index("Contents: [results]")].rstrip("\n") + "\n"]
    found = {p.stem: p for p in (root / "reproduction").glob("*.md")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    contents = ", ".join(f"[{n}](#{n})" for n in ["results", *names])
    parts.append("Contents: " + contents + "\n")
    for name in names:
        text = found[name].read_text()
        # section files reference figures relative to docs/reproduction/
        text = text.replace("](figures/", "](reproduction/figures/")
        parts.append(f'\n<a id="{name}"></a>\n\n' + text.strip() + "\n")
    (root / "reproduction.md").write_text("\n".join(parts))
    print(f"wrote {root / 'reproduction.md'} with {len(names)} sections: {', '.join(names)}")


if __name__ == "__main__":
    main()
