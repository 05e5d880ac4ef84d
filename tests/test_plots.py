"""Figures, the HTML report and the plot/report CLI on a tiny-PixArt run (random weights).

Every plot function is drawn once into a shared run folder (module fixture); the tests then
check its files: a non-empty PNG whose pixel size is the figure's size × dpi (read back from
the SVG's size in points), a parseable SVG, titles present. A synthetic report with two grid
sizes, varying head counts and a planted attention sink covers the UNet/sink code paths.
"""
import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnprobe import plots
from attnprobe.report import LayerResult, Report, load_report
from figcheck import check_figure, png_size

from figcheck import DPI  # noqa: E402  (smaller than the default: faster, same code paths)
PROMPTS = ["a photo of a cat", 'a red <b>rocket</b> & "moon"']  # markup must come out escaped
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `attnprobe analyze` leaves it: erf.json + images/."""
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline

    run = tmp_path_factory.mktemp("run")
    pipe, spec = load_pipeline("tiny-pixart")
    report = analyze(pipe, PROMPTS, steps=2, timestep_buckets=2, image_dir=run / "images",
                     model_info={"alias": spec.alias, "source": spec.source})
    report.save(run / "erf.json")
    return run


@pytest.fixture(scope="module")
def drawn(run_dir):
    """{figure stem: paths}: every report figure drawn once into run_dir/figures."""
    report = load_report(run_dir)
    out, kw = run_dir / "figures", {"dpi": DPI}
    return {
        "attention_maps": plots.plot_attention_maps(report, out, run_dir / "images", **kw),
        "asm_curves": plots.plot_asm_curves(report, out, **kw),
        "erf": plots.plot_erf(report, out, **kw),
        "erf_heads": plots.plot_erf_heads(report, out, **kw),
        "bias_sinks": plots.plot_bias_sinks(report, out, **kw),
        "erf_over_steps": plots.plot_erf_over_steps(report, out, **kw),
    }


@pytest.mark.parametrize("stem", [s for s in plots.FIGURES if s != "gradient_erf"])
def test_each_figure_written(drawn, stem):
    check_figure(drawn[stem], stem)


def test_fixed_size_figure_and_colours(drawn):
    # the ASM figure has a fixed size: 12.5 × 8.6 in
    assert png_size(drawn["asm_curves"][0]) == (round(12.5 * DPI), round(8.6 * DPI))
    # attention maps: 4 probe rows × (image + 4 layers); not blank
    img = np.asarray(Image.open(drawn["attention_maps"][0]).convert("RGB"), dtype=float)
    assert img.std() > 20


def test_attention_maps_without_image_and_without_probes(run_dir, tmp_path):
    report = load_report(run_dir)
    paths = plots.plot_attention_maps(report, tmp_path, images_dir=None, max_layers=2, dpi=DPI, formats=("png",))
    check_figure(paths, "attention_maps", formats=("png",))
    report.settings = dict(report.settings, probe_points=[])
    assert plots.plot_attention_maps(report, tmp_path / "none", dpi=DPI) == []


def synthetic_report() -> Report:
    """Two grids (8×8 and 4×4), 4 and 2 heads, UNet-like labels, a sink in one layer."""
    rng = np.random.default_rng(0)
    settings = {"resolution": [64, 64], "steps": 6, "threshold": 0.8, "timestep_buckets": 3, "probe_points": [[0.5, 0.5]],
                "prompts": ["x"], "n_prompts": 1, "cutoff": 0.1, "order": 2, "sink_factor": 5.0}
    layers = []
    for label, name, grid, heads in [("down.0.0.attn1", "down_blocks.0.a", (8, 8), 4), ("up.0.0.attn1", "up_blocks.0.a", (4, 4), 2),
                                     ("mid.0.attn1", "mid_block.a", (4, 4), 2)]:
        t, r, n = 3, max(grid), grid[0] * grid[1]
        ring = rng.random((t, heads, r)) * np.exp(-np.arange(r))
        key_mass = rng.random(n) + 0.5
        if label.startswith("down"):
            key_mass[-1] = 40 * key_mass.mean()  # a PixArt-style last-token sink
        layers.append(LayerResult(
            name=name, label=label, grid=grid, heads=heads, level=0 if grid == (8, 8) else 1, joint=None, ring=ring,
            hp_ring=ring * 0.5, mass=ring.sum(-1), hp_pos=ring.sum(-1) * 0.3, rows=np.ones(t), key_mass=key_mass,
            probe_maps=rng.random((1, n)), probe_rows=2, settings=settings))
    return Report(model={"alias": "synthetic"}, settings=settings, run={}, layers=layers)


def test_synthetic_multigrid_with_sink(tmp_path):
    report = synthetic_report()
    assert [l.label for l in plots.forward_order(report)] == ["down.0.0.attn1", "mid.0.attn1", "up.0.0.attn1"]
    assert report.layers[0].sink_keys == [63]
    for fn in (plots.plot_bias_sinks, plots.plot_erf_heads, plots.plot_asm_curves, plots.plot_erf_over_steps):
        paths = fn(report, tmp_path, dpi=60, formats=("png",))
        check_figure(paths, paths[0].stem, dpi=60, formats=("png",))


def test_step_ranges():
    assert plots.step_ranges(20, 4) == [(1, 5), (6, 10), (11, 15), (16, 20)]
    assert plots.step_ranges(5, 2) == [(1, 3), (4, 5)]  # capture: step s (0-based) in bucket ⌊s·T/S⌋
    assert plots.step_ranges(3, 5) == [(1, 1), (2, 2), (3, 3)]


# -- HTML report --------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """Collects <img> sources and checks that non-void elements open and close in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.imgs, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_report(run_dir, drawn):
    from attnprobe.html import write_html_report

    path = write_html_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    srcs = [img["src"] for img in parser.imgs]
    n_figures = len(list((run_dir / "figures").glob("*.png")))
    n_images = len(list((run_dir / "images").glob("*.png")))
    assert n_figures == 6 and n_images == 2
    assert len(srcs) == n_figures + n_images
    for src in srcs:  # everything embedded, each a decodable PNG
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert all(img.get("alt") for img in parser.imgs)
    text = "".join(parser.text)
    assert PROMPTS[1] in text  # shown verbatim as text ...
    assert "<b>rocket</b>" not in page and "&lt;b&gt;rocket&lt;/b&gt; &amp; &quot;moon&quot;" in page  # ... never as markup
    for label in ("block 0", "block 3"):
        assert label in text
    assert "http://" not in page and "https://" not in page  # self-contained


