"""``deltadistill bench``: FLOPs and latency of self-attention vs its replacements (SPEC §5).

For a model (alias, local folder, tiny-* or demo) and a list of square resolutions the bench
reports, side by side in one run:

* **FLOPs** (:mod:`deltadistill.flops`, analytic, 1 multiply-add = 2 FLOPs) of softmax
  self-attention, the ΔConvBlock that replaces it (the model's kernel sizes: one ``--kernel-size``
  or per layer from ``--erf-report``), a K×K neighbourhood attention and a LinFusion-form linear
  attention — for the largest-grid layer and summed over all self-attention layers.
* **Latency** of one module at the model's largest-grid layer: diffusers ``Attention`` with SDPA
  (random weights, the layer's dims) vs the ΔConvBlock (PyTorch reference path, and the Triton path
  when available) vs :class:`GeneralizedLinearAttention`; and of one whole denoiser call of the
  teacher vs the converted student. Times are medians over ``--repeats`` calls after ``--warmup``
  calls, with the device synchronised around each call. Peak memory beside each time: CUDA
  ``max_memory_allocated`` above the pre-call level on GPU; on CPU the peak bytes of tensors
  allocated during the call (:class:`LiveTensorBytes`, a dispatch mode: tracemalloc cannot see
  PyTorch's allocator, and process RSS is blurred by the allocator's caching and other threads).

Timing cases that would take too long are skipped, not run: the expected seconds per call are
estimated as analytic FLOPs / a FLOP rate (first from a matmul calibration, then from the previous
resolution's measurement of the same operator), and cases above ``--max-seconds`` are listed with
"skipped" and the estimate. Whole-step timing uses the real denoiser where a builder or weights
exist (tiny-*, demo, local folders, Hub weights already in the cache); for the other config-only
aliases (pixart, sd15, ...) it builds the denoiser with random weights — costs are the same — but
only when teacher + student fit in memory and the estimated step time (FlopCounterMode on the meta
device / the measured rate) is within the limit. Joint-attention models (FLUX, SD3) have no
student. CPU timings of a machine shared with other jobs are noisy: the run records the load
average, and ``--threads`` pins PyTorch's thread count.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import typer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from deltadistill import flops as cost_model

__all__ = [
    "GeneralizedLinearAttention",
    "Timing",
    "time_callable",
    "LiveTensorBytes",
    "peak_memory_bytes",
    "BenchResult",
    "run_bench",
    "flops_table_rows",
    "register",
]

REAL_DEFAULT_RESOLUTIONS = (512, 1024, 2048, 4096)
TEXT_TOKENS = {"pixart": 300, "unet": 77, "flux": 512, "sd3": 333}  # defaults when no tokenizer is at hand


# ----------------------------------------------------------------------------------------------
# The linear-attention peer
# ----------------------------------------------------------------------------------------------


class GeneralizedLinearAttention(nn.Module):
    """LinFusion-form linear attention ``[B, N, C] → [B, N, C]`` (formula in :mod:`deltadistill.flops`).

    q = elu(W_q(z + MLP_q(z))) + 1, k = elu(W_k(z + MLP_k(z))) + 1, v = W_v z; per head
    out = q (kᵀv/N) / (q · mean(k) + ε), then W_o. Random weights: a cost peer, not a trained model.
    """

    def __init__(self, dim: int, heads: int, inner: int | None = None, qkv_bias: bool = True, out_bias: bool = True):
        super().__init__()
        inner = dim if inner is None else inner
        self.heads, self.inner = heads, inner
        self.mlp_q = self._mlp(dim)
        self.mlp_k = self._mlp(dim)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)

    @staticmethod
    def _mlp(dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.LeakyReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.inner // self.heads

        def heads(t):  # [B, N, I] → [B, h, N, d]
            return t.reshape(b, n, h, d).transpose(1, 2)

        q = nn.functional.elu(heads(self.to_q(x + self.mlp_q(x)))) + 1.0  # [B, h, N, d]
        k = nn.functional.elu(heads(self.to_k(x + self.mlp_k(x)))) + 1.0  # [B, h, N, d]
        v = heads(self.to_v(x))  # [B, h, N, d]
        z = q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) + 1e-4  # [B, h, N, 1]
        s = n ** -0.5
        kv = (k * s).transpose(-2, -1) @ (v * s)  # [B, h, d, d]
        out = (q @ kv) / z  # [B, h, N, d]
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))  # [B, N, C]


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock times of ``repeats`` synchronised calls, in milliseconds."""

    times_ms: list[float]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, device="cpu") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, synchronising around each call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and still alive) during the mode, CPU or GPU.

    Every op output whose storage is new (not a storage seen before entering, e.g. weights or
    inputs, or a view of one) is counted until its last Python reference dies. Kernel-internal
    workspaces (e.g. SDPA's per-thread blocks) are not visible; use under ``torch.no_grad()`` so
    that autograd does not keep tensors alive behind Python's back.
    """

    def __init__(self, known: list[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in known if isinstance(t, torch.Tensor)}
        self._live: dict[int, list[int]] = {}  # data_ptr → [nbytes, python references]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except Exception:  # sparse / meta-like tensors without storage
            return
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self._known:
            return
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = entry = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory_bytes(fn: Callable[[], object], device="cpu", known: list[torch.Tensor] = ()) -> int:
    """Peak memory one call of ``fn`` adds: CUDA max allocated above the start; CPU live tensor bytes."""
    device = torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn()
            synchronize(device)
            del out
            return int(torch.cuda.max_memory_allocated(device) - before)
        mode = LiveTensorBytes(known)
        with mode:
            out = fn()
        del out
        return int(mode.peak)


def _matmul_rate(device, dtype) -> float:
    """FLOP/s of a square matmul on this device and dtype (seeds the skip estimates)."""
    n = 2048 if torch.device(device).type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = time_callable(lambda: a @ a, repeats=10, warmup=3, device=device)  # best of 10: robust to a busy CPU
    return 2 * n**3 / (t.min / 1e3)


# Rate of each timed operator relative to a plain matmul, before anything was measured
# (conservative: overestimating the time skips a case, underestimating could hang the bench).
_INITIAL_EFFICIENCY = {"self_attention": 0.4, "deltaconv": 0.2, "deltaconv_triton": 0.2,
                       "linear_attention": 0.3, "step": 0.3}


# ----------------------------------------------------------------------------------------------
# Model context
# ----------------------------------------------------------------------------------------------


@dataclass
class _Model:
    name: str
    spec: object
    arch: str
    info: dict  # {"class", "vae_scale_factor", "resolution", "config"}
    meta: nn.Module  # denoiser on the meta device (shapes only)
    pipe: object = None  # loaded pipeline when weights/builders exist
    text_len: int = 77


def _load_model(name: str) -> _Model:
    """Architecture (meta denoiser) of ``name``; the pipeline is loaded only when no config is shipped."""
    from attnprobe import registry
    from attnprobe.arch import denoiser_of, detect_arch, vae_scale_factor

    spec = registry.resolve(name)
    shipped = (registry.CONFIG_DIR / f"{spec.alias}.json").is_file()
    pipe = None
    if shipped:
        info = registry.architecture_config(name)
    else:  # tiny-*, demo, local folders: the config comes from the pipeline itself
        pipe, spec = registry.load_pipeline(name, dtype="fp32")
        den = denoiser_of(pipe)
        info = {"class": type(den).__name__, "vae_scale_factor": vae_scale_factor(pipe),
                "resolution": spec.resolution or 0,
                "config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")}}
    import diffusers

    with torch.device("meta"):
        meta = getattr(diffusers, info["class"]).from_config(info["config"])
    arch = detect_arch(meta)
    text_len = TEXT_TOKENS.get(arch, 77)
    if spec.alias == "pixart-alpha":
        text_len = 120
    tok = getattr(pipe, "tokenizer", None) if pipe is not None else None
    if tok is not None and 0 < int(getattr(tok, "model_max_length", 0) or 0) <= 1024:
        text_len = int(tok.model_max_length)
    if not info.get("resolution"):
        from attnprobe.arch import default_resolution

        info["resolution"] = default_resolution(arch, meta.config, info["vae_scale_factor"])
    return _Model(name, spec, arch, info, meta, pipe, text_len)


def default_resolutions(model: _Model) -> list[int]:
    """512…4096 for the real models' configs; native and 2× for tiny-*, demo and local folders."""
    from attnprobe import registry

    if (registry.CONFIG_DIR / f"{model.spec.alias}.json").is_file():
        return list(REAL_DEFAULT_RESOLUTIONS)
    r = int(model.info["resolution"])
    return [r, 2 * r]


def denoiser_inputs(model: _Model, resolution: int, device, dtype, batch: int = 1) -> dict:
    """Keyword arguments for one denoiser call at ``resolution`` px (random latents and conditions)."""
    cfg = model.meta.config
    vae = int(model.info["vae_scale_factor"])
    lat = resolution // vae
    g = torch.Generator("cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if model.arch == "pixart":
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(model.meta, "use_additional_conditions", False):
            added = {"resolution": torch.tensor([[resolution, resolution]] * batch, device=device, dtype=dtype),
                     "aspect_ratio": torch.ones(batch, 1, device=device, dtype=dtype)}
        return {"hidden_states": rnd(batch, cfg.in_channels, lat, lat),  # [B, C_lat, H_lat, W_lat]
                "encoder_hidden_states": rnd(batch, model.text_len, cfg.caption_channels),  # [B, L, D_text]
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                "added_cond_kwargs": added, "return_dict": False}
    if model.arch == "unet":
        kw = {"sample": rnd(batch, cfg.in_channels, lat, lat),
              "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
              "encoder_hidden_states": rnd(batch, model.text_len, cfg.cross_attention_dim), "return_dict": False}
        if cfg.addition_embed_type == "text_time":
            n_time = 6
            kw["added_cond_kwargs"] = {
                "text_embeds": rnd(batch, cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                         device=device, dtype=dtype)}
        return kw
    if model.arch == "dit":
        return {"hidden_states": rnd(batch, cfg.in_channels, lat, lat),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                "class_labels": torch.zeros(batch, device=device, dtype=torch.long), "return_dict": False}
    if model.arch == "flux":
        side = lat // 2  # 2×2 packing
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(side * side, 1), ids.float()], 1).to(device=device, dtype=dtype)  # [N, 3]
        kw = {"hidden_states": rnd(batch, side * side, cfg.in_channels),  # [B, N, 64]
              "encoder_hidden_states": rnd(batch, model.text_len, cfg.joint_attention_dim),
              "pooled_projections": rnd(batch, cfg.pooled_projection_dim),
              "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
              "img_ids": img_ids, "txt_ids": torch.zeros(model.text_len, 3, device=device, dtype=dtype),
              "return_dict": False}
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return kw
    if model.arch == "sd3":
        return {"hidden_states": rnd(batch, cfg.in_channels, lat, lat),
                "encoder_hidden_states": rnd(batch, model.text_len, cfg.joint_attention_dim),
                "pooled_projections": rnd(batch, cfg.pooled_projection_dim),
                "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype), "return_dict": False}
    raise ValueError(f"no input builder for architecture {model.arch!r}")


def meta_step_flops(model: _Model, resolution: int) -> int:
    """Matmul/conv FLOPs of one denoiser call (FlopCounterMode on the meta device, no memory)."""
    kw = denoiser_inputs(model, resolution, "meta", torch.float32)
    return cost_model.count_measured(model.meta, kw)


# ----------------------------------------------------------------------------------------------
# The bench
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    meta: dict
    flops: list[dict] = field(default_factory=list)  # one row per (resolution, operator)
    layers: list[dict] = field(default_factory=list)  # per (resolution, layer, operator)
    latency: list[dict] = field(default_factory=list)  # one row per (resolution, scope, operator)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "flops": self.flops, "flops_per_layer": self.layers,
                "latency": self.latency, "notes": self.notes}


