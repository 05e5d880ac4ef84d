"""Triton ΔConvBlock kernels vs the float64 PyTorch reference: forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
any kernel module is imported). The interpreter costs ~1 ms per tap per program, so the shapes are
tiny but awkward: odd H and W that do not fill a tile, channel counts that are not a multiple of
the channel block, K = 3 (several tiles) and K = 13 (kernel larger than the image). bf16 runs only
on a GPU (the interpreter's bf16 arithmetic is not faithful). With a CUDA device the same tests
run the compiled kernels on the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of a kernel module

import importlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from attnprobe.core import backends  # noqa: E402
from deltadistill import ops  # noqa: E402
import deltadistill.kernels.dwconv as dwk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and not dwk.INTERPRET:  # imported earlier without the interpreter: rebuild the kernels
    dwk = importlib.reload(dwk)
    for name in ("common", "pool", "adaptive_pool", "gate", "upsample", "stage"):
        importlib.reload(importlib.import_module(f"deltadistill.kernels.{name}"))
DEVICE = "cpu" if INTERPRET else "cuda"

# tolerance per dtype: |got - ref| <= atol * max|ref| + rtol * |ref|
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
DTYPES = [torch.float32, torch.float16]


def seed(*key) -> None:
    """Fresh, reproducible random inputs per test case."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare against a float64 reference with the dtype's tolerance; say how many differ and where."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    tol = TOL[dtype]
    scale = r.abs().nan_to_num(0.0).max().item() or 1.0
    err = (g - r).abs().nan_to_num(float("inf"))
    bad = ~(err <= tol["atol"] * scale + tol["rtol"] * r.abs())  # also catches NaN
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        first = tuple(where[0])
        raise AssertionError(
            f"{what} [{str(dtype).replace('torch.', '')}]: {int(bad.sum())} of {bad.numel()} elements differ "
            f"beyond rtol={tol['rtol']}, atol={tol['atol']}·max|ref|={tol['atol'] * scale:.3g}; "
            f"max abs err {err.max().item():.3g} (max |ref| {scale:.3g}); first at index {first}: "
            f"got {g[first].item():.6g}, expected {r[first].item():.6g}; more at {where[1:]}"
        )


