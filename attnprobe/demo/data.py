"""The demo model's training data: photographs that ship offline with a dependency.

Every photo comes from ``skimage.data`` (scikit-image) or ``sklearn.datasets.load_sample_images``
(scikit-learn), so nothing is downloaded. Each photo has one caption built from its source
("a photo of coffee"); the captions are the demo model's whole vocabulary.

Training samples are random square crops of a photo (side = ``scale`` × the photo's short side,
``scale`` uniform in ``[min_scale, max_scale]``, random position), resized with antialiasing to
the training resolution and flipped left-right with probability ½. Grey-scale photos are
replicated to three channels. All randomness comes from an explicit ``torch.Generator``, so a
seed fixes every crop.

scikit-image and scikit-learn are imported only when a photo is loaded (they are the
``demo-train`` extra), so importing this module is free.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Photo:
    """One training photograph: a short ``name``, its ``caption`` and where it comes from."""

    name: str
    caption: str
    source: str  # "skimage" (attribute of skimage.data) or "sklearn" (file name in load_sample_images)
    key: str


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "a photo of an astronaut", "skimage", "astronaut"),
    Photo("coffee", "a photo of coffee", "skimage", "coffee"),
    Photo("cat", "a photo of a cat", "skimage", "chelsea"),
    Photo("rocket", "a photo of a rocket", "skimage", "rocket"),
    Photo("cameraman", "a photo of a cameraman", "skimage", "camera"),
    Photo("grass", "a photo of grass", "skimage", "grass"),
    Photo("gravel", "a photo of gravel", "skimage", "gravel"),
    Photo("brick", "a photo of a brick wall", "skimage", "brick"),
    Photo("galaxies", "a photo of galaxies", "skimage", "hubble_deep_field"),
    Photo("retina", "a photo of a retina", "skimage", "retina"),
    Photo("cells", "a photo of stained cells", "skimage", "immunohistochemistry"),
    Photo("motorcycle", "a photo of a motorcycle", "skimage", "stereo_motorcycle"),
    Photo("temple", "a photo of a temple", "sklearn", "china.jpg"),
    Photo("flower", "a photo of a flower", "sklearn", "flower.jpg"),
)
"""The photo set, in label order (label i ↔ ``PHOTOS[i]``)."""

CAPTIONS: tuple[str, ...] = tuple(p.caption for p in PHOTOS)


def _to_rgb_float(image: np.ndarray) -> torch.Tensor:
    """uint8/float/bool array (H, W[, C]) → float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = arr[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).clamp(0.0, 1.0)


@lru_cache(maxsize=None)
def _sklearn_images() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {str(path).replace("\\", "/").rsplit("/", 1)[-1]: img for path, img in zip(bunch.filenames, bunch.images)}


def load_photo(photo: Photo) -> torch.Tensor:
    """The photo as a float tensor [3, H, W] in [0, 1] (grey photos replicated to RGB)."""
    if photo.source == "skimage":
        try:
            import skimage.data
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the demo photos need scikit-image: pip install 'attnprobe[demo-train]'") from exc
        image = getattr(skimage.data, photo.key)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity) -> left view
            image = image[0]
    elif photo.source == "sklearn":
        try:
            images = _sklearn_images()
        except ImportError as exc:  # pragma: no cover
            raise ImportError("the demo photos need scikit-learn: pip install 'attnprobe[demo-train]'") from exc
        image = images[photo.key]
    else:  # pragma: no cover - PHOTOS is fixed
        raise ValueError(f"unknown photo source {photo.source!r}")
    return _to_rgb_float(image)


def load_photos(photos: tuple[Photo, ...] = PHOTOS) -> list[torch.Tensor]:
    """All photos, in label order."""
    return [load_photo(p) for p in photos]


def random_crop(
    photo: torch.Tensor,
    resolution: int,
    generator: torch.Generator,
    min_scale: float = 0.5,
    max_scale: float = 1.0,
    flip: bool = True,
) -> torch.Tensor:
    """One random square crop of ``photo`` [3, H, W] resized to ``resolution``; returns [3, R, R] in [0, 1]."""
    _, h, w = photo.shape
    short = min(h, w)
    u = torch.rand(4, generator=generator).tolist()
    side = max(8, int(round(short * (min_scale + (max_scale - min_scale) * u[0]))))
    top = int(u[1] * (h - side + 1))
    left = int(u[2] * (w - side + 1))
    crop = photo[:, top : top + side, left : left + side]
    if side != resolution:
        crop = F.interpolate(crop[None], size=(resolution, resolution), mode="bilinear", antialias=side > resolution,
                             align_corners=False)[0]
    if flip and u[3] < 0.5:
        crop = crop.flip(-1)
    return crop.clamp(0.0, 1.0)


class CropSampler:
    """Random crops of the photo set with their labels.

    ``batch(n, generator)`` draws ``n`` (label, crop) pairs with labels uniform over the photos;
    ``fixed(per_photo, seed)`` returns ``per_photo`` crops of every photo in label order (for
    latent pre-computation and for the evaluation's reference features). Crops are [3, R, R]
    tensors in [0, 1].
    """

    def __init__(
        self,
        resolution: int,
        photos: tuple[Photo, ...] = PHOTOS,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        flip: bool = True,
    ):
        self.resolution = int(resolution)
        self.photos = photos
        self.images = load_photos(photos)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.flip = bool(flip)

    def __len__(self) -> int:
        return len(self.photos)

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.photos]

    def crop(self, label: int, generator: torch.Generator, resolution: int | None = None) -> torch.Tensor:
        return random_crop(self.images[label], resolution or self.resolution, generator, self.min_scale,
                           self.max_scale, self.flip)

    def batch(self, n: int, generator: torch.Generator, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random crops → (images [n, 3, R, R] in [0, 1], labels [n])."""
        labels = torch.randint(0, len(self.photos), (n,), generator=generator)
        images = torch.stack([self.crop(int(k), generator, resolution) for k in labels])
        return images, labels

    def fixed(self, per_photo: int, seed: int, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_photo`` seeded crops of every photo, label-major → (images, labels)."""
        generator = torch.Generator().manual_seed(int(seed))
        images, labels = [], []
        for label in range(len(self.photos)):
            for _ in range(per_photo):
                images.append(self.crop(label, generator, resolution))
                labels.append(label)
        return torch.stack(images), torch.tensor(labels)