def _kernel_spec(kernel_size: int | None, erf_report: str | os.PathLike | None, sites) -> tuple[object, str]:
    """``(int or {name: K}, description)``; a report must cover every site."""
    if kernel_size is not None and erf_report is not None:
        raise ValueError("pass either --kernel-size or --erf-report, not both")
    if erf_report is not None:
        from attnprobe import load_report

        sizes = load_report(erf_report).kernel_sizes()
        missing = [s.name for s in sites if s.name not in sizes]
        if missing:
            raise ValueError(f"{erf_report} has no kernel size for {len(missing)} layer(s) of this model "
                             f"(e.g. {missing[0]!r}); it was measured on another model")
        sizes = {s.name: int(sizes[s.name]) for s in sites}
        lo, hi = min(sizes.values()), max(sizes.values())
        return sizes, f"per layer from {Path(erf_report).name} (K {lo}–{hi})" if lo != hi else f"K={lo} from {Path(erf_report).name}"
    k = 13 if kernel_size is None else int(kernel_size)
    if k < 3 or k % 2 == 0:
        raise ValueError(f"--kernel-size must be odd and >= 3, got {k}")
    return k, f"K={k}"


def _representative(layers: list[cost_model.LayerShape]) -> cost_model.LayerShape:
    """The first layer on the largest token grid (UNet level 0; any layer of a DiT)."""
    return max(layers, key=lambda la: (la.tokens, -layers.index(la)))


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class _Estimator:
    """Expected seconds per call of a timing case, before running it.

    Before any measurement of an operator: FLOPs / (matmul rate × a conservative efficiency).
    After one: t₀ + (FLOPs − FLOPs₀) / max(FLOPs₀ / t₀, nominal rate) — the measured time carries the
    fixed per-call overhead (dominant for tiny models), the increment is charged at the better of
    the measured and the nominal rate.
    """

    def __init__(self, device, dtype):
        self.base = _matmul_rate(device, dtype)
        self.nominal = {op: self.base * eff for op, eff in _INITIAL_EFFICIENCY.items()}
        self.last: dict[str, tuple[float, float]] = {}  # op → (FLOPs, seconds) of the latest measurement

    def seconds(self, op: str, flops: float) -> float:
        if op not in self.last:
            return flops / self.nominal[op]
        f0, t0 = self.last[op]
        return t0 + max(flops - f0, 0.0) / max(f0 / t0, self.nominal[op])

    def update(self, op: str, flops: float, seconds: float) -> None:
        if seconds > 0 and flops > 0:
            self.last[op] = (flops, seconds)


