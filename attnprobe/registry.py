"""Model registry shared by attnprobe and deltadistill.

A model is named by an alias (``demo``, ``pixart``, ``sd15``, ``tiny-pixart``, ...), a local
diffusers folder, or a Hub id (``org/name``). :func:`resolve` turns a name into a
:class:`ModelSpec`; :func:`load_pipeline` builds or loads the pipeline, strictly offline unless
the caller allows downloads. Real aliases also carry their denoiser's architecture config
(``attnprobe/configs/<alias>.json``, no weights), so commands that only need shapes (the bench)
work without weights via :func:`denoiser_from_config`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


class ModelLoadError(RuntimeError):
    """The model could not be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    alias: str  # the name the user gave, normalised (alias, folder path or Hub id)
    source: str  # Hub id, local folder, or "builtin:<alias>"
    pipeline: str  # diffusers pipeline class
    arch: str  # pixart | unet | dit | flux | sd3
    resolution: int  # default image side in pixels
    description: str

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def is_local(self) -> bool:
        return not self.is_builtin and Path(self.source).is_dir()


def _demo_dir() -> Path:
    return Path(__file__).parent / "demo" / "pipeline"


def _demo_resolution() -> int:
    try:
        from attnprobe.demo import DEFAULT_RESOLUTION

        return int(DEFAULT_RESOLUTION)
    except Exception:
        return 128


ALIASES: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in [
        ModelSpec("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "PixArtSigmaPipeline", "pixart", 512,
                  "PixArt-Σ XL/2 at 512 px (28 blocks, 1152 ch)"),
        ModelSpec("pixart-1024", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtSigmaPipeline", "pixart", 1024,
                  "PixArt-Σ XL/2 at 1024 px"),
        ModelSpec("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", "PixArtAlphaPipeline", "pixart", 1024,
                  "PixArt-α XL/2 at 1024 px"),
        ModelSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", "unet", 512,
                  "Stable Diffusion 1.5 UNet"),
        ModelSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "unet", 1024,
                  "Stable Diffusion XL base 1.0 UNet"),
        ModelSpec("dit", "facebook/DiT-XL-2-256", "DiTPipeline", "dit", 256, "DiT-XL/2, class-conditional ImageNet 256"),
        ModelSpec("flux", "black-forest-labs/FLUX.1-dev", "FluxPipeline", "flux", 1024,
                  "FLUX.1-dev (joint attention; analysed on the image-image block)"),
        ModelSpec("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline", "sd3", 1024,
                  "SD3 medium (joint attention; analysed on the image-image block)"),
        ModelSpec("demo", str(_demo_dir()), "PixArtSigmaPipeline", "pixart", _demo_resolution(),
                  "small trained PixArt-family model shipped with the package (runs on CPU)"),
        ModelSpec("tiny-pixart", "builtin:tiny-pixart", "PixArtSigmaPipeline", "pixart", 32, "random-weight tiny PixArt-Σ (tests)"),
        ModelSpec("tiny-sd15", "builtin:tiny-sd15", "StableDiffusionPipeline", "unet", 32, "random-weight tiny SD1.5-like UNet (tests)"),
        ModelSpec("tiny-sdxl", "builtin:tiny-sdxl", "StableDiffusionXLPipeline", "unet", 32, "random-weight tiny SDXL-like UNet (tests)"),
        ModelSpec("tiny-dit", "builtin:tiny-dit", "DiTPipeline", "dit", 32, "random-weight tiny DiT (tests)"),
        ModelSpec("tiny-flux", "builtin:tiny-flux", "FluxPipeline", "flux", 32, "random-weight tiny FLUX (tests)"),
        ModelSpec("tiny-sd3", "builtin:tiny-sd3", "StableDiffusion3Pipeline", "sd3", 32, "random-weight tiny SD3 (tests)"),
    ]
}

_PIPELINE_ARCH = {
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "DiTPipeline": "dit",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}


