"""Quality metric of the demo model: can each caption's samples be told apart as its photo?

Metric (deterministic; all seeds fixed)::

    python -m attnprobe.demo.evaluate            # shipped pipeline, writes figures/demo_samples.png

1. **Samples.** For every caption of :data:`attnprobe.demo.DEMO_PROMPTS`, generate one image
   per seed 0..3 (``torch.Generator().manual_seed(seed)``) with the pipeline's own scheduler,
   20 steps, classifier-free guidance 4.5 (the ``PixArtSigmaPipeline`` default), at the demo
   resolution, in float32 on the CPU.
2. **Features.** Each image (real or generated) is resized with antialiasing to 64×64 and
   described by four histograms, each normalised to sum 1, square-rooted (Hellinger embedding,
   so Euclidean distance compares distributions) and so of unit L2 norm:

   - joint RGB colour histogram, 4×4×4 bins;
   - grey-level histogram, 16 bins;
   - gradient-magnitude histogram of the grey image (Sobel), 12 log-spaced bins;
   - gradient-orientation histogram (8 bins over [0, π)), weighted by magnitude.
3. **Classifier.** Nearest centroid: each photo's centroid is the mean feature of 64 random
   crops of it (seed 1234; the same crop distribution as training, see
   :mod:`attnprobe.demo.data`). A sample counts as correct when its nearest centroid is the photo
   its caption names.
4. **Report.** Accuracy over all samples (target ≥ 0.8), per-caption accuracy, the confusions, and
   as references the same classifier's accuracy on 8 held-out real crops per photo (seed 4321)
   and on their VAE reconstructions (the ceiling the generator can reach). A grid with one row
   per caption (a real crop, then the samples, titled with the predicted photo: green when
   correct, red when not) is written to ``figures/demo_samples.png``.

The score is a coarse colour-and-texture test, not a perceptual one: it says the model learned
which photo each caption means, not that the samples look photographic.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnprobe.demo.data import PHOTOS, CropSampler

FEATURE_SIZE = 64
CENTROID_CROPS = 64
CENTROID_SEED = 1234
HOLDOUT_CROPS = 8
HOLDOUT_SEED = 4321
_MAG_EDGES = torch.tensor([0.0, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.22, 0.32, 0.5, float("inf")])


def _hellinger(hist: torch.Tensor) -> torch.Tensor:
    hist = hist / hist.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return hist.sqrt()


def _bucket_hist(values: torch.Tensor, edges: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row histogram of ``values`` [B, N] over bins [edges[i], edges[i+1])."""
    idx = (torch.bucketize(values.contiguous(), edges[1:-1].contiguous(), right=True)).long()
    nbins = len(edges) - 1
    w = torch.ones_like(values) if weights is None else weights
    out = torch.zeros(values.shape[0], nbins, dtype=values.dtype)
    return out.scatter_add_(1, idx, w)


