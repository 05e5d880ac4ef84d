"""Regenerate the "Cost tables (deltadistill bench)" of benchmarks/RESULTS.md as Markdown.

    python benchmarks/cost_tables.py                      # PixArt-Σ and SD1.5, FLOPs + latency here
    python benchmarks/cost_tables.py --no-latency         # FLOPs only (seconds, no weights needed)
    python benchmarks/cost_tables.py --max-seconds 5 --repeats 3 --out /tmp/cost_tables.md

FLOPs are analytic (deltadistill.flops) and identical on every machine; latency is measured on
this machine with `deltadistill.bench.run_bench` (the same code as `deltadistill bench`), skipping
cases whose estimated time per call exceeds --max-seconds. The script prints Markdown (or writes
it to --out); paste it into RESULTS.md — it never edits RESULTS.md itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The paper's RTX 4090 latencies (ms) for one PixArt-Σ self-attention layer vs the Triton ΔConvBlock, K = 13.
PAPER_4090_MS = {512: (0.78, 0.71), 1024: (5.91, 1.71), 2048: (67.49, 6.69), 4096: (1077.98, 26.32)}


def md_table(header: list[str], rows: list[list[str]]) -> str:
    right = [i for i, h in enumerate(header) if h not in ("grid", "scope", "operator", "note")]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paper_table() -> str:
    rows = [[f"{r}", f"{sa:.2f}", f"{dc:.2f}", f"{sa / dc:.2f}×"] for r, (sa, dc) in PAPER_4090_MS.items()]
    return md_table(["resolution", "self-attention ms", "ΔConvBlock (Triton, K=13) ms", "speed-up"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="pixart,sd15", help="comma-separated aliases (default: pixart,sd15)")
    ap.add_argument("--resolutions", default="512,1024,2048,4096")
    ap.add_argument("--kernel-size", type=int, default=13)
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=5.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-dir", type=Path, default=None, help="also save each model's bench.json/CSVs here")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here instead of stdout")
    args = ap.parse_args(argv)

    from deltadistill.bench import flops_table_rows, latency_table_rows, run_bench, write_outputs

    resolutions = [int(r) for r in args.resolutions.split(",")]
    parts = []
    for alias in args.models.split(","):
        res = run_bench(alias, resolutions, flops=True, latency=args.latency, step=True, kernel_size=args.kernel_size,
                        repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                        max_seconds=args.max_seconds, threads=args.threads, progress=lambda m: print(f"[{alias}] {m}", file=sys.stderr))
        if args.json_dir is not None:
            write_outputs(res, out=args.json_dir / alias)
        meta = res.meta
        parts.append(f"#### {alias}: {meta['class']}, {meta['layers']} self-attention layers, {meta['kernel_sizes']}\n")
        h, rows = flops_table_rows(res, "layer")
        parts.append("GFLOPs of one self-attention layer (largest token grid) and its replacements:\n\n" + md_table(h, rows) + "\n")
        h, rows = flops_table_rows(res, "total")
        parts.append(f"GFLOPs summed over all {meta['layers']} self-attention layers (one denoiser call):\n\n"
                     + md_table(h, rows) + "\n")
        if args.latency:
            h, rows = latency_table_rows(res)
            parts.append(f"Latency on {meta['device']}, {meta['dtype']}, median of {meta['repeats']} calls after "
                         f"{meta['warmup']} warm-up (matmul reference: {meta.get('matmul_gflops_per_s', '?')} GFLOP/s; "
                         f"1-min load average at start: {meta.get('load_average_1min', '?')}):\n\n"
                         + md_table(h, rows) + "\n")
        for note in res.notes:
            parts.append(f"- {note}")
        parts.append("")
    parts.append("#### Paper (ΔConvFusion, RTX 4090), one PixArt-Σ layer\n\n" + paper_table() + "\n")
    text = "\n".join(parts)
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
