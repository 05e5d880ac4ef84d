"""The pure helpers of benchmarks/distill_probes.py that its RESULTS tables rest on."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is not a package
try:
    from distill_probes import coarse_fine, decoder_channel_gain, min_snr_weights
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
