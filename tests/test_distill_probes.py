"""The pure helpers of benchmarks/distill_probes.py that its RESULTS tables rest on."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is not a package
try:
    from distill_probes import KeyWeighted, coarse_fine, decoder_channel_gain, min_snr_weights
finally:
    sys.path.pop(0)


def test_coarse_fine_adds_up_and_separates():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    coarse, fine = coarse_fine(d, 4)
    assert abs(coarse + fine - float(d.pow(2).mean())) < 1e-12  # an orthogonal split
    # brute force: the coarse part is the mean of squared 4×4 block means, spread over each block's pixels
    blocks = d.reshape(3, 4, 4, 4, 4, 4).mean(dim=(3, 5))
    assert abs(coarse - float(blocks.pow(2).mean())) < 1e-12
    flat = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # constant on each block: coarse only
    assert coarse_fine(flat, 4)[1] < 1e-24
    zero_mean = d - flat  # every block's mean removed: fine only
    assert coarse_fine(zero_mean, 4)[0] < 1e-24


def test_min_snr_weights_against_the_formula():
    abar = torch.linspace(0.999, 0.001, 1000, dtype=torch.float64)
    t = torch.tensor([0, 100, 500, 900, 999])
    w = min_snr_weights(abar, t, 1.0).double()
    for ti, wi in zip(t.tolist(), w.tolist()):
        snr = float(abar[ti] / (1 - abar[ti]))
        assert abs(wi - min(snr, 1.0) / snr) < 1e-6
    assert w[0] < 0.01 and w[-1] == 1.0  # the clean end drawn far less often; the noisy end untouched


def test_decoder_channel_gain_of_a_linear_decoder():
    # a 1×1 convolution D(z) = W z: perturbing channel c by v changes the image by W[:, c] v, so the gain per unit
    # of squared scaled latent is ‖W[:, c]‖² / scale², whatever the perturbation (no finite-difference error)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64)
    w[:, 2] *= 3.0  # one channel three times as visible
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    gain = decoder_channel_gain(lambda v: torch.nn.functional.conv2d(v, w), z, scale=0.5)
    expected = w[:, :, 0, 0].pow(2).sum(0) / 0.25
    assert torch.allclose(gain.double(), expected, rtol=1e-9)
    assert int(gain.argmax()) == 2


def test_key_weighted_branch_against_brute_force():
    from deltadistill.block import DeltaConvBlock

    torch.manual_seed(0)
    dim, width, k, h, w = 8, 4, 3, 5, 6
    block = DeltaConvBlock(dim, k, gate="sigmoid").double()
    m = KeyWeighted(block, width, k).double()
    z = torch.randn(2, h, w, dim, dtype=torch.float64)
    assert torch.equal(m(z), block(z))  # the branch's projection starts at zero: the plain block
    with torch.no_grad():
        torch.nn.init.normal_(m.out.weight)
        for lw in m.logw:
            lw.normal_()
    with torch.no_grad():
        q, key, v = (t.permute(0, 3, 1, 2) for t in m.qkv(z).chunk(3, dim=-1))

    def stage(kk, vv, logw):  # Σ_j w_{i−j} e^{k_j} v_j / Σ_j w_{i−j} e^{k_j} over the positions j inside the grid
        out = torch.zeros_like(vv)
        for b in range(vv.shape[0]):
            for c in range(width):
                for i in range(vv.shape[2]):
                    for j in range(vv.shape[3]):
                        num = den = 0.0
                        for di in range(-(k // 2), k // 2 + 1):
                            for dj in range(-(k // 2), k // 2 + 1):
                                y, x = i + di, j + dj
                                if 0 <= y < vv.shape[2] and 0 <= x < vv.shape[3]:
                                    wt = float(logw[c, 0, di + k // 2, dj + k // 2].exp() * kk[b, c, y, x].exp())
                                    num += wt * float(vv[b, c, y, x])
                                    den += wt
                        out[b, c, i, j] = num / den
        return out

    full = stage(key, v, m.logw[0].detach())
    half = stage(torch.nn.functional.avg_pool2d(key, 2, ceil_mode=True),
                 torch.nn.functional.avg_pool2d(v, 2, ceil_mode=True), m.logw[1].detach())
    half = torch.nn.functional.interpolate(half, size=(h, w), mode="bilinear", align_corners=False)
    feats = torch.cat([torch.sigmoid(q) * full, torch.sigmoid(q) * half], dim=1).permute(0, 2, 3, 1)
    expected = block(z) + m.out(feats)
    assert torch.allclose(m(z), expected, atol=1e-10)


def test_key_weighted_control_ignores_the_keys():
    # content=False weighs every key alike: the branch is then a normalised positive-tap convolution of v, so changing
    # the k part of the linear map changes nothing, while the content-weighted branch does change
    from deltadistill.block import DeltaConvBlock

    torch.manual_seed(2)
    block = DeltaConvBlock(8, 3, gate="sigmoid").double()
    z = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    outs = {}
    for content in (False, True):
        m = KeyWeighted(block, 4, 3, content=content).double()
        with torch.no_grad():
            torch.nn.init.normal_(m.out.weight)
            before = m(z)
            m.qkv.weight[4:8].normal_()  # rows 4..7 make k
            m.qkv.bias[4:8].normal_()
            outs[content] = (m(z) - before).abs().max()
    assert outs[False] < 1e-12
    assert outs[True] > 1e-3
