"""Save and load distilled ΔConvBlocks (SPEC §6: the distilled model folder).

A folder holds

* ``config.json``: format name and version, the base model (alias, source, pipeline, arch), the
  base denoiser's class and config hash, the report hash when kernel sizes came from ``erf.json``,
  and per converted layer its name, label, dim, kernel_size, scales, inter_ratio, gate, gate_scale,
  pool, dw_bias and key_width (folders written before those four existed load with the defaults);
* ``delta_blocks.safetensors``: every block's parameters, keyed ``<layer name>.<parameter>``
  (e.g. ``transformer_blocks.3.attn1.proj_in.weight``).

:func:`save` writes into a temporary folder next to the target and renames it into place, so a
reader never sees half a folder; an existing folder is only replaced with ``overwrite=True``.
:func:`load` validates the folder against a *fresh* base pipeline (config hash, layer names,
dims, tensor names and shapes) before touching it, then converts it and loads the weights
(safetensors only — no pickle).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from attnprobe.core.errors import UserError
from attnprobe.core.outputs import dir_mode, file_mode, replace_dir
from attnprobe.core.registry import ModelSpec, config_hash
from deltadistill.block import DeltaConvBlock
from deltadistill.conversion import (
    attn_dim,
    conversion_info,
    convertible_sites,
    delta_modules,
    get_denoiser,
    install,
)

__all__ = ["save", "save_blocks", "save_into_run", "load", "read_config", "FolderMismatchError", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "delta_blocks.safetensors"
FORMAT = "deltadistill"
FORMAT_VERSION = 1


class FolderMismatchError(UserError):
    """A distilled folder does not fit the pipeline it is loaded onto (or is malformed)."""


def _base_model_info(base_model) -> dict:
    """``{"alias", "source", "pipeline", "family"}`` from an alias / folder / Hub id or a ModelSpec."""
    if isinstance(base_model, ModelSpec):
        spec = base_model
    else:
        from attnprobe.core.registry import ModelLoadError, resolve

        name = str(base_model)
        try:
            spec = resolve(name)
        except ModelLoadError:
            return {"alias": name, "source": name, "pipeline": "", "family": ""}
    return {"alias": spec.alias, "source": spec.source, "pipeline": spec.pipeline, "family": spec.family}


def save(pipe, folder, *, base_model, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the converted pipeline's ΔConvBlocks to ``folder`` atomically; returns the folder.

    Args:
        pipe: a converted pipeline (or its denoiser).
        folder: target folder; must not exist unless ``overwrite``.
        base_model: the base model's alias, folder or Hub id (or its ``ModelSpec``), recorded so
            users know which pipeline to load the blocks onto.
        extra: JSON-serialisable metadata stored under ``"extra"`` (training step, losses, ...).
    """
    den = get_denoiser(pipe)
    mods = delta_modules(den)
    if not mods:
        raise ValueError("the pipeline has no ΔConvBlocks to save; run deltadistill.convert(pipe, ...) first")
    info = conversion_info(den)
    return save_blocks({name: mod.block for name, mod in mods.items()}, {name: mod.label for name, mod in mods.items()},
                       den, folder, base_model=base_model, info=info, extra=extra, overwrite=overwrite)


def save_blocks(blocks: dict[str, DeltaConvBlock], labels: dict[str, str], denoiser, folder, *, base_model,
                info: dict | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``blocks`` ({site name: block}) for ``denoiser`` (may live on the meta device) as a folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True (or --overwrite) to replace it")
    info = info or {}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltadistill_version": _version(),
        "base_model": _base_model_info(base_model),
        "denoiser_class": type(denoiser).__name__,
        "base_config_hash": config_hash(denoiser.config),
        "report_hash": info.get("report_hash"),
        "kernel_source": info.get("kernel_source"),
        "layers": [{"name": name, "label": labels.get(name, name), "dim": block.dim, **_block_settings(block)}
                   for name, block in blocks.items()],
        "extra": extra or {},
    }
    text = json.dumps(config, indent=2, ensure_ascii=False)  # fail before writing anything if not JSON
    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous()
        for name, block in blocks.items()
        for key, value in block.state_dict().items()
    }

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        os.chmod(tmp / WEIGHTS_NAME, file_mode())  # safetensors writes 0600; follow the umask like every output
        (tmp / CONFIG_NAME).write_text(text + "\n")
        os.chmod(tmp, dir_mode())
        replace_dir(tmp, folder)  # an existing folder (overwrite) is moved aside, then swapped
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _block_settings(block) -> dict:
    if getattr(block, "kind", None) == "linear":
        return {"kernel_size": None, **block.settings()}
    return {"kernel_size": block.kernel_size, "scales": list(block.scales), "inter_ratio": block.inter_ratio,
            "gate": block.gate, "gate_scale": block.gate_scale, "pool": block.pool, "dw_bias": block.dw_bias,
            "key_width": block.key_width}


