"""Importing official ΔConvFusion checkpoints, and the paper preset.

The official block is re-implemented here, independently and in plain PyTorch NCHW, from its
description: conv_up (1×1) → per gate i: adaptive average pool to ⌊n/2^i⌋ (i > 0), depth-wise K×K
conv without bias, x1·σ(x2) (PixArt) or x1·x2·√(C'/2) (SD), bilinear back to full size → concat →
conv_out (1×1), plus conv_pool(mean over the grid). Checkpoints are written in the official key
layout with random weights; the imported blocks must compute the same function on even and odd
grids.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from attnprobe.core.family import denoiser_of, find_self_attention
from attnprobe.core.registry import load_pipeline
from deltadistill import load
from deltadistill.conversion import convert, delta_modules
from deltadistill.official import OfficialImportError, import_official

pytestmark = pytest.mark.usefixtures("one_thread")


def official_block(p: dict, z: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """z [B, H, W, C] → [B, H, W, C] with official parameters p (key → tensor, conv weights [K, K, C'])."""
    b, h, w, c = z.shape
    x = z.permute(0, 3, 1, 2).double()  # NCHW
    up = F.conv2d(x, p["conv_up.weight"].double()[:, :, None, None], p["conv_up.bias"].double())
    inner = up.shape[1]
    outs = []
    i = 0
    while f"gates.{i}.conv_spatial.weight" in p:
        k = p[f"gates.{i}.conv_spatial.weight"].double()  # [K, K, C']
        y = up if i == 0 else F.adaptive_avg_pool2d(up, (int(h * 0.5**i), int(w * 0.5**i)))
        y = F.conv2d(y, k.permute(2, 0, 1)[:, None], padding=k.shape[0] // 2, groups=inner)
        y1, y2 = y.chunk(2, dim=1)
        y = y1 * torch.sigmoid(y2) if sigmoid else y1 * (y2 / (inner / 2) ** -0.5)
        if i:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        outs.append(y)
        i += 1
    out = F.conv2d(torch.cat(outs, 1), p["conv_out.weight"].double()[:, :, None, None], p["conv_out.bias"].double())
    pool = F.linear(x.mean(dim=(2, 3)), p["conv_pool.weight"].double(), p["conv_pool.bias"].double())
    return (out + pool[:, :, None, None]).permute(0, 2, 3, 1)


def write_official(pipe, path, prefix="", layout="kkc", seed=0):
    """A checkpoint with random weights in the official layout for every self-attention site of ``pipe``."""
    g = torch.Generator().manual_seed(seed)
    tensors, per_site = {}, {}
    for i, site in enumerate(find_self_attention(denoiser_of(pipe))):
        c = site.module.to_q.in_features
        inner, k = c // 2, (3, 5)[i % 2]
        p = {"conv_up.weight": torch.randn(inner, c, generator=g) / c**0.5, "conv_up.bias": torch.randn(inner, generator=g),
             "conv_out.weight": torch.randn(c, inner, generator=g) / inner**0.5, "conv_out.bias": torch.randn(c, generator=g),
             "conv_pool.weight": torch.randn(c, c, generator=g) / c**0.5, "conv_pool.bias": torch.randn(c, generator=g)}
        for j in range(2):
            p[f"gates.{j}.conv_spatial.weight"] = torch.randn(k, k, inner, generator=g) / k
        per_site[site.name] = p
        host = prefix + site.name.rsplit(".", 1)[0] + ".conv1."
        for key, value in p.items():
            if layout == "c1kk" and "conv_spatial" in key:
                value = value.permute(2, 0, 1)[:, None].contiguous()  # [C', 1, K, K] (nn.Conv2d)
            tensors[host + key] = value
    if str(path).endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return per_site


@pytest.mark.parametrize("alias,prefix,layout,suffix", [
    ("tiny-pixart", "", "kkc", ".safetensors"),
    ("tiny-sd15", "denoiser.", "c1kk", ".pt"),
    ("tiny-sdxl", "model.", "kkc", ".safetensors"),
])
def test_imported_blocks_compute_the_official_function(alias, prefix, layout, suffix, tmp_path):
    pipe, _ = load_pipeline(alias)
    params = write_official(pipe, tmp_path / f"ckpt{suffix}", prefix=prefix, layout=layout)
    folder = import_official(tmp_path / f"ckpt{suffix}", alias, tmp_path / "imported")
    fresh, _ = load_pipeline(alias)
    load(fresh, folder)
    mods = delta_modules(fresh)
    assert list(mods) == list(params)
    sigmoid = alias == "tiny-pixart"
    g = torch.Generator().manual_seed(1)
    for name, mod in mods.items():
        assert mod.block.pool == "adaptive" and not mod.block.dw_bias
        assert mod.block.gate == ("sigmoid" if sigmoid else "scaled")
        for grid in ((8, 12), (7, 9)):  # even and odd sides
            z = torch.randn(2, *grid, mod.block.dim, generator=g)
            with torch.no_grad():
                got = mod.block.double()(z.double())
            torch.testing.assert_close(got, official_block(params[name], z, sigmoid), atol=1e-9, rtol=1e-9)
    out = fresh(prompt="a photo of cat", num_inference_steps=1, height=32, width=32, output_type="pt",
                **({"use_resolution_binning": False} if sigmoid else {})).images
    assert torch.isfinite(out).all()


def test_bad_checkpoints_are_refused(tmp_path):
    pipe, _ = load_pipeline("tiny-pixart")
    write_official(pipe, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ok.safetensors"))
    extra = dict(tensors, **{"transformer_blocks.9.conv1.conv_up.weight": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(OfficialImportError, match="match no official block.*transformer_blocks.9"):
        import_official(tmp_path / "extra.safetensors", "tiny-pixart", tmp_path / "o1")
    partial = {k: v for k, v in tensors.items() if not k.startswith("transformer_blocks.2.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(OfficialImportError, match="transformer_blocks.2.conv1"):
        import_official(tmp_path / "partial.safetensors", "tiny-pixart", tmp_path / "o2")
    with pytest.raises(OfficialImportError, match="has no dit models|no dit"):
        import_official(tmp_path / "ok.safetensors", "tiny-dit", tmp_path / "o3")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(__import__("deltadistill.cli", fromlist=["app"]).app,
                                ["import-official", str(tmp_path / "junk.pt"), "--model", "tiny-pixart", "--out", str(tmp_path / "o4")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "not a readable checkpoint" in result.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_paper_preset_converts_with_the_official_recipe():
    pipe, _ = load_pipeline("tiny-pixart")
    convert(pipe, preset="paper")  # kernel table: 13 everywhere
    blocks = [m.block for m in delta_modules(pipe).values()]
    assert {b.kernel_size for b in blocks} == {13} and all(b.gate == "sigmoid" and b.pool == "adaptive" for b in blocks)
    sd, _ = load_pipeline("tiny-sd15")
    convert(sd, 3, preset="paper", pool="ceil")  # one option overrides its preset value
    b = next(iter(delta_modules(sd).values())).block
    assert b.gate == "scaled" and b.gate_scale == pytest.approx(math.sqrt(b.inter_dim / 2)) and b.pool == "ceil"
    assert not b.dw_bias
    with pytest.raises(ValueError, match="kernel table has no entry"):  # the tiny UNet is not SD1.5's shape
        convert(load_pipeline("tiny-sd15")[0], preset="paper")
    with pytest.raises(ValueError, match="no recipe for dit"):
        convert(load_pipeline("tiny-dit")[0], 3, preset="paper")
