"""Reports as blocks, rendered to Markdown and to one self-contained HTML page (shared by every command).

A report is a list of blocks: ``("h1"|"h2"|"p", text)``, ``("table", header, rows)`` or ``("img", file name,
alt text)``. The HTML page inlines its styles and embeds figures as base64 data URIs, so it is one file to send.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows) | ("img", file name, alt text)


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            out += [("# " if b[0] == "h1" else "## ") + b[1], ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "table":
            _, header, rows = b
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out.append("")
        elif b[0] == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(out)


def render_html(blocks: Sequence[Block], images: Mapping[str, bytes], title: str = "lowbit report") -> str:
    """One self-contained page: styles inline, figures as base64 data URIs."""
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{html.escape(b[1]).replace('`', '')}</p>")
        elif b[0] == "table":
            _, header, rows = b
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(images[b[1]]).decode("ascii")
            body.append(f'<img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


__all__ = ["Block", "render_html", "render_markdown"]
