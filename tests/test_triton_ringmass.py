"""Fused attention → ring-mass kernel vs the PyTorch reference (and the reference vs brute force).

Runs in Triton's CPU interpreter without a GPU (TRITON_INTERPRET=1 is set below before the kernel
module is imported); compiled on the GPU when one is present. Grids are tiny and awkward: W not a
power of two, H > W (rings beyond the row width), Q not a multiple of the query block, text keys
before or after the image keys.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of a kernel module

import importlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

import attnprobe.kernels.ringmass as rm  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and not rm.INTERPRET:  # imported earlier without the interpreter: rebuild the kernel
    rm = importlib.reload(rm)
DEVICE = "cpu" if INTERPRET else "cuda"

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-3),
}


def seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def assert_close(got, ref, dtype, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g, r = got.detach().double().cpu(), ref.detach().double().cpu()
    tol = TOL[dtype]
    err = (g - r).abs().nan_to_num(float("inf"))
    bad = ~(err <= tol["atol"] + tol["rtol"] * r.abs())
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        first = tuple(where[0])
        raise AssertionError(
            f"{what} [{str(dtype).replace('torch.', '')}]: {int(bad.sum())} of {bad.numel()} ring masses differ "
            f"(max abs err {err.max().item():.3g}); first at [b, head, query, ring] = {first}: got "
            f"{g[first].item():.6g}, expected {r[first].item():.6g}; more at {where[1:]}"
        )


def make(bsz, heads, grid, d, text, dtype, q_layout="image", text_first=True):
    h, w = grid
    n = h * w
    start = text if text_first else 0
    k = torch.randn(bsz, heads, n + text, d) * 1.5
    nq = n if q_layout == "image" else n + text
    q = torch.randn(bsz, heads, nq, d) * 1.5
    key_slice = (start, start + n) if text else None
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), key_slice


CASES = [
    # (B, heads, grid, d, text tokens, q layout, text first, dtype, n queries)
    pytest.param(1, 2, (5, 7), 16, 0, "image", True, torch.float32, 21, id="self-attn-W7-Q21"),
    pytest.param(1, 2, (6, 4), 24, 5, "joint", True, torch.float32, 24, id="joint-text-first-H>W"),
    pytest.param(2, 1, (5, 7), 20, 3, "image", False, torch.float16, 33, id="joint-text-last-fp16-d20"),
]


@pytest.mark.parametrize("bsz,heads,grid,d,text,layout,text_first,dtype,nq", CASES)
def test_ring_mass_kernel_matches_reference(bsz, heads, grid, d, text, layout, text_first, dtype, nq):
    seed("rm", grid, d, text, layout, dtype)
    q, k, ks = make(bsz, heads, grid, d, text, dtype, layout, text_first)
    qi = torch.randperm(grid[0] * grid[1])[:nq]
    got = rm.ring_mass_attention(q, k, grid, qi.to(DEVICE), key_slice=ks, backend="triton")
    ref = rm.ring_mass_attention_reference(q.double().cpu(), k.double().cpu(), grid, qi, key_slice=ks)
    assert got.dtype == torch.float32 and got.shape == (bsz, heads, nq, max(grid))
    assert_close(got, ref, dtype, f"ring mass {grid} text={text} q={layout}")
    # Σ_r ring mass = attention mass on the image keys (= 1 without text keys)
    if not text:
        assert_close(got.sum(-1), torch.ones(bsz, heads, nq, dtype=torch.float64), dtype, "rows sum to one")


def test_ring_mass_gather_free_variant_and_scale():
    seed("rm-nogather")
    q, k, ks = make(1, 2, (5, 6), 16, 4, torch.float32, "joint")
    qi = torch.arange(30)
    got = rm._ring_mass_triton(q, k, (5, 6), qi.to(DEVICE), 0.4, ks, use_gather=False)
    ref = rm.ring_mass_attention_reference(q.double().cpu(), k.double().cpu(), (5, 6), qi, 0.4, ks)
    assert_close(got, ref, torch.float32, "gather-free ring mass, scale=0.4")


def test_reference_matches_brute_force():
    seed("rm-brute")
    grid, text = (3, 4), 2
    q, k, ks = make(1, 1, grid, 8, text, torch.float64, "joint")
    q, k = q.cpu(), k.cpu()
    qi = torch.tensor([0, 5, 11])
    a = torch.softmax(q[0, 0] @ k[0, 0].T / 8**0.5, -1)  # [N+text, N+text] full attention
    want = torch.zeros(3, 4, dtype=torch.float64)
    for n, p in enumerate(qi.tolist()):
        for key in range(12):
            r = max(abs(p // 4 - key // 4), abs(p % 4 - key % 4))
            want[n, r] += a[text + p, text + key]
    got = rm.ring_mass_attention_reference(q, k, grid, qi, key_slice=ks, chunk=2)
    assert_close(got[0, 0], want, torch.float32, "reference vs brute force")


def test_ring_mass_dispatch_and_errors():
    q, k, _ = make(1, 1, (3, 3), 16, 0, torch.float32)
    qi = torch.arange(9)
    cpu_q, cpu_k = q.cpu(), k.cpu()
    # auto keeps CPU tensors on the reference
    assert_close(rm.ring_mass_attention(cpu_q, cpu_k, (3, 3), qi),
                 rm.ring_mass_attention_reference(cpu_q.double(), cpu_k.double(), (3, 3), qi), torch.float32, "auto")
    with pytest.raises(ValueError, match="key_slice"):
        rm.ring_mass_attention(q, k, (3, 4), qi, backend="triton")
    with pytest.raises(ValueError, match="tokens"):
        rm.ring_mass_attention(q[:, :, :5], k, (3, 3), qi, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rm.ring_mass_attention(q, k, (3, 3), qi, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="bf16 kernels are checked compiled on a CUDA device only (no CUDA, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("grid", [(16, 16), (24, 40)])
def test_ring_mass_bf16_on_gpu(grid):
    seed("rm-bf16", grid)
    q, k, ks = make(2, 4, grid, 72, 7, torch.bfloat16, "joint")
    qi = torch.randperm(grid[0] * grid[1])[:200]
    got = rm.ring_mass_attention(q, k, grid, qi.to(DEVICE), key_slice=ks)
    ref = rm.ring_mass_attention_reference(q.double(), k.double(), grid, qi.to(DEVICE), key_slice=ks)
    assert_close(got, ref, torch.bfloat16, f"ring mass bf16 {grid}")


@pytest.mark.parametrize("joint,n_text", [(None, 0), ("image_last", 3), ("image_first", 4)])
def test_capture_uses_kernel_and_matches_reference_path(joint, n_text):
    """The capture's unfiltered rings through the fused kernel equal the chunked PyTorch path."""
    from attnprobe.core.sites import AttnSite
    from attnprobe.capture import LayerAccumulator

    class _Cap:
        def base_grid(self):
            return (5, 6)

        def bucket(self):
            return 0

    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 30 + n_text, 16, generator=g).to(DEVICE)
    k = torch.randn(1, 2, 30 + n_text, 16, generator=g).to(DEVICE)
    accs = []
    for backend in ("triton", "reference"):
        acc = LayerAccumulator(
            site=AttnSite("x.attn", "x", "fake", joint=joint), buckets=1, highpass_mass="positive", cutoff=0.1,
            order=2, queries="stride:2", probe_points=[], memory_budget=1 << 28, capture=_Cap(), ring_backend=backend,
        )
        acc.observe(q, k, None, None)
        accs.append(acc)
    torch.testing.assert_close(torch.from_numpy(accs[0].ring), torch.from_numpy(accs[1].ring), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(accs[0].hp_ring), torch.from_numpy(accs[1].hp_ring))
