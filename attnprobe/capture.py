"""Capture self-attention statistics while a diffusers model runs, without storing N×N maps.

``with capture(pipe, queries="stride:2") as probe: pipe(...)`` wraps the attention processor of
every self-attention site in a :class:`CaptureProcessor`. The wrapper calls the *original*
processor, so the module's output is exactly what it was; then it asks the model family's
adapter for the layer's queries and keys (:meth:`attnprobe.core.family.Family.query_key`: the
module's own projections — caught from the processor's call where it is a plain one —, norms,
rotary embeddings and text/image concatenation, from the very arguments the processor received)
and reduces them at once:

    for each chunk of c queries:                      # c adapts to a memory budget
        P = softmax(q_c kᵀ · scale [+ mask])          # (B, heads, c, N_keys), fp32
        A = P[..., image keys]                        # (B, heads, c, H'W')
        ring[h, r]    += Σ_{b,q} ring_mass(A)         # ℓ∞ rings, (heads, R)
        hp_ring[h, r] += Σ_{b,q} ring_mass(Λ⁺)        # Λ = Butterworth high-pass of A
        key_mass[k]   += Σ_{b,h,q} A[..., k]          # for sink detection
        far_key_mass[f, k] += Σ_{b,h,q: d(q,k) > r_f} A[..., k]   # the query-independent prior
        map_sum[q, k] += Σ_{b,h} A[..., q, k]         # --aggregate mean-map only: O(queries × N)

so peak extra memory is O(B · heads · c · N) and only O(heads · R + N) floats persist per layer.
Nothing global is patched, so the capture works whatever attention backend the processor
dispatches to; a selected layer that is never called shows up in :meth:`Capture.unobserved`
(``analyze`` raises :class:`CaptureMissedError`). Statistics are kept per denoising-step bucket.
Joint attention (FLUX, SD3) is observed on its image→image block: the softmax runs over all
keys (text included) and only image keys are binned.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attnprobe.core import backends
from attnprobe.core.errors import UserError
from attnprobe.core.family import denoiser_of, family_of, find_self_attention, run_catching_projections
from attnprobe.core.sites import AttnSite, select_sites
from attnprobe.config import AnalysisConfig
from attnprobe.estimators import far_radii
from attnprobe.stats import (AUTO_QUERIES, DENSE_MAX_TOKENS, butterworth_filter, butterworth_highpass, highpass_operator,
                             parse_queries, ring_distance, ring_sums)

__all__ = ["capture", "Capture", "CaptureProcessor", "CaptureMissedError", "LayerAccumulator", "parse_queries",
           "select_sites", "AUTO_QUERIES"]



class CaptureMissedError(UserError, RuntimeError):
    """Selected self-attention layers were never called while capturing."""


class CaptureProcessor:
    """Wraps an attention processor: same call, same output, plus observation of q and k."""

    def __init__(self, original, layer: "LayerAccumulator", family):
        self.original = original
        self.layer = layer
        self.family = family
        self._signature = inspect.signature(original.__call__ if not inspect.isfunction(original) else original)

    def _run(self, attn, *args, **kwargs):
        try:
            bound = self._signature.bind(attn, *args, **kwargs)
        except TypeError as exc:
            raise RuntimeError(f"{self.layer.site.name}: cannot read the processor call ({exc})") from None
        call = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                call[name] = value
        if "hidden_states" not in call:
            raise RuntimeError(f"{self.layer.site.name}: processor {type(self.original).__name__} takes no hidden_states")
        out, proj = run_catching_projections(self.family, attn, lambda: self.original(attn, *args, **kwargs))
        with torch.no_grad():
            qk = self.family.query_key(self.layer.site, attn, call, **({"projected": proj} if proj else {}))
        self.layer.observe(qk.q, qk.k, qk.mask, qk.scale)
        return out


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(original_cls: type) -> type:
    """A CaptureProcessor subclass whose __call__ advertises the original's signature.

    diffusers filters the keyword arguments it passes to a processor by
    ``inspect.signature(processor.__call__)``; advertising the original signature keeps every
    keyword (``image_rotary_emb``, ``temb``, ...) flowing through unchanged.
    """
    if original_cls not in _WRAPPER_CLASSES:

        def __call__(self, attn, *args, **kwargs):
            return self._run(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(original_cls.__call__)
        _WRAPPER_CLASSES[original_cls] = type(f"Capture{original_cls.__name__}", (CaptureProcessor,), {"__call__": __call__})
    return _WRAPPER_CLASSES[original_cls]


@dataclass
class LayerAccumulator:
    """Running sums for one self-attention site (all float64 on CPU)."""

    site: AttnSite
    buckets: int
    highpass_mass: str
    cutoff: float
    order: int
    queries: str
    probe_points: list[tuple[float, float]]
    memory_budget: int
    capture: "Capture" = field(repr=False)
    ring_backend: str | None = None  # unfiltered rings: None/"auto" (registry's choice), "triton" or "reference"
    border: str = "zero"  # FFT border of the high-pass: "zero" (padded) or "circular" (wraps)
    aggregate: str = "per-map"  # "mean-map" also keeps map_sum for the paper's step-averaged map
    groups: int = 1  # mean-map: prompt groups kept apart for the bootstrap (prompt p → group p % groups)
    grid: tuple[int, int] | None = None
    heads: int = 0
    ring: np.ndarray | None = None  # (T, heads, R)
    hp_ring: np.ndarray | None = None  # (T, heads, R)
    mass: np.ndarray | None = None  # (T, heads) image-key mass
    hp_pos: np.ndarray | None = None  # (T, heads) positive high-pass mass
    rows: np.ndarray | None = None  # (T,) query rows per head (batch × queries)
    key_mass: np.ndarray | None = None  # (N,) mass received per key
    far_key_mass: np.ndarray | None = None  # (F, N) mass key k receives from queries farther than far_radii[f]
    far_rows: np.ndarray | None = None  # (F, N) how many (batch, head, query) rows were that far from key k
    far_radii: tuple = ()
    prompt_hp_ring: dict = field(default_factory=dict)  # prompt index → (R,) high-pass rings, summed over heads/steps
    probe_maps: np.ndarray | None = None  # (P, N) mean over heads, summed over batch/steps
    map_sum: torch.Tensor | None = None  # mean-map: (T, G, Q, N) fp64 sums over batch, heads, steps, prompts
    probe_rows: int = 0
    _positions: torch.Tensor | None = field(default=None, repr=False)
    _response: torch.Tensor | None = field(default=None, repr=False)
    _operator: torch.Tensor | None = field(default=None, repr=False)

    def _init(self, heads: int, grid: tuple[int, int]) -> None:
        h, w = grid
        r = max(h, w)
        self.grid, self.heads = grid, heads
        t = self.buckets
        self.ring = np.zeros((t, heads, r))
        self.hp_ring = np.zeros((t, heads, r))
        self.mass = np.zeros((t, heads))
        self.hp_pos = np.zeros((t, heads))
        self.rows = np.zeros(t)
        self.key_mass = np.zeros(h * w)
        self.far_radii = far_radii(grid)
        self.far_key_mass = np.zeros((len(self.far_radii), h * w))
        self.far_rows = np.zeros((len(self.far_radii), h * w))
        self.probe_maps = np.zeros((len(self.probe_points), h * w))
        self._positions = parse_queries(self.queries, grid)
        if self.aggregate == "mean-map":
            per_group = t * len(self._positions) * h * w * 8
            budget = self.memory_budget
            if per_group > budget:
                raise UserError(
                    f"{self.site.name}: --aggregate mean-map keeps {len(self._positions)} queries × {h * w} keys × "
                    f"{t} bucket(s) = {per_group / 2**20:.0f} MiB per layer, over --memory-budget-mb "
                    f"{budget / 2**20:.0f}; use fewer queries (--queries stride:S) or timestep buckets, or a larger budget"
                )
            self.groups = max(1, min(self.groups, budget // per_group))
            self.map_sum = torch.zeros(t, self.groups, len(self._positions), h * w, dtype=torch.float64)

    def allocate(self, heads: int, grid: tuple[int, int]) -> None:
        """Zero sums of these shapes if no call came yet (a rank without prompts, before the ranks' sums are added)."""
        if self.grid is None:
            self._init(int(heads), (int(grid[0]), int(grid[1])))

    def _image_slice(self, n_tokens: int, n_image: int) -> int:
        """Offset of the image tokens in a sequence of n_tokens (joint attention concatenates text)."""
        if self.site.joint is None:
            if n_tokens != n_image:
                raise RuntimeError(
                    f"{self.site.name}: {n_tokens} tokens but the expected grid {self.grid} has {n_image}; "
                    "is the resolution consistent with the model?"
                )
            return 0
        if n_tokens < n_image:
            raise RuntimeError(f"{self.site.name}: {n_tokens} tokens, fewer than the {n_image} image tokens")
        return n_tokens - n_image if self.site.joint == "image_last" else 0

    @torch.no_grad()
    def observe(self, q: torch.Tensor, k: torch.Tensor, mask, scale) -> None:
        """Reduce one attention call. q: (B, heads, Nq, d), k: (B, heads, Nk, d)."""
        grid = self.site.grid(self.capture.base_grid())
        b, heads, nq, d = q.shape
        if self.grid is None:
            self._init(heads, grid)
        elif grid != self.grid:
            raise RuntimeError(
                f"{self.site.name}: grid changed from {self.grid} to {grid} during one capture; "
                "analyse one resolution per report"
            )
        n = grid[0] * grid[1]
        q_off = self._image_slice(nq, n)
        k_off = self._image_slice(k.shape[2], n)
        t = self.capture.bucket()
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        kf = k.float()
        if self._response is None or self._response.device != q.device:
            self._response = butterworth_filter(grid, self.cutoff, self.order, device=q.device, border=self.border).float()
            dense = self.border == "zero" and n <= DENSE_MAX_TOKENS and q.device.type == "cpu"
            self._operator = highpass_operator(grid, self.cutoff, self.order, "zero", q.device) if dense else None
        positions = self._positions.to(q.device)
        # Chunk size: ~8 fp32 buffers of (B, heads, c, Nk) must fit the budget.
        per_query = b * heads * k.shape[2] * 4 * 8
        chunk = max(1, min(len(positions), self.memory_budget // per_query))
        ring = torch.zeros(heads, max(grid), dtype=torch.float64, device=q.device)
        hp_ring = torch.zeros_like(ring)
        mass = torch.zeros(heads, dtype=torch.float64, device=q.device)
        hp_pos = torch.zeros_like(mass)
        key_mass = torch.zeros(n, dtype=torch.float64, device=q.device)
        far_km = torch.zeros(len(self.far_radii), n, dtype=torch.float64, device=q.device)
        far_rows = torch.zeros_like(far_km)
        radii = torch.tensor(self.far_radii, device=q.device)
        group = getattr(self.capture, "prompt", 0) % self.groups
        map_sum = None if self.map_sum is None else torch.zeros(len(positions), n, dtype=torch.float64, device=q.device)
        fused = self._use_ring_kernel(q, mask)
        if fused:  # unfiltered rings straight from q, k: the N×N map never exists for them
            rings = backends.call("ring_mass_attention", q, k, grid, positions, scale, key_slice=(k_off, k_off + n),
                                  backend="triton")
            ring += rings.sum((0, 2), dtype=torch.float64)  # (B, heads, Q, R) → (heads, R)
        for start in range(0, len(positions), chunk):
            pos = positions[start : start + chunk]
            probs = self._softmax_rows(q, kf, q_off + pos, mask, scale)  # (B, heads, c, Nk)
            a = probs[..., k_off : k_off + n]  # (B, heads, c, N)
            dist = ring_distance(grid, pos)  # (c, N): each key's ℓ∞ ring around each query
            if not fused:
                ring += ring_sums(a, dist, max(grid))
            mass += a.sum(-1).sum((0, 2), dtype=torch.float64)
            key_mass += a.sum((0, 1, 2), dtype=torch.float64)
            # far field: what each key receives from queries beyond r0 (the prior's share, see report)
            far = (dist[None] > radii[:, None, None]).to(a.dtype)  # (F, c, N)
            per_key = a.sum((0, 1))  # (c, N) summed over batch and heads
            if map_sum is not None:
                map_sum[start : start + len(pos)] += per_key.double()
            far_km += torch.einsum("fcn,cn->fn", far, per_key).double()
            far_rows += far.sum(1).double() * (b * heads)
            if self._operator is not None:  # the same filter as one GEMM (see stats.highpass_operator)
                lam = torch.matmul(a, self._operator)
            else:
                lam = butterworth_highpass(a, grid, response=self._response, border=self.border)  # (B, heads, c, N)
            pos_part = lam.clamp(min=0)
            hp_pos += pos_part.sum(-1).sum((0, 2), dtype=torch.float64)
            binned = pos_part if self.highpass_mass == "positive" else lam.abs()
            hp_ring += ring_sums(binned, dist, max(grid))
            del probs, a, lam, pos_part, binned
        self.ring[t] += ring.cpu().numpy()
        self.hp_ring[t] += hp_ring.cpu().numpy()
        self.mass[t] += mass.cpu().numpy()
        self.hp_pos[t] += hp_pos.cpu().numpy()
        self.rows[t] += b * len(positions)
        self.key_mass += key_mass.cpu().numpy()
        self.far_key_mass += far_km.cpu().numpy()
        self.far_rows += far_rows.cpu().numpy()
        if map_sum is not None:
            self.map_sum[t, group] += map_sum.cpu()
        p = getattr(self.capture, "prompt", 0)
        self.prompt_hp_ring[p] = self.prompt_hp_ring.get(p, 0) + hp_ring.sum(0).cpu().numpy()
        if self.probe_points:
            h, w = grid
            idx = torch.tensor(
                [min(h - 1, int(py * h)) * w + min(w - 1, int(px * w)) for py, px in self.probe_points], device=q.device
            )
            a = self._softmax_rows(q, kf, q_off + idx, mask, scale)[..., k_off : k_off + n]  # (B, heads, P, N)
            self.probe_maps += a.mean(1).sum(0, dtype=torch.float64).cpu().numpy()
            self.probe_rows += b

    def _use_ring_kernel(self, q: torch.Tensor, mask) -> bool:
        """The fused ring-mass kernel serves unmasked calls when the backend registry picks Triton."""
        if mask is not None:
            return False
        import attnprobe.kernels  # noqa: F401  (declares the ring-mass op and its GPU provider)

        return backends.resolve("ring_mass_attention", q, self.ring_backend) == "triton"

    @staticmethod
    def _softmax_rows(q, kf, rows, mask, scale) -> torch.Tensor:
        """Softmax attention rows for the queries ``rows``: (B, heads, len(rows), Nk) fp32."""
        s = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        if mask is not None:
            m = mask
            if m.dim() == 4 and m.shape[-2] > 1:
                m = m[..., rows, :]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        return torch.softmax(s, dim=-1)


class Capture:
    """Context manager that installs capture processors and owns the per-layer accumulators."""

    def __init__(
        self,
        pipe_or_denoiser,
        *,
        layers: str | None = None,
        queries: str = "auto",
        cutoff: float = 0.1,
        order: int = 2,
        highpass_mass: str = "positive",
        timestep_buckets: int = 1,
        steps: int | None = None,
        probe_points: list[tuple[float, float]] | None = None,
        memory_budget_mb: float = 256,
        ring_backend: str | None = None,
        border: str = "zero",
        aggregate: str = "per-map",
        groups: int = 8,
    ):
        ring_backend = None if ring_backend == "auto" else ring_backend
        AnalysisConfig(queries=queries, cutoff=cutoff, order=order, highpass_mass=highpass_mass,  # the one validation
                       timestep_buckets=timestep_buckets, probe_points=tuple(probe_points or ()),
                       memory_budget_mb=memory_budget_mb, ring_backend=ring_backend, border=border,
                       aggregate=aggregate).validate()
        self.denoiser = denoiser_of(pipe_or_denoiser)
        self.family = family_of(self.denoiser)
        self.sites = select_sites(find_self_attention(self.denoiser), layers)
        self.steps = steps
        self.buckets = timestep_buckets
        self.step = 0
        self._current_step = 0
        self.prompt = 0  # index of the prompt being generated (per-prompt sums feed the bootstrap)
        self._generations = 0
        self._base_grid: tuple[int, int] | None = None
        self.layers: dict[str, LayerAccumulator] = {
            s.name: LayerAccumulator(
                site=s, buckets=timestep_buckets, highpass_mass=highpass_mass, cutoff=cutoff, order=order,
                queries=queries, probe_points=list(probe_points or []), memory_budget=int(memory_budget_mb * 2**20),
                capture=self, ring_backend=ring_backend, border=border, aggregate=aggregate, groups=max(1, int(groups)),
            )
            for s in self.sites
        }
        self._originals: dict[str, object] = {}
        self._hook = None

    # -- step / grid bookkeeping (a forward pre-hook on the denoiser) -----------------------------
    def _pre_hook(self, module, args, kwargs):
        self._base_grid = self.family.grid_from_call(self.denoiser, args, kwargs)
        self._current_step = self.step
        self.step += 1

    def base_grid(self) -> tuple[int, int]:
        if self._base_grid is None:
            raise RuntimeError("capture saw an attention call before the denoiser's forward")
        return self._base_grid

    def bucket(self) -> int:
        if self.buckets == 1 or not self.steps:
            return 0
        return min(self.buckets - 1, self._current_step * self.buckets // self.steps)

    def new_generation(self, prompt: int | None = None) -> None:
        """Call before each pipeline call so step buckets restart (``prompt``: its index)."""
        self.step = 0
        self.prompt = self._generations if prompt is None else int(prompt)
        self._generations += 1

    def unobserved(self) -> list[str]:
        """Names of selected layers that no call has reached (yet)."""
        return [name for name, acc in self.layers.items() if acc.grid is None]

    def check_observed(self) -> None:
        """Raise :class:`CaptureMissedError` naming every selected layer that was never called."""
        missed = self.unobserved()
        if missed:
            shown = ", ".join(missed[:6]) + (f" and {len(missed) - 6} more" if len(missed) > 6 else "")
            raise CaptureMissedError(
                f"{len(missed)} of {len(self.layers)} selected self-attention layer(s) were never called while "
                f"capturing: {shown}; the pipeline did not run them (another denoiser, skipped blocks?)"
            )

    # -- install / restore --------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        for s in self.sites:
            if isinstance(s.module.processor, CaptureProcessor):
                raise RuntimeError(f"{s.name} is already being captured; nested capture on one model is not supported")
        try:
            for s in self.sites:
                orig = s.module.processor
                self._originals[s.name] = orig
                _set_processor(s.module, _wrapper_class(type(orig))(orig, self.layers[s.name], self.family))
            self._hook = self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for s in self.sites:
            if s.name in self._originals:
                _set_processor(s.module, self._originals.pop(s.name))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _set_processor(module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:  # pragma: no cover - every diffusers attention class has set_processor today
        module.processor = processor


def capture(pipe_or_denoiser, **options) -> Capture:
    """``with capture(pipe, queries="all") as probe: pipe(...)`` — see :class:`Capture`."""
    return Capture(pipe_or_denoiser, **options)
