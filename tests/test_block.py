"""DeltaConvBlock against an explicit float64 NCHW implementation (SPEC §2), per dtype.

The reference below is written independently of :mod:`deltadistill.ops`: NCHW tensors,
``F.conv2d(groups=C)``, ``F.avg_pool2d(ceil_mode=True, count_include_pad=False)`` and
``F.interpolate(mode="bilinear", align_corners=False)``, all in float64.
"""
from __future__ import annotations

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
