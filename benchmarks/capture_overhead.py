"""Cost of attention capture: one denoising step with capture ÷ without, and peak memory.

Usage:  python benchmarks/capture_overhead.py [--model tiny-pixart] [--grids 32,64] [--repeats 3]
        python benchmarks/capture_overhead.py --model pixart --random-weights --grids 32 --queries auto --repeats 1

``--random-weights`` builds the real-size architecture of an alias from its shipped config with
seeded random weights (PixArt-Σ XL: 28 blocks, C = 1152; 32×32 tokens = 512 px).

For each token grid and query setting, a subprocess builds the model, times the denoiser's
forward on a CFG batch (B = 2) without capture, then with capture (median of --repeats after
one warm-up), and reads the process's peak RSS (VmHWM) before and after the captured runs.
Prints a table (and --markdown for RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(model: str, grid: int, queries: str, repeats: int, random_weights: bool = False, border: str = "zero") -> dict:
    import torch

    from attnprobe.core.family import denoiser_of
    from attnprobe.capture import capture
    from attnprobe.core.registry import load_pipeline

    torch.manual_seed(0)
    pipe, spec = load_pipeline(model, random_weights=random_weights)
    den = denoiser_of(pipe)
    cfg = den.config
    latent = grid * int(cfg.patch_size)
    x = torch.randn(2, cfg.in_channels, latent, latent)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 8, cfg.caption_channels)
    kw = dict(encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    def step():
        with torch.no_grad():
            den(x, **kw)

    def timed():
        step()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain = timed()
    base_mem = _vmhwm_mb()
    with capture(den, queries=queries, timestep_buckets=1, border=border):
        captured = timed()
    peak_mem = _vmhwm_mb()
    return {"model": model + (" (random weights)" if random_weights else ""), "border": border, "grid": grid, "queries": queries, "plain_s": plain, "capture_s": captured,
            "ratio": captured / plain, "extra_peak_mb": max(0.0, peak_mem - base_mem)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-pixart")
    ap.add_argument("--grids", default="32,64")
    ap.add_argument("--queries", default="auto,all,stride:2,stride:4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--random-weights", action="store_true", help="real-size architecture from the shipped config")
    ap.add_argument("--border", default="zero", help="FFT border of the high-pass (zero: the default, circular)")
    ap.add_argument("--worker", nargs=3, metavar=("GRID", "QUERIES", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        grid, queries, model = args.worker
        print(json.dumps(worker(model, int(grid), queries, args.repeats, args.random_weights, args.border)))
        return
    from attnprobe.core.cli import calm_threads, omp_wait_setting

    calm_threads()  # the command lines' OpenMP waiting, inherited by the workers (a value you set is kept)
    rows = []
    for grid in (int(g) for g in args.grids.split(",")):
        for q in args.queries.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(grid), q, args.model, "--repeats", str(args.repeats),
                 "--border", args.border] + (["--random-weights"] if args.random_weights else []),
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['model']:12s} grid {grid:3d}² queries {q:9s} plain {r['plain_s'] * 1e3:8.1f} ms  "
                  f"capture {r['capture_s'] * 1e3:8.1f} ms  ratio {r['ratio']:5.2f}x  extra peak {r['extra_peak_mb']:7.1f} MB",
                  flush=True)
    if args.markdown:
        print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch threads default, threads wait by {omp_wait_setting()}\n")
        print("| model | border | token grid | queries | step without capture (ms) | with capture (ms) | ratio | extra peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['border']} | {r['grid']}×{r['grid']} | {r['queries']} | {r['plain_s'] * 1e3:.1f} | "
                  f"{r['capture_s'] * 1e3:.1f} | {r['ratio']:.2f}× | {r['extra_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
