"""Import checkpoints of the official ΔConvFusion code into the toolkit's distilled-model folder.

The authors' code mounts its block as ``conv1`` inside each host transformer block, in place of
``attn1``, with these parameters (any common key prefix, e.g. ``denoiser.``)::

    <block>.conv1.conv_up.weight              [C', C] (or a 1×1 conv [C', C, 1, 1])   → proj_in
    <block>.conv1.conv_up.bias                [C']      optional                      → proj_in.bias
    <block>.conv1.gates.<i>.conv_spatial.weight  [K, K, C'] (Triton) or [C', 1, K, K] → stages.<i>.weight
    <block>.conv1.gates.<i>.conv_spatial.bias    [C']   optional                      → stages.<i>.bias
    <block>.conv1.conv_out.weight             [C, C'/2 · S]                           → proj_out
    <block>.conv1.conv_pool.weight            [C, C]                                  → global_proj

Gate ``i`` works at scale 1/2^i. Kernel sizes, C' and the number of stages come from the shapes;
the gate, its scale and the pooling from the family's official recipe (``Family.paper_block``:
PixArt x1·σ(x2), SD x1·x2·√(C'/2); adaptive pooling). Anything that does not map is refused with
the keys listed. Verified on checkpoints written in that layout, not on the published files.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from attnprobe.core.errors import UserError
from attnprobe.core.family import denoiser_of, family_of, find_self_attention

__all__ = ["OfficialImportError", "import_official", "read_checkpoint", "blocks_from_official"]

_PARAM = re.compile(r"^(conv_up|conv_out|conv_pool|gates\.(\d+)\.conv_spatial)\.(weight|bias)$")


class OfficialImportError(UserError):
    """The checkpoint does not match the official layout or this model."""


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise OfficialImportError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise OfficialImportError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise OfficialImportError(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    for key in ("state_dict", "model", "base"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise OfficialImportError(f"{path} does not hold a flat dict of tensors")
    return data


def _group(tensors: dict, sites) -> tuple[dict[str, dict], list[str]]:
    """{site name: {official param: tensor}} and the keys that map to no site."""
    hosts = {s.name.rsplit(".", 1)[0] + ".conv1.": s.name for s in sites}
    grouped: dict[str, dict] = {}
    prefixes, unmatched = set(), []
    for key, value in tensors.items():
        for host, site in hosts.items():
            at = key.find(host)
            if at >= 0 and (at == 0 or key[at - 1] == ".") and _PARAM.match(key[at + len(host):]):
                prefixes.add(key[:at])
                grouped.setdefault(site, {})[key[at + len(host):]] = value
                break
        else:
            unmatched.append(key)
    if len(prefixes) > 1:
        raise OfficialImportError(f"the checkpoint mixes key prefixes {sorted(prefixes)}; expected one")
    return grouped, unmatched


def _linear(w: torch.Tensor, what: str) -> torch.Tensor:
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]  # 1×1 convolution of the PyTorch variant
    if w.ndim != 2:
        raise OfficialImportError(f"{what} has shape {tuple(w.shape)}; expected a [out, in] linear weight")
    return w


def _depthwise(w: torch.Tensor, inner: int, what: str) -> torch.Tensor:
    """[K, K, C'] or [C', 1, K, K] → [C', K, K]."""
    if w.ndim == 3 and w.shape[0] == w.shape[1] and w.shape[2] == inner:
        return w.permute(2, 0, 1)
    if w.ndim == 4 and w.shape[0] == inner and w.shape[1] == 1 and w.shape[2] == w.shape[3]:
        return w[:, 0]
    raise OfficialImportError(f"{what} has shape {tuple(w.shape)}; expected [K, K, {inner}] or [{inner}, 1, K, K]")


def blocks_from_official(tensors: dict, denoiser) -> dict:
    """``{site name: DeltaConvBlock}`` with the official weights, for every site of ``denoiser``."""
    from deltadistill.block import DeltaConvBlock
    from deltadistill.conversion import attn_dim

    family = family_of(denoiser)
    if family.paper_block is None:
        raise OfficialImportError(f"the official code has no {family.name} models (it covers PixArt-Σ, SD1.5 and SDXL)")
    sites = find_self_attention(denoiser)
    grouped, unmatched = _group(tensors, sites)
    if unmatched:
        raise OfficialImportError(f"{len(unmatched)} checkpoint key(s) match no official block of this {family.name} model: "
                                  + ", ".join(sorted(unmatched)[:5]) + (" ..." if len(unmatched) > 5 else ""))
    missing = [s.name for s in sites if s.name not in grouped]
    if missing:
        raise OfficialImportError(f"no official block for {len(missing)} self-attention layer(s), e.g. "
                                  f"{missing[0].rsplit('.', 1)[0]}.conv1 (another model, or a partial checkpoint?)")
    blocks = {}
    for site in sites:
        p = grouped[site.name]
        where = f"{site.name.rsplit('.', 1)[0]}.conv1"
        need = [k for k in ("conv_up.weight", "conv_out.weight", "conv_pool.weight", "gates.0.conv_spatial.weight") if k not in p]
        if need:
            raise OfficialImportError(f"{where}: missing {', '.join(need)}")
        up = _linear(p["conv_up.weight"], f"{where}.conv_up.weight")
        inner, dim = up.shape
        if dim != attn_dim(site.module, site.name):
            raise OfficialImportError(f"{where}: conv_up maps {dim} channels, the model's layer has {attn_dim(site.module, site.name)}")
        n_stages = 1 + max(int(m.group(2)) for k in p if (m := _PARAM.match(k)) and m.group(2) is not None)
        dws = [_depthwise(p[f"gates.{i}.conv_spatial.weight"], inner, f"{where}.gates.{i}.conv_spatial.weight")
               for i in range(n_stages) if f"gates.{i}.conv_spatial.weight" in p]
        if len(dws) != n_stages or len({d.shape[-1] for d in dws}) != 1:
            raise OfficialImportError(f"{where}: gates must be 0..{n_stages - 1} with one kernel size")
        biases = [p.get(f"gates.{i}.conv_spatial.bias") for i in range(n_stages)]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise OfficialImportError(f"{where}: some gates have a depth-wise bias and some do not")
        settings = dict(family.paper_block)
        block = DeltaConvBlock(dim, int(dws[0].shape[-1]), scales=tuple(0.5**i for i in range(n_stages)),
                               inter_ratio=inner / dim, gate=settings["gate"], gate_scale=settings["gate_scale"],
                               pool=settings["pool"], dw_bias=biases[0] is not None)
        with torch.no_grad():
            block.proj_in.weight.copy_(up)
            block.proj_in.bias.copy_(p.get("conv_up.bias", torch.zeros(inner)))
            for stage, w, b in zip(block.stages, dws, biases):
                stage.weight.copy_(w)
                if b is not None:
                    stage.bias.copy_(b)
            for ours, theirs in ((block.proj_out, "conv_out"), (block.global_proj, "conv_pool")):
                w = _linear(p[f"{theirs}.weight"], f"{where}.{theirs}.weight")
                if tuple(w.shape) != tuple(ours.weight.shape):
                    raise OfficialImportError(f"{where}.{theirs}.weight has shape {tuple(w.shape)}, expected {tuple(ours.weight.shape)}")
                ours.weight.copy_(w)
                ours.bias.copy_(p.get(f"{theirs}.bias", torch.zeros(ours.out_features)))
        blocks[site.name] = block
    return blocks


def import_official(checkpoint, model: str, out, *, overwrite: bool = False) -> Path:
    """Convert an official checkpoint for ``model`` (alias, folder) into a distilled folder ``out``.

    The base model's architecture comes from its shipped config when there is one (no weights
    needed), else from the pipeline itself.
    """
    from attnprobe.core import registry
    from deltadistill import io

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    tensors = read_checkpoint(checkpoint)
    spec = registry.resolve(model)
    if (registry.CONFIG_DIR / f"{spec.alias}.json").is_file():
        den, _ = registry.denoiser_from_config(model)
    else:
        pipe, spec = registry.load_pipeline(model, dtype="fp32")
        den = denoiser_of(pipe)
    blocks = blocks_from_official(tensors, den)
    labels = {s.name: s.label for s in find_self_attention(den)}
    return io.save_blocks(blocks, labels, den, out, base_model=spec, overwrite=overwrite,
                          info={"kernel_source": "official checkpoint"},
                          extra={"imported_from": str(checkpoint), "preset": "paper"})
