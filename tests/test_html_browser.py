"""The HTML report in a real browser: headless Chromium loads it from disk and every image decodes.

An inline script (added to a copy of the page) waits for the load event, then writes one record
per <img> (complete, naturalWidth, naturalHeight) into a <pre> element; ``--dump-dom`` prints
the resulting DOM, which the test parses. Skipped when no Chromium is installed
(Debian/Ubuntu: ``apt-get install -y chromium``).
"""
import json
import re
import shutil
import subprocess

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="headless browser test needs Chromium on PATH (apt-get install -y chromium)"
)

PROBE = """<script>
window.addEventListener("load", () => {
  const rows = Array.from(document.images).map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight }));
  const pre = document.createElement("pre");
  pre.id = "image-check";
  pre.textContent = JSON.stringify(rows);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from attnprobe import analyze
    from attnprobe.html import write_html_report
    from attnprobe.plots import plot_all
    from attnprobe.core.registry import load_pipeline

    run = tmp_path_factory.mktemp("run")
    pipe, spec = load_pipeline("tiny-pixart")
    report = analyze(pipe, ["a photo of a cat", "a <i>red</i> rocket"], steps=1, image_dir=run / "images",
                     model_info={"alias": spec.alias})
    report.save(run / "erf.json")
    plot_all(report, run / "figures", images_dir=run / "images", formats=("png",), dpi=60)
    return write_html_report(run)


def test_every_image_renders_in_chromium(page, tmp_path):
    html = page.read_text(encoding="utf-8")
    expected = html.count("<img ")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="image-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the probe script did not run; chromium stderr: {proc.stderr[-1000:]}"
    rows = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert len(rows) == expected == 6 + 2  # six figures and two generated images
    broken = [r["alt"] for r in rows if not (r["complete"] and r["width"] > 0 and r["height"] > 0)]
    assert not broken, f"images that did not render: {broken}"
    # the escaped prompt is text in the rendered page, not an <i> element
    assert "a &lt;i&gt;red&lt;/i&gt; rocket" in proc.stdout
