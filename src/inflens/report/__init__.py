"""Static HTML reports of influence explanations (Jinja2 templates, no server, no JS framework)."""

from __future__ import annotations

from .render import (
    SIGN_SENTENCE,
    Certificate,
    Example,
    Explanation,
    ReportInfo,
    Scored,
    format_number,
    image_data_uri,
    render_report,
)

__all__ = [
    "SIGN_SENTENCE",
    "Certificate",
    "Example",
    "Explanation",
    "ReportInfo",
    "Scored",
    "format_number",
    "image_data_uri",
    "render_report",
]
