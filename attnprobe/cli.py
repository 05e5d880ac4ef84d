"""The ``attnprobe`` command line: analyze, merge, models (and plot/report when installed).

Errors in what the user passed (missing files, unknown models, bad options, existing outputs)
print one line on stderr and exit with code 2; nothing already written is destroyed.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    help="Measure how local the self-attention of a diffusion model is, layer by layer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit code 2."""


def fail(message: str, code: int = 2):
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def quiet_libraries() -> None:
    """Silence diffusers/transformers chatter that would bury our output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def user_errors():
    """Exception types that mean bad input rather than a bug."""
    from attnprobe.arch import UnsupportedModelError
    from attnprobe.registry import ModelLoadError
    from attnprobe.report import ReportError

    return (UsageError, ModelLoadError, ReportError, UnsupportedModelError, ValueError, FileExistsError, FileNotFoundError)


def _parse_probe_points(text: Optional[str]):
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    points = []
    for item in text.split(";"):
        try:
            y, x = (float(v) for v in item.split(","))
        except ValueError:
            raise UsageError(f"bad --probe-points {text!r}: use 'y,x;y,x' with fractions in [0, 1]") from None
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise UsageError(f"probe point {item!r} is outside [0, 1]")
        points.append((y, x))
    return points


@app.command()
def analyze(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Text file, one prompt per line ('#' comments). For DiT: class labels."),
    model: str = typer.Option("demo", "--model", "-m", help="Alias (see `attnprobe models`), local pipeline folder, or Hub id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<model>)."),
    resolution: Optional[str] = typer.Option(None, help="Image size in pixels: N or HxW (default: the model's)."),
    steps: int = typer.Option(20, min=1, help="Denoising steps per prompt."),
    guidance_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the pipeline's)."),
    seed: int = typer.Option(0, help="Seed of the first prompt; prompt i uses seed + i."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, fp16 or bf16."),
    device: str = typer.Option("auto", help="Torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1, ..."),
    threshold: float = typer.Option(0.8, help="τ: ERF = smallest odd K whose high-pass ASM reaches τ."),
    cutoff: float = typer.Option(0.1, help="Butterworth cut-off D0 in cycles per token (max ≈ 0.7)."),
    order: int = typer.Option(2, min=1, help="Butterworth order n."),
    highpass_mass: str = typer.Option("positive", help="ASM over the high-passed map: 'positive' part or 'abs'."),
    kernel_ratio: float = typer.Option(0.6, help="Kernel size = odd(ceil(ratio × ERF)); ½-scale stage doubles the reach."),
    kmin: int = typer.Option(3, help="Smallest recommended kernel size."),
    kmax: int = typer.Option(31, help="Largest recommended kernel size."),
    queries: str = typer.Option("auto", help="Queries per layer: all, auto (~100-200 on a regular sub-lattice; all up to 16×16), stride:S or sample:N."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated regexes on layer names/labels (default: all)."),
    timestep_buckets: int = typer.Option(4, min=1, help="Step buckets for the ERF-over-time statistics."),
    probe_points: Optional[str] = typer.Option(None, help="Query points whose maps are kept, 'y,x;y,x' fractions (default: 4 points)."),
    memory_budget_mb: float = typer.Option(256, help="Peak extra memory per attention call for the capture."),
    ring_backend: str = typer.Option("auto", help="Unfiltered ring masses: auto (fused Triton kernel on CUDA), triton or reference."),
    plots: bool = typer.Option(True, help="Also write figures into OUT/figures (when the plotting module is present)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Generate images for every prompt while capturing attention statistics; write erf.json."""
    quiet_libraries()
    try:
        from attnprobe.analysis import analyze as run_analysis
        from attnprobe.outputs import check_output_dir, staged_output_dir
        from attnprobe.registry import load_pipeline, resolve
        from attnprobe.outputs import read_prompts

        if ring_backend not in ("auto", "triton", "reference"):
            raise UsageError("--ring-backend must be auto, triton or reference")
        if highpass_mass not in ("positive", "abs"):
            raise UsageError("--highpass-mass must be 'positive' or 'abs'")
        if not 0 < threshold <= 1:
            raise UsageError("--threshold must be in (0, 1]")
        prompt_list = read_prompts(prompts)
        spec = resolve(model)
        out = out or Path("runs") / Path(spec.alias).name
        check_output_dir(out, overwrite)
        points = _parse_probe_points(probe_points)
        device = ("cuda" if _cuda() else "cpu") if device == "auto" else device
        pipe, spec = load_pipeline(model, dtype=dtype, device=device)
        if spec.resolution:
            pipe._attnprobe_resolution = spec.resolution
        from attnprobe.capture import parse_queries
        from attnprobe.run import resolve_resolution

        parse_queries(queries, (8, 8))
        resolve_resolution(pipe, resolution)
    except user_errors() as exc:
        fail(str(exc))

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False,
    )
    with progress:
        t_prompts = progress.add_task("prompts", total=len(prompt_list))
        t_steps = progress.add_task("steps", total=steps)

        def on_step(i, step, total):
            progress.update(t_steps, completed=step, description=f"steps (prompt {i + 1})")
            if step >= total:
                progress.update(t_prompts, completed=i + 1)

        try:
            with staged_output_dir(out, overwrite) as tmp:
                report = run_analysis(
                    pipe, prompt_list, resolution=resolution, steps=steps, guidance_scale=guidance_scale, seed=seed,
                    threshold=threshold, cutoff=cutoff, order=order, highpass_mass=highpass_mass,
                    kernel_ratio=kernel_ratio, kmin=kmin, kmax=kmax, queries=queries, layers=layers,
                    timestep_buckets=timestep_buckets, probe_points=points, memory_budget_mb=memory_budget_mb,
                    ring_backend=ring_backend, model_info={"alias": spec.alias, "source": spec.source}, image_dir=tmp / "images", on_step=on_step,
                )
                report.save(tmp / "erf.json")
                if plots:
                    _write_plots(report, tmp)
        except user_errors() as exc:
            fail(str(exc))
    print_layer_table(report)
    console.print(f"wrote [bold]{out / 'erf.json'}[/] ({len(report.layers)} layers, {len(prompt_list)} images)")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _write_plots(report, folder: Path) -> None:
    """Figures via attnprobe.plots when present (the plotting module is optional at this stage)."""
    try:
        from attnprobe import plots
    except ImportError:
        return
    plots.plot_all(report, folder / "figures", images_dir=folder / "images")


