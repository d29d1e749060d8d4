"""HTML pieces and number formatting of the report: text is escaped here, and nowhere else."""

from __future__ import annotations

import html
import math
import time
from typing import Any

CSS = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; } code { font-size: 0.92em; }
.missing { color: #a15c00; font-style: italic; } .bad { color: #b00020; } .good { color: #1b7a1b; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def missing_note(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """Header cells are text (escaped); row cells are HTML already. Numeric-looking cells align right."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if is_number(c) else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def key_value_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return False
    return True


def fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals; "–" for a missing or non-finite one."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return escape(str(value))
    if not math.isfinite(number):
        return "–"
    return f"{number:.{digits}f}"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def format_size(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes} B"
    exponent = min(int(math.log10(n_bytes)) // 3, 4)
    return f"{n_bytes / 1000**exponent:.1f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"


def format_utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
