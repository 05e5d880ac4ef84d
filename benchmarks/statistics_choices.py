"""What the statistics' hidden choices do on the demo model: aggregation, border, uncertainty.

Usage:  python benchmarks/statistics_choices.py [--steps 20] [--markdown] [--json OUT.json]

Runs `attnprobe analyze` on the demo pipeline (the 14 demo captions, default settings) twice,
once per FFT border (``zero``, ``circular``), each with ``--aggregate mean-map``: a mean-map
capture also accumulates the per-map sums, so every run yields both readings of the same
attention. Prints per layer, for the four (aggregate, border) combinations, the ERF with its 90%
bootstrap interval over prompts (mean-map: over 8 prompt groups) and the ASM margin, plus the
bias share (query-independent prior) next to the old "1 − high-pass share" and whether the
layer is global. The per-map readings equal what a default (per-map) run reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def _readings(report):
    """{(aggregate, border): [(erf, interval, margin, kernel), ...]} and per-layer shares of one report."""
    border = report.settings["border"]
    out = {}
    for agg in ("per-map", "mean-map"):
        rows = []
        for layer in report.layers:
            view = layer if agg == "mean-map" else dataclasses.replace(layer, mean_map=None)
            rows.append((view.erf, view.erf_interval, view.asm_margin, view.kernel_size, view.is_global))
        out[(agg, border)] = rows
    shares = [(l.bias_share, 1 - l.highpass_share, l.sink_keys) for l in report.layers]
    return out, shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="denoising steps per caption")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for RESULTS.md)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    import torch

    from attnprobe.analysis import analyze
    from attnprobe.demo import DEMO_PROMPTS, load_demo_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_demo_pipeline()
    prompts = list(DEMO_PROMPTS)
    readings, shares, seconds = {}, None, {}
    labels = None
    for border in ("zero", "circular"):
        t0 = time.perf_counter()
        report = analyze(pipe, prompts, steps=args.steps, aggregate="mean-map", border=border)
        seconds[border] = time.perf_counter() - t0
        r, sh = _readings(report)
        readings.update(r)
        shares = shares or sh
        labels = [l.label for l in report.layers]
        print(f"# {border} border: {seconds[border]:.0f} s", file=sys.stderr)

    combos = [("per-map", "zero"), ("mean-map", "zero"), ("per-map", "circular"), ("mean-map", "circular")]

    def cell(row):
        erf, iv, margin, kernel, is_global = row
        if is_global:
            return "global (k max)"
        ivs = f" [{iv[0]}–{iv[1]}]" if iv else ""
        return f"{erf}{ivs} m={margin:.3f} k={kernel}"

    head = ["layer"] + [f"{a}, {b}" for a, b in combos] + ["bias share", "old 1 − HP share"]
    rows = []
    for i, label in enumerate(labels):
        bias, old, _ = shares[i]
        rows.append([label] + [cell(readings[c][i]) for c in combos] + [f"{bias:.3f}", f"{old:.3f}"])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if args.json:
        data = {
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "prompts": len(prompts),
            "seconds": seconds, "layers": labels,
            "readings": {f"{a}|{b}": [{"erf": e, "interval": list(iv) if iv else None, "margin": m, "kernel": k,
                                        "global": g} for e, iv, m, k, g in readings[(a, b)]] for a, b in combos},
            "bias_share": [s[0] for s in shares], "old_one_minus_highpass_share": [s[1] for s in shares],
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
