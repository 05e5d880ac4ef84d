"""Brute-force references for the capture tests: explicit ℓ∞ distance tables and numpy FFTs."""
import numpy as np


def rings_brute(maps, grid, positions):
    """(Q, N) maps → (Q, R) with an explicit ℓ∞ distance table."""
    h, w = grid
    rr, cc = np.divmod(np.arange(h * w), w)
    out = np.zeros((len(positions), max(h, w)))
    for i, p in enumerate(positions):
        d = np.maximum(np.abs(rr - rr[p]), np.abs(cc - cc[p]))
        np.add.at(out[i], d, maps[i])
    return out


def highpass_numpy(maps, grid, cutoff, order, border="circular"):
    """Butterworth high-pass with a full complex FFT; ``border="zero"`` pads with np.pad and crops."""
    h, w = grid
    x = maps.reshape(-1, h, w)
    if border == "zero":
        x = np.pad(x, ((0, 0), (0, h), (0, w)))
    fh, fw = x.shape[-2:]
    d = np.hypot(np.fft.fftfreq(fh)[:, None], np.fft.fftfreq(fw)[None, :])
    with np.errstate(divide="ignore"):
        resp = 1.0 / (1.0 + (cutoff / d) ** (2 * order))
    resp[0, 0] = 0.0
    out = np.real(np.fft.ifft2(np.fft.fft2(x) * resp))[:, :h, :w]
    return out.reshape(maps.shape)
