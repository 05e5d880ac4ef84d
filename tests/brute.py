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


def highpass_numpy(maps, grid, cutoff, order):
    h, w = grid
    d = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    with np.errstate(divide="ignore"):
        resp = 1.0 / (1.0 + (cutoff / d) ** (2 * order))
    resp[0, 0] = 0.0
    return np.real(np.fft.ifft2(np.fft.fft2(maps.reshape(-1, h, w)) * resp)).reshape(maps.shape)