def photo_features(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] → features [B, 100] (see the module docstring)."""
    x = images.float().clamp(0, 1)
    if x.shape[-1] != FEATURE_SIZE or x.shape[-2] != FEATURE_SIZE:
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    b = x.shape[0]
    # joint colour histogram, 4 levels per channel
    q = (x * 4).long().clamp(max=3)
    codes = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).reshape(b, -1)
    colour = torch.zeros(b, 64).scatter_add_(1, codes, torch.ones(codes.shape))
    grey = x.mean(dim=1, keepdim=True)
    levels = torch.zeros(b, 16).scatter_add_(1, (grey * 16).long().clamp(max=15).reshape(b, -1),
                                             torch.ones(b, FEATURE_SIZE * FEATURE_SIZE))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    gx, gy = g[:, 0].reshape(b, -1), g[:, 1].reshape(b, -1)
    mag = (gx.pow(2) + gy.pow(2)).sqrt()
    magnitude = _bucket_hist(mag, _MAG_EDGES)
    angle = torch.atan2(gy, gx) % torch.pi
    orient = torch.zeros(b, 8).scatter_add_(1, (angle / torch.pi * 8).long().clamp(0, 7), mag)
    orient = orient + 1e-6  # flat images: uniform orientation
    return torch.cat([_hellinger(h) for h in (colour, levels, magnitude, orient)], dim=1)


class NearestCentroid:
    """Nearest-centroid classifier over :func:`photo_features`, one centroid per photo."""

    def __init__(self, centroids: torch.Tensor, names: list[str]):
        self.centroids = centroids
        self.names = names

    @classmethod
    def from_photos(cls, sampler: CropSampler, per_photo: int = CENTROID_CROPS, seed: int = CENTROID_SEED):
        images, labels = sampler.fixed(per_photo, seed)
        feats = photo_features(images)
        centroids = torch.stack([feats[labels == k].mean(0) for k in range(len(sampler))])
        return cls(centroids, [p.name for p in sampler.photos])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cdist(photo_features(images), self.centroids).argmin(dim=1)


def nearest_photo_accuracy(images, captions) -> float | None:
    """Share of PIL ``images`` classified as the photo their caption names (None: a caption is not a demo caption)."""
    import numpy as np

    names = {p.caption: i for i, p in enumerate(PHOTOS)}
    if not images or any(c not in names for c in captions):
        return None
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    batch = torch.from_numpy(arr).permute(0, 3, 1, 2)  # [N, 3, H, W] in [0, 1]
    classifier = NearestCentroid.from_photos(CropSampler(batch.shape[-1]))
    truth = torch.tensor([names[c] for c in captions])
    return float((classifier.predict(batch) == truth).float().mean())


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 4.5,
             resolution: int | None = None, progress=None) -> torch.Tensor:
    """Samples [len(prompts), len(seeds), 3, H, W] in [0, 1]; one generator per (prompt, seed)."""
    out = []
    task = progress.add_task("sampling", total=len(prompts)) if progress is not None else None
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        images = pipe(prompt, num_images_per_prompt=len(seeds), generator=gens, num_inference_steps=steps,
                      guidance_scale=guidance_scale, height=resolution, width=resolution, max_sequence_length=16,
                      output_type="pt").images
        out.append(images.float().cpu())
        if progress is not None:
            progress.update(task, advance=1)
    return torch.stack(out)


@torch.no_grad()
def _reconstruct(vae, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    dtype = next(vae.parameters()).dtype
    outs = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch] * 2 - 1).to(dtype)
        outs.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(outs)


def save_grid(samples: torch.Tensor, references: torch.Tensor, predictions: torch.Tensor, prompts: list[str],
              names: list[str], path: Path, title: str) -> None:
    """One row per caption: a real crop, then the samples titled with their predicted photo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = samples.shape[0], samples.shape[1] + 1
    height = 1.5 * rows + 0.8
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 1.6, height), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            img = references[i] if j == 0 else samples[i, j - 1]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="lanczos")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(prompts[i].replace("a photo of ", ""), fontsize=9)
                ax.set_title("photo crop" if i == 0 else "", fontsize=8)
            else:
                pred = int(predictions[i, j - 1])
                ok = pred == i
                ax.set_title(names[pred], fontsize=8, color="green" if ok else "red")
                for spine in ax.spines.values():
                    spine.set_edgecolor("green" if ok else "red")
                    spine.set_linewidth(2)
    fig.suptitle(title.replace(" — ", "\n"), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))  # keep the two-line title clear of the first row
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def evaluate(pipe=None, seeds: tuple[int, ...] = (0, 1, 2, 3), steps: int = 20, guidance_scale: float = 4.5,
             grid_path: str | Path | None = "figures/demo_samples.png", quiet: bool = False) -> dict:
    """Run the metric (module docstring) on ``pipe`` (default: the shipped demo pipeline)."""
    from rich.progress import Progress

    from attnprobe.demo import DEFAULT_RESOLUTION, load_demo_pipeline

    started = time.time()
    if pipe is None:
        pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    resolution = int(pipe.transformer.config.sample_size * pipe.vae_scale_factor) or DEFAULT_RESOLUTION
    prompts = [p.caption for p in PHOTOS]
    sampler = CropSampler(resolution)
    classifier = NearestCentroid.from_photos(sampler)
    holdout, holdout_labels = sampler.fixed(HOLDOUT_CROPS, HOLDOUT_SEED)
    real_acc = float((classifier.predict(holdout) == holdout_labels).float().mean())
    recon_acc = float((classifier.predict(_reconstruct(pipe.vae, holdout)) == holdout_labels).float().mean())
    with Progress(disable=quiet, transient=True) as progress:
        samples = generate(pipe, prompts, list(seeds), steps, guidance_scale, resolution, progress)
    n_prompts, n_seeds = samples.shape[:2]
    predictions = classifier.predict(samples.flatten(0, 1)).view(n_prompts, n_seeds)
    truth = torch.arange(n_prompts)[:, None].expand_as(predictions)
    correct = predictions == truth
    names = classifier.names
    result = {
        "accuracy": float(correct.float().mean()),
        "per_caption": {prompts[i]: float(correct[i].float().mean()) for i in range(n_prompts)},
        "predictions": {prompts[i]: [names[int(k)] for k in predictions[i]] for i in range(n_prompts)},
        "reference_accuracy_real_crops": real_acc,
        "reference_accuracy_vae_reconstructions": recon_acc,
        "seeds": list(seeds),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "seconds": round(time.time() - started, 1),
    }
    if grid_path is not None:
        grid_path = Path(grid_path)
        references = sampler.fixed(1, HOLDOUT_SEED + 1)[0]
        title = (f"demo model: {steps} steps, CFG {guidance_scale}, seeds {list(seeds)} — nearest-photo accuracy "
                 f"{result['accuracy']:.0%} (real crops {real_acc:.0%}, VAE recon {recon_acc:.0%})")
        save_grid(samples, references, predictions, prompts, names, grid_path, title)
        result["grid"] = str(grid_path)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnprobe.demo.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped demo model)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per caption")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--grid", type=Path, default=Path("figures/demo_samples.png"), help="sample grid to write")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from attnprobe.demo import load_demo_pipeline

    try:
        pipe = load_demo_pipeline(path=args.model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate(pipe, tuple(range(args.seeds)), args.steps, args.guidance_scale, args.grid, args.quiet)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
