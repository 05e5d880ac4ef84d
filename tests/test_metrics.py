"""Metrics against references: scikit-image (PSNR, SSIM), scipy's sqrtm (Fréchet), explicit formulas."""
import math

import numpy as np
import pytest
import scipy.linalg

from deltadistill import metrics


def _images(seed, n=3, h=24, w=20):
    rng = np.random.default_rng(seed)
    return rng.random((n, h, w, 3))


def test_psnr_and_ssim_match_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    a = _images(0)
    b = np.clip(a + 0.1 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    got = metrics.psnr(b, a)
    mse = np.mean((a - b) ** 2)
    assert got["psnr"] == pytest.approx(10 * math.log10(1 / mse))
    for i in range(len(a)):
        assert got["psnr_per_image"][i] == pytest.approx(skm.peak_signal_noise_ratio(a[i], b[i], data_range=1.0))
    assert got["psnr_mean"] == pytest.approx(np.mean([skm.peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)]))
    assert got["psnr_mean"] > got["psnr"]  # Jensen: the mean of -log MSE is above -log of the mean MSE
    s = metrics.ssim(b, a)
    for i in range(len(a)):
        want = skm.structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1)
        assert s["ssim_per_image"][i] == pytest.approx(want, abs=1e-10)
    assert metrics.ssim(a, a)["ssim"] == pytest.approx(1.0) and metrics.psnr(a, a)["psnr"] == float("inf")


def test_psnr_by_group_is_the_pooled_psnr_of_each_group():
    skm = pytest.importorskip("skimage.metrics")
    a = _images(3, n=6)
    b = np.clip(a + np.array([0.02, 0.3, 0.05, 0.02, 0.3, 0.05])[:, None, None, None]
                * np.random.default_rng(4).standard_normal(a.shape), 0, 1)
    groups = ["cat", "dog", "sky", "cat", "dog", "sky"]
    got = metrics.psnr_by_group(b, a, groups)
    assert [g["group"] for g in got] == ["cat", "dog", "sky"] and all(g["n"] == 2 for g in got)
    for g in got:
        idx = [i for i, x in enumerate(groups) if x == g["group"]]
        # scikit-image on the stacked images of a group: PSNR of their pooled MSE
        assert g["psnr"] == pytest.approx(skm.peak_signal_noise_ratio(a[idx], b[idx], data_range=1.0))
    assert sum(g["mse_share"] for g in got) == pytest.approx(1.0)
    assert max(got, key=lambda g: g["mse_share"])["group"] == "dog"  # the noisiest group carries most of the error
    with pytest.raises(ValueError, match="one group per image"):
        metrics.psnr_by_group(b, a, groups[:-1])


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    y = rng.standard_normal((150, 12)) * 1.5 + 0.3
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert metrics.frechet_distance(x, y) == pytest.approx(want, rel=1e-6)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        metrics.frechet_distance(x, y[:, :5])


def test_inception_score_and_clip_score_by_formula():
    logits = np.random.default_rng(3).standard_normal((40, 5)) * 3
    mean, _ = metrics.inception_score(logits, splits=1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = math.exp(np.mean((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)))
    assert mean == pytest.approx(want)
    assert metrics.inception_score(np.zeros((10, 7)), splits=2)[0] == pytest.approx(1.0)  # uniform: IS = 1
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.clip_score(a, np.array([[2.0, 0.0], [0.0, -1.0]])) == pytest.approx(50.0)  # cos 1 and -1 → clipped
