"""Rendering of bench results: rich tables, CSV and JSON files."""
from __future__ import annotations

import json
from pathlib import Path


from deltadistill import flops as cost_model
from deltadistill.bench.runner import BenchResult


_OP_LABEL = {**cost_model.OPERATOR_NAMES, "deltaconv": "ΔConvBlock (reference)", "deltaconv_triton": "ΔConvBlock (Triton)", "deltaconv_cpu": "ΔConvBlock (CPU kernel)",
             "teacher_step": "teacher step", "student_step": "student step",
             "self_attention": "self-attention (SDPA)"}


def _g(flops: float | None) -> str:
    """GFLOPs with sensible digits: 554,190 · 15.83 · 0.00412."""
    if flops is None:
        return ""
    g = flops / 1e9
    return f"{g:,.0f}" if g >= 100 else f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def flops_table_rows(result: BenchResult, scope: str = "layer") -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the FLOPs table: GFLOPs per operator and SA ÷ operator ratios.

    ``scope="layer"``: the largest-grid layer; ``"total"``: all self-attention layers summed.
    """
    key = "layer_flops" if scope == "layer" else "total_flops"
    header = ["resolution", "grid", "N", "self-attn", "ΔConv", "window", "linear", "SA÷ΔConv", "SA÷window", "SA÷linear"]
    rows = []
    for r in result.meta["resolutions"]:
        by_op = {row["operator"]: row for row in result.flops if row["resolution"] == r}
        if not by_op:
            continue
        sa = by_op["self_attention"][key]
        vals = [by_op[op][key] for op in cost_model.OPERATORS]
        rows.append([f"{r}", by_op["self_attention"]["grid"], f"{by_op['self_attention']['tokens']:,}",
                     *[_g(v) for v in vals], *[f"{sa / v:,.1f}×" for v in vals[1:]]])
    return header, rows


def latency_table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    header = ["resolution", "scope", "operator", "median ms", "min ms", "peak MB", "speed-up", "÷ floor", "note"]
    rows = []
    for row in result.latency:
        ref = "vs SA" if row["scope"] == "module" else "vs teacher"
        rows.append([
            f"{row['resolution']}", row["scope"] + (f" ({row['grid']})" if row["grid"] else ""),
            _OP_LABEL.get(row["operator"], row["operator"]),
            "" if row["ms_median"] is None else f"{row['ms_median']:,.2f}",
            "" if row["ms_min"] is None else f"{row['ms_min']:,.2f}",
            "" if row["peak_mb"] is None else f"{row['peak_mb']:,.1f}",
            "" if row["speedup_vs_sa"] is None else f"{row['speedup_vs_sa']:.2f}× {ref}",
            "" if not row.get("floor_ms") or not row["ms_median"] else f"{row['ms_median'] / row['floor_ms']:.2f}×",
            row["note"],
        ])
    return header, rows


def _rich_table(title: str, header: list[str], rows: list[list[str]], caption: str = ""):
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (1, 2) and h in ("grid", "scope", "operator") or h == "note" else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def write_outputs(result: BenchResult, out: Path | None = None, csv: Path | None = None, json_path: Path | None = None) -> list[Path]:
    """``out/``: flops.csv, flops_per_layer.csv, latency.csv, bench.json; ``csv``: one tidy CSV; ``json_path``."""
    import pandas as pd

    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, records in (("flops.csv", result.flops), ("flops_per_layer.csv", result.layers),
                              ("latency.csv", result.latency)):
            if records:
                pd.DataFrame(records).to_csv(out / name, index=False)
                written.append(out / name)
        (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written.append(out / "bench.json")
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        frames = [pd.DataFrame(rec).assign(section=sec) for sec, rec in (("flops", result.flops), ("latency", result.latency)) if rec]
        pd.concat(frames, ignore_index=True).to_csv(csv, index=False)
        written.append(csv)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written.append(json_path)
    return written


def print_result(result: BenchResult, console) -> None:
    meta = result.meta
    if result.flops:
        n = meta["layers"]
        cap = (f"GFLOPs per call, batch 1; 1 multiply-add = 2 FLOPs; ΔConvBlock and window attention with "
               f"{meta['kernel_sizes']}; linear attention of LinFusion's form.")
        h, rows = flops_table_rows(result, "layer")
        console.print(_rich_table(f"FLOPs — {meta['model']}, one self-attention layer (largest grid)", h, rows, cap))
        h, rows = flops_table_rows(result, "total")
        console.print(_rich_table(f"FLOPs — {meta['model']}, all {n} self-attention layers summed", h, rows))
    if result.latency:
        h, rows = latency_table_rows(result)
        cap = (f"{meta['device']}, {meta['dtype']}; median of {meta['repeats']} calls after {meta['warmup']} warm-up; "
               "peak MB = memory allocated by the call (CUDA max allocated, or live tensor bytes on CPU); "
               "÷ floor = ΔConvBlock time ÷ its two 1×1 projections alone at the same shape (the matmul floor)"
               + (f"; load average {meta['load_average_1min']} at start" if "load_average_1min" in meta else "")
               + (f"; threads wait by {meta['omp_wait']}" if "omp_wait" in meta else "") + ".")
        console.print(_rich_table(f"Latency — {meta['model']}", h, rows, cap))
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)