def run_bench(
    model: str,
    resolutions: list[int] | None = None,
    *,
    flops: bool = True,
    latency: bool = True,
    step: bool = True,
    kernel_size: int | None = None,
    erf_report: str | os.PathLike | None = None,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    max_seconds: float = 2.0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the bench; see the module docstring. Raises ValueError for bad arguments."""
    from attnprobe import registry
    from attnprobe.arch import find_self_attention

    say = progress or (lambda msg: None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    tdtype = registry.auto_dtype(device) if dtype == "auto" else registry._torch_dtype(dtype)
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"unknown backend {backend!r}; choose reference, triton or auto")
    from deltadistill import ops

    triton_ok = torch.device(device).type == "cuda" and ops.triton_available()
    if backend == "triton" and not triton_ok:
        raise ValueError("--backend triton needs Triton and a CUDA device; use --backend reference (or auto)")
    say(f"loading {model}")
    m = _load_model(model)
    sites = find_self_attention(m.meta)
    kspec, kdesc = _kernel_spec(kernel_size, erf_report, sites)
    resolutions = sorted(set(resolutions or default_resolutions(m)))
    from attnprobe.arch import base_grid

    for r in resolutions:
        try:
            base_grid(m.arch, m.meta.config, m.info["vae_scale_factor"], r, r)
        except ValueError as exc:
            raise ValueError(f"{m.spec.alias}: {exc}") from None
    joint = m.arch in ("flux", "sd3")
    res = BenchResult(meta={
        "model": m.spec.alias, "class": m.info["class"], "arch": m.arch, "resolutions": resolutions,
        "kernel_sizes": kdesc, "layers": len(sites), "device": _device_name(device), "dtype": str(tdtype).replace("torch.", ""),
        "backend": backend, "repeats": repeats, "warmup": warmup, "max_seconds": max_seconds,
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flops_convention": "1 multiply-add = 2 FLOPs; elementwise ops 1 FLOP each (deltadistill.flops)",
    })
    if hasattr(os, "getloadavg"):  # a busy shared CPU explains noisy timings
        load = os.getloadavg()[0]
        res.meta["load_average_1min"] = round(load, 2)
        if latency and torch.device(device).type == "cpu" and load > (os.cpu_count() or 1):
            res.notes.append(f"the CPU is oversubscribed (load average {load:.1f} on {os.cpu_count()} cores): timings "
                             "are noisy, small ops worst (thread-pool stalls); --threads 1 steadies them.")
    if joint:
        res.notes.append(f"{m.arch} uses joint attention: costs are for its image tokens only, and the ΔConvBlock "
                         "is shown for reference (deltadistill does not convert joint attention).")
    shapes = {r: cost_model.layer_shapes(m.meta, m.info["vae_scale_factor"], r, kspec) for r in resolutions}

    if flops:
        for r in resolutions:
            layers = shapes[r]
            rep = _representative(layers)
            totals = cost_model.model_flops(layers)
            one = {op: cost_model.operator_flops(op, rep) for op in cost_model.OPERATORS}
            for op in cost_model.OPERATORS:
                res.flops.append({
                    "model": m.spec.alias, "resolution": r, "grid": f"{rep.grid[0]}x{rep.grid[1]}", "tokens": rep.tokens,
                    "dim": rep.dim, "kernel_size": rep.kernel_size, "operator": op,
                    "layer_flops": one[op].total, "layer_matmul_flops": one[op].matmul,
                    "total_flops": totals[op].total, "n_layers": len(layers),
                    "sa_over_op": totals["self_attention"].total / totals[op].total,
                })
            res.flops.append({
                "model": m.spec.alias, "resolution": r, "grid": f"{rep.grid[0]}x{rep.grid[1]}", "tokens": rep.tokens,
                "dim": rep.dim, "kernel_size": rep.kernel_size, "operator": "self_attention_paper_formula",
                "layer_flops": cost_model.paper_attention_flops(rep.tokens, rep.dim), "layer_matmul_flops": None,
                "total_flops": sum(cost_model.paper_attention_flops(la.tokens, la.dim) for la in layers),
                "n_layers": len(layers), "sa_over_op": None,
            })
            for la in layers:
                for op in cost_model.OPERATORS:
                    res.layers.append({"resolution": r, "layer": la.name, "label": la.label,
                                       "grid": f"{la.grid[0]}x{la.grid[1]}", "dim": la.dim, "heads": la.heads,
                                       "kernel_size": la.kernel_size, "operator": op,
                                       "flops": cost_model.operator_flops(op, la).total})
    if latency:
        _latency(m, res, shapes, kspec, resolutions, repeats, warmup, device, tdtype, backend, triton_ok,
                 max_seconds, step, say)
    return res


def _latency(m, res, shapes, kspec, resolutions, repeats, warmup, device, tdtype, backend, triton_ok,
             max_seconds, step, say):
    from diffusers.models.attention_processor import Attention

    from deltadistill.block import DeltaConvBlock

    say("calibrating")
    est = _Estimator(device, tdtype)
    res.meta["matmul_gflops_per_s"] = round(est.base / 1e9, 1)
    ops_to_time = ["self_attention", "deltaconv"]
    if triton_ok and backend in ("auto", "triton"):
        ops_to_time.append("deltaconv_triton")
    if backend == "triton":
        ops_to_time.remove("deltaconv")
    ops_to_time.append("linear_attention")
    if not triton_ok:
        res.notes.append("Triton ΔConvBlock not timed: needs a CUDA device with Triton (this run: "
                         f"{res.meta['device']}).")
    torch.manual_seed(0)
    for r in resolutions:
        rep = _representative(shapes[r])
        h, w = rep.grid
        base = {"model": m.spec.alias, "resolution": r, "tokens": rep.tokens, "grid": f"{h}x{w}", "dim": rep.dim,
                "kernel_size": rep.kernel_size, "scope": "module", "repeats": repeats}
        times = {}
        for op in ops_to_time:
            analytic = cost_model.operator_flops("deltaconv" if op.startswith("deltaconv") else op, rep).total
            row = {**base, "operator": op, "backend": "triton" if op == "deltaconv_triton" else
                   ("sdpa" if op == "self_attention" else "reference"),
                   "ms_median": None, "ms_min": None, "peak_mb": None, "speedup_vs_sa": None, "note": ""}
            guess = est.seconds(op, analytic)
            if guess > max_seconds:
                row["note"] = f"skipped: est. {guess:.1f} s/call > --max-seconds {max_seconds:g}"
                res.latency.append(row)
                continue
            say(f"{r}px: {op}")
            try:
                if op == "self_attention":
                    mod = Attention(rep.dim, heads=rep.heads, dim_head=rep.head_dim, bias=rep.qkv_bias,
                                    out_bias=rep.out_bias)
                    x = torch.randn(1, rep.tokens, rep.dim)  # [B, N, C]
                elif op.startswith("deltaconv"):
                    mod = DeltaConvBlock(rep.dim, rep.kernel_size,
                                         backend="triton" if op == "deltaconv_triton" else "reference")
                    with torch.no_grad():  # random weights everywhere (proj_out starts at zero)
                        for p in mod.parameters():
                            p.normal_(0, 0.02)
                    x = torch.randn(1, h, w, rep.dim)  # [B, H, W, C]
                else:
                    mod = GeneralizedLinearAttention(rep.dim, rep.heads, rep.inner, rep.qkv_bias, rep.out_bias)
                    x = torch.randn(1, rep.tokens, rep.dim)  # [B, N, C]
                mod = mod.to(device=device, dtype=tdtype).eval()
                x = x.to(device=device, dtype=tdtype)
                t = time_callable(lambda: mod(x), repeats=repeats, warmup=warmup, device=device)
                est.update(op, analytic, t.median / 1e3)
                mem = peak_memory_bytes(lambda: mod(x), device, known=[x, *mod.parameters(), *mod.buffers()])
                row.update(ms_median=t.median, ms_min=t.min, peak_mb=mem / 2**20)
                times[op] = t.median
                del mod, x
            except (RuntimeError, MemoryError) as exc:  # OOM or a kernel failure: record, go on
                row["note"] = f"failed: {str(exc).splitlines()[0][:120]}"
            res.latency.append(row)
        for row in res.latency:
            if row["resolution"] == r and row["scope"] == "module" and row["ms_median"] and "self_attention" in times:
                row["speedup_vs_sa"] = times["self_attention"] / row["ms_median"]
    if step:
        _step_latency(m, res, kspec, resolutions, repeats, warmup, device, tdtype, est, max_seconds, say)


def _available_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _build_step_models(m, res, kspec, device, tdtype):
    """(teacher, student or None): the loaded denoiser, or random weights built in ``tdtype`` directly."""
    from attnprobe.arch import CONVERTIBLE, denoiser_of

    from deltadistill.conversion import convert

    from attnprobe import registry

    if m.pipe is None and registry.weights_available(m.spec):  # real weights in the HF cache
        m.pipe, _ = registry.load_pipeline(m.name, dtype=tdtype, device=device)
    if m.pipe is not None:
        teacher = denoiser_of(m.pipe)
    else:
        import diffusers

        res.notes.append(f"whole step of {m.spec.alias} uses random weights (no weights cached here): "
                         "costs are real, outputs meaningless.")
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(tdtype)  # allocate in the target dtype: no fp32 copy of a large model
        try:
            with torch.device(device):
                teacher = getattr(diffusers, m.info["class"]).from_config(m.info["config"])
        finally:
            torch.set_default_dtype(previous)
    if any(p.dtype != tdtype or p.device.type != torch.device(device).type for p in teacher.parameters()):
        teacher = teacher.to(device=device, dtype=tdtype)
    teacher = teacher.eval()
    student = None
    if m.arch in CONVERTIBLE:
        student = convert(copy.deepcopy(teacher), kspec).eval()
        with torch.no_grad():  # trained-looking blocks: proj_out starts at zero
            for mod in student.modules():
                if hasattr(mod, "block"):
                    mod.block.proj_out.weight.normal_(0, 0.02)
    return teacher, student


def _step_latency(m, res, kspec, resolutions, repeats, warmup, device, tdtype, est, max_seconds, say):
    from attnprobe.arch import CONVERTIBLE

    teacher = student = None
    n_params = sum(p.numel() for p in m.meta.parameters())
    weight_bytes = n_params * torch.tensor([], dtype=tdtype).element_size()
    convertible = m.arch in CONVERTIBLE
    if m.pipe is None:  # real weights (if cached) or random ones: the same bytes
        need = weight_bytes * (2 if convertible else 1) * 1.25  # teacher (+ student) + activations headroom
        if need > _available_bytes(device):
            res.notes.append(f"whole step not timed: {m.spec.alias}'s "
                             f"teacher{' + student' if convertible else ''} ({need / 2**30:.1f} GiB) does not fit in "
                             f"{torch.device(device).type} memory.")
            return
    for r in resolutions:
        base = {"model": m.spec.alias, "resolution": r, "tokens": None, "grid": "", "dim": None, "kernel_size": None,
                "scope": "step", "repeats": repeats, "ms_min": None, "ms_median": None, "peak_mb": None,
                "speedup_vs_sa": None, "backend": "reference"}
        rows = [{**base, "operator": "teacher_step", "note": ""}]
        if convertible:
            rows.append({**base, "operator": "student_step", "note": ""})
        try:
            step_flops = meta_step_flops(m, r)
            guess = est.seconds("step", step_flops)
            skip = f"skipped: est. {guess:.1f} s/call > --max-seconds {max_seconds:g}" if guess > max_seconds else ""
        except Exception as exc:  # the forward does not run on meta: only small, loaded models are timed blindly
            step_flops = 0
            skip = "" if m.pipe is not None else f"skipped: cannot estimate the step cost ({type(exc).__name__})"
        if skip:
            for row in rows:
                row["note"] = skip
            res.latency.extend(rows)
            continue
        if teacher is None:
            say("building teacher and student")
            try:
                teacher, student = _build_step_models(m, res, kspec, device, tdtype)
            except (RuntimeError, MemoryError) as exc:
                for row in rows:
                    row["note"] = f"failed to build: {str(exc).splitlines()[0][:120]}"
                res.latency.extend(rows)
                return
        kw = denoiser_inputs(m, r, device, tdtype)
        known = [t for t in tree_leaves(kw) if isinstance(t, torch.Tensor)]
        t_teacher = None
        for row, net in zip(rows, (teacher, student)):
            say(f"{r}px: {row['operator']}")
            try:
                t = time_callable(lambda: net(**kw), repeats=repeats, warmup=warmup, device=device)
                mem = peak_memory_bytes(lambda: net(**kw), device, known=[*known, *net.parameters(), *net.buffers()])
                row.update(ms_median=t.median, ms_min=t.min, peak_mb=mem / 2**20)
                if row["operator"] == "teacher_step":
                    t_teacher = t.median
                    if step_flops:
                        est.update("step", step_flops, t.median / 1e3)
                elif t_teacher:
                    row["speedup_vs_sa"] = t_teacher / t.median
            except (RuntimeError, MemoryError) as exc:
                row["note"] = f"failed: {str(exc).splitlines()[0][:120]}"
        if len(rows) == 1:
            rows[0]["note"] = "joint attention: no student (not convertible)"
        res.latency.extend(rows)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_OP_LABEL = {**cost_model.OPERATOR_NAMES, "deltaconv": "ΔConvBlock (reference)", "deltaconv_triton": "ΔConvBlock (Triton)",
             "teacher_step": "teacher step", "student_step": "student step",
             "self_attention": "self-attention (SDPA)"}


def _g(flops: float | None) -> str:
    """GFLOPs with sensible digits: 554,190 · 15.83 · 0.00412."""
    if flops is None:
        return ""
    g = flops / 1e9
    return f"{g:,.0f}" if g >= 100 else f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def flops_table_rows(result: BenchResult, scope: str = "layer") -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the FLOPs table: GFLOPs per operator and SA ÷ operator ratios.

    ``scope="layer"``: the largest-grid layer; ``"total"``: all self-attention layers summed.
    """
    key = "layer_flops" if scope == "layer" else "total_flops"
    header = ["resolution", "grid", "N", "self-attn", "ΔConv", "window", "linear", "SA÷ΔConv", "SA÷window", "SA÷linear"]
    rows = []
    for r in result.meta["resolutions"]:
        by_op = {row["operator"]: row for row in result.flops if row["resolution"] == r}
        if not by_op:
            continue
        sa = by_op["self_attention"][key]
        vals = [by_op[op][key] for op in cost_model.OPERATORS]
        rows.append([f"{r}", by_op["self_attention"]["grid"], f"{by_op['self_attention']['tokens']:,}",
                     *[_g(v) for v in vals], *[f"{sa / v:,.1f}×" for v in vals[1:]]])
    return header, rows


def latency_table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    header = ["resolution", "scope", "operator", "median ms", "min ms", "peak MB", "speed-up", "note"]
    rows = []
    for row in result.latency:
        ref = "vs SA" if row["scope"] == "module" else "vs teacher"
        rows.append([
            f"{row['resolution']}", row["scope"] + (f" ({row['grid']})" if row["grid"] else ""),
            _OP_LABEL.get(row["operator"], row["operator"]),
            "" if row["ms_median"] is None else f"{row['ms_median']:,.2f}",
            "" if row["ms_min"] is None else f"{row['ms_min']:,.2f}",
            "" if row["peak_mb"] is None else f"{row['peak_mb']:,.1f}",
            "" if row["speedup_vs_sa"] is None else f"{row['speedup_vs_sa']:.2f}× {ref}",
            row["note"],
        ])
    return header, rows


def _rich_table(title: str, header: list[str], rows: list[list[str]], caption: str = ""):
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (1, 2) and h in ("grid", "scope", "operator") or h == "note" else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def write_outputs(result: BenchResult, out: Path | None = None, csv: Path | None = None, json_path: Path | None = None) -> list[Path]:
    """``out/``: flops.csv, flops_per_layer.csv, latency.csv, bench.json; ``csv``: one tidy CSV; ``json_path``."""
    import pandas as pd

    written = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, records in (("flops.csv", result.flops), ("flops_per_layer.csv", result.layers),
                              ("latency.csv", result.latency)):
            if records:
                pd.DataFrame(records).to_csv(out / name, index=False)
                written.append(out / name)
        (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written.append(out / "bench.json")
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        frames = [pd.DataFrame(rec).assign(section=sec) for sec, rec in (("flops", result.flops), ("latency", result.latency)) if rec]
        pd.concat(frames, ignore_index=True).to_csv(csv, index=False)
        written.append(csv)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        written.append(json_path)
    return written


def print_result(result: BenchResult, console) -> None:
    meta = result.meta
    if result.flops:
        n = meta["layers"]
        cap = (f"GFLOPs per call, batch 1; 1 multiply-add = 2 FLOPs; ΔConvBlock and window attention with "
               f"{meta['kernel_sizes']}; linear attention of LinFusion's form.")
        h, rows = flops_table_rows(result, "layer")
        console.print(_rich_table(f"FLOPs — {meta['model']}, one self-attention layer (largest grid)", h, rows, cap))
        h, rows = flops_table_rows(result, "total")
        console.print(_rich_table(f"FLOPs — {meta['model']}, all {n} self-attention layers summed", h, rows))
    if result.latency:
        h, rows = latency_table_rows(result)
        cap = (f"{meta['device']}, {meta['dtype']}; median of {meta['repeats']} calls after {meta['warmup']} warm-up; "
               "peak MB = memory allocated by the call (CUDA max allocated, or live tensor bytes on CPU)"
               + (f"; load average {meta['load_average_1min']} at start" if "load_average_1min" in meta else "") + ".")
        console.print(_rich_table(f"Latency — {meta['model']}", h, rows, cap))
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_resolutions(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower().removesuffix("px")
        if not part.isdigit() or int(part) <= 0:
            raise typer.BadParameter(f"{part!r} is not a positive integer; use e.g. 512,1024,2048", param_hint="--resolutions")
        out.append(int(part))
    return out


def bench(
    model: str = typer.Option("demo", "--model", help="Alias (demo, pixart, sd15, sdxl, dit, flux, sd3, tiny-*), local diffusers folder or Hub id."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Comma-separated square image sides in px. Default: 512,1024,2048,4096 for real models, native and 2× for demo/tiny-*."),
    do_flops: bool = typer.Option(False, "--flops", help="FLOPs tables (default: both tables when neither --flops nor --latency is given)."),
    do_latency: bool = typer.Option(False, "--latency", help="Latency and peak-memory table."),
    step: bool = typer.Option(True, "--step/--no-step", help="Also time one whole denoiser call, teacher vs student."),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="One odd ΔConvBlock kernel size for every layer (default 13)."),
    erf_report: Optional[Path] = typer.Option(None, "--erf-report", help="erf.json from `attnprobe analyze`: per-layer kernel sizes."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed calls per case (median reported)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls before timing."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, fp16 or bf16."),
    backend: str = typer.Option("auto", "--backend", help="ΔConvBlock path: reference, triton or auto (both when Triton is available)."),
    max_seconds: float = typer.Option(2.0, "--max-seconds", help="Skip timing cases estimated to take longer than this per call."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for PyTorch (default: PyTorch's choice)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for flops.csv, flops_per_layer.csv, latency.csv and bench.json."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write all rows to one CSV (column `section`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write everything (rows, per-layer FLOPs, notes, run metadata) to a JSON file."),
) -> None:
    """FLOPs and latency of self-attention vs ΔConvBlock vs window and linear attention, per resolution."""
    import logging
    import warnings

    from rich.console import Console

    from attnprobe.arch import UnsupportedModelError
    from attnprobe.registry import ModelLoadError

    import sys

    console = Console() if sys.stdout.isatty() else Console(width=160)  # files/pipes: no 80-column wrap
    err = Console(stderr=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if kernel_size is not None and erf_report is not None:
        raise typer.BadParameter("pass either --kernel-size or --erf-report, not both", param_hint="--kernel-size")
    if erf_report is not None and not Path(erf_report).exists():
        raise typer.BadParameter(f"{erf_report} does not exist; run `attnprobe analyze` first", param_hint="--erf-report")
    if kernel_size is not None and (kernel_size < 3 or kernel_size % 2 == 0):
        raise typer.BadParameter(f"must be odd and >= 3, got {kernel_size}", param_hint="--kernel-size")
    res_list = _parse_resolutions(resolutions)
    if not do_flops and not do_latency:
        do_flops = do_latency = True
    try:
        with err.status("bench") as status:
            result = run_bench(model, res_list, flops=do_flops, latency=do_latency, step=step, kernel_size=kernel_size,
                               erf_report=erf_report, repeats=repeats, warmup=warmup, device=device, dtype=dtype,
                               backend=backend, max_seconds=max_seconds, threads=threads,
                               progress=lambda msg: status.update(f"bench: {msg}"))
    except (ModelLoadError, UnsupportedModelError, ValueError, KeyError) as exc:
        err.print(f"[bold red]Error:[/] {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", highlight=False)
        raise typer.Exit(2)
    print_result(result, console)
    for path in write_outputs(result, out, csv, json_out):
        console.print(f"wrote [bold]{path}[/]")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to the ``deltadistill`` typer app."""
    app.command("bench")(bench)