def _build_block(layer: dict, dim: int):
    if layer.get("student", "deltaconv") == "linear":
        from deltadistill.linear_attention import LinearAttentionBlock

        return LinearAttentionBlock(dim, int(layer["heads"]), int(layer["head_dim"]), bias=bool(layer.get("bias", True)))
    return DeltaConvBlock(
        dim,
        layer["kernel_size"],
        scales=tuple(layer.get("scales", (1, 0.5))),
        inter_ratio=layer.get("inter_ratio", 0.5),
        gate=layer.get("gate", "scaled"),
        gate_scale=layer.get("gate_scale") if layer.get("gate", "scaled") == "scaled" else None,
        pool=layer.get("pool", "ceil"),
        dw_bias=bool(layer.get("dw_bias", True)),
        key_width=int(layer.get("key_width", 0)),
    )


def save_into_run(pipe, out, *, base_model, extra: dict | None = None) -> None:
    """:func:`save` into a temporary folder, then move its two files into the run folder ``out``.

    ``save`` replaces whole folders; a training run folder also holds checkpoints and metrics, so
    the model is staged beside them and its files are renamed in (weights first, config.json last:
    a config.json always describes complete weights).
    """
    out = Path(out)
    stage = out / f".model-tmp-{uuid.uuid4().hex[:8]}"
    try:
        save(pipe, stage, base_model=base_model, extra=extra)
        os.replace(stage / WEIGHTS_NAME, out / WEIGHTS_NAME)
        os.replace(stage / CONFIG_NAME, out / CONFIG_NAME)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _version() -> str:
    from deltadistill._version import __version__

    return __version__


def read_config(folder) -> dict:
    """The validated ``config.json`` of a distilled folder."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FolderMismatchError(f"{folder} is not a deltadistill folder: no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FolderMismatchError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise FolderMismatchError(f"{path} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise FolderMismatchError(f"{path} is not a deltadistill config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise FolderMismatchError(
            f"{path} has format version {config.get('format_version')}, this deltadistill reads {FORMAT_VERSION}; "
            "upgrade deltadistill"
        )
    for key in ("base_config_hash", "layers"):
        if key not in config:
            raise FolderMismatchError(f"{path} lacks {key!r}")
    return config


def load(pipe, folder):
    """Convert a fresh base ``pipe`` to match ``folder`` and load its trained blocks; returns ``pipe``.

    Everything is checked before the pipeline is modified: the base denoiser's config hash, each
    layer's name and dim, and every tensor's name and shape (so an edited kernel size is caught).
    Raises :class:`FolderMismatchError` (a ValueError) with a one-line message naming the mismatch.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    den, _, sites = convertible_sites(pipe)
    base = config.get("base_model", {}) or {}
    want, have = config["base_config_hash"], config_hash(den.config)
    if want != have:
        raise FolderMismatchError(
            f"{folder} was distilled from {base.get('alias', '?')} ({config.get('denoiser_class')}, config hash {want}) "
            f"but this pipeline's {type(den).__name__} has config hash {have}; load the matching base pipeline "
            f"(attnprobe.core.registry.load_pipeline({base.get('alias', '...')!r}))"
        )
    by_name = {s.name: s for s in sites}
    blocks: dict[str, DeltaConvBlock] = {}
    for layer in config["layers"]:
        name = layer.get("name")
        if name not in by_name:
            raise FolderMismatchError(f"{folder}: layer {name!r} is not a self-attention module of this {type(den).__name__}")
        dim = attn_dim(by_name[name].module, name)
        if int(layer.get("dim", -1)) != dim:
            raise FolderMismatchError(f"{folder}: layer {name} has dim {layer.get('dim')} in {CONFIG_NAME}, the model has {dim}")
        try:
            blocks[name] = _build_block(layer, dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise FolderMismatchError(f"{folder}: layer {name} has invalid settings in {CONFIG_NAME}: {exc}") from None

    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FolderMismatchError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # SafetensorError for truncated or garbage files
        raise FolderMismatchError(f"{weights} is damaged or not a safetensors file ({str(exc).splitlines()[0][:100]})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FolderMismatchError(f"{weights}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}); the run diverged "
                                  "or the file is damaged")
    expected = {f"{name}.{key}": value for name, block in blocks.items() for key, value in block.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise FolderMismatchError(
            f"{folder}: {WEIGHTS_NAME} does not match {CONFIG_NAME} ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise FolderMismatchError(
                f"{folder}: {key} has shape {tuple(tensors[key].shape)} in {WEIGHTS_NAME} but {tuple(ref.shape)} from "
                f"{CONFIG_NAME} (edited kernel_size/scales/inter_ratio?)"
            )
    with torch.no_grad():
        for key, ref in expected.items():
            ref.copy_(tensors[key].to(ref.dtype))  # state_dict() values share storage with the parameters

    info = {k: config.get(k) for k in ("report_hash", "kernel_source")}
    if any(layer.get("student") == "linear" for layer in config["layers"]):
        info["student"] = "linear"
    info["loaded_from"] = str(folder)
    install(pipe, blocks, info)
    return pipe
