"""Model families: one adapter per diffusers architecture, found by discovery.

Everything that differs between PixArt, a UNet, DiT, FLUX, SD3, HunyuanDiT, ... lives in that
family's adapter, one file in :mod:`attnprobe.core.families`; the rest of the toolkit asks the
adapter. A :class:`Family` answers:

* which modules are self-attention (:meth:`Family.self_attention`) and how to compute their
  queries and keys from a processor call (:meth:`Family.query_key`, used by the capture);
* the token grid for an image size (:meth:`Family.base_grid`) and for a denoiser call
  (:meth:`Family.grid_from_call`); every site halves it ``site.level`` times;
* how to call the pipeline (:meth:`Family.call_kwargs`) and the denoiser
  (:meth:`Family.denoiser_kwargs` from encoded conditions, :meth:`Family.random_inputs` for
  benchmarks), and how to encode prompts into conditions (:meth:`Family.encode_conditions`);
* whether its self-attention may be replaced by a convolution (``convertible``);
* the aliases it provides (Hub ids, shipped models) and tiny random-weight pipelines for tests.

Adding a family is one new module in ``attnprobe/core/families/`` defining a ``Family``
subclass with a ``name``; :func:`families` imports every module of that package and collects
them (no list to edit).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from attnprobe.core.sites import AttnSite, UnsupportedModelError

__all__ = [
    "Alias",
    "Family",
    "QueryKey",
    "run_catching_projections",
    "families",
    "family_of",
    "family_named",
    "family_for_pipeline",
    "denoiser_of",
    "find_self_attention",
    "vae_scale_factor",
    "attention_query_key",
    "cross_channels",
]


@dataclass(frozen=True)
class Alias:
    """A model name a family provides: ``alias`` resolves to ``source`` (Hub id or folder)."""

    alias: str
    source: str
    pipeline: str
    resolution: int
    description: str
    text_tokens: int | None = None  # text length of its encoder, when it differs from the family's


@dataclass
class QueryKey:
    """What the capture needs from one self-attention call.

    ``q`` [B, heads, Nq, d] and ``k`` [B, heads, Nk, d] exactly as the softmax sees them (after
    norms, rotary embeddings, text/image concatenation); ``mask`` None, a bool mask or an additive
    float mask broadcastable to [B, heads, Nq, Nk]; ``scale`` the softmax scale (None: 1/√d).
    """

    q: torch.Tensor
    k: torch.Tensor
    mask: torch.Tensor | None = None
    scale: float | None = None


class Family:
    """Adapter base class: the defaults fit a patchified transformer on a VAE latent."""

    name: ClassVar[str] = ""
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0  # higher is tried first when several families match a class
    convertible: ClassVar[bool] = True
    # self-attention without position terms commutes with any reordering of its tokens (turns and flips of the
    # grid included); rotary embeddings break that. The trajectory recipe's symmetries need it.
    attention_equivariant: ClassVar[bool] = True
    returns_latents: ClassVar[bool] = True  # the pipeline supports output_type="latent"
    class_conditional: ClassVar[bool] = False  # "prompts" are class labels
    cfg_cond_first: ClassVar[bool] = False  # the pipeline batches classifier-free guidance as [cond; uncond]
    not_convertible_reason: ClassVar[str] = ""
    text_tokens: ClassVar[int] = 77  # text length of a typical prompt encoding (benchmarks)
    tiny_text_tokens: ClassVar[int] = 16  # the same for the tiny test and random-weight pipelines (16 per tiny tokenizer)
    max_sequence_length: ClassVar[int | None] = None  # cap passed to the pipeline, if it takes one
    aliases: ClassVar[tuple[Alias, ...]] = ()
    # The official ΔConvFusion recipe of this family (block settings; None: there is none), and its
    # kernel table (:meth:`paper_kernel_size`). Used by ``--preset paper``.
    paper_block: ClassVar[dict | None] = None

    # -- identity ---------------------------------------------------------------------------
    def matches(self, denoiser: torch.nn.Module) -> bool:
        return any(base.__name__ in self.denoiser_classes for base in type(denoiser).__mro__)

    def tiny_builders(self) -> dict[str, tuple[Callable, str, int]]:
        """``{alias: (build(seed=0) -> pipeline, description, resolution)}`` of tiny random-weight pipelines."""
        return {}

    def random_pipeline(self, denoiser: torch.nn.Module, vae_factor: int):
        """A pipeline around a real-size ``denoiser`` (random weights) with tiny random text encoders and
        VAE of matching widths, for ``--random-weights`` smoke tests and benchmarks."""
        raise UnsupportedModelError(f"--random-weights is not available for the {self.name} family yet "
                                    "(PixArt and SD1.5-style UNets are)")

    # -- self-attention sites -----------------------------------------------------------------
    def self_attention(self, denoiser: torch.nn.Module) -> list[AttnSite]:
        raise NotImplementedError

    def residual_tap(self, site: AttnSite) -> str:
        """Qualified name of the module whose first input is the host block's residual stream right
        after this site's self-attention step (hidden + gate · attention output)."""
        raise UnsupportedModelError(f"{self.name}: no residual-stream tap is known for {site.name}")

    def paper_kernel_size(self, site: AttnSite) -> int | None:
        """The official recipe's kernel size for ``site`` (None: the table has no entry for it)."""
        return None

    def query_key(self, site: AttnSite, attn, call: dict, projected=None) -> QueryKey:
        """Queries and keys of one processor call; ``call`` maps the processor's argument names
        (``hidden_states``, ``encoder_hidden_states``, ``attention_mask``, ...) to values. ``projected``:
        the ``(to_q, to_k)`` outputs of the processor's own call where the capture caught them (families
        that override this method are not given them)."""
        return attention_query_key(attn, call["hidden_states"], call.get("attention_mask"), projected=projected)

    # -- geometry ---------------------------------------------------------------------------
    def patch(self, config) -> int:
        """Latent pixels per token side."""
        return int(config.patch_size)

    def grid_divisor(self, config, vae_factor: int) -> int:
        """Image pixels an image side must be divisible by."""
        return vae_factor * self.patch(config)

    def base_grid(self, config, vae_factor: int, height: int, width: int) -> tuple[int, int]:
        """Base token grid (H', W') for an image of height × width pixels (raises if not divisible)."""
        div = self.grid_divisor(config, vae_factor)
        if height <= 0 or width <= 0 or height % div or width % div:
            raise ValueError(f"resolution {height}x{width} is not divisible by {div}, this model's downsampling")
        per_token = vae_factor * self.patch(config)
        return height // per_token, width // per_token

    def default_resolution(self, config, vae_factor: int) -> int:
        size = config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * vae_factor

    def check_resolution(self, config, vae_factor: int, height: int, width: int) -> None:
        """Raise ValueError if the model cannot generate at height × width."""
        self.base_grid(config, vae_factor, height, width)

    def grid_from_call(self, denoiser, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """Base token grid of one denoiser forward call (None if the call does not show it)."""
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if not torch.is_tensor(x) or x.ndim != 4:  # [B, C, H_lat, W_lat]
            return None
        p = self.patch(denoiser.config)
        return int(x.shape[-2]) // p, int(x.shape[-1]) // p

    # -- calling the pipeline -----------------------------------------------------------------
    def call_kwargs(self, pipe, prompts: list[str], *, height: int, width: int) -> dict:
        """Prompt-dependent keyword arguments of one ``pipe(...)`` call for a batch of prompts."""
        kw = {"prompt": list(prompts), "height": int(height), "width": int(width)}
        if self.max_sequence_length is not None:
            kw["max_sequence_length"] = self.sequence_length(pipe)
        return kw

    def sequence_length(self, pipe) -> int:
        """``max_sequence_length`` the pipeline's tokenizer supports (short test tokenizers cap it)."""
        tok = getattr(pipe, "tokenizer", None)
        limit = getattr(tok, "model_max_length", None)
        cap = int(self.max_sequence_length or 77)
        return min(cap, int(limit)) if isinstance(limit, int) and 0 < limit < 100_000 else cap

    # -- conditions and the denoiser call ----------------------------------------------------------
    def encode_conditions(self, pipe, prompts: list[str], resolution: int) -> dict[str, torch.Tensor]:
        """Prompts → ``{denoiser keyword: [M, ...]}`` (CPU tensors), what :meth:`denoiser_kwargs` takes."""
        raise UnsupportedModelError(f"{self.name} models cannot be trained here (no condition encoder)")

    def finish_conditions(self, cond: dict, null: dict) -> None:
        """Adjust encoded conditions of a whole data set and its null condition in place (default: none)."""

    def trim_text(self, kwargs: dict) -> None:
        """Drop, in place, text positions that a batch of recorded denoiser-call keywords (flattened, [B, ...])
        masks out in every row, where that changes no output (default: none)."""

    def null_condition(self, pipe, resolution: int) -> dict[str, torch.Tensor]:
        """The condition of the empty prompt, one sample (for caption dropout)."""
        return {k: v[0] for k, v in self.encode_conditions(pipe, [""], resolution).items()}

    def denoiser_kwargs(self, denoiser, cond: dict, resolution: int) -> dict:
        """Keyword arguments besides latent and timestep for one training call; values [B, ...]."""
        return dict(cond)

    def random_inputs(self, denoiser, resolution: int, vae_factor: int, *, text_len: int, device, dtype,
                      batch: int = 1, seed: int = 0) -> dict:
        """All keyword arguments of one denoiser call with random latents and conditions (benchmarks)."""
        raise UnsupportedModelError(f"no benchmark inputs for {self.name} models")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def attention_query_key(attn, hidden_states: torch.Tensor, attention_mask=None, rotary=None, projected=None) -> QueryKey:
    """q, k of a plain diffusers ``Attention`` used as self-attention (``AttnProcessor2_0`` and kin).

    Mirrors the processor: optional group norm, ``to_q``/``to_k``, split heads, ``norm_q``/``norm_k``,
    rotary embedding (HunyuanDiT), the prepared attention mask. hidden_states [B, N, C] (or
    [B, C, H, W]). ``projected``: ``(to_q(x), to_k(x))`` already computed (by the processor itself).
    """
    if getattr(attn, "spatial_norm", None) is not None:
        raise UnsupportedModelError("attention with a spatial norm (VAE attention) is not a supported self-attention site")
    x = hidden_states
    if x.ndim == 4:  # [B, C, H, W] → [B, HW, C]
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).transpose(1, 2)
    b, n, _ = x.shape
    mask = attention_mask
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, n, b)
        mask = mask.view(b, attn.heads, -1, mask.shape[-1])
    if projected is not None:
        q, k = projected
    else:
        if getattr(attn, "group_norm", None) is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k = attn.to_q(x), attn.to_k(x)
    d = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)  # [B, heads, N, d]
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q = apply_rotary_emb(q, rotary)
        k = apply_rotary_emb(k, rotary)
    return QueryKey(q, k, mask)