def print_layer_table(report) -> None:
    table = Table(title=f"attention locality — {report.model.get('alias')} @ {report.settings['resolution'][0]}x{report.settings['resolution'][1]}")
    for col, just in [("layer", "left"), ("grid", "right"), ("ERF", "right"), ("ERF raw", "right"), ("kernel", "right"),
                      ("bias share", "right"), ("sink", "center")]:
        table.add_column(col, justify=just)
    for layer in report.layers:
        h, w = layer.grid
        table.add_row(
            layer.label, f"{h}×{w}", str(layer.erf), str(layer.erf_unfiltered), str(layer.kernel_size),
            f"{layer.bias_share:.2f}", f"[red]yes ({len(layer.sink_keys)})[/]" if layer.has_sink else "–",
        )
    console.print(table)


@app.command()
def merge(
    reports: list[Path] = typer.Argument(..., help="erf.json files (or run folders) of the same model and settings."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged report path."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
):
    """Merge reports exactly by adding their accumulated sums (split work across machines)."""
    try:
        from attnprobe.report import load_report, merge_reports

        if output.exists() and not overwrite:
            raise UsageError(f"{output} exists; pass --overwrite to replace it")
        merged = merge_reports([load_report(p) for p in reports])
        merged.save(output)
    except user_errors() as exc:
        fail(str(exc))
    print_layer_table(merged)
    console.print(f"wrote [bold]{output}[/] (merged {len(reports)} reports, {len(merged.settings['prompts'])} prompts)")


@app.command()
def models():
    """List model aliases, what they resolve to, and whether their weights are here."""
    from attnprobe.registry import ALIASES, weights_available

    table = Table(title="attnprobe models")
    table.add_column("alias", no_wrap=True)
    table.add_column("resolves to", overflow="fold")
    for col in ("arch", "res.", "weights"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    for spec in ALIASES.values():
        have = weights_available(spec)
        table.add_row(spec.alias, spec.source if not spec.alias == "demo" else "attnprobe/demo/pipeline (shipped)",
                      spec.arch, str(spec.resolution), "[green]yes[/]" if have else "[red]no[/]", spec.description)
    console.print(table)
    console.print("Also accepted: a local diffusers pipeline folder, or a Hub id 'org/name' (needs its weights in the HF cache).")


try:  # `attnprobe plot` and `attnprobe report` live with the figures
    from attnprobe.cli_figures import register as _register_figures

    _register_figures(app)
except ImportError:  # pragma: no cover - only while the figures module is absent
    pass


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
