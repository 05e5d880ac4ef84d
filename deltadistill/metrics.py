"""Image-quality metrics of a distilled student against its teacher and against real images.

Paired (same noise, student vs teacher; images as float arrays in [0, 1], [B, H, W, 3]):

* PSNR = 10 · log10(1 / MSE), from the mean MSE over all images (:func:`psnr`);
* SSIM (Wang et al. 2004) with the common defaults: 7×7 uniform window, K1 = 0.01, K2 = 0.03,
  sample covariances, data range 1, per channel then averaged, borders of (7 − 1)/2 cropped
  (:func:`ssim`).

Distributional (the paper's Table 3), from features of pretrained encoders:

* FD-DINOv2 (:func:`frechet_distance`) = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½}), on DINOv2
  image embeddings of the generated vs reference images;
* DINOv2 score (:func:`inception_score`) = exp(E_x KL(p(y|x) ‖ p(y))) over ``splits`` random
  splits — the Inception score with a DINOv2 ImageNet classifier in place of Inception v3 (what the
  official code computes);
* CLIP score (:func:`clip_score`) = 100 · max(cos(image embedding, text embedding), 0), averaged.

The encoders load through transformers from a local folder or a Hub id already in the cache
(:class:`Encoders`); without them these three metrics are skipped with a message, never faked.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["psnr", "psnr_by_group", "ssim", "frechet_distance", "inception_score", "clip_score", "Encoders", "EncoderUnavailable"]


def _as_float(images) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] in [0, 1], got shape {arr.shape}")
    return arr


def psnr(images, reference) -> dict:
    """``{"psnr", "mse", "psnr_per_image", "psnr_mean"}``: PSNR of the mean MSE (dB), per image, and the mean of
    the per-image values (the convention of most papers; PSNR of the mean MSE is lower, set by the worst images)."""
    a, b = _as_float(images), _as_float(reference)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    per = ((a - b) ** 2).mean(axis=(1, 2, 3))  # [B]
    mse = float(per.mean())

    def db(m):
        return float("inf") if m == 0 else 10.0 * math.log10(1.0 / m)

    per_db = [db(float(m)) for m in per]
    return {"psnr": db(mse), "mse": mse, "psnr_per_image": per_db, "psnr_mean": float(np.mean(per_db))}


def psnr_by_group(images, reference, groups) -> list[dict]:
    """PSNR of the pooled MSE within each group of images (e.g. one prompt's seeds), in first-seen group order.

    ``[{"group", "n", "psnr", "mse_share"}]``: ``mse_share`` is the group's part of the total squared
    error, so the groups that set the pooled PSNR of :func:`psnr` stand out.
    """
    a, b = _as_float(images), _as_float(reference)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    groups = list(groups)
    if len(groups) != len(a):
        raise ValueError(f"need one group per image, got {len(groups)} groups for {len(a)} images")
    per = ((a - b) ** 2).mean(axis=(1, 2, 3))
    total = float(per.sum())
    out = []
    for g in dict.fromkeys(groups):
        m = per[[i for i, x in enumerate(groups) if x == g]]
        mse = float(m.mean())
        out.append({"group": g, "n": len(m), "psnr": float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse),
                    "mse_share": float(m.sum()) / total if total > 0 else 0.0})
    return out


def _ssim_channel(x: np.ndarray, y: np.ndarray, win: int, data_range: float) -> float:
    from scipy.ndimage import uniform_filter

    n = win * win
    cov_norm = n / (n - 1)  # sample covariance
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    vx = cov_norm * (uniform_filter(x * x, win) - ux * ux)
    vy = cov_norm * (uniform_filter(y * y, win) - uy * uy)
    vxy = cov_norm * (uniform_filter(x * y, win) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean()) if pad else float(s.mean())


def ssim(images, reference, win: int = 7) -> dict:
    """``{"ssim", "ssim_per_image"}`` (mean over images of the mean over channels)."""
    a, b = _as_float(images), _as_float(reference)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape[1:3]) < win:
        raise ValueError(f"images of {a.shape[1]}x{a.shape[2]} are smaller than the {win}x{win} SSIM window")
    per = [float(np.mean([_ssim_channel(x[..., c], y[..., c], win, 1.0) for c in range(3)])) for x, y in zip(a, b)]
    return {"ssim": float(np.mean(per)), "ssim_per_image": per}


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (float64)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two [N, D] feature sets with N >= 2 and equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)  # (Σa^½ Σb Σa^½)^½: symmetric PSD, same trace as (Σa Σb)^½
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


def inception_score(logits, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) ‖ p(y))) from classifier logits [N, classes]."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"logits must be [N, classes], got {x.shape}")
    x = x[np.random.default_rng(seed).permutation(len(x))]
    logp = x - x.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    scores = []
    for part in np.array_split(logp, min(splits, len(x))):
        p = np.exp(part)
        log_marginal = np.log(p.mean(0, keepdims=True))
        scores.append(float(np.exp((p * (part - log_marginal)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0


def clip_score(image_embeds, text_embeds) -> float:
    """100 · mean over pairs of max(cos(image_i, text_i), 0)."""
    a, b = np.asarray(image_embeds, dtype=np.float64), np.asarray(text_embeds, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need paired [N, D] embeddings, got {a.shape} and {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(100.0 * np.clip(cos, 0, None).mean())


class EncoderUnavailable(RuntimeError):
    """A DINOv2 / CLIP model is not available offline; the message says how to get it."""


def _load(cls_names: tuple[str, ...], source: str, what: str):
    import transformers

    transformers.utils.logging.disable_progress_bar()

    local = Path(source).expanduser()
    where = str(local) if local.is_dir() else source
    errors = []
    for cls_name in cls_names:
        try:
            model = getattr(transformers, cls_name).from_pretrained(where, local_files_only=True).eval()
            processor = transformers.AutoProcessor.from_pretrained(where, local_files_only=True)
            return model, processor
        except Exception as exc:  # missing weights, wrong head, missing processor files
            errors.append(f"{cls_name}: {str(exc).splitlines()[0][:120]}")
    raise EncoderUnavailable(
        f"{what} weights {source!r} are not available offline ({errors[-1]}); on a machine with internet run "
        f"`hf download {source}` and copy the HF cache here, or pass a local folder"
    )


class Encoders:
    """DINOv2 and CLIP through transformers, loaded lazily from local folders or cached Hub ids.

    ``dino``: a ``Dinov2ForImageClassification`` (features + ImageNet logits, for FDD and the DINOv2
    score) or a plain ``Dinov2Model`` (features only: FDD). ``clip``: a ``CLIPModel`` with its
    processor (image and text embeddings).
    """

    def __init__(self, dino: str | None = None, clip: str | None = None, device: str = "cpu", batch_size: int = 16):
        self.dino_source, self.clip_source = dino, clip
        self.device, self.batch_size = device, batch_size
        self._dino = self._clip = None

    def dino(self):
        if self._dino is None:
            self._dino = _load(("Dinov2ForImageClassification", "Dinov2Model"), self.dino_source, "DINOv2")
        return self._dino

    def clip(self):
        if self._clip is None:
            self._clip = _load(("CLIPModel",), self.clip_source, "CLIP")
        return self._clip

    def dino_features(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """(CLS embeddings [N, D], ImageNet logits [N, 1000] or None) of PIL images."""
        import torch

        model, processor = self.dino()
        model = model.to(self.device)
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            inputs = processor(images=list(images[i : i + self.batch_size]), return_tensors="pt").to(self.device)
            with torch.no_grad():
                if hasattr(model, "classifier"):
                    out = model(**inputs, output_hidden_states=True)
                    feats.append(out.hidden_states[-1][:, 0].float().cpu())
                    logits.append(out.logits.float().cpu())
                else:
                    feats.append(model(**inputs).pooler_output.float().cpu())
        return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits else None)

    def clip_embeddings(self, images, texts) -> tuple[np.ndarray, np.ndarray]:
        import torch

        model, processor = self.clip()
        model = model.to(self.device)
        img, txt = [], []
        for i in range(0, len(images), self.batch_size):
            inputs = processor(text=list(texts[i : i + self.batch_size]), images=list(images[i : i + self.batch_size]),
                               return_tensors="pt", padding=True, truncation=True).to(self.device)
            with torch.no_grad():
                out = model(**inputs)
            img.append(out.image_embeds.float().cpu())
            txt.append(out.text_embeds.float().cpu())
        return torch.cat(img).numpy(), torch.cat(txt).numpy()
