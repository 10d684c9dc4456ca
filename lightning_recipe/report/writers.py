"""The report files of a fit: ``report.json``, ``report.md`` and ``report.html`` written from the findings."""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Optional

from lightning_recipe.findings import Finding, _fmt, _jsonable, status_counts
from lightning_recipe.report.html import render_html


def _environment() -> dict[str, Any]:
    import lightning
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
    }


def _write_reports(
    directory: str,
    findings: list[Finding],
    figures: list[str],
    meta: dict[str, Any],
) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and ``report.html`` under ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    meta = {**meta, "environment": _environment()}
    counts = status_counts(findings)
    paths = {
        "json": os.path.join(directory, "report.json"),
        "md": os.path.join(directory, "report.md"),
        "html": os.path.join(directory, "report.html"),
    }
    payload = {"summary": counts, "meta": meta, "findings": [f.to_dict() for f in findings], "figures": figures}
    with open(paths["json"], "w") as fh:
        json.dump(_jsonable(payload), fh, indent=2)
    with open(paths["md"], "w") as fh:
        fh.write(render_markdown(findings, figures, meta))
    with open(paths["html"], "w") as fh:
        fh.write(render_html(findings, figures, meta, directory))
    return paths


def _md(value: Any) -> str:
    """Text for the Markdown report with HTML made inert: Markdown renderers (TensorBoard's text tab, GitHub) pass raw
    HTML through, and messages quote user-chosen names (modules, dict keys, file names).

    Example::

        >>> _md("key <script>alert(1)</script> & a < b -> c")
        'key &lt;script>alert(1)&lt;/script> &amp; a &lt; b -> c'
    """
    return str(value).replace("&", "&amp;").replace("<", "&lt;")


def render_markdown(findings: list[Finding], figures: list[str], meta: Optional[dict[str, Any]] = None) -> str:
    """The findings as a Markdown report (a table, then each failure and warning in full, then each note).

    Args:
        findings: the findings to report.
        figures: paths of figure files, linked relative to the report.
        meta: run facts (seed, steps, environment) shown at the top.

    Example::

        >>> md = render_markdown([Finding("LossDecreaseCheck", "pass", "decreased")], [])
        >>> "| LossDecreaseCheck | pass |" in md
        True
    """
    meta = meta or {}
    counts = status_counts(findings)
    lines = ["# lightning_recipe report", ""]
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    lines.append("")
    for k, v in meta.items():
        lines.append(f"- **{_md(k)}**: {_md(v)}")
    lines += ["", "| check | status | measured | expected | step | message |", "| --- | --- | --- | --- | --- | --- |"]
    for f in findings:
        msg = f.message.splitlines()[0] if f.message else ""
        lines.append(
            f"| {_md(f.check)} | {_md(f.status)} | {_fmt(f.measured)} | {_fmt(f.expected)} | "
            f"{'' if f.step is None else f.step} | {_md(msg).replace('|', '/')} |"
        )
    for title, kinds in (("Failures and warnings", ("fail", "warn")), ("Notes", ("note",))):
        notable = [f for f in findings if f.status in kinds]
        if notable:
            lines += ["", f"## {title}", ""]
            for f in notable:
                lines += [f"### {_md(f.check)} ({_md(f.status)})", "", _md(f.message), ""]
                if f.causes:
                    lines += ["Likely causes:", ""] + [f"- {_md(c)}" for c in f.causes] + [""]
    if figures:
        lines += ["", "## Figures", ""]
        for p in figures:
            name = _md(os.path.basename(p))
            lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"
