"""The compiled CPU stage kernel (``deltadistill.cpu_kernel``) against float64 PyTorch, and its dispatch."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnprobe.core import backends
from deltadistill import cpu_kernel, ops
from deltadistill.block import DeltaConvBlock

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler here to build the CPU kernel")


def _conv64(x, w, b):
    c, k = w.shape[0], w.shape[-1]
    y = F.conv2d(x.double().permute(0, 3, 1, 2), w.double()[:, None], None if b is None else b.double(),
                 padding=k // 2, groups=c)
    return y.permute(0, 2, 3, 1)


def _gate64(y, mode, scale):
    y1, y2 = y.chunk(2, dim=-1)
    return y1 * y2 * scale if mode == "scaled" else y1 * torch.sigmoid(y2)


# (B, H, W, C, K): channel counts off the vector width (20, 34, 36), grids smaller than the kernel,
# odd grids, rows and columns on both sides of the register tile (W = 16, K = 3 and W = 20, K = 11:
# a tile of 8 columns whose last tap ends exactly on the grid's edge), and the PixArt/SD stage shapes.
SHAPES = [(1, 7, 9, 20, 3), (2, 13, 11, 36, 5), (1, 16, 16, 48, 13), (1, 5, 5, 32, 13), (1, 3, 2, 34, 9),
          (2, 17, 23, 64, 7), (2, 6, 16, 24, 3), (1, 11, 20, 32, 11), (1, 32, 32, 160, 9), (1, 16, 16, 576, 13),
          (1, 1, 7, 32, 3), (2, 5, 1, 32, 5), (2, 3, 4, 48, 7)]  # a single row or column; a batch smaller than K


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_depthwise_convolution_matches_float64(shape, with_bias):
    b, h, w, c, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    x, wt = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k
    bias = torch.randn(c, generator=g) if with_bias else None
    got = cpu_kernel.dwconv_nhwc_cpu(x, wt, bias)
    ref = _conv64(x, wt, bias)
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode,scale", [("scaled", 0.37), ("sigmoid", 1.0)])
@pytest.mark.parametrize("with_in_bias", [False, True])
def test_fused_stage_matches_float64(shape, mode, scale, with_in_bias):
    """With ``in_bias`` the stage convolves x + in_bias (zero outside the image: the bias is not convolved there)."""
    b, h, w, c, k = shape
    g = torch.Generator().manual_seed(7 + sum(shape))
    x, wt, bias = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k, torch.randn(c, generator=g)
    in_bias = torch.randn(c, generator=g) if with_in_bias else None
    got = cpu_kernel.stage_cpu(x, wt, bias, mode, scale, in_bias=in_bias)
    ref = _gate64(_conv64(x if in_bias is None else x.double() + in_bias.double(), wt, bias), mode, scale)
    assert got.shape == (b, h, w, c // 2)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6)


def _grads64(x, w, b, g):
    """Gradients of Σ g·conv(x) with respect to x, w and b, in float64."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    (_conv64(x, w, b) * g.double()).sum().backward()
    return x.grad, w.grad, None if b is None else b.grad


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_gradient_matches_float64(shape):
    b, h, w, c, k = shape
    g = torch.Generator().manual_seed(3 + sum(shape))
    x, grad = torch.randn(b, h, w, c, generator=g), torch.randn(b, h, w, c, generator=g)
    got = cpu_kernel.dwconv_weight_grad_cpu(x, grad, k)
    ref = _grads64(x, torch.zeros(c, k, k), None, grad)[1]
    assert got.shape == (c, k, k)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.fixture
