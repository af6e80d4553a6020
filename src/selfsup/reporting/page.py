"""The HTML page: one self-contained file (CSS inline, pictures as data URIs, no script, no
network), runs side by side at 1280 px and stacked on a phone."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from matplotlib.figure import Figure

CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;
background:#fafafa}
main{max-width:1400px;margin:0 auto;padding:12px}
h1{font-size:1.5em;margin:.4em 0}
h2{font-size:1.2em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:.2em 0 .4em;overflow-wrap:anywhere}
p,li,figcaption{overflow-wrap:anywhere}
.row{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,380px),1fr));gap:12px}
.cell{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:10px;min-width:0}
img{max-width:100%;height:auto;display:block;margin:4px 0}
figure{display:inline-block;vertical-align:top;width:min(100%,580px);margin:0 8px 8px 0}
.scroll{overflow-x:auto;max-width:100%;background:
linear-gradient(90deg,#fff 30%,#fff0) 0 0/2em 100% no-repeat local,
linear-gradient(270deg,#fff 30%,#fff0) 100% 0/2em 100% no-repeat local,
radial-gradient(farthest-side at 0 50%,#0004,#0000) 0 0/.9em 100% no-repeat scroll,
radial-gradient(farthest-side at 100% 50%,#0004,#0000) 100% 0/.9em 100% no-repeat scroll;
background-color:#fff}
.hint{display:none;color:#8a5300}
@media (max-width:700px){.hint{display:inline}}
table{border-collapse:collapse;font-size:.9em;margin:4px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right;vertical-align:top;
overflow-wrap:break-word}
td{max-width:40em}
th:first-child,td:first-child{text-align:left}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f4f4f4;padding:6px;font-size:.85em;
margin:4px 0;max-height:28em;overflow-y:auto}
.note{color:#8a5300;background:#fff6e5;border-left:3px solid #f0a000;padding:4px 8px;margin:4px 0}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;list-style:none;padding:0;margin:4px 0;
font-size:.9em}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:50%;margin-right:4px;
vertical-align:-.1em}
figcaption{font-size:.85em;color:#555}
"""


@dataclass
class Section:
    """One section of one run: a title, its HTML, and an optional note of what is missing."""

    key: str
    title: str
    body: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunPage:
    """What the page shows of one run."""

    name: str
    kind: str  # "image", "language" or "unknown"
    sections: list[Section] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (a tight box, unless the figure has its own layout)."""
    buf = io.BytesIO()
    tight = fig.get_layout_engine() is not None or not getattr(fig, "grid", False)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def img(data: bytes, alt: str, *, caption: str = "", min_width: int | None = None) -> str:
    """A figure: an <img> holding the PNG bytes as a data URI, and its caption. `min_width`:
    never shown narrower (px; its labels stay legible): on a narrow screen it scrolls sideways,
    and the caption says so."""
    if min_width is None:
        tag = f'<img src="{png_uri(data)}" alt="{esc(alt)}">'
        return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>"
    tag = f'<img src="{png_uri(data)}" alt="{esc(alt)}" style="min-width:{min_width}px">'
    hint = '<span class="hint">(scroll the picture sideways) </span>'
    return (
        f'<figure style="width:min(100%,{max(580, min_width)}px)"><div class="scroll">{tag}'
        f"</div><figcaption>{hint}{esc(caption)}</figcaption></figure>"
    )


def fig_img(fig: Figure, alt: str, caption: str = "") -> str:
    return img(figure_png(fig), alt, caption=caption)


def table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """An HTML table in a container that scrolls sideways on a narrow screen, a shadow at the
    edge that hides more columns."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def legend(items: Sequence[tuple[str, str]]) -> str:
    """A colour legend: (label, CSS colour) pairs."""
    lis = "".join(
        f'<li><span class="swatch" style="background:{esc(c)}"></span>{esc(label)}</li>'
        for label, c in items
    )
    return f'<ul class="legend">{lis}</ul>'


def render(pages: Sequence[RunPage], title: str, summary: str = "") -> str:
    """The whole page: a summary, then each section with the runs side by side."""
    keys: dict[str, str] = {}
    for page in pages:
        for s in page.sections:
            keys.setdefault(s.key, s.title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        summary,
    ]
    missing = [p for p in pages if p.missing]
    if missing:
        items = "".join(
            f"<li><b>{esc(p.name)}</b>: {esc('; '.join(p.missing))}</li>" for p in missing
        )
        parts.append(f'<div class="note"><b>Not in the run folder (yet):</b><ul>{items}</ul></div>')
    for key, section_title in keys.items():
        parts.append(f'<section id="{esc(key)}"><h2>{esc(section_title)}</h2><div class="row">')
        for page in pages:
            s = next((s for s in page.sections if s.key == key), None)
            inner = (
                s.body + "".join(note(n) for n in s.notes)
                if s is not None
                else note("not in this run")
            )
            parts.append(f'<div class="cell"><h3>{esc(page.name)}</h3>{inner}</div>')
        parts.append("</div></section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
