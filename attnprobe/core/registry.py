"""Model registry: names → pipelines, strictly offline unless allowed.

A model is named by an alias (``demo``, ``pixart``, ``sd15``, ``tiny-pixart``, ...; each family
adapter declares its own), a local diffusers folder, or a Hub id (``org/name``). :func:`resolve`
turns a name into a :class:`ModelSpec`; :func:`load_pipeline` builds or loads the pipeline. Real
aliases also ship their denoiser's architecture config (``attnprobe/core/configs/<alias>.json``,
no weights), so commands that only need shapes work without weights
(:func:`denoiser_from_config`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attnprobe.core.errors import UserError
from attnprobe.core.family import denoiser_of, families, family_for_pipeline, vae_scale_factor
from attnprobe.core.family import Family
from attnprobe.core.family import family_of as family_of_denoiser

CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = [
    "ModelLoadError", "ModelSpec", "aliases", "resolve", "load_pipeline", "weights_available", "config_hash",
    "architecture_config", "denoiser_from_config", "auto_dtype", "torch_dtype", "CONFIG_DIR",
]


class ModelLoadError(UserError):
    """The model could not be resolved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    alias: str  # the name the user gave, normalised (alias, folder path or Hub id)
    source: str  # Hub id, local folder, or "builtin:<alias>"
    pipeline: str  # diffusers pipeline class ("" until loaded, for a bare Hub id)
    family: str  # family adapter name ("" until loaded)
    resolution: int  # default image side in pixels (0: the model's config decides)
    description: str
    text_tokens: int | None = None

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def is_local(self) -> bool:
        return not self.is_builtin and Path(self.source).is_dir()


_ALIASES: dict[str, ModelSpec] | None = None


def aliases() -> dict[str, ModelSpec]:
    """Every alias the families provide: real models first, then the tiny test pipelines."""
    global _ALIASES
    if _ALIASES is None:
        real, tiny = {}, {}
        for fam in families():
            for a in fam.aliases:
                real[a.alias] = ModelSpec(a.alias, a.source, a.pipeline, fam.name, a.resolution, a.description, a.text_tokens)
            for alias, (_, description, resolution) in fam.tiny_builders().items():
                tiny[alias] = ModelSpec(alias, f"builtin:{alias}", "", fam.name, resolution, description)
        order = ("pixart", "pixart-1024", "pixart-alpha", "sd15", "sdxl", "dit", "flux", "sd3")
        ranked = sorted(real, key=lambda k: (order.index(k) if k in order else len(order), k != "demo", k))
        _ALIASES = {k: real[k] for k in ranked} | dict(sorted(tiny.items()))
    return _ALIASES


def _tiny_builder(alias: str):
    for fam in families():
        builders = fam.tiny_builders()
        if alias in builders:
            return builders[alias][0]
    raise ModelLoadError(f"no builder for {alias!r}")


def resolve(name: str) -> ModelSpec:
    """Alias, local diffusers folder, or Hub id → :class:`ModelSpec` (raises ModelLoadError)."""
    if not name or not name.strip():
        raise ModelLoadError("empty model name; pass an alias (see `attnprobe models`), a local folder or a Hub id")
    name = name.strip()
    known = aliases()
    if name in known:
        return known[name]
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            cls = json.loads(index.read_text())["_class_name"]
        except Exception as exc:
            raise ModelLoadError(f"cannot read {index}: {exc}") from None
        fam = family_for_pipeline(cls)
        if fam is None:
            raise ModelLoadError(f"pipeline {cls} in {path} is not supported; supported: {_supported_pipelines()}")
        return ModelSpec(str(path), str(path.resolve()), cls, fam.name, 0, f"local folder ({cls})")
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return ModelSpec(name, name, "", "", 0, "Hub id")
    raise ModelLoadError(f"unknown model {name!r}: not an alias ({', '.join(known)}), a local folder, or a Hub id 'org/name'")


def text_tokens(spec: ModelSpec, family: Family, random_weights: bool = False) -> int:
    """The text length ``spec``'s pipeline encodes: its alias's encoder, else its family's; the tiny tokenizer of the
    test and random-weight pipelines caps it (the dry runs size text embeddings and joint attention with it)."""
    if spec.text_tokens:
        return int(spec.text_tokens)
    return int(family.tiny_text_tokens if spec.is_builtin or random_weights else family.text_tokens)


def _supported_pipelines() -> str:
    return ", ".join(sorted(c for f in families() for c in f.pipeline_classes))