def resolve(name: str) -> ModelSpec:
    """Alias, local diffusers folder, or Hub id → :class:`ModelSpec` (raises ModelLoadError)."""
    if not name or not name.strip():
        raise ModelLoadError("empty model name; pass an alias (see `attnprobe models`), a local folder or a Hub id")
    name = name.strip()
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            cls = json.loads(index.read_text())["_class_name"]
        except Exception as exc:
            raise ModelLoadError(f"cannot read {index}: {exc}") from None
        if cls not in _PIPELINE_ARCH:
            raise ModelLoadError(f"pipeline {cls} in {path} is not supported; supported: {', '.join(sorted(_PIPELINE_ARCH))}")
        return ModelSpec(str(path), str(path.resolve()), cls, _PIPELINE_ARCH[cls], 0, f"local folder ({cls})")
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return ModelSpec(name, name, "", "", 0, "Hub id")
    known = ", ".join(ALIASES)
    raise ModelLoadError(f"unknown model {name!r}: not an alias ({known}), a local folder, or a Hub id 'org/name'")


def weights_available(spec: ModelSpec) -> bool:
    """True when the pipeline can be loaded without network."""
    if spec.is_builtin:
        return True
    if Path(spec.source).is_dir():
        return (Path(spec.source) / "model_index.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.source, "model_index.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16")
    return table[dtype]


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quiet_loading_bars() -> None:
    """Hide diffusers'/transformers' per-component loading bars (our CLIs draw their own)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - older library versions
        pass


def load_pipeline(name: str, dtype="auto", device: str | torch.device = "cpu", allow_download: bool = False):
    """Load (or build) the pipeline for ``name``; returns ``(pipe, spec)``.

    Weights never download unless ``allow_download`` is true (or ``HF_HUB_OFFLINE=0`` is set
    explicitly); a missing model raises :class:`ModelLoadError` saying how to get it.
    """
    spec = resolve(name)
    torch_dtype = auto_dtype(device) if dtype in (None, "auto") else _torch_dtype(dtype)
    if spec.is_builtin:
        from attnprobe.tiny import BUILDERS

        pipe = BUILDERS[spec.source.split(":", 1)[1]][0]()
    else:
        from diffusers import DiffusionPipeline

        local_only = not (allow_download or os.environ.get("HF_HUB_OFFLINE") == "0")
        _quiet_loading_bars()
        if spec.alias == "demo" and not Path(spec.source).is_dir():
            raise ModelLoadError(
                f"the demo model is missing from {spec.source}; reinstall the package or run "
                "`python -m attnprobe.demo.train --out attnprobe/demo/pipeline`"
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(spec.source, torch_dtype=torch_dtype, local_files_only=local_only)
        except Exception as exc:  # diffusers raises several types for missing files
            if Path(spec.source).is_dir():
                raise ModelLoadError(f"cannot load the pipeline in {spec.source}: {exc}".splitlines()[0]) from None
            raise ModelLoadError(
                f"weights for {spec.alias!r} ({spec.source}) are not available offline; on a machine with internet run "
                f"`huggingface-cli download {spec.source}` (and copy the HF cache here), or pass a local folder "
                "with --model /path/to/pipeline"
            ) from None
        cls = type(pipe).__name__
        if not spec.arch:
            if cls not in _PIPELINE_ARCH:
                raise ModelLoadError(f"pipeline {cls} is not supported; supported: {', '.join(sorted(_PIPELINE_ARCH))}")
            spec = ModelSpec(spec.alias, spec.source, cls, _PIPELINE_ARCH[cls], 0, "Hub id")
    if device != "cpu" or torch_dtype != torch.float32:
        pipe = pipe.to(device=device, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec


def config_hash(config) -> str:
    """Stable short hash of a denoiser config (diffusers FrozenDict or dict)."""
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def architecture_config(name: str) -> dict:
    """``{"class", "vae_scale_factor", "resolution", "config"}`` for an alias, without weights."""
    spec = resolve(name)
    path = CONFIG_DIR / f"{spec.alias}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if spec.is_builtin or Path(spec.source).is_dir():
        pipe, spec = load_pipeline(name, dtype="fp32")
        from attnprobe.arch import denoiser_of, vae_scale_factor

        den = denoiser_of(pipe)
        return {
            "class": type(den).__name__,
            "vae_scale_factor": vae_scale_factor(pipe),
            "resolution": spec.resolution,
            "config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")},
        }
    raise ModelLoadError(f"no architecture config is shipped for {name!r}; use an alias from `attnprobe models`")


def denoiser_from_config(name: str, device: str = "meta") -> tuple[torch.nn.Module, dict]:
    """Instantiate the denoiser of ``name`` from its config alone (meta device: no memory, no weights)."""
    import diffusers

    info = architecture_config(name)
    cls = getattr(diffusers, info["class"])
    with torch.device(device):
        model = cls.from_config(info["config"])
    return model, info
