"""report.html: one self-contained page with every finding and the figures inlined, checked in headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer

from lightning_recipe.report.html import render_html
from lightning_recipe.findings import Finding, collect_findings
from lightning_recipe.report.writers import render_markdown
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A fit whose learning rate is far too high: failures, warnings and passes, and two figures."""
    root = tmp_path_factory.mktemp("report")
    x, y = blobs(n=1536)
    callbacks = [InitialLossCheck(on_fail="warn"),
                 LossDecreaseCheck(on_fail="warn", warmup_steps=20, check_every_n_steps=16),
                 PredictionDynamics(every_n_steps=2, on_fail="warn")]
    tr = trainer(root, callbacks, max_epochs=1)
    torch.manual_seed(1)
    model = TinyModel(lr=6.0, optimizer="sgd")
    with pytest.warns(UserWarning):
        tr.fit(model, loader(x, y))
    directory = os.path.join(root, "recipe")
    with open(os.path.join(directory, "report.html")) as fh:
        page = fh.read()
    return {"dir": directory, "html": page, "findings": collect_findings(tr),
            "figures": [p for cb in callbacks for p in cb.figures]}


def test_report_html_is_self_contained_and_shows_every_finding(report):
    page, findings = report["html"], report["findings"]
    assert {f.status for f in findings} >= {"warn", "pass"}
    assert [os.path.basename(p) for p in report["figures"]] == ["loss_curve.png", "prediction_dynamics.png"]
    # nothing external: every image is an inline PNG, no script, no link
    sources = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for src, path in zip(sources, report["figures"]):
        with open(path, "rb") as fh:
            assert base64.b64decode(src.split(",", 1)[1]) == fh.read()
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    rows = re.findall(r"<tr class='finding (\w+)'>(.*?)</tr>", page, flags=re.S)
    assert len(rows) == len(findings)
    for f in findings:
        row = next(r for s, r in rows if s == f.status and html.escape(f.message) in r)
        assert f"<td>{html.escape(f.check)}</td>" in row and f"<td class='status'>{f.status}</td>" in row
        for cause in f.causes:
            assert f"<li>{html.escape(cause)}</li>" in row
    statuses = [s for s, _ in rows]
    assert statuses == sorted(statuses, key=["fail", "warn", "note", "pass", "skip"].index)  # worst first
    assert "note" in statuses  # the thrash of lr=6: a note, between the warnings and the passes
    counts = {s: sum(f.status == s for f in findings) for s in ("fail", "warn", "note", "pass", "skip")}
    for s, n in counts.items():
        assert f"<span class='{s}'>{n} {s}</span>" in page
    assert ".note{background:" in page  # its own colour


def test_a_note_is_in_report_json_and_md_and_never_warns(report):
    """The thrash of a far too high learning rate is a note: listed, counted and shown, but never a warning."""
    payload = json.loads(open(os.path.join(report["dir"], "report.json")).read())
    notes = [f for f in payload["findings"] if f["status"] == "note"]
    assert [f["check"] for f in notes] == ["PredictionDynamics.jitter"] and "THRASH" in notes[0]["message"]
    assert list(payload["summary"]) == ["fail", "warn", "note", "pass", "skip"] and payload["summary"]["note"] == 1
    assert notes[0]["measured"] > notes[0]["expected"]  # the index above the threshold
    md = open(os.path.join(report["dir"], "report.md")).read()
    assert "| PredictionDynamics.jitter | note |" in md and "## Notes" in md
    assert "### PredictionDynamics.jitter (note)" in md and ", 1 note, " in md.splitlines()[2]
    assert [f.check for f in report["findings"] if f.status == "note"] == ["PredictionDynamics.jitter"]


def test_render_markdown_and_html_give_a_note_its_own_label():
    findings = [Finding("A", "warn", "look"), Finding("B", "note", "FYI"), Finding("C", "pass", "fine")]
    md = render_markdown(findings, [])
    assert md.splitlines()[2] == "0 fail, 1 warn, 1 note, 1 pass, 0 skip"
    assert md.index("## Failures and warnings") < md.index("### A (warn)") < md.index("## Notes") < md.index(
        "### B (note)")
    page = render_html(findings, [], {}, ".")
    assert "<span class='note'>1 note</span>" in page and "<td class='status'>note</td>" in page
    rows = re.findall(r"<tr class='finding (\w+)'>", page)
    assert rows == ["warn", "note", "pass"]


def test_render_html_escapes_and_reports_missing_figures(tmp_path):
    f = Finding("X<script>", "fail", "a < b & c", 1.5, 2.0, 3, ["cause <1>"], {"ratio": float("inf")})
    page = render_html([f], [str(tmp_path / "gone.png")], {"seed": 0}, str(tmp_path))
    assert "X&lt;script&gt;" in page and "a &lt; b &amp; c" in page and "<li>cause &lt;1&gt;</li>" in page
    assert "missing figure gone.png" in page and "&quot;ratio&quot;: &quot;inf&quot;" in page


_PROBE = """<script>window.addEventListener('load', () => {
  const pre = document.createElement('pre'); pre.id = 'probe';
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  pre.textContent = JSON.stringify({images: images, text: document.body.innerText});
  document.body.appendChild(pre);
});</script>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from matplotlib.image import imread

    # the page as a browser shows it: every finding's text visible, every image decoded
    probed = tmp_path / "probed.html"
    probed.write_text(report["html"].replace("</body>", _PROBE + "</body>"))
    done = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", done.stdout, flags=re.S)
    assert match, done.stderr[-2000:]
    probe = json.loads(html.unescape(match.group(1)))
    assert [img[:1] for img in probe["images"]] == [[True], [True]]
    assert [tuple(img[1:]) for img in probe["images"]] == [(1200, 420), (1200, 450)]  # decoded at full size
    text = probe["text"]
    for f in report["findings"]:
        assert f.check in text and f.message.splitlines()[0] in text
        assert all(c in text for c in f.causes)

    # the screenshot of the real file is not blank: coloured figure pixels and the status colours
    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}",
              "file://" + os.path.join(report["dir"], "report.html"))
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    not_white = (pixels < 0.95).any(-1)
    assert not_white.mean() > 0.05
    colours = np.unique((pixels[not_white] * 255).astype(np.uint8), axis=0)
    assert len(colours) > 200  # figures (lines, heatmap, colour bar) are drawn, not only text
    warn_bg = np.array([0xFF, 0xF3, 0xCD]) / 255
    assert (np.abs(pixels - warn_bg).max(-1) < 0.01).sum() > 1000  # a highlighted warning row