def test_html_report_draws_missing_figures(run_dir, tmp_path, monkeypatch):
    import shutil

    from attnprobe.html import write_html_report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("figures", "report.html"))
    calls = []

    def fake_plot_all(report, out_dir, images_dir=None, **kw):
        calls.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(Path(out_dir) / "erf.png")
        return [Path(out_dir) / "erf.png"]

    monkeypatch.setattr(plots, "plot_all", fake_plot_all)
    page = write_html_report(run).read_text()
    assert calls == [run / "figures"] and page.count("data:image/png;base64,") == 1 + 2


# -- CLI ----------------------------------------------------------------------------------------


def bad_inputs(run_dir, tmp: Path) -> dict:
    good = json.loads((run_dir / "erf.json").read_text())
    old = dict(good, schema_version=0)
    (tmp / "old.json").write_text(json.dumps(old))
    (tmp / "trunc.json").write_text((run_dir / "erf.json").read_text()[:500])
    (tmp / "empty").mkdir()
    return {"missing": tmp / "nope" / "erf.json", "old": tmp / "old.json", "truncated": tmp / "trunc.json",
            "no-report-folder": tmp / "empty"}


@pytest.mark.parametrize("case", ["missing", "old", "truncated", "no-report-folder"])
@pytest.mark.parametrize("command", [["plot"], ["report", "--html"]])
def test_cli_bad_input(run_dir, tmp_path, case, command):
    from attnprobe.cli import app

    path = bad_inputs(run_dir, tmp_path)[case]
    result = runner.invoke(app, [command[0], str(path), *command[1:]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    if case == "old":
        assert "schema version 0" in lines[0]
    if case == "truncated":
        assert "not valid JSON" in lines[0]


def test_cli_plot_refuses_to_overwrite_and_checks_format(run_dir, drawn, tmp_path):
    from attnprobe.cli import app

    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # erf.json, images/ and figures/ (PNG + SVG) as `analyze` leaves them
    result = runner.invoke(app, ["plot", str(run / "erf.json"), "--format", "png"])  # the README's order works
    assert result.exit_code == 0, result.stderr
    assert sorted(p.suffix for p in (run / "figures").iterdir()) == [".png"] * 6  # replaced as a whole: no stale SVG
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["plot", str(run / "erf.json"), "--out", str(tmp_path / "mine")])  # not ours: refused
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    result = runner.invoke(app, ["plot", str(run_dir / "erf.json"), "--out", str(tmp_path / "f"), "--format", "gif"])
    assert result.exit_code == 2 and "--format" in result.stderr


def test_cli_plot_and_report(run_dir, drawn, tmp_path, monkeypatch):
    from attnprobe.cli import app

    seen = {}

    def fake_plot_all(report, out_dir, images_dir=None, **kw):  # the drawing itself is tested above
        seen.update(out=Path(out_dir), images=Path(images_dir), **kw)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(Path(out_dir) / "erf.png")
        return [Path(out_dir) / "erf.png"]

    monkeypatch.setattr(plots, "plot_all", fake_plot_all)
    result = runner.invoke(app, ["plot", str(run_dir / "erf.json"), "--out", str(tmp_path / "figs"), "--format", "png", "--dpi", "90"])
    assert result.exit_code == 0, result.output
    # drawn into a staging folder beside the target, which then becomes it
    assert seen["out"].parent == tmp_path and (tmp_path / "figs" / "erf.png").is_file() and seen["images"] == run_dir / "images"
    assert seen["formats"] == ("png",) and seen["dpi"] == 90
    monkeypatch.undo()
    result = runner.invoke(app, ["report", str(run_dir), "--html"])  # figures exist: embeds them
    assert result.exit_code == 0, result.output
    assert "block 0" in result.stdout and (run_dir / "report.html").is_file()


def test_cli_plot_overwrite_into_a_user_folder_keeps_its_other_files(run_dir, tmp_path, monkeypatch):
    """--overwrite into a folder of the user's replaces the figures' own files only (a paper's figures/
    folder with its scripts survives a redraw)."""
    from attnprobe.cli import app

    def fake_plot_all(report, out_dir, images_dir=None, **kw):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255, 0, 0)).save(Path(out_dir) / "erf.png")
        return [Path(out_dir) / "erf.png"]

    monkeypatch.setattr(plots, "plot_all", fake_plot_all)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "make_figures.sh").write_text("keep")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(mine / "erf.png")
    (mine / "erf.svg").write_text("<svg/>")  # an earlier --format svg of the same figure: stale now
    result = runner.invoke(app, ["plot", str(run_dir / "erf.json"), "--out", str(mine), "--overwrite", "--format", "png"])
    assert result.exit_code == 0, result.output
    assert (mine / "make_figures.sh").read_text() == "keep"
    assert Image.open(mine / "erf.png").getpixel((0, 0)) == (255, 0, 0)  # replaced
    assert not (mine / "erf.svg").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the staging folder is gone
