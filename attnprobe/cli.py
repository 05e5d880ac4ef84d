"""The ``attnprobe`` command line: analyze, merge, models, plot, report.

Errors in what the user passed (missing files, unknown models, bad options, existing outputs)
print one line on stderr and exit with code 2, checked before any model is loaded; nothing
already written is destroyed. Unexpected failures exit with 1 (``--debug`` shows the traceback).
See :mod:`attnprobe.core.cli`.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnprobe._version import __version__
from attnprobe.core.cli import UsageError, calm_threads, check_device, command, escape_help_markup, fail, make_app
from attnprobe.core.progress import Progress

calm_threads()  # before torch is imported

app = make_app("attnprobe", "Measure how local the self-attention of a diffusion model is, layer by layer.", __version__)
console = Console()
err_console = Console(stderr=True)


def _parse_probe_points(text: Optional[str]):
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    points = []
    for item in text.split(";"):
        try:
            y, x = (float(v) for v in item.split(","))
        except ValueError:
            raise UsageError(f"bad --probe-points {text!r}: use 'y,x;y,x' with fractions in [0, 1]") from None
        points.append((y, x))
    return tuple(points)


@app.command()
@command
def analyze(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Text file, one prompt per line ('#' comments). For DiT: class labels."),
    model: str = typer.Option("demo", "--model", "-m", help="Alias (see `attnprobe models`), local pipeline folder, or Hub id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<model>)."),
    resolution: Optional[str] = typer.Option(None, help="Image size in pixels: N or HxW (default: the model's)."),
    steps: int = typer.Option(20, help="Denoising steps per prompt."),
    guidance_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the pipeline's)."),
    seed: int = typer.Option(0, help="Seed of the first prompt; prompt i uses seed + i."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, fp16 or bf16."),
    device: str = typer.Option("auto", help="Torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1, ... "
                                            "Threads: OMP_WAIT_POLICY=PASSIVE unless set (steady on a busy CPU), with a short spin when the CPU is idle at start; OMP_NUM_THREADS caps them."),
    threshold: float = typer.Option(0.8, help="τ: ERF = smallest odd K whose high-pass ASM reaches τ."),
    cutoff: float = typer.Option(0.1, help="Butterworth cut-off D0 in cycles per token (max ≈ 0.7)."),
    order: int = typer.Option(2, help="Butterworth order n."),
    highpass_mass: str = typer.Option("positive", help="ASM over the high-passed map: 'positive' part or 'abs'."),
    aggregate: str = typer.Option("per-map", help="per-map: high-pass every attention map and sum (what a per-call "
                                                   "student must reproduce); mean-map: high-pass the map averaged over "
                                                   "heads, steps and prompts (the paper's reading). See README 'Statistics'."),
    border: str = typer.Option("zero", help="FFT border of the high-pass: zero (maps zero-padded, nothing wraps) or "
                                            "circular (the FFT wraps edges onto each other)."),
    erf_from: str = typer.Option("upper", help="Size kernels from the upper end of the ERF's bootstrap interval over "
                                               "prompts (upper) or from the ERF itself (point)."),
    kernel_ratio: float = typer.Option(0.6, help="Default kernel size = odd(ceil(ratio × ERF)) (recomputable later)."),
    kmin: int = typer.Option(3, help="Smallest recommended kernel size."),
    kmax: int = typer.Option(31, help="Largest recommended kernel size."),
    queries: str = typer.Option("auto", help="Queries per layer: all, auto (~100-200 on a regular sub-lattice; all up to 16×16), stride:S or sample:N."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated regexes on layer names/labels (default: all)."),
    timestep_buckets: int = typer.Option(4, help="Step buckets for the ERF-over-time statistics."),
    probe_points: Optional[str] = typer.Option(None, help="Query points whose maps are kept, 'y,x;y,x' fractions (default: 4 points)."),
    memory_budget_mb: float = typer.Option(256, help="Peak extra memory per attention call for the capture (and, with "
                                                     "--aggregate mean-map, the map sums kept per layer)."),
    ring_backend: str = typer.Option("auto", help="Unfiltered ring masses: auto (fused Triton kernel on CUDA), triton or reference."),
    plots: bool = typer.Option(True, help="Also write figures into OUT/figures."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    estimate: bool = typer.Option(False, "--estimate", help="Dry run: build the model from its shipped config on the "
                                  "meta device (no weights) and print layers, grids, query chunks, peak extra memory, "
                                  "rows to reduce and the estimated time per step on --device; writes nothing."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Run the real code path on a config-only alias "
                                        "with seeded random weights (smoke tests, benchmarks); the report says so."),
    shard: Optional[str] = typer.Option(None, help="i/n: analyse only shard i of n (0-based) of the prompts, with "
                                                   "their global seeds; `attnprobe merge` adds the n reports into the "
                                                   "full one. Under torchrun / accelerate launch the ranks share the "
                                                   "prompts by themselves (README 'Several processes or machines')."),
):
    """Generate images for every prompt while capturing attention statistics; write erf.json.

    Under ``torchrun`` / ``accelerate launch`` every process takes a share of the prompts and rank 0
    writes the one report (equal to a single process's); the other ranks write nothing.
    """
    options = dict(locals())
    from attnprobe import distributed

    part = None if shard is None else distributed.parse_shard(shard)
    with distributed.launch(check_device(device)) as team, contextlib.ExitStack() as stack:
        try:
            _analyze(team, stack, part, options)
        except distributed.RankError as exc:  # another rank failed: rank 0 says so, the others leave quietly
            if exc.quiet:
                raise typer.Exit(exc.code) from None
            fail(exc, exc.code)


def _analyze(team, stack, part, o: dict) -> None:
    """The body of ``analyze`` (``o``: its options) for one rank of ``team``."""
    from attnprobe.analysis import ResolutionWarning, analyze as run_analysis, check_mean_map_memory, resolution_notes
    from attnprobe.config import AnalysisConfig
    from attnprobe.core import backends
    from attnprobe.core.outputs import check_output_dir, check_writable, read_prompts, staged_output_dir
    from attnprobe.core.family import find_self_attention
    from attnprobe.core.pipeline import resolve_resolution
    from attnprobe.core.sites import select_sites
    from attnprobe.core.registry import load_pipeline, resolve
    from attnprobe.distributed import share

    steps, device, out = o["steps"], team.device, o["out"]
    with team.together():  # bad input fails every rank before the model loads; rank 0 prints it once
        if part is not None and team.world_size > 1:
            raise UsageError("--shard splits the prompts by hand; under torchrun / accelerate launch leave it out "
                             "(the ranks share the prompts)")
        cfg = AnalysisConfig(
            resolution=o["resolution"], steps=steps, guidance_scale=o["guidance_scale"], seed=o["seed"],
            threshold=o["threshold"], cutoff=o["cutoff"], order=o["order"], highpass_mass=o["highpass_mass"],
            kernel_ratio=o["kernel_ratio"], kmin=o["kmin"], kmax=o["kmax"], queries=o["queries"], layers=o["layers"],
            timestep_buckets=o["timestep_buckets"], probe_points=_parse_probe_points(o["probe_points"]), sink_factor=5.0,
            memory_budget_mb=o["memory_budget_mb"], ring_backend=None if o["ring_backend"] == "auto" else o["ring_backend"],
            aggregate=o["aggregate"], border=o["border"], erf_from=o["erf_from"],
        ).validate()
        prompt_list = read_prompts(o["prompts"])
        if o["estimate"]:
            from attnprobe.core.registry import auto_dtype, torch_dtype

            dt = auto_dtype(device) if o["dtype"] == "auto" else torch_dtype(o["dtype"])
            if team.is_main:
                print_estimate(o["model"], cfg, device, dt, len(prompt_list), o["random_weights"])
            return
        i, n = part or (team.rank, team.world_size)
        indices = share(len(prompt_list), i, n)
        if part is not None and not indices:
            raise UsageError(f"--shard {i}/{n}: shard {i} gets no prompts ({len(prompt_list)} prompts over {n} shards); "
                             f"use at most {len(prompt_list)} shards")
        if part is not None and cfg.aggregate == "mean-map":
            raise UsageError("--shard with --aggregate mean-map: mean-map reports do not merge (the high-pass of an "
                             "averaged map is not a sum of parts); run the ranks under torchrun / accelerate launch instead")
        spec = resolve(o["model"])
        out = out or Path("runs") / Path(spec.alias).name
        if team.is_main:
            check_output_dir(out, o["overwrite"])
            check_writable(out)
        if cfg.ring_backend == "triton" and not device.startswith("cuda") and not backends.interpreting():
            raise UsageError("--ring-backend triton needs a CUDA device (and Triton); use auto or reference")
    with team.together():  # then what needs the model (a rank short of memory fails them all, too)
        pipe, spec = load_pipeline(o["model"], dtype=o["dtype"], device=device, random_weights=o["random_weights"])
        size = resolve_resolution(pipe, o["resolution"])
        check_mean_map_memory(pipe, cfg, *size)
        select_sites(find_self_attention(pipe), cfg.layers)  # before the progress bar: a bad filter is one line
        tmp = stack.enter_context(staged_output_dir(out, o["overwrite"])) if team.is_main else None
    for note in resolution_notes(pipe, *size) if team.is_main else ():
        err_console.print(f"warning: {note}", highlight=False, soft_wrap=True)
    if team.world_size > 1 and team.is_main:
        err_console.print(f"{len(prompt_list)} prompts over {team.world_size} processes; progress of rank 0 "
                          f"({len(indices)} prompts)", highlight=False)
    mine = len(indices)
    progress = stack.enter_context(Progress("analyze", mine * steps, unit="step", enabled=team.is_main))

    def on_step(j, step, total):
        progress.update(j * total + min(step, total), prompt=f"{j + 1}/{mine}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResolutionWarning)  # printed above, before the run
        report = run_analysis(pipe, [prompt_list[k] for k in indices], cfg, prompt_indices=indices, team=team,
                              model_info={"alias": spec.alias, "source": spec.source,
                                          "weights": "random" if getattr(pipe, "_attnprobe_random_weights", False)
                                          else "pretrained"},
                              image_dir=None if tmp is None else tmp / "images", on_step=on_step)
    if not team.is_main:
        return
    if part is not None:
        report.run["shard"] = f"{i}/{n}"
    report.save(tmp / "erf.json")
    if o["plots"]:
        from attnprobe.plots import plot_all

        plot_all(report, tmp / "figures", images_dir=tmp / "images")
    stack.close()  # the staged folder becomes OUT
    print_layer_table(report)
    what = f", from {team.world_size} processes" if team.world_size > 1 else (f", shard {i}/{n}" if part else "")
    console.print(f"wrote [bold]{out / 'erf.json'}[/] ({len(report.layers)} layers, {len(report.images)} images{what})")


def print_estimate(model: str, cfg, device: str, dtype, prompts: int, random_weights: bool = False) -> None:
    from attnprobe.estimate import estimate_analysis

    est = estimate_analysis(model, cfg, device=device, dtype=dtype, prompts=prompts, random_weights=random_weights)
    h, w = est.resolution
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"attnprobe analyze --estimate — {est.model} @ {h}x{w} on {device} ({est.dtype}, batch {est.batch})",
                  caption=f"Q: queries per layer; MiB: peak extra memory of one call; rows: softmax rows reduced per step; s: capture "
                          f"seconds per step. {est.calibration}")
    table.add_column("layer", no_wrap=True, min_width=14)
    for col in ("grid", "heads", "keys", "Q", "chunks", "MiB", "rows", "s"):
        table.add_column(col, justify="right", no_wrap=True, min_width=5)
    for l in est.layers:
        table.add_row(l.name, f"{l.grid[0]}×{l.grid[1]}", str(l.heads), str(l.keys), str(l.queries), str(l.chunks),
                      f"{l.peak_bytes / 2**20:.0f}", f"{l.rows_per_step:,}", f"{l.capture_s:.3f}")
    console.print(table)
    total = est.total_s
    console.print(
        f"{len(est.layers)} self-attention layers; weights {est.params / 1e6:.0f} M parameters = "
        f"{est.weight_bytes / 2**30:.2f} GiB; capture peak extra {est.peak_bytes / 2**20:.0f} MiB per call "
        f"(--memory-budget-mb {cfg.memory_budget_mb:g}), running sums {est.kept_bytes / 2**20:.1f} MiB in all; "
        f"peak resident memory ≈ {est.rss_bytes / 2**30:.1f} GiB.\n"
        f"Estimated per denoising step: model {est.model_step_s:.2f} s + capture {est.capture_step_s:.2f} s = "
        f"{est.step_s:.2f} s; {est.steps} steps × {est.prompts} prompt(s) ≈ {total / 60:.1f} min "
        f"({total / 3600:.2f} h). Estimates, not measurements: see benchmarks/RESULTS.md."
    )


def print_layer_table(report) -> None:
    h, w = report.settings["resolution"]
    s = report.settings
    table = Table(title=f"attention locality — {report.model.get('alias')} @ {h}x{w}",
                  caption=f"{s.get('aggregate', 'per-map')}, {s.get('border', 'circular')} border, τ = {report.threshold:g}; "
                          f"90% bootstrap over {s.get('n_prompts', '?')} prompts; margin = ASM distance from flipping the ERF")
    for col, just in [("layer", "left"), ("grid", "right"), ("ERF", "right"), ("90% CI", "right"), ("margin", "right"),
                      ("ERF raw", "right"), ("kernel", "right"), ("bias share", "right"), ("sink", "center")]:
        table.add_column(col, justify=just)
    for layer in report.layers:
        gh, gw = layer.grid
        iv = layer.erf_interval
        margin = layer.asm_margin
        bias = layer.bias_share
        table.add_row(
            layer.label, f"{gh}×{gw}", "global" if layer.is_global else str(layer.erf),
            f"{iv[0]}–{iv[1]}" if iv else "–",
            "–" if margin != margin else (f"[yellow]{margin:.3f}[/]" if margin < 0.02 else f"{margin:.3f}"),
            str(layer.erf_unfiltered), str(layer.kernel_size),
            "–" if bias != bias else f"{bias:.2f}", f"[red]yes ({len(layer.sink_keys)})[/]" if layer.has_sink else "–",
        )
    console.print(table)


@app.command()
@command
def merge(
    reports: list[Path] = typer.Argument(..., help="erf.json files (or run folders) of the same model and settings."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged report path."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
):
    """Merge reports exactly by adding their accumulated sums (split work across machines)."""
    from attnprobe.merge import merge_reports
    from attnprobe.report import load_report

    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    merged = merge_reports([load_report(p) for p in reports])
    merged.save(output)
    print_layer_table(merged)
    console.print(f"wrote [bold]{output}[/] (merged {len(reports)} reports, {len(merged.settings['prompts'])} prompts)")


@app.command()
@command
def models():
    """List model aliases, what they resolve to, and whether their weights are here."""
    from attnprobe.core.registry import aliases, weights_available

    table = Table(title="attnprobe models")
    table.add_column("alias", no_wrap=True)
    table.add_column("resolves to", overflow="fold")
    for col in ("family", "res.", "weights"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    for spec in aliases().values():
        have = weights_available(spec)
        table.add_row(spec.alias, spec.source if spec.alias != "demo" else "attnprobe/demo/pipeline (shipped)",
                      spec.family, str(spec.resolution), "[green]yes[/]" if have else "[red]no[/]", spec.description)
    console.print(table)
    console.print("Also accepted: a local diffusers pipeline folder, or a Hub id 'org/name' (needs its weights in the HF cache).")


@app.command()
@command
def plot(
    report_path: Path = typer.Argument(..., metavar="RUN/erf.json", help="The report (or its run folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the figures (default: RUN/figures)."),
    overwrite: bool = typer.Option(False, help="Write into OUT although it already holds files: figures of the same name are replaced, other files are kept (the run's own figures folder is always replaced as a whole)."),
    formats: str = typer.Option("png,svg", "--format", help="Comma-separated file formats: png, svg, pdf."),
    dpi: int = typer.Option(120, min=50, max=600, help="Resolution of raster formats (dots per inch)."),
):
    """Draw the report's figures (attention maps, ASM curves, ERF, sinks, ERF over steps) as PNG and SVG.

    The teacher-vs-student gradient-ERF figure of a distilled model: `deltadistill plot`.
    """
    from attnprobe.plots import plot_all
    from attnprobe.report import load_report

    report = load_report(report_path)
    run_dir = report_path if report_path.is_dir() else report_path.parent
    own = out is None
    if own:  # the run's own figures folder holds derived files only: redrawing replaces it
        out, overwrite = run_dir / "figures", True
    fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    if not fmts or any(f not in ("png", "svg", "pdf") for f in fmts):
        raise UsageError(f"--format {formats!r}: choose from png, svg, pdf (comma-separated)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output folder {out} already holds files; pass --overwrite to write into it")
    from attnprobe.core.outputs import merge_into_dir, staged_output_dir

    if own or not out.is_dir() or not any(out.iterdir()):
        with console.status("drawing figures"), staged_output_dir(out, overwrite) as tmp:  # replaced as a whole
            paths = [out / p.relative_to(tmp) for p in plot_all(report, tmp, images_dir=run_dir / "images", formats=fmts, dpi=dpi)]
    else:  # a folder of the user's (e.g. a paper's figures/): only the figures' own files are replaced
        with console.status("drawing figures"), merge_into_dir(out) as tmp:
            paths = [out / p.relative_to(tmp) for p in plot_all(report, tmp, images_dir=run_dir / "images", formats=fmts, dpi=dpi)]
        for path in paths:  # no stale other-format copy of a figure just drawn (erf.svg beside a new erf.png)
            for ext in {"png", "svg", "pdf"} - set(fmts):
                path.with_suffix(f".{ext}").unlink(missing_ok=True)
    stems = sorted({p.stem for p in paths})
    console.print(f"wrote {len(stems)} figures ({', '.join(fmts)}) to [bold]{out}[/]: {', '.join(stems)}")


@app.command()
@command
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder of `attnprobe analyze` (holding erf.json)."),
    html: bool = typer.Option(False, "--html", help="Write RUN_DIR/report.html: one self-contained page with every figure."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write instead of RUN_DIR/report.html."),
):
    """Print the layer table of a run; with --html also write a self-contained HTML report."""
    from attnprobe.report import load_report

    if output is not None and not html:
        raise UsageError("--output needs --html")
    rep = load_report(run_dir)
    print_layer_table(rep)
    if not html:
        return
    from attnprobe.html import write_html_report

    folder = run_dir if run_dir.is_dir() else run_dir.parent
    with console.status("writing the HTML report"):
        path = write_html_report(folder, output=output)
    console.print(f"wrote [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB, self-contained)")


escape_help_markup(app)  # last: every command is registered


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
