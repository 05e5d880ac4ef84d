"""``attnprobe plot`` and ``attnprobe report``: figures and the HTML page of a finished run.

:func:`register` adds both commands to the typer app of :mod:`attnprobe.cli`. Bad input (a
missing or truncated ``erf.json``, an older schema, an existing output folder) prints one line
on stderr and exits with code 2, like every other attnprobe command.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "plot", "report"]


def plot(
    report_path: Path = typer.Argument(..., metavar="RUN/erf.json", help="The report (or its run folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the figures (default: RUN/figures)."),
    overwrite: bool = typer.Option(False, help="Write into OUT even if it already holds files."),
    formats: str = typer.Option("png,svg", "--format", help="Comma-separated file formats: png, svg, pdf."),
    dpi: int = typer.Option(120, min=50, max=600, help="Resolution of raster formats (dots per inch)."),
    student: Optional[Path] = typer.Option(
        None, help="A deltadistill folder distilled from this report's model: adds the teacher-vs-student gradient-ERF figure."
    ),
):
    """Draw the report's figures (attention maps, ASM curves, ERF, sinks, ERF over steps) as PNG and SVG."""
    from attnprobe.cli import UsageError, console, fail, quiet_libraries, user_errors

    quiet_libraries()
    try:
        from attnprobe.report import load_report

        report = load_report(report_path)
        run_dir = report_path if report_path.is_dir() else report_path.parent
        out = out if out is not None else run_dir / "figures"
        fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
        bad = [f for f in fmts if f not in ("png", "svg", "pdf")]
        if bad or not fmts:
            raise UsageError(f"--format {formats!r}: choose from png, svg, pdf (comma-separated)")
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UsageError(f"output folder {out} already holds files; pass --overwrite to write into it")
        teacher = student_pipe = None
        if student is not None:
            if not student.is_dir():
                raise UsageError(f"--student {student} is not a folder")
            if importlib.util.find_spec("deltadistill") is None:
                raise UsageError("--student needs the deltadistill package, which is not installed")
            from attnprobe.plots import load_teacher_student

            teacher, student_pipe = load_teacher_student(report, student)
    except user_errors() as exc:
        fail(str(exc))

    from attnprobe.plots import plot_all

    with console.status("drawing figures"):
        paths = plot_all(report, out, images_dir=run_dir / "images", teacher=teacher, student=student_pipe,
                         formats=fmts, dpi=dpi)
    stems = sorted({p.stem for p in paths})
    console.print(f"wrote {len(stems)} figures ({', '.join(fmts)}) to [bold]{out}[/]: {', '.join(stems)}")


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder of `attnprobe analyze` (holding erf.json)."),
    html: bool = typer.Option(False, "--html", help="Write RUN_DIR/report.html: one self-contained page with every figure."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write instead of RUN_DIR/report.html."),
):
    """Print the layer table of a run; with --html also write a self-contained HTML report."""
    from attnprobe.cli import console, fail, print_layer_table, quiet_libraries, user_errors

    quiet_libraries()
    try:
        from attnprobe.report import load_report

        rep = load_report(run_dir)
    except user_errors() as exc:
        fail(str(exc))
    print_layer_table(rep)
    if not html:
        if output is not None:
            fail("--output needs --html")
        return
    try:
        from attnprobe.html import write_html_report

        folder = run_dir if run_dir.is_dir() else run_dir.parent
        with console.status("writing the HTML report"):
            path = write_html_report(folder, output=output)
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"wrote [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB, self-contained)")


def register(app: typer.Typer) -> None:
    """Add ``plot`` and ``report`` to the attnprobe typer app."""
    app.command("plot")(plot)
    app.command("report")(report)