def run_both(fn_triton, fn_ref, inputs, dtype, what, grad_inputs=None):
    """Run ``fn_triton`` on ``inputs`` (cast to dtype) and ``fn_ref`` on float64 copies of the same
    values; compare the outputs and the gradients of every floating-point input."""
    xs = [t.to(DEVICE, dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    x64 = [t.detach().double().cpu().requires_grad_() if t.is_floating_point() else t for t in xs]
    y = fn_triton(*xs)
    y64 = fn_ref(*x64)
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, expected {dtype}"
    assert_close(y, y64, dtype, f"{what} forward")
    dy = torch.randn(y64.shape, dtype=torch.float64)
    y.backward(dy.to(DEVICE, dtype))
    y64.backward(dy)
    names = grad_inputs or [f"input {i}" for i in range(len(xs))]
    for name, a, b in zip(names, xs, x64):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert a.grad is not None, f"{what}: no gradient for {name}"
            assert_close(a.grad, b.grad, dtype, f"{what} d/d {name}")


# ----------------------------------------------------------------------------------------------
# depth-wise conv
# ----------------------------------------------------------------------------------------------

CONV_CASES = [
    # (B, H, W, C, K): interpreter tile is 8×8 pixels × 16 channels
    pytest.param((2, 11, 19, 20), 3, id="K3-multi-tile-tails"),
    pytest.param((1, 5, 7, 12), 13, id="K13-kernel-larger-than-image"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape,k", CONV_CASES)
def test_dwconv_kernel(shape, k, dtype):
    seed("dwconv", shape, k, dtype)
    c = shape[-1]
    x, w, b = torch.randn(shape), torch.randn(c, k, k) / k, torch.randn(c)
    run_both(
        lambda x, w, b: ops.dwconv_nhwc(x, w, b, backend="triton"),
        ops.dwconv_nhwc_reference,
        [x, w, b],
        dtype,
        f"dwconv K={k} {shape}",
        ["x", "weight", "bias"],
    )


def test_dwconv_kernel_no_bias_and_references():
    seed("dwconv-nobias")
    x, w = torch.randn(1, 9, 10, 18), torch.randn(18, 5, 5)
    run_both(lambda x, w: ops.dwconv_nhwc(x, w, None, backend="triton"), ops.dwconv_nhwc_reference, [x, w],
             torch.float32, "dwconv no bias", ["x", "weight"])
    # the launchers against their *_reference twins
    x64 = x.double()
    dy = torch.randn(1, 9, 10, 18)
    wt = dwk.tap_major(w.to(DEVICE))
    dx = dwk.dwconv_launch(dy.to(DEVICE).contiguous(), wt, None, 5, flip=True)
    assert_close(dx, dwk.dwconv_dgrad_reference(dy.double(), w.double()), torch.float32, "dgrad launcher")
    dw, db = dwk.dwconv_wgrad(x.to(DEVICE), dy.to(DEVICE), 5)
    dw_ref, db_ref = dwk.dwconv_wgrad_reference(x64, dy.double(), 5)
    assert_close(dw, dw_ref, torch.float32, "wgrad launcher (weight)")
    assert_close(db, db_ref, torch.float32, "wgrad launcher (bias)")


def test_dwconv_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd K"):
        ops.dwconv_nhwc(torch.randn(1, 4, 4, 2, device=DEVICE), torch.randn(2, 4, 4, device=DEVICE), None,
                        backend="triton")


# ----------------------------------------------------------------------------------------------
# pooling, upsampling, gate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 7, 9, 20), (1, 6, 8, 5)], ids=["odd-HW", "even-HW"])
def test_avgpool2_kernel(shape, dtype):
    seed("pool", shape, dtype)
    run_both(lambda x: ops.avgpool2_nhwc(x, backend="triton"), ops.avgpool2_nhwc_reference, [torch.randn(shape)],
             dtype, f"avgpool2 {shape}", ["x"])


UPSAMPLE_CASES = [
    pytest.param((3, 5), (5, 9), id="odd-2x"),
    pytest.param((4, 4), (8, 8), id="even-2x"),
    pytest.param((7, 7), (3, 5), id="downsample"),
    pytest.param((1, 2), (4, 5), id="degenerate-1px"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("src,dst", UPSAMPLE_CASES)
def test_upsample_kernel(src, dst, dtype):
    seed("up", src, dst, dtype)
    run_both(lambda x: ops.upsample_bilinear_nhwc(x, dst, backend="triton"),
             lambda x: ops.upsample_bilinear_nhwc_reference(x, dst), [torch.randn(2, *src, 20)], dtype,
             f"upsample {src}->{dst}", ["x"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["scaled", "sigmoid"])
def test_gate_kernel(mode, dtype):
    seed("gate", mode, dtype)
    run_both(lambda x: ops.gate(x, mode, 0.3, backend="triton"), lambda x: ops.gate_reference(x, mode, 0.3),
             [torch.randn(2, 3, 5, 40)], dtype, f"gate {mode}", ["x"])


# ----------------------------------------------------------------------------------------------
# fused ops
# ----------------------------------------------------------------------------------------------


STAGE_CASES = [
    pytest.param(3, "scaled", torch.float32, "ceil", id="K3-scaled-float32-ceil"),
    pytest.param(3, "sigmoid", torch.float16, "ceil", id="K3-sigmoid-float16-ceil"),
    pytest.param(13, "scaled", torch.float16, "ceil", id="K13-scaled-float16-ceil"),
    pytest.param(13, "sigmoid", torch.float32, "ceil", id="K13-sigmoid-float32-ceil"),
    pytest.param(3, "scaled", torch.float32, None, id="K3-scaled-float32-full"),
    pytest.param(5, "sigmoid", torch.float16, None, id="K5-sigmoid-float16-full"),
    pytest.param(3, "sigmoid", torch.float32, "adaptive", id="K3-sigmoid-float32-adaptive"),
    pytest.param(5, "scaled", torch.float16, "adaptive", id="K5-scaled-float16-adaptive"),
]


@pytest.mark.parametrize("k,mode,dtype,pool", STAGE_CASES)
def test_stage_kernel(k, mode, dtype, pool):
    seed("stage", k, mode, dtype, pool)
    c = 24 if k == 3 else 8  # K=3: two channel blocks per half with a tail; K=13: kept small (slow in the interpreter)
    x, w, b = torch.randn(1, 9, 13, c), torch.randn(c, k, k) / k, torch.randn(c)
    size = ops.adaptive_size(9, 13) if pool == "adaptive" else None  # (4, 6): overlapping windows
    run_both(lambda x, w, b: ops.stage(x, w, b, mode, 0.3, pool=pool, size=size, backend="triton"),
             lambda x, w, b: ops.stage_reference(x, w, b, mode, 0.3, pool=pool, size=size), [x, w, b], dtype,
             f"stage K={k} {mode} pool={pool}", ["x", "weight", "bias"])


def test_stage_inference_skips_pre_gate_buffer():
    seed("stage-nograd")
    x, w, b = torch.randn(1, 6, 7, 8), torch.randn(8, 3, 3), torch.randn(8)
    with torch.no_grad():
        y = ops.stage(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), "scaled", 0.5, pool="ceil", backend="triton")
    assert_close(y, ops.stage_reference(x.double(), w.double(), b.double(), "scaled", 0.5, pool="ceil"), torch.float32,
                 "stage no-grad")


def _adaptive_pool_explicit(x: torch.Tensor, size) -> torch.Tensor:
    """Adaptive average pooling written out: window [⌊i·H/h⌋, ⌈(i+1)·H/h⌉) per axis (float64, NHWC)."""
    bsz, hh, ww, c = x.shape
    h, w = size
    out = torch.zeros(bsz, h, w, c, dtype=torch.float64)
    for i in range(h):
        r0, r1 = (i * hh) // h, -((-(i + 1) * hh) // h)
        for j in range(w):
            c0, c1 = (j * ww) // w, -((-(j + 1) * ww) // w)
            out[:, i, j] = x[:, r0:r1, c0:c1].double().mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("grid", [(7, 9), (15, 17), (16, 16)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_adaptive_pool_matches_explicit_windows(grid, backend):
    seed("adaptive", grid)
    size = ops.adaptive_size(*grid)
    assert size == (grid[0] // 2, grid[1] // 2)
    x = torch.randn(2, *grid, 20)
    want = _adaptive_pool_explicit(x, size)
    dev = DEVICE if backend == "triton" else "cpu"
    xt = x.clone().to(dev).requires_grad_()
    got = ops.adaptive_pool_nhwc(xt, size, backend=backend)
    assert_close(got, want, torch.float32, f"adaptive pool {grid} ({backend})")
    dy = torch.randn(want.shape, dtype=torch.float64)
    got.backward(dy.to(dev, torch.float32))
    x64 = x.double().requires_grad_()
    _adaptive_pool_explicit(x64, size).backward(dy)
    assert_close(xt.grad, x64.grad, torch.float32, f"adaptive pool d/dx {grid} ({backend})")


@pytest.mark.parametrize("pool", ["ceil", "adaptive"])
def test_block_pool_modes_agree_on_even_grids_and_differ_on_odd(pool):
    block_mod = pytest.importorskip("deltadistill.block")
    seed("pool-modes")
    blocks = {p: block_mod.DeltaConvBlock(16, 3, pool=p, backend="reference") for p in ("ceil", "adaptive")}
    with torch.no_grad():
        for p in blocks["ceil"].parameters():
            p.normal_(0, 0.3)
    blocks["adaptive"].load_state_dict(blocks["ceil"].state_dict())
    even, odd = torch.randn(1, 8, 10, 16), torch.randn(1, 7, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(blocks["ceil"](even), blocks["adaptive"](even))
        assert (blocks["ceil"](odd) - blocks["adaptive"](odd)).abs().max() > 1e-3


@pytest.mark.parametrize("pool,dw_bias,gate", [("ceil", True, "scaled"), ("adaptive", False, "sigmoid")])
def test_delta_conv_block_triton_backend_matches_reference(pool, dw_bias, gate):
    block_mod = pytest.importorskip("deltadistill.block", reason="deltadistill.block not available")
    seed("block", pool)
    blocks = {}
    for be in ("triton", "reference"):
        blk = block_mod.DeltaConvBlock(16, 5, scales=(1, 0.5, 0.25), backend=be, pool=pool, dw_bias=dw_bias, gate=gate)
        blocks[be] = blk
    with torch.no_grad():  # the block zero-initialises proj_out; give every branch a say
        ref = blocks["reference"]
        for lin in (ref.proj_out, ref.global_proj):
            lin.weight.normal_(0, lin.in_features**-0.5)
        for stage in ref.stages:
            if stage.bias is not None:
                stage.bias.normal_(0, 0.1)
    blocks["triton"].load_state_dict(blocks["reference"].state_dict())
    _triton_block_matches_float64(blocks["triton"], blocks["reference"], "DeltaConvBlock")


def _triton_block_matches_float64(tri, ref, what: str) -> None:
    """Forward and every gradient of a Triton-backed block against its float64 reference twin, on a 7×9 grid."""
    tri, ref = tri.to(DEVICE), ref.double()
    z = torch.randn(2, 7, 9, 16)
    z_t, z_r = z.to(DEVICE).clone().requires_grad_(), z.double().requires_grad_()
    y_t, y_r = tri(z_t), ref(z_r)
    assert_close(y_t, y_r, torch.float32, f"{what} forward (triton backend)")
    dy = torch.randn(y_r.shape, dtype=torch.float64)
    y_t.backward(dy.to(DEVICE, torch.float32))
    y_r.backward(dy)
    assert_close(z_t.grad, z_r.grad, torch.float32, f"{what} d/dz")
    for (name, p_t), p_r in zip(tri.named_parameters(), ref.parameters()):
        assert_close(p_t.grad, p_r.grad, torch.float32, f"{what} d/d {name}")


def test_key_weighted_branch_triton_backend_matches_reference():
    """The key-weighted branch (key_width > 0) on the Triton kernels: forward and every gradient against float64."""
    block_mod = pytest.importorskip("deltadistill.block", reason="deltadistill.block not available")
    seed("block", "keyed")
    ref = block_mod.DeltaConvBlock(16, 5, scales=(1, 0.5), backend="reference", gate="sigmoid", key_width=4)
    with torch.no_grad():  # zero-initialised outputs and uniform taps would hide the branch
        for lin in (ref.proj_out, ref.global_proj, ref.key_out):
            lin.weight.normal_(0, lin.in_features**-0.5)
        ref.key_taps.normal_(0, 1.0)
        ref.key_qkv.weight[4:8] *= 6.0  # keys over a wide range
    tri = block_mod.DeltaConvBlock(16, 5, scales=(1, 0.5), backend="triton", gate="sigmoid", key_width=4)
    tri.load_state_dict(ref.state_dict())
    _triton_block_matches_float64(tri, ref, "key-weighted block")


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def test_resolve_backend_auto_and_forced():
    from deltadistill import cpu_kernel

    x = torch.zeros(1, 2, 2, 4)  # CPU tensor
    for op in ops.OPS:  # auto: never Triton for a CPU tensor; the compiled CPU kernel where it covers the op
        want = "cpu" if op in ("dwconv", "stage") and cpu_kernel.available() else "reference"
        assert ops.resolve_backend(op, x) == want, f"auto mode must keep CPU tensors off Triton ({op})"
        assert ops.resolve_backend(op, x, "reference") == "reference"
        assert ops.resolve_backend(op, x, "triton") == "triton", f"forced triton under the interpreter ({op})"
        assert backends.implementations(op)["triton"].__module__.startswith("deltadistill.kernels.")


# ----------------------------------------------------------------------------------------------
# bf16 (GPU only)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="bf16 kernels are checked compiled on a CUDA device only (no CUDA, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("k", [3, 13])
def test_bf16_kernels_on_gpu(k):
    dtype = torch.bfloat16
    seed("bf16", k)
    c = 40
    x, w, b = torch.randn(2, 13, 21, c), torch.randn(c, k, k) / k, torch.randn(c)
    run_both(lambda x, w, b: ops.dwconv_nhwc(x, w, b, backend="triton"), ops.dwconv_nhwc_reference, [x, w, b],
             dtype, f"dwconv bf16 K={k}", ["x", "weight", "bias"])
    for pool, size in (("ceil", None), (None, None), ("adaptive", ops.adaptive_size(13, 21))):
        run_both(lambda x, w, b: ops.stage(x, w, b, "scaled", 0.3, pool=pool, size=size, backend="triton"),
                 lambda x, w, b: ops.stage_reference(x, w, b, "scaled", 0.3, pool=pool, size=size), [x, w, b], dtype,
                 f"stage bf16 K={k} pool={pool}", ["x", "weight", "bias"])
    xu = torch.randn(2, 7, 11, c)
    run_both(lambda x: ops.upsample_bilinear_nhwc(x, (13, 21), backend="triton"),
             lambda x: ops.upsample_bilinear_nhwc_reference(x, (13, 21)), [xu], dtype, "upsample bf16", ["x"])
