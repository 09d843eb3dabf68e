"""A self-contained HTML page (figures embedded as PNG, no scripts, no network).

Every user-supplied string (modality names, class names, run names, configuration values) goes
through :func:`html.escape`; nothing is inserted raw.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__

__all__ = ["Section", "Table", "Link", "render_page", "figure_to_data_uri"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}.verdict{background:#f4f7fb;border-left:4px solid #0173b2;padding:.8em 1em;margin:1em 0}
.verdict.warn{border-left-color:#de8f05;background:#fdf7ee}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0;display:inline-block;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.muted{color:#666;font-size:.9em}caption{caption-side:top;text-align:left;font-size:.9em;color:#444;
padding:.2em 0}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def figure_to_data_uri(fig, dpi: int = 110, close: bool = True) -> str:
    """PNG data URI of a matplotlib figure (closed unless ``close=False``)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Link:
    """A table cell that links ``href`` (escaped; only relative paths and http(s) URLs); a cell
    may also hold a list of links."""

    text: str
    href: str

    def render(self) -> str:
        href = self.href
        if ":" in href.split("/", 1)[0] and not href.startswith(("http://", "https://")):
            raise ValueError(f"Link: refusing href {href!r} (relative paths and http(s) only).")
        return f'<a href="{esc(href)}">{esc(self.text)}</a>'


@dataclass
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""

    def render(self) -> str:
        def cell(v):
            if isinstance(v, Link):
                return f"<td>{v.render()}</td>"
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, Link) for x in v):
                return "<td>" + ", ".join(x.render() for x in v) + "</td>"
            if isinstance(v, float):
                v = v + 0.0 if round(v, 3) else 0.0  # never "-0.000"
                return f'<td class="num">{v:.3f}</td>'
            if isinstance(v, int) and not isinstance(v, bool):
                return f'<td class="num">{v}</td>'
            return f"<td>{esc(v)}</td>"

        head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in self.rows)
        cap = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    """A heading with paragraphs, a highlighted verdict, tables, figures and a config block."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    verdict: str | None = None
    verdict_warn: bool = False
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (data URI, caption)
    config: dict | None = None

    def render(self) -> str:
        parts = [f"<h2>{esc(self.title)}</h2>"]
        if self.verdict:
            cls = "verdict warn" if self.verdict_warn else "verdict"
            lines = "<br>".join(esc(line) for line in self.verdict.splitlines())
            parts.append(f'<div class="{cls}">{lines}</div>')
        parts += [f"<p>{esc(p)}</p>" for p in self.paragraphs]
        parts += [t.render() for t in self.tables]
        for uri, caption in self.figures:
            if not uri.startswith("data:image/png;base64,"):
                raise ValueError("figures must be embedded PNG data URIs.")
            parts.append(f'<figure><img src="{uri}" alt="{esc(caption)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        if self.config is not None:
            parts.append("<details><summary>Configuration</summary><pre>"
                         f"{esc(json.dumps(self.config, indent=2, default=str))}</pre></details>")
        return "\n".join(parts)


def render_page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    sub = f'<p class="muted">{esc(subtitle)}</p>' if subtitle else ""
    body = "\n".join(s.render() for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1>{sub}{body}"
            f'<p class="muted">Generated by modaldiag {esc(__version__)}.</p></body></html>\n')
