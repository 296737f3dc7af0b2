"""The report as a document: a few block types in titled sections, rendered to Markdown and
to one self-contained HTML page.

The sections build blocks and know nothing of either format; ``write`` renders the same
sections twice.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass
class Text:
    text: str
    emphasis: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str  # relative to the run directory
    alt: str


@dataclass
class Code:
    text: str
    summary: str  # the HTML shows it collapsed under this line


Block = Text | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Markdown


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _markdown_block(block)
    return "\n".join(lines)


def _markdown_block(block: Block) -> list[str]:
    """The lines of one block, the blank line after it included."""
    if isinstance(block, Text):
        return [f"*{block.text}*" if block.emphasis else block.text, ""]
    if isinstance(block, Table):
        return ["| " + " | ".join(_md_cell(c) for c in block.header) + " |",
                "|" + "---|" * len(block.header),
                *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows),
                ""]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.path})", ""]
    return [f"<details><summary>{block.summary}</summary>", "", "```toml",
            block.text.rstrip(), "```", "", "</details>", ""]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# HTML


_MIME = {"png": "image/png", "gif": "image/gif", "jpg": "image/jpeg", "jpeg": "image/jpeg"}

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }
th { background: #f2f2f2; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
.missing { color: #a0522d; font-style: italic; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def render_html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    """One self-contained page: every picture inlined as a base64 data URI."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            part = _html_block(block, images)
            if part is not None:
                parts.append(part)
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(block: Block, images: dict[str, bytes]) -> str | None:
    """One block as HTML; None for a picture not in ``images``."""
    esc = html.escape
    if isinstance(block, Text):
        cls = " class='missing'" if block.emphasis else ""
        return f"<p{cls}>{_code_spans(esc(block.text))}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(c)}</th>" for c in block.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in block.rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    if isinstance(block, Image):
        data = images.get(block.path)
        if data is None:
            return None
        mime = _MIME.get(block.path.rsplit(".", 1)[-1].lower(), "image/png")
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        return f"<p><img src='{uri}' alt='{esc(block.alt)}' title='{esc(block.path)}'></p>"
    return (f"<details><summary>{esc(block.summary)}</summary>"
            f"<pre>{esc(block.text)}</pre></details>")


def _code_spans(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