def threads():
    """Set torch's thread count for one test (the kernel splits its work over that many threads)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("shape", [(2, 13, 11, 36, 5), (1, 16, 16, 48, 13), (1, 16, 16, 576, 13), (1, 2, 9, 160, 9)])
def test_work_split_over_threads_matches_float64(shape, n_threads, threads):
    """Channel blocks per thread (many blocks, or a multiple of the threads) and rows per thread (few blocks)."""
    threads(n_threads)
    b, h, w, c, k = shape
    g = torch.Generator().manual_seed(11 + sum(shape))
    x, wt, bias = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k, torch.randn(c, generator=g)
    torch.testing.assert_close(cpu_kernel.dwconv_nhwc_cpu(x, wt, bias).double(), _conv64(x, wt, bias), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(cpu_kernel.stage_cpu(x, wt, bias, "sigmoid").double(),
                               _gate64(_conv64(x, wt, bias), "sigmoid", 1.0), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_sigmoid_gate_is_exact_far_into_both_tails():
    """The kernel's own exp: σ of ±100 (clamped range) and of everything in between, to float precision."""
    c = 32
    x = torch.zeros(1, 1, 401, c)
    x[..., c // 2:] = torch.linspace(-100, 100, 401)[None, None, :, None]  # x2, the gate's argument
    x[..., : c // 2] = 1.0  # x1
    wt = torch.zeros(c, 3, 3)
    wt[:, 1, 1] = 1.0  # identity convolution
    got = cpu_kernel.stage_cpu(x, wt, None, "sigmoid", 1.0)
    ref = torch.sigmoid(x[..., c // 2:].double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=5e-7, atol=1e-30)


@needs_kernel
@pytest.mark.parametrize("src,dst", [((32, 32), (64, 64)), ((4, 4), (16, 16)), ((4, 6), (7, 11)), ((1, 1), (3, 5)),
                                     ((8, 9), (8, 9)), ((7, 5), (13, 9))])
def test_fused_upsample_add_matches_float64(src, dst, threads):
    """out += bilinear(y) against F.interpolate in float64: 2× and 4× (the pyramid's stages), odd grids of the ceil
    pooling, a 1×1 source and equal sizes."""
    threads(2)
    g = torch.Generator().manual_seed(sum(src) + sum(dst))
    y, out = torch.randn(2, *src, 40, generator=g), torch.randn(2, *dst, 40, generator=g)
    ref = out.double() + F.interpolate(y.double().permute(0, 3, 1, 2), size=dst, mode="bilinear",
                                       align_corners=False).permute(0, 2, 3, 1)
    target = out.clone()
    assert cpu_kernel.upsample_add_cpu(y, target) is target  # in place
    # fp32 source coordinates (PyTorch's CPU rule, too) put the weights ~1e-7 off the float64 ones
    torch.testing.assert_close(target.double(), ref, rtol=1e-5, atol=3e-6)
    bias = torch.randn(2, 40, generator=g)  # per image: the block's output bias with its global branch
    target = out.clone()
    cpu_kernel.upsample_add_cpu(y, target, bias)
    torch.testing.assert_close(target.double(), ref + bias.double()[:, None, None, :], rtol=1e-5, atol=3e-6)
    with pytest.raises(ValueError, match="cannot add"):
        cpu_kernel.upsample_add_cpu(y[..., :8], out)
    with pytest.raises(ValueError, match="bias must be"):
        cpu_kernel.upsample_add_cpu(y, out, bias[0])


@needs_kernel
@pytest.mark.parametrize("gate,pool,scales,grid", [("sigmoid", "ceil", (1, 0.5), (16, 16)),
                                                    ("scaled", "ceil", (1, 0.5, 0.25), (13, 11)),
                                                    ("sigmoid", "ceil", (0.5, 0.25), (12, 12)),
                                                    ("sigmoid", "adaptive", (1, 0.5), (7, 9))])
def test_block_forward_on_the_cpu_kernel_equals_the_reference(gate, pool, scales, grid, monkeypatch):
    monkeypatch.setenv("DELTADISTILL_CPU_AUTOTUNE", "0")  # the kernel on every shape, not the faster of the two
    torch.manual_seed(0)
    block = DeltaConvBlock(48, 5, scales=scales, gate=gate, pool=pool).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        z = torch.randn(2, *grid, 48)
        assert backends.resolve("stage", z) == "cpu"
        assert ops.folds_biases(z)  # proj_in's bias added as the stages pack, proj_out's in the upsample-add
        got = block(z)
        block.backend = "reference"
        ref = block(z)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("pool", [None, "ceil", "adaptive"])
def test_stage_with_an_input_bias_is_the_stage_of_the_biased_input_on_every_path(pool, monkeypatch):
    """ops.stage(x, in_bias=b) = stage(x + b): the kernel without gradients, its training path, the reference, and
    the gradient reaches b; pooling averages, so it commutes with the add."""
    monkeypatch.setenv("DELTADISTILL_CPU_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(5)
    x, wt, bias, b = (torch.randn(2, 9, 7, 32, generator=g), torch.randn(32, 5, 5, generator=g) / 5,
                      torch.randn(32, generator=g), torch.randn(32, generator=g))
    size = (4, 3) if pool == "adaptive" else None
    ref = ops.stage(x + b, wt, bias, "sigmoid", 1.0, pool=pool, size=size, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(ops.stage(x, wt, bias, "sigmoid", 1.0, pool=pool, size=size, backend="cpu", in_bias=b),
                                   ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.stage(x, wt, bias, "sigmoid", 1.0, pool=pool, size=size, backend="reference",
                                         in_bias=b), ref)
    bg = b.clone().requires_grad_()
    got = ops.stage(x, wt, bias, "sigmoid", 1.0, pool=pool, size=size, backend="cpu", in_bias=bg)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    br = b.clone().requires_grad_()
    ops.stage(x + br, wt, bias, "sigmoid", 1.0, pool=pool, size=size, backend="reference").sum().backward()
    torch.testing.assert_close(bg.grad, br.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_stage_with_an_input_bias_where_the_timing_picks_the_reference(monkeypatch):
    """The ``cpu`` stage keeps PyTorch's path where that timed faster; with in_bias it must add the bias itself."""
    monkeypatch.setattr(cpu_kernel, "kernel_is_faster", lambda key, kernel, reference: False)
    g = torch.Generator().manual_seed(8)
    x, wt, bias, b = (torch.randn(1, 6, 10, 32, generator=g), torch.randn(32, 3, 3, generator=g) / 3,
                      torch.randn(32, generator=g), torch.randn(32, generator=g))
    with torch.no_grad():
        got = ops.stage(x, wt, bias, "sigmoid", 1.0, pool="ceil", backend="cpu", in_bias=b)
    ref = _gate64(_conv64(F.avg_pool2d((x + b).double().permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1),
                          wt, bias), "sigmoid", 1.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6)


@needs_kernel
def test_nothing_is_folded_under_autocast_or_around_a_hooked_projection(monkeypatch):
    """Under CPU autocast the projections return bf16 (the kernel does not run): no folding; a hook or an adapter on
    proj_in must still see proj_in run as a module, bias included."""
    monkeypatch.setenv("DELTADISTILL_CPU_AUTOTUNE", "0")
    torch.manual_seed(1)
    block = DeltaConvBlock(48, 5, gate="sigmoid").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        z = torch.randn(2, 8, 8, 48)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ops.folds_biases(z)
        assert ops.folds_biases(z)
        seen = []
        handle = block.proj_in.register_forward_hook(lambda m, i, o: seen.append(o) or o + 1.0)
        got = block(z)
        block.backend = "reference"
        ref = block(z)
        handle.remove()
        assert len(seen) == 2  # the hook ran on both paths
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert (got - block(z)).abs().max() > 1e-3  # and it mattered


@needs_kernel
def test_upsample_add_with_a_bias_is_the_same_on_the_kernel_and_the_reference():
    g = torch.Generator().manual_seed(6)
    y, out, bias = torch.randn(2, 4, 5, 24, generator=g), torch.randn(2, 8, 9, 24, generator=g), torch.randn(2, 24, generator=g)
    with torch.no_grad():
        got = ops.upsample_add(out.clone(), y, backend="cpu", bias=bias)
    ref = ops.upsample_add(out.clone(), y, backend="reference", bias=bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    ref64 = out.double() + bias.double()[:, None, None, :] + F.interpolate(
        y.double().permute(0, 3, 1, 2), size=(8, 9), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(got.double(), ref64, rtol=1e-5, atol=3e-6)


@needs_kernel
def test_auto_takes_the_kernel_and_keeps_the_inference_only_op_out_of_training():
    x = torch.randn(1, 8, 8, 16)
    assert backends.resolve("stage", x) == "cpu"  # the stage has a backward
    assert backends.resolve("upsample_add", x) == "reference"  # in place, no backward: inference only
    with torch.no_grad():
        assert backends.resolve("stage", x) == "cpu"
        assert backends.resolve("upsample_add", x) == "cpu"
        assert backends.resolve("stage", x.double()) == "reference"
        assert backends.resolve("stage", x, "reference") == "reference"
        assert backends.resolve("upsample", x, "cpu") == "reference"  # no compiled upsample: PyTorch's
    with pytest.raises(RuntimeError, match="no gradient recorded"):
        backends.resolve("upsample_add", x, "cpu")
    with pytest.raises(RuntimeError, match="fp32 CPU tensor"):
        backends.resolve("stage", x.double(), "cpu")


@needs_kernel
def test_kernel_refuses_what_it_cannot_compute():
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernel.dwconv_nhwc_cpu(torch.randn(1, 4, 4, 8).double(), torch.randn(8, 3, 3).double())
    with pytest.raises(ValueError, match="odd K"):
        cpu_kernel.dwconv_nhwc_cpu(torch.randn(1, 4, 4, 8), torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        cpu_kernel.stage_cpu(torch.randn(1, 4, 4, 7), torch.randn(7, 3, 3), None, "sigmoid")
    with pytest.raises(ValueError, match="unknown gate"):
        cpu_kernel.stage_cpu(torch.randn(1, 4, 4, 8), torch.randn(8, 3, 3), None, "relu")
    with pytest.raises(ValueError, match="bias must be"):  # would read past the bias
        cpu_kernel.dwconv_nhwc_cpu(torch.randn(1, 4, 4, 32), torch.randn(32, 3, 3), torch.randn(16))
    with pytest.raises(TypeError, match="CPU tensors"):
        cpu_kernel.dwconv_nhwc_cpu(torch.randn(1, 4, 4, 8), torch.randn(8, 3, 3, device="meta"))
    with pytest.raises(ValueError, match="in_bias must be"):  # the stage's input bias: one per channel
        cpu_kernel.stage_cpu(torch.randn(1, 4, 4, 32), torch.randn(32, 3, 3), None, "sigmoid", in_bias=torch.randn(16))
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernel.stage_cpu(torch.randn(1, 4, 4, 32), torch.randn(32, 3, 3), None, "sigmoid",
                             in_bias=torch.randn(32).double())
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernel.upsample_add_cpu(torch.randn(1, 2, 2, 8), torch.zeros(1, 4, 4, 8), torch.randn(1, 8).double())
    with pytest.raises(ValueError, match="must match"):  # the weight gradient needs input and gradient alike
        cpu_kernel.dwconv_weight_grad_cpu(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 5, 8), 3)
    with pytest.raises(ValueError, match="K odd"):
        cpu_kernel.dwconv_weight_grad_cpu(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), 4)
    with pytest.raises(TypeError, match="fp32"):
        cpu_kernel.dwconv_weight_grad_cpu(torch.randn(1, 4, 4, 8).double(), torch.randn(1, 4, 4, 8).double(), 3)
    out = torch.zeros(1, 0, 4, 8)
    assert cpu_kernel.upsample_add_cpu(torch.randn(1, 2, 2, 8), out) is out  # nothing to write
    with pytest.raises(ValueError, match="empty"):
        cpu_kernel.upsample_add_cpu(torch.randn(1, 0, 3, 8), torch.zeros(1, 4, 4, 8))


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel cache of its own and a forgotten build, restored afterwards."""
    monkeypatch.setenv("DELTADISTILL_CACHE", str(tmp_path))
    cpu_kernel._library.cache_clear()
    yield tmp_path
    cpu_kernel._library.cache_clear()


@pytest.mark.parametrize("how", ["no compiler", "broken compiler"])
def test_without_a_working_compiler_the_reference_runs(fresh_kernel, monkeypatch, how):
    if how == "no compiler":
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    else:
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "/bin/false")
    with pytest.warns(UserWarning, match="PyTorch reference"):
        assert not cpu_kernel.available()
    block = DeltaConvBlock(16, 3, gate="sigmoid").eval()
    z = torch.randn(1, 6, 6, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        assert backends.resolve("stage", z) == "reference"
        assert torch.isfinite(block(z)).all()
        with pytest.raises(RuntimeError, match="cannot run"):
            ops.stage(z[..., :8], torch.randn(8, 3, 3), None, "sigmoid", backend="cpu")
    assert not list(fresh_kernel.rglob("*.so"))


@needs_kernel
def test_the_build_is_cached_by_source_and_cpu(fresh_kernel):
    first = cpu_kernel.library_path()
    assert first is not None and first.parent.parent == fresh_kernel
    stamp = first.stat().st_mtime_ns
    cpu_kernel._library.cache_clear()
    assert cpu_kernel.library_path() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in fresh_kernel.rglob("*")] == ["cpu_kernel", first.name]  # no temporary left behind


@needs_kernel
def test_autotune_keeps_the_faster_path_per_shape(monkeypatch):
    """The first call of a shape times both paths and remembers the faster; later calls take it without timing."""
    monkeypatch.setattr(cpu_kernel, "_CHOICE", {})
    calls = []
    slow_kernel = cpu_kernel.stage_cpu

    def kernel(*a, **k):  # a kernel made slow on purpose
        calls.append("kernel")
        import time
        time.sleep(0.01)
        return slow_kernel(*a, **k)

    monkeypatch.setattr(cpu_kernel, "stage_cpu", kernel)
    x, w = torch.randn(1, 8, 8, 32), torch.randn(32, 5, 5)
    with torch.no_grad():
        first = ops.stage(x, w, None, "sigmoid", backend="cpu")
        assert calls == ["kernel"] * 3  # timed three times, then the reference chosen
        again = ops.stage(x, w, None, "sigmoid", backend="cpu")
    assert calls == ["kernel"] * 3 and len(cpu_kernel._CHOICE) == 1 and not next(iter(cpu_kernel._CHOICE.values()))
    ref = ops.stage_reference(x, w, None, "sigmoid")
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(again, ref)


@needs_kernel
def test_the_build_without_avx512_matches_float64(fresh_kernel, threads):
    """The portable build (no -march: 8 lanes, tiles of 2 rows × 4 columns) on shapes with an odd number of rows per
    thread, partial channel blocks and both work splits."""
    cc = cpu_kernel._compiler()
    lib = cpu_kernel._load(cpu_kernel._build(cc, flag_sets=(["-O3"],)))
    assert lib[1] == 8 or lib[1] == 16  # 16 only where the compiler targets AVX-512 by default
    for n_threads in (1, 2, 3):
        threads(n_threads)
        for b, h, w, c, k in [(2, 7, 9, 36, 5), (1, 13, 11, 48, 13), (1, 5, 6, 20, 3), (2, 3, 4, 160, 9)]:
            g = torch.Generator().manual_seed(b + h + w + c + k)
            x, wt, bias = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k, torch.randn(c, generator=g)
            ref = _conv64(x, wt, bias)
            torch.testing.assert_close(cpu_kernel._run(x, wt, bias, None, 1.0, lib=lib).double(), ref, rtol=1e-5, atol=2e-6)
            torch.testing.assert_close(cpu_kernel._run(x, wt, bias, "sigmoid", 1.0, lib=lib).double(),
                                       _gate64(ref, "sigmoid", 1.0), rtol=1e-5, atol=2e-6)
            gref = _grads64(x, wt, None, ref.float())[1]  # any gradient will do: the conv output itself
            torch.testing.assert_close(cpu_kernel.dwconv_weight_grad_cpu(x, ref.float(), k, lib=lib).double(), gref,
                                       rtol=1e-5, atol=1e-5 * float(gref.abs().max()))


def _convolve_in_child(queue, x, w, ref):
    torch.set_num_threads(2)  # two parts; the tensors are too small for PyTorch's own ops to go parallel
    queue.put(float((cpu_kernel.dwconv_nhwc_cpu(x, w).double() - ref).abs().max()))


@needs_kernel
def test_a_forked_child_runs_the_kernel_on_its_own_threads(threads):
    """Neither the parent's pool threads nor its OpenMP team work after fork() (GNU OpenMP waits forever in a child
    whose parent used its team); the child must run the kernel on threads of its own."""
    import multiprocessing

    threads(2)
    cpu_kernel.dwconv_nhwc_cpu(torch.randn(1, 8, 8, 64), torch.randn(64, 3, 3))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    x, w = torch.randn(1, 8, 8, 64), torch.randn(64, 3, 3)
    child = ctx.Process(target=_convolve_in_child, args=(queue, x, w, _conv64(x, w, None)))
    child.start()
    child.join(30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) < 1e-4


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_weight_gradient_work_splits_match_float64(n_threads, threads):
    """Channel blocks per thread (many blocks) and images per thread with partial sums (few blocks, a batch)."""
    threads(n_threads)
    for b, h, w, c, k in [(5, 9, 7, 36, 5), (4, 8, 8, 160, 9), (1, 6, 5, 20, 3), (3, 4, 4, 16, 13)]:
        g = torch.Generator().manual_seed(b * h + c + k)
        x, grad = torch.randn(b, h, w, c, generator=g), torch.randn(b, h, w, c, generator=g)
        ref = _grads64(x, torch.zeros(c, k, k), None, grad)[1]
        torch.testing.assert_close(cpu_kernel.dwconv_weight_grad_cpu(x, grad, k).double(), ref, rtol=1e-5,
                                   atol=1e-5 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 13, 11, 36, 5), (2, 16, 16, 96, 13), (1, 3, 2, 34, 9), (3, 8, 8, 96, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_the_convolution_backward_matches_float64(shape, with_bias, autotune, monkeypatch):
    """The cpu backend's convolution with a gradient recorded: input, weight and bias gradients, always on the kernel
    (autotune off) and on whichever of kernel and oneDNN the per-shape timing picked."""
    monkeypatch.setenv("DELTADISTILL_CPU_AUTOTUNE", autotune)
    b, h, w, c, k = shape
    g = torch.Generator().manual_seed(11 + sum(shape))
    x, wt = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k
    bias = torch.randn(c, generator=g) if with_bias else None
    grad = torch.randn(b, h, w, c, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, wt) + ((bias,) if with_bias else ())]
    out = ops.dwconv_nhwc(*leaves[:2], leaves[2] if with_bias else None, backend="cpu")
    assert out.grad_fn is not None and "DepthwiseConvCPU" in type(out.grad_fn).__name__
    (out * grad).sum().backward()
    for got, ref in zip([t.grad for t in leaves], _grads64(x, wt, bias, grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_kernel
@pytest.mark.parametrize("kw", [{"gate": "sigmoid"}, {"gate": "scaled", "pool": "adaptive"},
                                {"gate": "scaled", "scales": (1, 0.5, 0.25), "dw_bias": False}])
def test_a_training_step_on_the_kernel_matches_the_reference(kw, monkeypatch):
    """Every parameter's gradient through the whole block (pooling, gate and resizing by autograd around the compiled
    convolution), on an odd grid with a batch, against the reference backend."""
    monkeypatch.setenv("DELTADISTILL_CPU_AUTOTUNE", "0")  # the kernel, whatever it would time at
    torch.manual_seed(5)
    block = DeltaConvBlock(48, 7, **kw)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    z, target = torch.randn(3, 11, 9, 48), torch.randn(3, 11, 9, 48)
    grads = {}
    for backend in ("cpu", "reference"):
        block.backend = backend
        block.zero_grad()
        torch.nn.functional.mse_loss(block(z), target).backward()
        grads[backend] = {n: p.grad.clone() for n, p in block.named_parameters()}
    for name, ref in grads["reference"].items():
        torch.testing.assert_close(grads["cpu"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernel
def test_training_picks_its_path_by_rule_not_by_timing(monkeypatch):
    """A timed choice can differ between processes, and the paths round differently: training must repeat bit for bit.
    So with a gradient recorded nothing is timed: the kernel from K = TRAIN_MIN_K up, oneDNN below."""
    def no_timing(*a, **k):
        raise AssertionError("training timed a path")

    monkeypatch.setattr(cpu_kernel, "kernel_is_faster", no_timing)
    picked = []
    real = cpu_kernel.dwconv_weight_grad_cpu
    monkeypatch.setattr(cpu_kernel, "dwconv_weight_grad_cpu", lambda *a, **k: picked.append(a[2]) or real(*a, **k))
    for k in (3, ops.TRAIN_MIN_K, 9):
        x, w = torch.randn(2, 8, 8, 32, requires_grad=True), torch.randn(32, k, k, requires_grad=True)
        (ops.dwconv_nhwc(x, w, backend="cpu") ** 2).sum().backward()
    assert picked == [ops.TRAIN_MIN_K, 9]  # K = 3: oneDNN's weight gradient


@needs_kernel
@pytest.mark.parametrize("n_threads", [2, 3])
def test_the_openmp_team_and_the_pool_give_the_same_bits(n_threads, threads, monkeypatch):
    """Where the kernel runs its parts on PyTorch's OpenMP team, each part computes what it computes on the pool."""
    lib = cpu_kernel._library()
    if lib.stage_parts is None:
        pytest.skip("the kernel does not share an OpenMP runtime with PyTorch here")
    threads(n_threads)
    g = torch.Generator().manual_seed(n_threads)
    for b, h, w, c, k in [(1, 16, 16, 576, 13), (2, 13, 11, 36, 5), (1, 9, 40, 64, 7)]:  # both work splits
        x, wt, bias = torch.randn(b, h, w, c, generator=g), torch.randn(c, k, k, generator=g) / k, torch.randn(c, generator=g)
        y, out = torch.randn(b, (h + 1) // 2, (w + 1) // 2, c, generator=g), torch.randn(b, h, w, c, generator=g)
        team = (cpu_kernel.stage_cpu(x, wt, bias, "sigmoid"), cpu_kernel.upsample_add_cpu(y, out.clone()))
        monkeypatch.setattr(cpu_kernel, "_forked", True)  # what a forked child does: the pool
        pool = (cpu_kernel.stage_cpu(x, wt, bias, "sigmoid"), cpu_kernel.upsample_add_cpu(y, out.clone()))
        monkeypatch.setattr(cpu_kernel, "_forked", False)
        assert torch.equal(team[0], pool[0]) and torch.equal(team[1], pool[1])
        torch.testing.assert_close(team[0].double(), _gate64(_conv64(x, wt, bias), "sigmoid", 1.0), rtol=1e-5, atol=2e-6)
    for b, c in [(4, 32), (6, 160)]:  # weight gradient: images per thread (partial sums), channel blocks per thread
        x, grad = torch.randn(b, 7, 9, c, generator=g), torch.randn(b, 7, 9, c, generator=g)
        team = cpu_kernel.dwconv_weight_grad_cpu(x, grad, 5)
        monkeypatch.setattr(cpu_kernel, "_forked", True)
        pool = cpu_kernel.dwconv_weight_grad_cpu(x, grad, 5)
        monkeypatch.setattr(cpu_kernel, "_forked", False)
        assert torch.equal(team, pool)
        ref = _grads64(x, torch.zeros(c, 5, 5), None, grad)[1]
        torch.testing.assert_close(pool.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="PyTorch runs on GNU OpenMP on Linux only")
@needs_kernel
def test_the_kernel_loads_no_second_openmp_runtime():
    """The library's libgomp.so.1 must resolve to PyTorch's (two runtimes = two thread teams fighting for the cores)."""
    assert cpu_kernel.available()
    runtimes = cpu_kernel._openmp_runtimes()
    assert len(runtimes) == 1 and "torch" in next(iter(runtimes)), runtimes
    assert cpu_kernel._library().stage_parts is not None  # and the kernel uses that team


@needs_kernel
def test_flop_counting_sees_the_reference_whatever_the_block_asks_for(monkeypatch):
    from deltadistill import flops as fl

    x = torch.randn(1, 16, 16, 48)
    auto = fl.count_measured(DeltaConvBlock(48, 13).eval(), x)
    assert auto == fl.deltaconv_flops((16, 16), 48, 13).matmul  # convolutions counted once (no autotune timing)
    assert fl.count_measured(DeltaConvBlock(48, 13, backend="cpu").eval(), x) == auto


def test_preferring_stays_in_its_own_thread():
    import threading

    seen = {}
    inside, done = threading.Event(), threading.Event()
    x = torch.randn(1, 4, 4, 8)

    def other():
        inside.wait(10)
        seen["other"] = backends._choice(None)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with backends.preferring("reference"):
        inside.set()
        done.wait(10)
        seen["here"] = backends._choice(None)
        assert backends._choice("triton") == "triton"  # an explicit choice wins, unless asked otherwise
        with backends.preferring("reference", over_explicit=True):
            assert backends.resolve("stage", x, "triton") == "reference"
    t.join()
    assert seen["here"] == "reference" and seen["other"] == backends._choice(None)


@needs_kernel
def test_fused_upsample_add_falls_back_for_a_strided_output():
    y = torch.randn(1, 4, 4, 16)
    out = torch.randn(1, 8, 8, 16).transpose(1, 2)  # not contiguous: the fused pass cannot write it in place
    ref = out.clone() + ops.upsample_bilinear_nhwc_reference(y, (8, 8))
    with torch.no_grad():
        got = ops.upsample_add(out, y)
    torch.testing.assert_close(got, ref)


@needs_kernel
def test_dwconv_op_dispatches_to_the_kernel_without_gradients():
    x, w, b = torch.randn(1, 9, 9, 32), torch.randn(32, 5, 5), torch.randn(32)
    with torch.no_grad():
        assert backends.resolve("dwconv", x) == "cpu"
        got = ops.dwconv_nhwc(x, w, b, backend="cpu")
    torch.testing.assert_close(got.double(), _conv64(x, w, b), rtol=1e-5, atol=2e-6)


@needs_kernel
def test_bench_refuses_the_cpu_backend_where_it_cannot_run():
    from typer.testing import CliRunner

    from deltadistill.cli import app

    result = CliRunner().invoke(app, ["bench", "--model", "tiny-pixart", "--resolutions", "32", "--latency",
                                      "--backend", "cpu", "--dtype", "fp16"])
    assert result.exit_code == 2 and "--backend cpu needs" in result.output
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-pixart", "--resolutions", "32", "--latency",
                                      "--backend", "gpu"])
    assert result.exit_code == 2 and "unknown backend" in result.output
