"""CPU training step of ΔConvBlocks: PyTorch's backward against the compiled weight gradient of the ``cpu`` backend.

Usage:  python benchmarks/cpu_train_step.py [--repeats 9] [--threads 2] [--markdown] [--json out.json]

Rows (fp32, interleaved rounds, median):

* ``demo regression``: the trajectory recipe's regression step on the demo model: its eight blocks
  (C = 192, ρ = ½, sigmoid gate, the demo report's kernel sizes 3, 3, 5, 9, 11, 13, 13, 13), each on a
  batch of 32 layer inputs at 16×16 tokens (256 px), MSE to random targets, forward and backward;
* ``PixArt block``: one PixArt-Σ XL layer's block (C = 1152, K = 13, sigmoid gate) on a batch of 2 at 32²
  tokens, forward and backward.

Each row is timed with ``backend="reference"`` (PyTorch: oneDNN's depth-wise convolution and its backward)
and ``backend="cpu"`` (the compiled kernel: forward, input gradient as the same kernel with flipped taps,
weight gradient in ``dw_weight_grad``; pooling, gate and resizing stay PyTorch's). The gradients of the two
are compared (largest relative difference over all parameters). Random weights: speed does not depend on values.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_block_floor import cpu_name  # noqa: E402

DEMO_KS = (3, 3, 5, 9, 11, 13, 13, 13)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args(argv)


def _case(dim, ks, batch, grid):
    import torch

    from deltadistill.block import DeltaConvBlock

    torch.manual_seed(0)
    blocks = [DeltaConvBlock(dim, k, gate="sigmoid") for k in ks]
    with torch.no_grad():
        for b in blocks:
            for p in b.parameters():
                p.normal_(0, 0.05)
    xs = [torch.randn(batch, grid, grid, dim) for _ in ks]
    ys = [torch.randn(batch, grid, grid, dim) for _ in ks]
    params = [p for b in blocks for p in b.parameters()]

    def step(backend):
        for b in blocks:
            b.backend = backend
        for p in params:
            p.grad = None
        loss = sum(torch.nn.functional.mse_loss(b(x), y) for b, x, y in zip(blocks, xs, ys))
        loss.backward()
        return [p.grad.clone() for p in params]

    return step


def measure(label, dim, ks, batch, grid, repeats):
    from deltadistill import cpu_kernel

    step = _case(dim, ks, batch, grid)
    backends_ = ["reference"] + (["cpu"] if cpu_kernel.available() else [])
    grads = {be: step(be) for be in backends_}  # warm-up (and the cpu backend's per-shape timing)
    times = {be: [] for be in backends_}
    for _ in range(repeats):
        for be in backends_:
            t0 = time.perf_counter()
            step(be)
            times[be].append(time.perf_counter() - t0)
    ms = {be: round(1e3 * statistics.median(v), 2) for be, v in times.items()}
    row = {"case": label, "dim": dim, "kernel_sizes": list(ks), "batch": batch, "grid": grid, "ms": ms}
    if "cpu" in ms:
        row["speedup"] = ms["reference"] / ms["cpu"]
        row["grad_rel_diff"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                   for a, b in zip(grads["cpu"], grads["reference"]))
    return row


def table(rows, markdown: bool) -> str:
    head = ["case", "blocks × batch × grid", "reference (PyTorch backward)", "cpu kernel", "speed-up", "grad rel. diff"]
    lines = []
    for r in rows:
        cpu = r["ms"].get("cpu")
        lines.append([r["case"], f"{len(r['kernel_sizes'])} × {r['batch']} × {r['grid']}²", f"{r['ms']['reference']:.1f} ms",
                      "–" if cpu is None else f"{cpu:.1f} ms", "–" if cpu is None else f"{r['speedup']:.2f}×",
                      "–" if cpu is None else f"{r['grad_rel_diff']:.1e}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure("demo regression step", 192, DEMO_KS, 32, 16, args.repeats),
            measure("PixArt block, forward + backward", 1152, (13,), 2, 32, args.repeats)]
    print(f"{date.today()}, {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"median of {args.repeats} interleaved rounds")
    print(table(rows, args.markdown))
    if args.json:
        payload = {"date": str(date.today()), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
                   "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
