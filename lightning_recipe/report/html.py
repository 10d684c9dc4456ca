"""A self-contained HTML report: every finding with its numbers and causes, figures inlined.

One file, no script, no external resource: figures are inlined as base64 PNGs, the style sheet is inline, so the
page reads offline in any browser (and survives being mailed or attached to an issue).
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_recipe.findings import Finding

_ORDER = ("fail", "warn", "note", "pass", "skip")  # worst first, as `findings.STATUSES`

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}.summary span{display:inline-block;padding:.2em .7em;margin-right:.4em;border-radius:1em;font-weight:bold}
table{border-collapse:collapse;width:100%;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{font-family:ui-monospace,monospace;white-space:nowrap}
.fail{background:#fdd}.warn{background:#fff3cd}.note{background:#e3effb}.pass{background:#e7f6e7}.skip{background:#eee}
.status{font-weight:bold;text-transform:uppercase}pre{white-space:pre-wrap;margin:0;font-family:inherit}
ul.causes{margin:.3em 0 0 1.2em;padding:0}details{margin-top:.3em;font-size:.9em}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em}
.meta{color:#555;font-size:.9em}
"""


def _img_tag(path: str) -> str:
    name = html.escape(os.path.basename(path))
    try:
        with open(path, "rb") as fh:
            data = base64.b64encode(fh.read()).decode()
    except OSError:
        return f"<p class='missing'>missing figure {name}</p>"
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def _details(details: dict[str, Any]) -> str:
    if not details:
        return ""
    from lightning_recipe.findings import _jsonable

    try:
        text = json.dumps(_jsonable(details), indent=1)
    except (TypeError, ValueError):  # pragma: no cover - _jsonable makes everything serialisable
        text = str(details)
    return f"<details><summary>numbers</summary><pre class='num'>{html.escape(text)}</pre></details>"


def render_html(findings: list["Finding"], figures: list[str], meta: dict[str, Any], directory: str) -> str:
    """Render the report as one HTML page with the figures inlined as base64 PNGs.

    Args:
        findings: every finding, in callback order (shown worst first: fail, warn, note, pass, skip).
        figures: PNG paths (absolute, or relative to ``directory``); each is shown once.
        meta: run facts shown at the top.
        directory: where relative figure paths live.

    Returns:
        The page.

    Example::

        >>> from lightning_recipe.findings import Finding
        >>> finding = Finding("LossDecreaseCheck", "fail", "flat", 2.3, 1.0, 100, ["lr too low"])
        >>> page = render_html([finding], [], {}, ".")
        >>> "<td class='status'>fail</td>" in page and "lr too low" in page
        True
    """
    from lightning_recipe.findings import _fmt

    counts = {s: sum(f.status == s for f in findings) for s in _ORDER}
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<meta name='viewport' content='width=device-width, initial-scale=1'>",
           "<title>lightning_recipe report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>lightning_recipe report</h1>", "<p class='summary'>"]
    out += [f"<span class='{s}'>{n} {s}</span>" for s, n in counts.items()]
    out.append("</p><ul class='meta'>")
    out += [f"<li><b>{html.escape(str(k))}</b>: {html.escape(_meta_value(v))}</li>" for k, v in meta.items()]
    out.append("</ul><h2>Findings</h2><table id='findings'><tr><th>check</th><th>status</th><th>measured</th>"
               "<th>expected</th><th>step</th><th>message and likely causes</th></tr>")
    rank = {s: i for i, s in enumerate(_ORDER)}
    for f in sorted(findings, key=lambda f: rank.get(f.status, len(_ORDER))):  # stable: callback order within a status
        causes = "".join(f"<li>{html.escape(c)}</li>" for c in f.causes)
        out.append(
            f"<tr class='finding {html.escape(f.status)}'><td>{html.escape(f.check)}</td>"
            f"<td class='status'>{html.escape(f.status)}</td><td class='num'>{html.escape(_fmt(f.measured))}</td>"
            f"<td class='num'>{html.escape(_fmt(f.expected))}</td>"
            f"<td class='num'>{'' if f.step is None else f.step}</td>"
            f"<td><pre>{html.escape(f.message)}</pre>"
            + (f"<b>Likely causes:</b><ul class='causes'>{causes}</ul>" if causes else "")
            + _details(f.details) + "</td></tr>"
        )
    out.append("</table>")
    if not findings:
        out.append("<p>No findings: no recipe check ran to a conclusion.</p>")
    shown: list[str] = []
    for p in figures:
        full = _resolve(p, directory)
        if full not in shown:
            shown.append(full)
    if shown:
        out.append("<h2>Figures</h2>")
        out += [_img_tag(p) for p in shown]
    out.append("</body></html>")
    return "\n".join(out)


def _resolve(path: str, directory: str) -> str:
    """A figure's file: absolute as given; relative to ``directory`` (``"loss.png"``), unless it already names a file
    from the working directory (``"logs/version_0/recipe/loss.png"``, what a relative log folder gives): never
    joined twice.

    Example::

        >>> _resolve("/a/b.png", "/c")
        '/a/b.png'
        >>> _resolve("b.png", "/c")
        '/c/b.png'
    """
    if os.path.isabs(path) or "://" in path:
        return path
    joined = os.path.join(directory, path)
    if not os.path.exists(joined) and os.path.exists(path):
        return os.path.abspath(path)
    return joined


def _meta_value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {w}" for k, w in v.items())
    return str(v)
