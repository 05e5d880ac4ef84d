"""DeltaConvBlock against an explicit float64 NCHW implementation (SPEC §2), per dtype.

The reference below is written independently of :mod:`deltadistill.ops`: NCHW tensors,
``F.conv2d(groups=C)``, ``F.avg_pool2d(ceil_mode=True, count_include_pad=False)`` and
``F.interpolate(mode="bilinear", align_corners=False)``, all in float64.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from deltadistill.block import DeltaConvBlock, scale_level

# dtype -> (atol, rtol) against the float64 reference, relative to the output's scale
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
SHAPES = [(2, 8, 8), (1, 7, 5), (2, 6, 9), (1, 1, 3), (1, 5, 1)]  # (B, H, W): square, odd, non-square, degenerate


def reference_block(block: DeltaConvBlock, z: torch.Tensor) -> torch.Tensor:
    """Float64 ΔConvBlock on NCHW, written out step by step. z [B, H, W, C] → [B, H, W, C]."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    z = z.double()
    b, h, w, c = z.shape
    inner, k = block.inter_dim, block.kernel_size
    x = (z @ p["proj_in.weight"].T + p["proj_in.bias"]).permute(0, 3, 1, 2)  # [B, C', H, W]
    feats = []
    for i, s in enumerate(block.scales):
        xs = x
        for _ in range(round(math.log2(1 / s))):  # s = 1/2^k: k ceil-mode 2×2 pools
            xs = F.avg_pool2d(xs, 2, 2, ceil_mode=True, count_include_pad=False)
        wgt = p[f"stages.{i}.weight"].reshape(inner, 1, k, k)
        y = F.conv2d(xs, wgt, p[f"stages.{i}.bias"], padding=k // 2, groups=inner)  # [B, C', h_s, w_s]
        x1, x2 = y[:, : inner // 2], y[:, inner // 2 :]
        g = x1 * x2 / math.sqrt(inner) if block.gate == "scaled" else x1 * torch.sigmoid(x2)
        if g.shape[-2:] != (h, w):
            g = F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)
        feats.append(g)  # [B, C'/2, H, W]
    cat = torch.cat(feats, 1).permute(0, 2, 3, 1)  # [B, H, W, C'/2·S]
    out = cat @ p["proj_out.weight"].T + p["proj_out.bias"]  # [B, H, W, C]
    glob = z.mean(dim=(1, 2)) @ p["global_proj.weight"].T + p["global_proj.bias"]  # [B, C]
    return out + glob[:, None, None, :]


def _randomised(block: DeltaConvBlock, seed: int) -> DeltaConvBlock:
    """Give every parameter (incl. the zero-initialised ones) random values so all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    return block


def _assert_close(actual, expected, atol, rtol, what=""):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs()
    bad = err > atol * scale + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs err {err.max().item():.3g} "
            f"(scale {scale.item():.3g}); first at {idx}: {actual[idx].item():.6g} vs {expected[idx].item():.6g}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_forward_matches_float64_reference(shape, dtype, gate):
    b, h, w = shape
    seed = 100 * b + 10 * h + w + (gate == "sigmoid")
    block = _randomised(DeltaConvBlock(16, 3, gate=gate, backend="reference"), seed)
    z = torch.randn(b, h, w, 16, generator=torch.Generator().manual_seed(seed))
    expected = reference_block(block, z)
    out = block.to(dtype)(z.to(dtype))
    assert out.shape == (b, h, w, 16) and out.dtype == dtype
    assert torch.isfinite(out).all()
    _assert_close(out, expected, *TOL[dtype], what=f"{gate} {shape} {dtype}")


@pytest.mark.parametrize("scales", [(1,), (0.5,), (1, 0.5, 0.25), (0.25, 1)])
def test_pyramid_scales_generalise(scales):
    block = _randomised(DeltaConvBlock(8, 5, scales=scales, inter_ratio=1.0), 3)
    z = torch.randn(2, 9, 6, 8, generator=torch.Generator().manual_seed(4))
    assert block.proj_out.in_features == 4 * len(scales)  # C·ρ/2 channels per stage
    _assert_close(block(z), reference_block(block, z), 1e-5, 1e-5, what=str(scales))


def test_gradients_match_float64_reference():
    block = _randomised(DeltaConvBlock(16, 5, scales=(1, 0.5)), 7)
    ref = _randomised(DeltaConvBlock(16, 5, scales=(1, 0.5)), 7).double()
    z = torch.randn(2, 7, 10, 16, generator=torch.Generator().manual_seed(8))
    probe = torch.randn(2, 7, 10, 16, generator=torch.Generator().manual_seed(9))
    z32, z64 = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    (block(z32) * probe).sum().backward()
    (reference_block_params(ref, z64) * probe.double()).sum().backward()
    _assert_close(z32.grad, z64.grad, 1e-5, 1e-5, what="grad z")
    for (name, p32), (_, p64) in zip(block.named_parameters(), ref.named_parameters()):
        _assert_close(p32.grad, p64.grad, 1e-5, 1e-5, what=f"grad {name}")


def reference_block_params(block: DeltaConvBlock, z: torch.Tensor) -> torch.Tensor:
    """:func:`reference_block` but differentiable w.r.t. the block's own (float64) parameters."""
    p = dict(block.named_parameters())
    inner, k = block.inter_dim, block.kernel_size
    b, h, w, _ = z.shape
    x = F.linear(z, p["proj_in.weight"], p["proj_in.bias"]).permute(0, 3, 1, 2)
    feats = []
    for i, s in enumerate(block.scales):
        xs = x if s == 1 else F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        y = F.conv2d(xs, p[f"stages.{i}.weight"].unsqueeze(1), p[f"stages.{i}.bias"], padding=k // 2, groups=inner)
        g = y[:, : inner // 2] * y[:, inner // 2 :] / math.sqrt(inner)
        feats.append(g if s == 1 else F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False))
    out = F.linear(torch.cat(feats, 1).permute(0, 2, 3, 1), p["proj_out.weight"], p["proj_out.bias"])
    return out + F.linear(z.mean(dim=(1, 2)), p["global_proj.weight"], p["global_proj.bias"])[:, None, None]


@pytest.mark.parametrize("gate", ["scaled", "sigmoid"])
def test_gate_on_identity_path(gate):
    """Centre-tap kernels and an identity-like proj_in expose the gate: stage = gate(proj_in z)."""
    c, inner = 8, 4
    block = DeltaConvBlock(c, 3, scales=(1,), gate=gate)
    with torch.no_grad():
        block.proj_in.weight.zero_()
        block.proj_in.weight[:, :inner] = torch.eye(inner)  # x = z[..., :4]
        block.proj_in.bias.zero_()
        block.stages[0].weight.zero_()
        block.stages[0].weight[:, 1, 1] = 1.0  # identity conv
        block.stages[0].bias.zero_()
        block.proj_out.weight.zero_()
        block.proj_out.weight[:2, :2] = torch.eye(2)  # out[..., :2] = gated features
    z = torch.randn(1, 4, 5, c, generator=torch.Generator().manual_seed(0))
    x1, x2 = z[..., :2], z[..., 2:4]
    want = x1 * x2 / math.sqrt(inner) if gate == "scaled" else x1 * torch.sigmoid(x2)
    out = block(z)
    torch.testing.assert_close(out[..., :2], want, atol=1e-6, rtol=1e-6)
    assert out[..., 2:].abs().max() == 0


def test_global_branch_is_broadcast_mean():
    block = DeltaConvBlock(8, 3)
    with torch.no_grad():
        block.global_proj.weight.copy_(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
        block.global_proj.bias.fill_(0.5)
    z = torch.randn(2, 5, 7, 8, generator=torch.Generator().manual_seed(2))
    out = block(z)  # proj_out is zero at init: only the global branch speaks
    want = z.mean(dim=(1, 2)) @ block.global_proj.weight.T + 0.5  # [B, C]
    torch.testing.assert_close(out, want[:, None, None, :].expand_as(out))


def test_fresh_block_adds_nothing_and_features_have_unit_scale():
    torch.manual_seed(0)
    block = DeltaConvBlock(256, 7)
    z = torch.randn(2, 32, 32, 256)
    assert block(z).abs().max() == 0  # zero proj_out and global branch: a no-op residual at init
    x = block.proj_in(z)
    y = F.conv2d(x.permute(0, 3, 1, 2), block.stages[0].weight.unsqueeze(1), padding=3, groups=128)
    g = y[:, :64] * y[:, 64:] / math.sqrt(128)
    assert 0.4 < g.std().item() < 2.5  # gated features ~unit variance, so proj_out can learn at a normal pace


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=4), "odd"),
        (dict(kernel_size=1), "odd"),
        (dict(scales=(1, 0.3)), "1/2\\^k"),
        (dict(scales=(2,)), "1/2\\^k"),
        (dict(scales=(1, 0.5, 0.5)), "repeat"),
        (dict(scales=()), "at least one"),
        (dict(inter_ratio=0.25), "even integer"),  # 12 · 0.25 = 3 channels: cannot halve
        (dict(gate="relu"), "gate"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    args = dict(dim=12, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        DeltaConvBlock(**args)


def test_wrong_input_layout_raises():
    with pytest.raises(ValueError, match="channels last"):
        DeltaConvBlock(8, 3)(torch.randn(1, 8, 4, 4))


def test_scale_level():
    assert [scale_level(s) for s in (1, 0.5, 0.25, 1 / 8)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# the key-weighted branch (key_width > 0; not in the paper)


def _key_block(c=12, k=5, n=3, seed=0, **kw) -> DeltaConvBlock:
    """Every parameter random (zero-initialised outputs and uniform taps would hide errors), keys spread over ±10."""
    block = _randomised(DeltaConvBlock(c, k, gate="sigmoid", key_width=n, **kw), seed)
    with torch.no_grad():
        block.key_qkv.weight[n:2 * n] *= 8.0  # e^k then spans many orders of magnitude: the shift must cancel
        block.key_taps.mul_(3.0)
    return block


def _pool_once(t: torch.Tensor) -> torch.Tensor:
    """One 2×2 stride-2 pool, each cell the mean of the real pixels it covers (a last odd row/column: 2 or 1)."""
    b, h, w, c = t.shape
    out = torch.zeros(b, -(-h // 2), -(-w // 2), c, dtype=t.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = t[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2))
    return out


def brute_keyed(block: DeltaConvBlock, z: torch.Tensor) -> torch.Tensor:
    """The branch by its definition, a loop over every output cell and window offset, float64: each stage's cells
    (fine pixels, or the mean of the fine pixels each pooled cell covers) weigh e^{taps[offset]} · e^{k_j}."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    z = z.double()
    b, h, w, _ = z.shape
    n, r = block.key_width, block.kernel_size // 2
    q, key, v = (z @ p["key_qkv.weight"].T + p["key_qkv.bias"]).split(n, dim=-1)
    e = torch.exp(key)  # no shift by the largest key: the block's shift must cancel
    out = torch.zeros(b, h, w, block.dim, dtype=torch.float64)
    for si, stage in enumerate(block.stages):
        if stage.level == 0:
            ee, ev = e, e * v
        elif block.pool == "ceil":  # k successive 2×2 pools of e^k and e^k·v, as the pyramid's stages pool
            ee, ev = e, e * v
            for _ in range(stage.level):
                ee, ev = _pool_once(ee), _pool_once(ev)
        else:
            size = (max(1, h >> stage.level), max(1, w >> stage.level))
            pool = lambda t: F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)  # noqa: E731
            ee, ev = pool(e), pool(e * v)
        hs, ws = ee.shape[1:3]
        taps = p["key_taps"][si].exp()  # [n, K, K]
        a = torch.zeros(b, hs, ws, n, dtype=torch.float64)
        for i in range(hs):
            for j in range(ws):
                num = torch.zeros(b, n, dtype=torch.float64)
                den = torch.zeros(b, n, dtype=torch.float64)
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        if 0 <= i + di < hs and 0 <= j + dj < ws:
                            num += taps[:, di + r, dj + r] * ev[:, i + di, j + dj]
                            den += taps[:, di + r, dj + r] * ee[:, i + di, j + dj]
                a[:, i, j] = num / den
        if (hs, ws) != (h, w):
            a = F.interpolate(a.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        out += (torch.sigmoid(q) * a) @ p["key_out.weight"][:, si * n:(si + 1) * n].T
    return out


@pytest.mark.parametrize("shape,scales,pool", [
    ((2, 8, 8), (1, 0.5), "ceil"), ((1, 7, 5), (1, 0.5), "ceil"), ((1, 7, 7), (1, 0.5, 0.25), "ceil"),
    ((1, 9, 6), (1, 0.5, 0.25), "ceil"), ((1, 7, 5), (1, 0.5), "adaptive"), ((1, 9, 7), (1, 0.5, 0.25), "adaptive"),
    ((1, 6, 6), (0.5,), "ceil"),
], ids=["8x8", "7x5", "7x7-three-stages", "9x6-three-stages", "7x5-adaptive", "9x7-adaptive-three", "half-only"])
def test_key_weighted_branch_matches_brute_force(shape, scales, pool):
    """The whole block with the branch: the independent NCHW reference of the pyramid and global branch (ceil
    pooling) or the block's own pyramid (adaptive), plus the branch by its definition."""
    block = _key_block(scales=scales, pool=pool)
    z = torch.randn(*shape, 12, generator=torch.Generator().manual_seed(1))
    if pool == "ceil":
        rest = reference_block(block, z)
    else:
        b64, z64 = copy.deepcopy(block).double(), z.double()
        rest = b64._mix(z64, b64.proj_out.bias + b64.global_proj(z64.mean(dim=(1, 2)))).detach()
    expected = rest + brute_keyed(block, z)
    _assert_close(block(z), expected, 1e-5, 1e-5, what="block with the key-weighted branch")
    _assert_close(block.double()(z.double()), expected, 1e-11, 1e-11, what="block with the key-weighted branch, float64")


def test_key_weighted_branch_in_half_precision_stays_finite_and_close():
    """fp16 weights: e^k would round to 0 a few units below the largest key (0/0); the branch runs its ratio in
    float32, so the output stays finite and within fp16's rounding of the float64 definition."""
    block = _key_block(seed=4).half()  # keys spread over ±25: many windows sit more than 17 below the largest
    z = torch.randn(1, 8, 8, 12, generator=torch.Generator().manual_seed(5)).half()
    ref = brute_keyed(block, z)  # float64, from the same fp16 weights and input
    got = block._keyed(z)
    assert torch.isfinite(got).all()
    _assert_close(got, ref, 2e-2, 2e-2, what="key-weighted branch, fp16")


def test_key_weighted_gradients_match_float64():
    """Gradients through the branch (the compiled CPU convolution's backward where it runs) against float64."""
    block = _key_block(n=4, seed=3)
    ref = copy.deepcopy(block).double()
    z = torch.randn(2, 7, 10, 12, generator=torch.Generator().manual_seed(8))
    probe = torch.randn(2, 7, 10, 12, generator=torch.Generator().manual_seed(9))
    z32, z64 = z.clone().requires_grad_(True), z.double().requires_grad_(True)
    (block(z32) * probe).sum().backward()
    (ref(z64) * probe.double()).sum().backward()
    _assert_close(z32.grad, z64.grad, 1e-5, 1e-5, what="grad z")
    for (name, p32), (_, p64) in zip(block.named_parameters(), ref.named_parameters()):
        _assert_close(p32.grad, p64.grad, 1e-5, 1e-5, what=f"grad {name}")
    assert block.key_taps.grad.abs().sum() > 0 and block.key_qkv.weight.grad.abs().sum() > 0


def test_key_weighted_branch_starts_silent_and_weighs_keys():
    """A fresh block with the branch computes the plain block (its output projection is zero, yet trains), and
    the branch is content-dependent: a key that dominates its window pulls the average to its own value."""
    torch.manual_seed(0)
    block = DeltaConvBlock(12, 3, gate="sigmoid", key_width=3)
    z = torch.randn(1, 6, 6, 12)
    torch.testing.assert_close(block(z), block._mix(z, block.proj_out.bias + block.global_proj(z.mean(dim=(1, 2)))),
                               atol=0, rtol=0)
    (block(z) - torch.randn(1, 6, 6, 12)).pow(2).sum().backward()  # a fresh block outputs zero: aim elsewhere
    assert block.key_out.weight.grad.abs().sum() > 0

    block = DeltaConvBlock(4, 3, scales=(1,), gate="sigmoid", key_width=1)
    with torch.no_grad():  # q = 0, k = z₀, v = z₁; output = σ(0) · a
        block.key_qkv.weight.zero_()
        block.key_qkv.bias.zero_()
        block.key_qkv.weight[1, 0] = 1.0
        block.key_qkv.weight[2, 1] = 1.0
        block.key_out.weight.zero_()
        block.key_out.weight[0, 0] = 2.0
    z = torch.zeros(1, 5, 5, 4)
    z[..., 1] = torch.arange(25.0).view(5, 5)  # values
    z[0, 2, 2, 0] = 40.0  # one key far above the others
    a = block._keyed(z)[..., 0].detach()
    assert a[0, 2, 2] == pytest.approx(12.0) and a[0, 1, 1] == pytest.approx(12.0)  # every window holding it: its value
    assert a[0, 4, 4] == pytest.approx(z[0, 3:5, 3:5, 1].mean().item())  # a window without it: the plain mean
    z[..., 0] = 1e4 * torch.randn(5, 5)  # keys far apart: finite, no 0/0
    assert torch.isfinite(block(z)).all()


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_key_width_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="key_width"):
        DeltaConvBlock(12, 3, key_width=bad)
