"""GPU benchmark of the Triton kernels: correctness against the PyTorch references, then timings.

Run on a machine with a CUDA GPU (and Triton):

    python benchmarks/gpu_kernels.py                      # PixArt shapes: C=1152, K=13, B=2, bf16
    python benchmarks/gpu_kernels.py --grids 32 64 --json out.json

Sections (all timings: ``triton.testing.do_bench``, median, milliseconds):

1. checks   — every Triton op (forward and gradients) against its reference, bf16 and fp32, on
              awkward shapes; the ring-mass kernel against its reference.
2. block    — ΔConvBlock(C, K) forward and forward+backward with backend="triton" vs
              backend="reference" vs a diffusers self-attention ``Attention(query_dim=C, heads=16,
              dim_head=72)`` with SDPA (AttnProcessor2_0), per grid side (N = side² tokens).
3. dwconv   — the depth-wise conv kernel alone on the block's inner width C·ρ: achieved bandwidth
              (bytes that must move: read x, write y / measured time) as a fraction of the
              measured copy bandwidth (a large ``torch.empty_like(x).copy_(x)``), plus FMA rate.
              A K×K depth-wise conv does K² FMAs per element, so at K=13 it is bounded by the
              FP32 pipes before HBM: the fraction is reported, not expected to reach 1.
4. ringmass — fused attention→ring-mass kernel vs its PyTorch reference vs SDPA forward on the
              same q, k (v = k).

Without a GPU the script prints a message and exits with status 0.

    python benchmarks/gpu_kernels.py --smoke              # no GPU needed: a test of this script

``--smoke`` runs every section on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by
the script before any kernel is imported), at tiny shapes, in fp32 only (the interpreter's bf16
arithmetic is not faithful), timed by a wall clock: its numbers say nothing about a GPU, but every line
of the script runs, so that the first GPU run does not fail on the script itself
(``tests/test_bench.py`` runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _fail_soft(msg: str) -> None:
    print(msg)
    sys.exit(0)


SMOKE = False  # --smoke: CPU, Triton's interpreter, a wall clock


def _bench(fn, warmup=25, rep=100) -> float:
    if SMOKE:  # one warm-up call and two timed ones: enough to run the code, not to time it
        import statistics
        import time

        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _md_table(title: str, header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------


def run_checks(dev, quick: bool = False, dtypes=(torch.float32, torch.bfloat16)) -> list[list]:
    from deltadistill import ops

    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    rows = []
    # the fp32 references must really be fp32 (cuDNN convolutions default to TF32); restored at the end
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    def check(name, fn, inputs, dtype):
        torch.manual_seed(0)
        xs = [t.to(dev, dtype).clone().requires_grad_() for t in inputs]
        x32 = [t.detach().float().requires_grad_() for t in xs]
        y = fn("triton", *xs)
        y32 = fn("reference", *x32)
        dy = torch.randn_like(y32)
        y.backward(dy.to(dtype))
        y32.backward(dy)
        errs = [_rel_err(y, y32)] + [_rel_err(a.grad, b.grad) for a, b in zip(xs, x32)]
        ok = max(errs) <= tol[dtype]
        rows.append([name, str(dtype).replace("torch.", ""), f"{errs[0]:.2e}", f"{max(errs[1:]):.2e}",
                     "ok" if ok else "FAIL"])

    bsz, h, w_, c, k = (1, 9, 11, 24, 5) if quick else (2, 37, 45, 200, 13)
    for dtype in dtypes:
        x, w, b = torch.randn(bsz, h, w_, c), torch.randn(c, k, k) / k, torch.randn(c)
        check("dwconv K=13", lambda be, x, w, b: ops.dwconv_nhwc(x, w, b, backend=be), [x, w, b], dtype)
        check("dwconv K=3", lambda be, x, w, b: ops.dwconv_nhwc(x, w, b, backend=be),
              [x, torch.randn(c, 3, 3) / 3, b], dtype)
        check("avgpool2", lambda be, x: ops.avgpool2_nhwc(x, backend=be), [x], dtype)
        check("upsample", lambda be, x: ops.upsample_bilinear_nhwc(x, (2 * h + 1, 2 * w_ - 1), backend=be), [x], dtype)
        check("gate sigmoid", lambda be, x: ops.gate(x, "sigmoid", backend=be), [x], dtype)
        check("stage (pool)", lambda be, x, w, b: ops.stage(x, w, b, "scaled", 0.1, pool="ceil", backend=be), [x, w, b],
              dtype)
        check("stage (full)", lambda be, x, w, b: ops.stage(x, w, b, "sigmoid", 1.0, pool=None, backend=be), [x, w, b],
              dtype)

    from attnprobe.kernels.ringmass import ring_mass_attention, ring_mass_attention_reference

    for dtype in dtypes:
        torch.manual_seed(0)
        grid = (5, 7) if quick else (24, 40)
        n = grid[0] * grid[1]
        q = torch.randn(2, 4, 7 + n, 72, device=dev, dtype=dtype)
        k = torch.randn(2, 4, 7 + n, 72, device=dev, dtype=dtype)
        qi = torch.randperm(n, device=dev)[: max(1, n // 3)]
        got = ring_mass_attention(q, k, grid, qi, key_slice=(7, 7 + n), backend="triton")
        ref = ring_mass_attention_reference(q.float(), k.float(), grid, qi, key_slice=(7, 7 + n))
        err = (got - ref).abs().max().item()
        rows.append([f"ring_mass (joint, {grid[0]}x{grid[1]})", str(dtype).replace("torch.", ""), f"{err:.2e} abs", "-",
                     "ok" if err <= (1e-5 if dtype == torch.float32 else 2e-3) else "FAIL"])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


# ----------------------------------------------------------------------------------------------
# 2. ΔConvBlock vs self-attention
# ----------------------------------------------------------------------------------------------


def _make_block(dim, k, backend, dev, dtype):
    from deltadistill.block import DeltaConvBlock

    torch.manual_seed(0)
    blk = DeltaConvBlock(dim, k, backend=backend)
    with torch.no_grad():  # the block's init zeroes proj_out; make every branch contribute
        for lin in (blk.proj_out, blk.global_proj):
            lin.weight.normal_(0, lin.in_features**-0.5)
        for stage in blk.stages:
            stage.bias.normal_(0, 0.1)
    return blk.to(dev, dtype)


def run_block(dev, args) -> list[list]:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    dtype = args.dtype
    dim, k, bsz = args.dim, args.kernel, args.batch
    tri = _make_block(dim, k, "triton", dev, dtype)
    ref = _make_block(dim, k, "reference", dev, dtype)
    ref.load_state_dict(tri.state_dict())
    attn = Attention(query_dim=dim, heads=16, dim_head=72).to(dev, dtype)
    attn.set_processor(AttnProcessor2_0())
    rows = []
    for side in args.grids:
        z = torch.randn(bsz, side, side, dim, device=dev, dtype=dtype)
        tokens = z.reshape(bsz, side * side, dim)
        with torch.no_grad():
            err = _rel_err(tri(z), ref(z))
            t_fwd = [_bench(lambda: tri(z)), _bench(lambda: ref(z)), _bench(lambda: attn(tokens))]
        zg = z.clone().requires_grad_()
        tg = tokens.clone().requires_grad_()
        dy = torch.randn_like(z)

        def fb(mod, inp, dy=dy):
            out = mod(inp)
            out.backward(dy.reshape(out.shape))

        t_fb = [
            _bench(lambda: fb(tri, zg), rep=args.rep),
            _bench(lambda: fb(ref, zg), rep=args.rep),
            _bench(lambda: fb(attn, tg), rep=args.rep),
        ]
        rows.append([f"{side}x{side}", side * side, *t_fwd, t_fwd[1] / t_fwd[0], t_fwd[2] / t_fwd[0],
                     *t_fb, t_fb[1] / t_fb[0], t_fb[2] / t_fb[0], f"{err:.1e}"])
        del z, zg, tg, dy, tokens
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# 3. dwconv bandwidth
# ----------------------------------------------------------------------------------------------


def copy_bandwidth(dev) -> float:
    """Measured device copy bandwidth in GB/s (read + write of a 1 GiB bf16 tensor; 1 MiB with --smoke)."""
    x = torch.empty((1 if SMOKE else 512) * 1024 * 1024, device=dev, dtype=torch.bfloat16)
    ms = _bench(lambda: torch.empty_like(x).copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6


def run_dwconv(dev, args, copy_gbs) -> list[list]:
    from deltadistill.kernels.dwconv import dwconv_launch, dwconv_wgrad, tap_major
    from deltadistill import ops

    dtype = args.dtype
    c = int(args.dim * 0.5)  # the block's inner width C·ρ
    k = args.kernel
    rows = []
    for side in args.grids:
        x = torch.randn(args.batch, side, side, c, device=dev, dtype=dtype)
        dy = torch.randn_like(x)
        w = torch.randn(c, k, k, device=dev, dtype=dtype) / k
        b = torch.randn(c, device=dev, dtype=dtype)
        wt = tap_major(w)
        nbytes = 2 * x.numel() * x.element_size()  # read x, write y
        t_f = _bench(lambda: dwconv_launch(x, wt, b, k))
        t_d = _bench(lambda: dwconv_launch(dy, wt, None, k, flip=True))
        t_w = _bench(lambda: dwconv_wgrad(x, dy, k))
        t_ref = _bench(lambda: ops.dwconv_nhwc_reference(x, w, b).contiguous())
        gbs = nbytes / t_f / 1e6
        tflops = 2 * k * k * x.numel() / t_f / 1e9
        rows.append([f"{side}x{side}", c, t_f, t_d, t_w, t_ref, gbs, gbs / copy_gbs, tflops])
    return rows


# ----------------------------------------------------------------------------------------------
# 4. ring mass
# ----------------------------------------------------------------------------------------------


def run_ringmass(dev, args) -> list[list]:
    import torch.nn.functional as F

    from attnprobe.kernels.ringmass import ring_mass_attention, ring_mass_attention_reference

    dtype = args.dtype
    heads, d = 16, 72
    rows = []
    for side in args.ring_grids:
        n = side * side
        q = torch.randn(args.batch, heads, n, d, device=dev, dtype=dtype)
        k = torch.randn_like(q)
        qi = torch.arange(n, device=dev)
        t_k = _bench(lambda: ring_mass_attention(q, k, (side, side), qi, backend="triton"))
        t_s = _bench(lambda: F.scaled_dot_product_attention(q, k, k))
        if side <= args.ring_ref_max:
            t_r = _bench(lambda: ring_mass_attention_reference(q, k, (side, side), qi), warmup=1, rep=20)
            err = (ring_mass_attention(q, k, (side, side), qi, backend="triton")
                   - ring_mass_attention_reference(q, k, (side, side), qi))
            err = f"{err.abs().max().item():.1e}"
        else:
            t_r, err = float("nan"), "-"
        rows.append([f"{side}x{side}", n, t_k, t_r, t_s, t_r / t_k, t_k / t_s, err])
        del q, k
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128, 256], help="token grid sides for the block")
    ap.add_argument("--ring-grids", type=int, nargs="+", default=[32, 64, 128], help="grid sides for ring mass")
    ap.add_argument("--ring-ref-max", type=int, default=64, help="largest side timed with the PyTorch reference")
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--kernel", type=int, default=13)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms) for fwd+bwd")
    ap.add_argument("--skip", nargs="*", default=[], choices=["checks", "block", "dwconv", "ringmass"])
    ap.add_argument("--json", type=Path, help="also write all tables to this JSON file")
    ap.add_argument("--quick", action="store_true", help="small correctness shapes (smoke test)")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: run every section on the CPU in Triton's interpreter, tiny shapes, fp32 (tests the script)")
    args = ap.parse_args(argv)
    args.dtype = torch.bfloat16
    if args.smoke:
        return _smoke(args)

    if not torch.cuda.is_available():
        _fail_soft("No CUDA GPU is visible: the Triton kernel benchmark needs one. "
                   "Run `python benchmarks/gpu_kernels.py` on a GPU machine (CPU correctness is covered by "
                   "`pytest tests/test_triton_kernels.py tests/test_triton_ringmass.py`).")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fail_soft("TRITON_INTERPRET=1 is set: timings of the interpreter are meaningless; unset it and rerun.")
    try:
        import triton  # noqa: F401
    except ImportError:
        _fail_soft("Triton is not installed: `pip install triton` (or the project's [triton] extra) and rerun.")

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"# Triton kernel benchmark on {name} (torch {torch.__version__}, triton {triton.__version__})\n")
    return _sections(args, dev, name, triton.__version__)


def _smoke(args) -> int:
    """--smoke: the sections on the CPU, in Triton's interpreter, at tiny shapes, in fp32."""
    global SMOKE
    if any(m.startswith("deltadistill.kernels") or m.startswith("attnprobe.kernels") for m in sys.modules):
        raise SystemExit("--smoke must set TRITON_INTERPRET=1 before the kernels are imported; run the script afresh")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
    except ImportError:
        _fail_soft("Triton is not installed: `pip install triton` (or the project's [triton] extra) and rerun.")
    SMOKE = True
    args.dim, args.batch, args.quick, args.dtype = 32, 1, True, torch.float32
    args.grids, args.ring_grids, args.ring_ref_max = [8], [4], 4
    print("# --smoke: CPU, Triton's interpreter, tiny shapes, fp32; the times say nothing about a GPU\n")
    return _sections(args, torch.device("cpu"), "cpu (smoke, TRITON_INTERPRET=1)", triton.__version__)