def run_catching_projections(family: Family, attn, run: Callable):
    """``run()`` (a processor call on ``attn``), and its ``(to_q, to_k)`` outputs for :meth:`Family.query_key`.

    Only where the family takes q, k as diffusers' plain processors do (it does not override ``query_key``) and
    each projection ran exactly once; else None, and the caller recomputes them. Recomputing cost ~10% of a
    PixArt-Σ XL step under capture.
    """
    caught: dict[str, list] = {"to_q": [], "to_k": []}
    hooks = []
    if type(family).query_key is Family.query_key:
        hooks = [mod.register_forward_hook(lambda m, i, o, n=n: caught[n].append(o.detach()))
                 for n in caught if isinstance(mod := getattr(attn, n, None), torch.nn.Module)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    once = hooks and all(len(v) == 1 and torch.is_tensor(v[0]) for v in caught.values())
    return out, ((caught["to_q"][0], caught["to_k"][0]) if once else None)


def cross_channels(denoiser) -> int:
    """Channels of the text condition a UNet/PixArt-style denoiser's cross-attention expects."""
    return int(denoiser.config.cross_attention_dim)


# ----------------------------------------------------------------------------------------------
# discovery and look-up
# ----------------------------------------------------------------------------------------------

_FAMILIES: list[Family] | None = None


def families() -> list[Family]:
    """Every family adapter, most specific first (imports each module of ``attnprobe.core.families``)."""
    global _FAMILIES
    if _FAMILIES is None:
        import attnprobe.core.families as pkg

        found: dict[str, Family] = {}
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, Family) and obj.__module__ == module.__name__ and obj.name:
                    if obj.name in found:
                        raise RuntimeError(f"two model families are named {obj.name!r}")
                    found[obj.name] = obj()
        _FAMILIES = sorted(found.values(), key=lambda f: -f.priority)
    return _FAMILIES


