"""Training data for distillation: latents z₀ plus their conditioning, prepared once.

Two sources (:func:`prepare_data` picks by the path):

* **a folder of images** with captions, either a sidecar ``<stem>.txt`` next to each image or a
  ``captions.jsonl`` in the folder (``{"file": "cat.png", "caption": "a cat"}`` per line; the
  keys ``image``/``file_name`` and ``text`` are accepted too). Images are resized (shorter side)
  and centre-cropped to the training resolution, scaled to [-1, 1] and encoded by the
  pipeline's VAE: z₀ = (mode of q(z|x) − shift) · scaling_factor. Unreadable or corrupt images
  are skipped and counted in ``info["skipped"]``; images without a caption train with the empty
  caption and are counted in ``info["uncaptioned"]``.
* **a prompt file** (``.txt``, one prompt per line, ``#`` comments): no data set needed. z₀ are
  sampled from the teacher itself, ``pipe(prompt, output_type="latent")`` with a few steps and
  fixed seeds (DiT pipelines cannot return latents: their images are sampled and re-encoded).

Conditioning is encoded by the model family's adapter
(:meth:`attnprobe.core.family.Family.encode_conditions`) into a dict of tensors per sample whose
keys are the denoiser's keyword arguments (PixArt: ``encoder_hidden_states`` [L, D] and
``encoder_attention_mask`` [L], L trimmed to the longest caption; UNets: ``encoder_hidden_states``,
SDXL adds ``text_embeds`` and ``time_ids``; DiT: ``class_labels``), plus the same dict for the
empty caption (the null condition; class 1000 for DiT), which :meth:`DistillData.batch` swaps in
with probability ``caption_dropout`` for classifier-free guidance. Everything lives in memory
(fine up to some thousands of samples); ``cache_dir`` stores it once as safetensors, keyed by a hash of the inputs, and later runs load it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnprobe.core.errors import UserError
from attnprobe.core.family import denoiser_of, family_of
from attnprobe.core.outputs import read_prompts as _read_prompts
from attnprobe.core.pipeline import sample

__all__ = ["DataError", "DistillData", "data_identity", "prepare_data", "read_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CACHE_VERSION = 1


class DataError(UserError):
    """The data source is missing, empty or unusable; the message says what to fix."""


@dataclass
class DistillData:
    """Prepared training data: z₀ [M, C, h, w], per-sample conditioning, the null condition."""

    latents: torch.Tensor  # [M, C, h, w]
    cond: dict[str, torch.Tensor]  # key → [M, ...]
    null_cond: dict[str, torch.Tensor]  # key → [...] (one sample)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def batch(self, index: torch.Tensor, drop: torch.Tensor | None = None, device=None, dtype=None):
        """Latents [B, C, h, w] and conditioning for sample ``index`` [B]; ``drop`` [B] bool → null condition."""
        lat = self.latents[index]
        cond = {}
        for key, val in self.cond.items():
            v = val[index]  # [B, ...]
            if drop is not None and bool(drop.any()):
                null = self.null_cond[key].to(v.dtype).expand_as(v)
                v = torch.where(drop.reshape(-1, *([1] * (v.ndim - 1))), null, v)
            cond[key] = v
        if device is not None or dtype is not None:
            lat = lat.to(device=device, dtype=dtype)
            cond = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in cond.items()}
        return lat, cond


# ----------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[str]:
    """The prompts of a prompt file (:func:`attnprobe.outputs.read_prompts`), errors as DataError."""
    return _read_prompts(path, error=DataError)


def _jsonl_captions(path: Path) -> dict[str, str]:
    caps = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name = rec.get("file") or rec.get("image") or rec.get("file_name")
            text = rec.get("caption", rec.get("text"))
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"{path}:{i} is not a JSON object with 'file' and 'caption'") from None
        if not name or text is None:
            raise DataError(f"{path}:{i} needs 'file' and 'caption' keys")
        caps[str(name)] = str(text)
    return caps


def read_image_folder(folder: Path) -> tuple[list[tuple[Path, str | None]], int]:
    """``([(image path, caption or None)], n_sidecars)`` for the images under ``folder`` (sorted, recursive)."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    jsonl = folder / "captions.jsonl"
    table = _jsonl_captions(jsonl) if jsonl.is_file() else {}
    out = []
    for p in images:
        rel = p.relative_to(folder).as_posix()
        cap = table.get(rel, table.get(p.name))
        side = p.with_suffix(".txt")
        if cap is None and side.is_file():
            try:
                cap = side.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                cap = None
        out.append((p, cap))
    return out, len(table)


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """Image file → [3, R, R] in [-1, 1] (shorter side resized, centre crop). Raises on bad files."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: truncated/corrupt files raise here
        im = im.convert("RGB")
    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError("empty image")
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, R, R]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, R, R] in [-1, 1] → model-space latents [B, C, R/f, R/f]."""
    vae = pipe.vae
    dev, dt = vae.device, vae.dtype
    lat = vae.encode(pixels.to(device=dev, dtype=dt)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def encode_conditions(pipe, prompts: list[str], resolution: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Prompts → ``{denoiser kwarg: [M, ...]}`` on CPU, in batches (the family adapter encodes)."""
    fam = family_of(denoiser_of(pipe))
    chunks: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(prompts), batch_size):
        try:
            got = fam.encode_conditions(pipe, list(prompts[i : i + batch_size]), resolution)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        for k, v in got.items():
            chunks.setdefault(k, []).append(v.detach().cpu())
    return {k: torch.cat(v) for k, v in chunks.items()}


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def data_identity(source) -> str | None:
    """What a run trained on, for ``--resume`` to compare: the prompts of a prompt file, or the relative paths and
    sizes of an image folder's files (not their times: a copied folder is the same data). None when ``source``
    cannot be read (preparing the data then says why)."""
    source = Path(source)
    h = hashlib.sha256()
    try:
        if source.is_dir():
            for p in sorted(source.rglob("*")):
                if p.is_file():
                    h.update(f"{p.relative_to(source).as_posix()}:{p.stat().st_size}\n".encode())
        else:
            h.update("\n".join(read_prompts(source)).encode())
    except (OSError, DataError):
        return None
    return h.hexdigest()[:16]


def _fingerprint(source: Path, kind: str, model_id: str, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "kind": kind, "model": model_id, **settings}, sort_keys=True).encode())
    if kind == "prompts":
        h.update(source.read_bytes())
    else:
        for p in sorted(source.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(source).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _save_cache(data: DistillData, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"latents": data.latents.contiguous()}
    tensors.update({f"cond.{k}": v.contiguous() for k, v in data.cond.items()})
    tensors.update({f"null.{k}": v.contiguous() for k, v in data.null_cond.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"info": json.dumps(data.info)})
    os.replace(tmp, path)


def _load_cache(path: Path) -> DistillData:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cond = {k[5:]: v for k, v in tensors.items() if k.startswith("cond.")}
    null = {k[5:]: v for k, v in tensors.items() if k.startswith("null.")}
    info["cache"] = {"path": str(path), "hit": True}
    return DistillData(tensors["latents"], cond, null, info)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def prepare_data(
    pipe,
    source,
    *,
    resolution: int,
    model_id: str = "",
    seed: int = 0,
    sample_steps: int = 8,
    sample_guidance: float | None = None,
    samples_per_prompt: int = 1,
    cache_dir=None,
    log=None,
    batch_size: int = 8,
) -> DistillData:
    """Build (or load from ``cache_dir``) the training data for ``pipe`` from ``source``.

    ``source`` is a folder of captioned images or a prompt file. ``pipe`` must be the unconverted
    teacher pipeline (prompt files are sampled from it). ``log(msg)`` receives progress lines.
    """
    log = log or (lambda msg: None)
    fam = family_of(denoiser_of(pipe))
    source = Path(source)
    if not source.exists():
        raise DataError(f"data source {source} does not exist; pass a folder of captioned images or a prompt file")
    kind = "images" if source.is_dir() else "prompts"
    settings = {"resolution": int(resolution), "dtype": str(pipe.vae.dtype)}
    if kind == "prompts":
        settings.update(seed=int(seed), steps=int(sample_steps), guidance=sample_guidance, per_prompt=int(samples_per_prompt))
    cache_path = None
    if cache_dir is not None:
        fp = _fingerprint(source, kind, model_id, settings)
        cache_path = Path(cache_dir) / f"data-{fp}.safetensors"
        if cache_path.is_file():
            try:
                data = _load_cache(cache_path)
                log(f"data: loaded {len(data)} cached samples from {cache_path}")
                return data
            except Exception as exc:  # a damaged cache is rebuilt, never fatal
                log(f"data: cache {cache_path} unreadable ({exc}); rebuilding")

    info: dict = {"source": str(source), "kind": kind, "resolution": int(resolution)}
    if kind == "prompts":
        prompts = read_prompts(source)
        captions = [p for p in prompts for _ in range(samples_per_prompt)]
        seeds = [seed * 100_003 + i for i in range(len(captions))]
        log(f"data: sampling {len(captions)} latents from the teacher ({sample_steps} steps)")
        lats = []
        for i in range(0, len(captions), batch_size):
            ps, ss = captions[i : i + batch_size], seeds[i : i + batch_size]
            if not fam.returns_latents:  # DiT: no latent output, sample images and re-encode
                imgs = sample(pipe, ps, ss, steps=sample_steps, guidance=sample_guidance, output_type="pt")
                lats.append(encode_images(pipe, imgs.float() * 2 - 1))
            else:
                out = sample(pipe, ps, ss, steps=sample_steps, resolution=resolution, guidance=sample_guidance, output_type="latent")
                lats.append(out.float().cpu())
        latents = torch.cat(lats)
        info.update(prompts=len(prompts), samples=len(captions), sample_steps=int(sample_steps))
    else:
        items, n_jsonl = read_image_folder(source)
        if not items:
            raise DataError(f"no images in {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        skipped, pixels, captions = [], [], []
        for path, cap in items:
            try:
                pixels.append(_load_image(path, resolution))
            except Exception as exc:  # PIL raises many types for corrupt files
                skipped.append({"file": str(path), "reason": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            captions.append(cap)
        if not pixels:
            raise DataError(f"none of the {len(items)} images in {source} could be read ({skipped[0]['reason']})")
        uncaptioned = sum(c is None for c in captions)
        captions = [c or "" for c in captions]
        log(f"data: encoding {len(pixels)} images ({len(skipped)} skipped as unreadable, {uncaptioned} without caption)")
        latents = torch.cat([encode_images(pipe, torch.stack(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)])
        info.update(images=len(items), used=len(pixels), skipped=len(skipped), skipped_files=skipped[:50],
                    uncaptioned=uncaptioned, jsonl_captions=n_jsonl)
    if fam.class_conditional and kind == "images":
        raise DataError(f"{fam.name} models are class-conditional; train them from a prompt file of class names or ids")
    cond = encode_conditions(pipe, captions, resolution)
    null = fam.null_condition(pipe, resolution)
    fam.finish_conditions(cond, null)
    data = DistillData(latents, cond, null, info)
    if cache_path is not None:
        _save_cache(data, cache_path)
        data.info["cache"] = {"path": str(cache_path), "hit": False}
        log(f"data: cached {len(data)} samples to {cache_path}")
    return data
