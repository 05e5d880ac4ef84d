"""CPU cost of one ΔConvBlock against its matmul floor and against the self-attention it replaces.

Usage:  python benchmarks/cpu_block_floor.py [--repeats 7] [--threads 2] [--markdown] [--json out.json]

For each layer shape of the issue's table (PixArt-Σ XL C = 1152, K = 13 on 32² and 64² tokens;
SD1.5's level-0 layer C = 320, K = 9 on 64²), batch 1, fp32, no grad, it times interleaved rounds (one
call of each operator per round, in a random order drawn per round (seeded), so that no operator always
follows the same one; median over rounds, after one warm-up round), and each call once more at once
("back to back": the operator's own data in the caches, the same state for all):

* ``SDPA module``: diffusers' ``Attention`` with ``AttnProcessor2_0`` (q, k, v, out projections
  and ``scaled_dot_product_attention``), the layer a ΔConvBlock replaces;
* ``ΔConv, concat``: the block as it ran before: the stages resized to H×W, concatenated and
  projected by one ``proj_out`` at full resolution (the global branch in its bias);
* ``ΔConv``: ``DeltaConvBlock.forward`` now: each stage projected by its slice of ``proj_out`` at
  its own resolution, then resized and summed (3/16 fewer projection FLOPs for scales (1, ½));
* ``ΔConv, CPU kernel``: the same block with ``backend="cpu"``: its depth-wise stages (convolution and
  gate) in the compiled kernel of :mod:`deltadistill.cpu_kernel`, the default path for sampling on a
  CPU since 2026-12-07 (measured only where a C compiler builds it);
* ``floor``: the block's two 1×1 projections at full resolution (two ``F.linear``, the matmul
  work of the block as the paper writes it; the current block does less than this).

Columns: SA ÷ ΔConv (reference, and with the CPU kernel), the analytic FLOPs ratio of
:mod:`deltadistill.flops`, and each ΔConv path ÷ the floor; the last, the kernel ÷ the floor back to
back. Random weights (speed does not depend on values).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from datetime import date

SHAPES = [  # (label, C, heads, K, grid, qkv bias)
    ("PixArt C = 1152, K = 13", 1152, 16, 13, 32, True),
    ("PixArt C = 1152, K = 13", 1152, 16, 13, 64, True),
    ("SD1.5 level 0, C = 320, K = 9", 320, 8, 9, 64, False),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args(argv)


def round_order(names: list, r: int) -> list:
    """The operators of round ``r`` in a random order, seeded by ``r`` (the same rounds every run)."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def measure(label, c, heads, k, grid, qkv_bias, repeats):
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from deltadistill.block import DeltaConvBlock
    from deltadistill.flops import deltaconv_flops, self_attention_flops

    torch.manual_seed(0)
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads, bias=qkv_bias, out_bias=True,
                     processor=AttnProcessor2_0()).eval()
    block = DeltaConvBlock(c, k, backend="reference").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    n = grid * grid
    tokens = torch.randn(1, n, c)
    z = tokens.view(1, grid, grid, c)
    mid = torch.randn(n, block.proj_out.in_features)
    fast = copy.deepcopy(block)
    fast.backend = "cpu"
    flat = tokens.view(n, c)

    def concat():
        bias = block.proj_out.bias + block.global_proj(z.mean(dim=(1, 2)))[0]
        return F.linear(block._pyramid(z), block.proj_out.weight, bias)

    cases = {
        "sdpa": lambda: attn(tokens),
        "concat": concat,
        "block": lambda: block(z),
        "kernel": lambda: fast(z),
        "floor": lambda: (F.linear(flat, block.proj_in.weight, block.proj_in.bias),
                          F.linear(mid, block.proj_out.weight, block.proj_out.bias)),
    }
    times = {name: [] for name in cases}
    warm = {name: [] for name in cases}
    names = list(cases)
    with torch.inference_mode():
        for name, fn in cases.items():  # warm-up round
            fn()
        for r in range(repeats):
            # each op timed twice: right after another op (a random order per round: what ran before changed the
            # floor's time at SD1.5 level 0 from 2.7 to 3.8 ms on a 2-core Xeon, through the caches), then at once
            # again ("back to back": its own data in the caches, the same state for every op)
            for name in round_order(names, r):
                for into in (times, warm):
                    t0 = time.perf_counter()
                    cases[name]()
                    into[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    ms_warm = {name: statistics.median(v) for name, v in warm.items()}
    with torch.inference_mode():
        err = float((fast(z) - block(z)).abs().max() / block(z).abs().max())
    sa = self_attention_flops(n, c, heads, qkv_bias=qkv_bias).total
    dc = deltaconv_flops((grid, grid), c, k).total
    return {"layer": label, "grid": grid, "dim": c, "kernel_size": k, "ms": {k_: round(v, 2) for k_, v in ms.items()},
            "sa_over_block": ms["sdpa"] / ms["block"], "flops_ratio": sa / dc,
            "concat_over_floor": ms["concat"] / ms["floor"], "block_over_floor": ms["block"] / ms["floor"],
            "sa_over_kernel": ms["sdpa"] / ms["kernel"], "kernel_over_floor": ms["kernel"] / ms["floor"],
            "kernel_rel_error": err, "ms_warm": {k_: round(v, 2) for k_, v in ms_warm.items()},
            "sa_over_kernel_warm": ms_warm["sdpa"] / ms_warm["kernel"],
            "kernel_over_floor_warm": ms_warm["kernel"] / ms_warm["floor"],
            "spread_block_ms": [round(min(times["block"]), 2), round(max(times["block"]), 2)]}


def table(rows, markdown: bool) -> str:
    head = ["layer", "grid", "SDPA module", "ΔConv, concat", "ΔConv", "ΔConv, CPU kernel", "floor", "SA ÷ ΔConv",
            "SA ÷ ΔConv kernel", "FLOPs ratio", "concat ÷ floor", "ΔConv ÷ floor", "kernel ÷ floor",
            "kernel ÷ floor, back to back"]
    body = [[r["layer"], f"{r['grid']}²", f"{r['ms']['sdpa']:.1f} ms", f"{r['ms']['concat']:.1f} ms",
             f"{r['ms']['block']:.1f} ms", f"{r['ms']['kernel']:.1f} ms", f"{r['ms']['floor']:.1f} ms",
             f"{r['sa_over_block']:.1f}×", f"{r['sa_over_kernel']:.1f}×", f"{r['flops_ratio']:.1f}×",
             f"{r['concat_over_floor']:.2f}×", f"{r['block_over_floor']:.2f}×", f"{r['kernel_over_floor']:.2f}×",
             f"{r['kernel_over_floor_warm']:.2f}× ({r['ms_warm']['kernel']:.1f} / {r['ms_warm']['floor']:.1f} ms)"]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def cpu_name() -> str:
    """The CPU's model name and widest vector extension (Linux), else the architecture."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return f"{platform.machine()} CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = "AVX-512" + (" and AMX" if "amx_tile" in flags else "") if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{os.cpu_count()}-core {name}" + (f" ({isa})" if isa else "")


def main(argv=None):
    args = parse_args(argv)
    from attnprobe.core.cli import calm_threads, omp_wait_setting

    calm_threads()  # the command lines' OpenMP waiting (before torch loads OpenMP; a value you set is kept)
    import torch

    from deltadistill import cpu_kernel

    if not cpu_kernel.available():
        raise SystemExit("cpu_block_floor: the CPU kernel did not build here (see the warning above); it needs a C compiler")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(*shape, args.repeats) for shape in SHAPES]
    print(f"{date.today()}, {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fp32, batch 1, median of {args.repeats} interleaved rounds (each op timed after the one before it in a "
          f"random order per round, then back to back), threads wait by {omp_wait_setting()}")
    print(table(rows, args.markdown))
    if args.json:
        meta = {"date": str(date.today()), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "repeats": args.repeats, "omp_wait": omp_wait_setting(),
                "timing": "ms: each op once per round, rounds in a random order each (seeded); ms_warm: the same op "
                          "timed again at once (back to back); medians over rounds"}
        with open(args.json, "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