def _supported() -> str:
    return ", ".join(sorted({c for f in families() for c in f.denoiser_classes}))


def family_of(denoiser: torch.nn.Module) -> Family:
    """The adapter of a denoiser (``pipe.transformer`` / ``pipe.unet``), or UnsupportedModelError."""
    for fam in families():
        if fam.matches(denoiser):
            return fam
    raise UnsupportedModelError(f"unsupported denoiser {type(denoiser).__name__}; supported: {_supported()}")


def family_named(name: str) -> Family:
    for fam in families():
        if fam.name == name:
            return fam
    raise UnsupportedModelError(f"unknown model family {name!r}; known: {', '.join(f.name for f in families())}")


def family_for_pipeline(pipeline_class: str) -> Family | None:
    """The family of a diffusers pipeline class name, or None."""
    for fam in families():
        if pipeline_class in fam.pipeline_classes:
            return fam
    return None


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network (``transformer`` or ``unet``); a denoiser is returned as is.

    DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers are unwrapped,
    so module names never carry a ``module.`` prefix.
    """
    net = pipe
    while isinstance(net, torch.nn.Module):
        inner = getattr(net, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module) and isinstance(
            net, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        ):
            inner = net.module
        if not isinstance(inner, torch.nn.Module):
            break
        net = inner
    if isinstance(net, torch.nn.Module) and not any(
        isinstance(getattr(net, a, None), torch.nn.Module) for a in ("transformer", "unet")
    ):
        return net
    for attr in ("transformer", "unet"):
        found = getattr(net, attr, None)
        if isinstance(found, torch.nn.Module):
            return found
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no `transformer` or `unet`; supported denoisers: {_supported()}"
    )


def find_self_attention(denoiser: torch.nn.Module) -> list[AttnSite]:
    """All self-attention sites of a supported denoiser, in forward order."""
    den = denoiser_of(denoiser)
    fam = family_of(den)
    sites = fam.self_attention(den)
    if not sites:
        raise UnsupportedModelError(f"found no self-attention modules in {type(den).__name__}")
    return sites


def vae_scale_factor(pipe) -> int:
    """Pixel → latent downsampling factor of the pipeline's VAE."""
    sf = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sf, int) and sf > 0:
        return sf
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no VAE; cannot derive the token grid")
    return 2 ** (len(vae.config.block_out_channels) - 1)