def weights_available(spec: ModelSpec) -> bool:
    """True when the pipeline can be loaded without network."""
    if spec.is_builtin:
        return True
    if Path(spec.source).is_dir():
        return (Path(spec.source) / "model_index.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec.source, "model_index.json"), str)
    except Exception:
        return False


def torch_dtype(dtype) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``torch.float16`` ... → a torch dtype (ModelLoadError otherwise)."""
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


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": ...}`` for diffusers versions that renamed ``torch_dtype`` (no deprecation warning), else the old name."""
    import diffusers.utils.deprecation_utils as dep

    return {"dtype": dtype} if hasattr(dep, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else {"torch_dtype": dtype}


def _quiet_loading_bars() -> None:
    """Hide diffusers'/transformers' per-component loading bars (our CLIs draw their own)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - older library versions
        pass


def load_pipeline(name: str, dtype="auto", device: str | torch.device = "cpu", allow_download: bool = False,
                  random_weights: bool = False):
    """Load (or build) the pipeline for ``name``; returns ``(pipe, spec)``.

    Weights never download unless ``allow_download`` is true (or ``HF_HUB_OFFLINE=0`` is set
    explicitly); a missing model raises :class:`ModelLoadError` saying how to get it.
    ``random_weights``: build the real-size denoiser of an alias from its shipped config with seeded
    random weights, around tiny text encoders and VAE (smoke tests and benchmarks at real shapes;
    ``pipe._attnprobe_random_weights`` is set and reports say so).
    """
    spec = resolve(name)
    dt = auto_dtype(device) if dtype in (None, "auto") else torch_dtype(dtype)
    if random_weights and not spec.is_builtin:
        pipe = _random_pipeline(spec)
    elif spec.is_builtin:
        pipe = _tiny_builder(spec.alias)()
        pipe._attnprobe_random_weights = True  # the tiny pipelines are random by construction
    else:
        from diffusers import DiffusionPipeline

        local_only = not (allow_download or os.environ.get("HF_HUB_OFFLINE") == "0")
        _quiet_loading_bars()
        if spec.alias == "demo" and not Path(spec.source).is_dir():
            raise ModelLoadError(f"the demo model is missing from {spec.source}; reinstall the package or run "
                                 "`python -m attnprobe.demo.train --out attnprobe/demo/pipeline`")
        try:
            pipe = DiffusionPipeline.from_pretrained(spec.source, **dtype_kwarg(dt), local_files_only=local_only)
        except Exception as exc:  # diffusers raises several types for missing files
            if Path(spec.source).is_dir():
                raise ModelLoadError(f"cannot load the pipeline in {spec.source}: {exc}".splitlines()[0]) from None
            raise ModelLoadError(
                f"weights for {spec.alias!r} ({spec.source}) are not available offline; on a machine with internet run "
                f"`hf download {spec.source}` (and copy the HF cache here), or pass a local folder "
                "with --model /path/to/pipeline"
            ) from None
        if not spec.family:
            cls = type(pipe).__name__
            fam = family_for_pipeline(cls)
            if fam is None:
                raise ModelLoadError(f"pipeline {cls} is not supported; supported: {_supported_pipelines()}")
            spec = replace(spec, pipeline=cls, family=fam.name)
    if not spec.pipeline:
        spec = replace(spec, pipeline=type(pipe).__name__)
    if str(device) != "cpu" or dt != torch.float32:
        pipe = pipe.to(device=device, dtype=dt)
    pipe.set_progress_bar_config(disable=True)
    if spec.resolution:
        pipe._attnprobe_resolution = spec.resolution  # the alias's native size, for resolution=None
    trained = _training_resolution(spec.source)
    if trained:
        pipe._attnprobe_training_resolution = trained  # recorded by the training script (the demo records it)
    return pipe, spec


def _random_pipeline(spec: ModelSpec):
    """The real-size denoiser of ``spec`` from its shipped config (seeded random weights) in a pipeline."""
    if not (CONFIG_DIR / f"{spec.alias}.json").is_file():
        raise ModelLoadError(f"--random-weights needs an alias with a shipped architecture config "
                             f"({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}); got {spec.alias!r}")
    meta, info = denoiser_from_config(spec.alias, device="meta")
    family = family_of_denoiser(meta)
    if type(family).random_pipeline is Family.random_pipeline:
        family.random_pipeline(meta, int(info["vae_scale_factor"]))  # raises: not supported for this family
    need = sum(p.numel() for p in meta.parameters()) * 4
    free = _available_memory()
    if free and need > 0.8 * free:
        raise ModelLoadError(f"--random-weights: {spec.alias} needs {need / 2**30:.1f} GiB of fp32 weights, "
                             f"more than the {free / 2**30:.1f} GiB available here")
    torch.manual_seed(0)
    den, info = denoiser_from_config(spec.alias, device="cpu")
    pipe = family.random_pipeline(den.eval(), int(info["vae_scale_factor"]))
    pipe._attnprobe_random_weights = True
    if info.get("resolution"):
        pipe._attnprobe_resolution = int(info["resolution"])
    return pipe


def _available_memory() -> int:
    """Bytes of memory available (Linux /proc/meminfo), 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _training_resolution(source) -> int | None:
    """The ``config.resolution`` a pipeline folder's train_config.json records, if any."""
    try:
        path = Path(str(source)) / "train_config.json"
        if path.is_file():
            value = json.loads(path.read_text()).get("config", {}).get("resolution")
            return int(value) if value else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def config_hash(config) -> str:
    """Stable short hash of a denoiser config (diffusers FrozenDict or dict)."""
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def architecture_config(name: str) -> dict:
    """``{"class", "vae_scale_factor", "resolution", "config"}`` for a model, without weights where shipped."""
    spec = resolve(name)
    path = CONFIG_DIR / f"{spec.alias}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if spec.is_builtin or Path(spec.source).is_dir():
        pipe, spec = load_pipeline(name, dtype="fp32")
        den = denoiser_of(pipe)
        return {"class": type(den).__name__, "vae_scale_factor": vae_scale_factor(pipe), "resolution": spec.resolution,
                "config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")}}
    raise ModelLoadError(f"no architecture config is shipped for {name!r}; use an alias from `attnprobe models`")


def denoiser_from_config(name: str, device: str = "meta") -> tuple[torch.nn.Module, dict]:
    """Instantiate the denoiser of ``name`` from its config alone (meta device: no memory, no weights)."""
    import diffusers

    info = architecture_config(name)
    cls = getattr(diffusers, info["class"])
    with torch.device(device):
        model = cls.from_config(info["config"])
    return model, info