def _sections(args, dev, name, triton_version) -> int:
    out = {"device": name, "torch": torch.__version__, "triton": triton_version,
           "args": vars(args) | {"json": None, "dtype": str(args.dtype)}}

    if "checks" not in args.skip:
        rows = run_checks(dev, args.quick, dtypes=(torch.float32,) if SMOKE else (torch.float32, torch.bfloat16))
        print(_md_table("Correctness vs PyTorch reference (max error / max |ref|)",
                        ["op", "dtype", "forward", "grads (worst)", "status"], rows))
        out["checks"] = rows
        if any(r[-1] == "FAIL" for r in rows):
            print("**Some checks FAILED** — timings below are of kernels that disagree with the reference.\n")
    if "block" not in args.skip:
        rows = run_block(dev, args)
        print(_md_table(
            f"ΔConvBlock(C={args.dim}, K={args.kernel}) vs diffusers Attention (SDPA), B={args.batch}, {_dt(args)} (ms)",
            ["grid", "N", "fwd triton", "fwd reference", "fwd SDPA attn", "ref/triton", "attn/triton",
             "f+b triton", "f+b reference", "f+b SDPA attn", "ref/triton", "attn/triton", "fwd rel err"],
            rows))
        out["block"] = rows
    if "dwconv" not in args.skip:
        copy_gbs = copy_bandwidth(dev)
        print(f"Measured copy bandwidth (torch copy_ of {'1 MiB' if SMOKE else '1 GiB'}): {copy_gbs:.0f} GB/s\n")
        rows = run_dwconv(dev, args, copy_gbs)
        print(_md_table(
            f"Depth-wise conv kernel, K={args.kernel}, B={args.batch}, {_dt(args)} (ms; bandwidth = 2·|x| bytes / fwd time)",
            ["grid", "C", "fwd", "dgrad", "wgrad", "reference fwd (cuDNN)", "fwd GB/s", "fraction of copy BW",
             "fwd TFLOP/s"],
            rows))
        out["copy_GBps"] = copy_gbs
        out["dwconv"] = rows
    if "ringmass" not in args.skip:
        rows = run_ringmass(dev, args)
        print(_md_table(
            f"Ring mass (all queries, 16 heads, d=72, B={args.batch}, {_dt(args)}) (ms)",
            ["grid", "N", "triton", "reference", "SDPA fwd", "ref/triton", "triton/SDPA", "max abs err"],
            rows))
        out["ringmass"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if any(r[-1] == "FAIL" for r in out.get("checks", [])) else 0  # a failed check fails the run


def _dt(args) -> str:
    return str(args.dtype).replace("torch.", "")


if __name__ == "__main__":
    sys.exit(main())
