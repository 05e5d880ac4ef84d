"""``deltadistill bench`` command."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from attnprobe.core.cli import UsageError, command

from deltadistill.bench.runner import run_bench
from deltadistill.bench.tables import print_result, write_outputs


def _parse_resolutions(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower().removesuffix("px")
        if not part.isdigit() or int(part) <= 0:
            raise UsageError(f"--resolutions: {part!r} is not a positive integer; use e.g. 512,1024,2048")
        out.append(int(part))
    return out


def bench(
    model: str = typer.Option("demo", "--model", help="Alias (demo, pixart, sd15, sdxl, dit, flux, sd3, tiny-*), local diffusers folder or Hub id."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Comma-separated square image sides in px. Default: 512,1024,2048,4096 for real models, native and 2× for demo/tiny-*."),
    do_flops: bool = typer.Option(False, "--flops", help="FLOPs tables (default: both tables when neither --flops nor --latency is given)."),
    do_latency: bool = typer.Option(False, "--latency", help="Latency and peak-memory table."),
    step: bool = typer.Option(True, "--step/--no-step", help="Also time one whole denoiser call, teacher vs student."),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="One odd ΔConvBlock kernel size for every layer (default 13)."),
    erf_report: Optional[Path] = typer.Option(None, "--erf-report", help="erf.json from `attnprobe analyze`: per-layer kernel sizes."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed calls per case (median reported)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls before timing."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, fp16 or bf16."),
    backend: str = typer.Option("auto", "--backend", help="ΔConvBlock path: reference, triton, cpu (the compiled CPU kernel) or auto (the reference and every kernel that can run here; the student step takes the fastest)."),
    max_seconds: float = typer.Option(2.0, "--max-seconds", help="Skip timing cases estimated to take longer than this per call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch (default: PyTorch's choice)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for flops.csv, flops_per_layer.csv, latency.csv and bench.json."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write all rows to one CSV (column `section`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write everything (rows, per-layer FLOPs, notes, run metadata) to a JSON file."),
) -> None:
    """FLOPs and latency of self-attention vs ΔConvBlock vs window and linear attention, per resolution."""
    import sys

    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=160)  # files/pipes: no 80-column wrap
    err = Console(stderr=True)
    if kernel_size is not None and erf_report is not None:
        raise UsageError("pass either --kernel-size or --erf-report, not both")
    if erf_report is not None and not Path(erf_report).exists():
        raise UsageError(f"--erf-report {erf_report} does not exist; run `attnprobe analyze` first")
    if kernel_size is not None and (kernel_size < 3 or kernel_size % 2 == 0):
        raise UsageError(f"--kernel-size must be odd and >= 3, got {kernel_size}")
    res_list = _parse_resolutions(resolutions)
    if not do_flops and not do_latency:
        do_flops = do_latency = True
    with err.status("bench") as status:
        result = run_bench(model, res_list, flops=do_flops, latency=do_latency, step=step, kernel_size=kernel_size,
                           erf_report=erf_report, repeats=repeats, warmup=warmup, device=device, dtype=dtype,
                           backend=backend, max_seconds=max_seconds, threads=threads,
                           progress=lambda msg: status.update(f"bench: {msg}"))
    print_result(result, console)
    for path in write_outputs(result, out, csv, json_out):
        console.print(f"wrote [bold]{path}[/]")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to the ``deltadistill`` typer app."""
    app.command("bench")(command(bench))
