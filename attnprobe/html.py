"""One self-contained HTML page per run: ``write_html_report(run_dir)`` → ``run_dir/report.html``.

The page holds the run's model and settings, the per-layer table (label, grid, ERF, raw ERF,
kernel size, bias share, sinks), every figure in ``run_dir/figures`` (drawn first with
:func:`attnprobe.plots.plot_all` when some are missing) and the generated images. Images are
embedded as base64 ``data:`` URIs and the style sheet is inline, so the file opens in a browser
from disk, can be mailed or attached, and needs no server. All text that comes from the user or
the run (prompts, model names, settings) is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import json
import os

from pathlib import Path

from attnprobe.core.outputs import atomic_write_text
from attnprobe.report import Report, ReportError, load_report

__all__ = ["write_html_report", "render_html"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1500px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .25em .8em; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.sink td { background: #fff2ee; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; margin-top: .3em; }
.images { display: flex; flex-wrap: wrap; gap: 1em; }
.images figure { margin: 0; width: 256px; } .images img { width: 256px; image-rendering: auto; }
.muted { color: #666; } code { background: #f4f4f4; padding: 0 .25em; border-radius: 3px; }
"""

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"

def _e(value) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)

def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "–" if value is None else str(value)

def _figure_paths(report: Report, run_dir: Path, make_missing: bool) -> list[Path]:
    """The run's figure PNGs in the documented order; draws them first when some are missing."""
    from attnprobe.plots import FIGURES, plot_all

    fig_dir = run_dir / "figures"
    expected = [s for s in FIGURES if s != "gradient_erf"]  # the gradient figure needs a student model
    if make_missing and not all((fig_dir / f"{s}.png").is_file() for s in expected):
        plot_all(report, fig_dir, images_dir=run_dir / "images")
    if not fig_dir.is_dir():
        return []
    pngs = {p.stem: p for p in fig_dir.glob("*.png")}
    ordered = [pngs.pop(s) for s in FIGURES if s in pngs]
    return ordered + [pngs[k] for k in sorted(pngs)]

def _settings_rows(report: Report) -> list[tuple[str, str]]:
    m, s, r = report.model, report.settings, report.run
    rows = [
        ("model", m.get("alias") or "–"),
        ("source", m.get("source") or "–"),
        ("pipeline / denoiser", f"{m.get('pipeline', '?')} / {m.get('denoiser', '?')} ({m.get('family', m.get('arch', '?'))})"),
        ("config hash", m.get("config_hash", "–")),
    ]
    skip = {"prompts", "seeds"}
    rows += [(key, _fmt(value)) for key, value in s.items() if key not in skip]
    if "merged" in r:
        rows.append(("run", f"merged from {len(r['merged'])} reports"))
    else:
        rows += [(f"run {key}", _fmt(value)) for key, value in r.items()]
    return rows

