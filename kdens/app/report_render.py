"""The experiment report's document model and its two renderings: Markdown and one HTML file.

``kdens.app.report`` builds a list of :class:`Section` objects from the run folders; this
module turns that same structure into ``report.md`` (images linked relatively) or a
self-contained ``report.html`` (images embedded as base64 data URIs, inline CSS, no
script and no reference to any other file). Neither rendering parses the other.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Para:
    """A paragraph of plain text (no markup: both renderers escape what they must)."""

    text: str


@dataclass
class Table:
    """Rows of cells under a header; ``note`` is a line of plain text under the table."""

    headers: list[str]
    rows: list[list[str]]
    note: str | None = None


@dataclass
class Image:
    """A PNG under the experiment folder, given relative to it (``report/curves.png``)."""

    path: str
    caption: str


@dataclass
class Code:
    """Preformatted text (a config, an error message)."""

    text: str
    lang: str = ""


@dataclass
class Gallery:
    """Several images meant to sit side by side (the confusion matrices)."""

    images: list[Image]


Block = Para | Table | Image | Code | Gallery


@dataclass
class Section:
    """A titled part of the report (rendered as a level-2 heading)."""

    title: str
    blocks: list[Block] = field(default_factory=list)


# ---------------------------------------------------------------- Markdown

def _md_cell(text: str) -> str:
    # a pipe ends a cell and a newline ends a row: neither may survive inside one
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
             "|" + "|".join("---" for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines)


def _md_image(im: Image) -> str:
    alt = im.caption.replace("]", ")").replace("[", "(")
    return f"![{alt}]({im.path})\n\n*{im.caption}*"


def _md_code(c: Code) -> str:
    fence = "````" if "```" in c.text else "```"
    return f"{fence}{c.lang}\n{c.text.rstrip()}\n{fence}"


def _md_block(b: Block) -> str:
    if isinstance(b, Para):
        return b.text
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Image):
        return _md_image(b)
    if isinstance(b, Gallery):
        return "\n\n".join(_md_image(im) for im in b.images)
    return _md_code(b)


def to_markdown(title: str, sections: list[Section]) -> str:
    """The report as GitHub-flavoured Markdown; image links are relative to the experiment folder."""
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [_md_block(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8em;overflow:auto;font-size:.85em}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{flex:0 1 560px}
p.note{font-size:.85em;color:#555}
""".strip()


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(root: Path, rel: str) -> str:
    data = (Path(root) / rel).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_image(root: Path, im: Image) -> str:
    return (f'<figure><img alt="{_esc(im.caption)}" src="{_data_uri(root, im.path)}">'
            f"<figcaption>{_esc(im.caption)}</figcaption></figure>")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{_esc(t.note)}</p>' if t.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _html_block(root: Path, b: Block) -> str:
    if isinstance(b, Para):
        return f"<p>{_esc(b.text)}</p>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Image):
        return _html_image(root, b)
    if isinstance(b, Gallery):
        return '<div class="gallery">' + "".join(_html_image(root, im) for im in b.images) + "</div>"
    return f"<pre><code>{_esc(b.text.rstrip())}</code></pre>"


def to_html(title: str, sections: list[Section], root: Path) -> str:
    """The report as one HTML page with every image inlined from ``root`` (the experiment folder)."""
    body = [f"<h1>{_esc(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{_esc(s.title)}</h2>")
        body += [_html_block(root, b) for b in s.blocks]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