def render_html(report: Report, figures: list[Path], images: list[tuple[Path, str]], title: str | None = None) -> str:
    """The page as a string: ``figures`` (PNG paths) and ``images`` ((path, caption)) are embedded."""
    from attnprobe.plots import FIGURES, forward_order

    alias = report.model.get("alias") or report.model.get("denoiser") or "model"
    h, w = report.settings.get("resolution", ["?", "?"])
    title = title or f"attnprobe report — {alias} @ {h}×{w}"
    tau = report.settings.get("threshold", 0.8)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{len(report.layers)} self-attention layers; ERF = smallest odd kernel size K whose '
        f"high-passed attention score mass reaches τ = {_e(tau)}. {_e(_highpass_note(report))} "
        f"Aggregation {_e(report.settings.get('aggregate', 'per-map'))}, {_e(report.settings.get('border', 'circular'))} "
        "border; 90% CI: bootstrap over prompts; margin: ASM distance from flipping the ERF "
        "(see docs/statistics.md).</p>",
        '<h2 id="layers">Layers</h2>',
        "<table>",
        "<thead><tr><th>layer</th><th>module</th><th class=\"num\">grid</th><th class=\"num\">heads</th>"
        "<th class=\"num\">ERF</th><th class=\"num\">90% CI</th><th class=\"num\">margin</th><th class=\"num\">ERF raw</th><th class=\"num\">kernel</th>"
        "<th class=\"num\">bias share</th><th>sinks</th></tr></thead>",
        "<tbody>",
    ]
    for layer in forward_order(report):
        gh, gw = layer.grid
        sinks = (f"{len(layer.sink_keys)} key(s), {layer.sink_share:.1%} of mass" if layer.has_sink else "–")
        row_class = ' class="sink"' if layer.has_sink else ""
        out.append(
            f'<tr{row_class}><td>{_e(layer.label)}</td><td><code>{_e(layer.name)}</code></td>'
            f'<td class="num">{gh}×{gw}</td><td class="num">{layer.heads}</td><td class="num">{"global" if layer.is_global else layer.erf}</td>'
            f'<td class="num">{_e(_interval(layer))}</td><td class="num">{_e(_num(layer.asm_margin, 3))}</td>'
            f'<td class="num">{layer.erf_unfiltered}</td><td class="num">{layer.kernel_size}</td>'
            f'<td class="num">{_e(_num(layer.bias_share, 2))}</td><td>{_e(sinks)}</td></tr>'
        )
    out += ["</tbody>", "</table>", '<h2 id="figures">Figures</h2>']
    if not figures:
        out.append('<p class="muted">No figures.</p>')
    for path in figures:
        caption = FIGURES.get(path.stem, path.stem.replace("_", " "))
        out.append(
            f'<figure id="fig-{_e(path.stem)}"><img src="{_data_uri(path)}" alt="{_e(caption)}">'
            f'<figcaption>{_e(caption)} <span class="muted">({_e(path.name)})</span></figcaption></figure>'
        )
    out.append('<h2 id="images">Generated images</h2>')
    if images:
        out.append('<div class="images">')
        for path, caption in images:
            out.append(
                f'<figure><img src="{_data_uri(path)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
            )
        out.append("</div>")
    else:
        out.append('<p class="muted">No generated images in this run folder.</p>')
    out += ['<h2 id="prompts">Prompts</h2>', "<ol>"]
    seeds = report.settings.get("seeds") or []
    for i, prompt in enumerate(report.settings.get("prompts", [])):
        seed = f' <span class="muted">(seed {_e(seeds[i])})</span>' if i < len(seeds) else ""
        out.append(f"<li>{_e(prompt)}{seed}</li>")
    out += ["</ol>", '<h2 id="settings">Settings</h2>', "<table>", "<tbody>"]
    for key, value in _settings_rows(report):
        out.append(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>")
    out += ["</tbody>", "</table>", "</body>", "</html>", ""]
    return "\n".join(out)

def _highpass_note(report: Report) -> str:
    kind = "positive part" if report.settings.get("highpass_mass", "positive") == "positive" else "absolute value"
    return (f"The high-pass is a Butterworth filter (D0 = {report.settings.get('cutoff')}, n = {report.settings.get('order')}); "
            f"its output sums to ~0, so ASM is taken over its {kind}.")

def write_html_report(run_dir, *, make_figures: bool = True, output: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``output``) for the run in ``run_dir``; returns its path.

    ``run_dir`` holds ``erf.json`` (and usually ``images/`` and ``figures/``). Figures that are
    missing are drawn first unless ``make_figures`` is False. Raises ReportError for a bad report.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    report = load_report(run_dir / "erf.json")
    prompts = report.settings.get("prompts", [])
    images = []
    image_dir = (run_dir / "images").resolve()
    for i, name in enumerate(report.images):
        path = (image_dir / str(name)).resolve()
        if not path.is_relative_to(image_dir) or path.suffix.lower() not in _MIME:
            raise ReportError(f"erf.json names image {str(name)!r}, which is not an image file inside {image_dir}; "
                              "refusing to embed it")
        if path.is_file():
            images.append((path, f"{i + 1}. {prompts[i]}" if i < len(prompts) else name))
    figures = _figure_paths(report, run_dir, make_figures)
    page = render_html(report, figures, images)
    target = Path(output) if output is not None else run_dir / "report.html"
    atomic_write_text(target, page)
    return target


def _interval(layer) -> str:
    iv = layer.erf_interval
    return f"{iv[0]}–{iv[1]}" if iv else "–"


def _num(value: float, digits: int) -> str:
    return "–" if value != value else f"{value:.{digits}f}"
