"""``attnprobe analyze --estimate``: what an analysis will cost, before any weights are loaded.

The denoiser is built from its shipped architecture config on the *meta* device (no memory, no
weights). For the chosen settings it reports, per self-attention layer, the token grid, heads,
queries, how many query chunks the memory budget allows and the peak extra memory of one call
(the capture's working set: ~8 fp32 buffers of batch × heads × chunk × keys), the floats each
layer keeps, and the attention rows reduced per denoising step. Time per step is estimated twice:

* the model: FLOPs of one denoiser call (counted on the meta device) ÷ this device's measured
  matmul rate ÷ an efficiency of 0.6 (what diffusers models reach on CPU; measured on the demo);
* the capture: one layer's reduction timed at its real shape on this device (random q, k), scaled
  to the other layers by rows × keys.

Nothing here needs the model's weights; the numbers are estimates, and ``benchmarks/RESULTS.md``
records how they compare with measured runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from attnprobe.config import AnalysisConfig
from attnprobe.core.family import family_of, find_self_attention
from attnprobe.core.registry import denoiser_from_config, resolve, text_tokens
from attnprobe.core.sites import select_sites
from attnprobe.stats import parse_queries

__all__ = ["LayerCost", "AnalysisEstimate", "estimate_analysis", "MODEL_EFFICIENCY", "RUNTIME_BYTES"]

MODEL_EFFICIENCY = 0.6  # share of the square-matmul rate a denoiser forward reaches
RUNTIME_BYTES = 700 * 2**20  # a Python process with torch, diffusers and transformers imported (measured here)
BUFFERS = 8  # fp32 (batch, heads, chunk, keys) buffers the capture holds at once (see capture.py)


@dataclass
class LayerCost:
    name: str
    grid: tuple[int, int]
    heads: int
    head_dim: int
    keys: int
    queries: int
    chunks: int
    peak_bytes: int  # extra memory of one attention call
    kept_floats: int  # running sums kept for the whole run
    rows_per_step: int  # softmax rows reduced per denoising step (batch × heads × queries)
    capture_s: float = 0.0  # estimated capture time per step for this layer


@dataclass
class AnalysisEstimate:
    model: str
    resolution: tuple[int, int]
    batch: int
    device: str
    dtype: str
    params: int
    weight_bytes: int
    layers: list[LayerCost] = field(default_factory=list)
    model_step_s: float = 0.0
    capture_step_s: float = 0.0
    steps: int = 20
    prompts: int = 1
    calibration: str = ""

    @property
    def step_s(self) -> float:
        return self.model_step_s + self.capture_step_s

    @property
    def total_s(self) -> float:
        return self.step_s * self.steps * self.prompts

    @property
    def peak_bytes(self) -> int:
        return max((l.peak_bytes for l in self.layers), default=0)

    @property
    def kept_bytes(self) -> int:
        return 8 * sum(l.kept_floats for l in self.layers)

    @property
    def rss_bytes(self) -> int:
        """Peak resident memory of the run: Python + torch + diffusers (RUNTIME_BYTES), the weights, the
        capture's working set and sums, and the widest layer's activations (16 fp32 copies of batch × N × C)."""
        act = max((self.batch * l.grid[0] * l.grid[1] * l.heads * l.head_dim * 4 * 16 for l in self.layers), default=0)
        return RUNTIME_BYTES + self.weight_bytes + self.peak_bytes + self.kept_bytes + act


def _matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 2048 if torch.device(device).type == "cuda" else 768
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _step_flops(den, family, resolution: int, vae_factor: int, text_len: int, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    kw = family.random_inputs(den, resolution, vae_factor, text_len=text_len, device="meta", dtype=torch.float32,
                              batch=batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        den(**kw)
    return int(counter.get_total_flops())


def estimate_analysis(model: str, cfg: AnalysisConfig | None = None, *, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, prompts: int = 1, batch: int | None = None,
                      calibrate: bool = True, random_weights: bool = False) -> AnalysisEstimate:
    """Cost of ``attnprobe analyze`` for ``model`` (an alias with a shipped config) and ``cfg``
    (``random_weights``: the run loads the random-weight pipeline, whose tiny tokenizer makes 16 text tokens)."""
    from attnprobe.capture import LayerAccumulator

    cfg = (cfg or AnalysisConfig()).validate()
    spec = resolve(model)
    den, info = denoiser_from_config(spec.alias, device="meta")
    family = family_of(den)
    vf = int(info["vae_scale_factor"])
    if cfg.resolution in (None, "", 0):
        h = w = int(info.get("resolution") or spec.resolution or family.default_resolution(den.config, vf))
    else:
        from attnprobe.core.pipeline import parse_resolution

        h, w = parse_resolution(cfg.resolution)
    family.check_resolution(den.config, vf, h, w)
    base = family.base_grid(den.config, vf, h, w)
    batch = batch or (1 if cfg.guidance_scale == 1 else 2)  # classifier-free guidance doubles the batch
    text = text_tokens(spec, family, random_weights)  # joint attention's keys hold them too
    buckets = max(1, min(cfg.timestep_buckets, cfg.steps))
    budget = int(cfg.memory_budget_mb * 2**20)
    params = sum(p.numel() for p in den.parameters())
    est = AnalysisEstimate(model=spec.alias, resolution=(h, w), batch=batch, device=str(device),
                           dtype=str(dtype).replace("torch.", ""), params=params,
                           weight_bytes=params * torch.tensor([], dtype=dtype).element_size(), steps=cfg.steps,
                           prompts=prompts)
    for site in select_sites(find_self_attention(den), cfg.layers):
        grid = site.grid(base)
        n = grid[0] * grid[1]
        heads = int(site.module.heads)
        head_dim = int(site.module.inner_dim // heads) if hasattr(site.module, "inner_dim") else 64
        keys = n + (text if site.joint else 0)
        q = len(parse_queries(cfg.queries, grid))
        per_query = batch * heads * keys * 4 * BUFFERS
        chunk = max(1, min(q, budget // per_query))
        f = max(1, math.ceil(math.log2(max(grid))))
        kept = buckets * heads * (2 * max(grid) + 2) + buckets + n * (1 + 2 * f) + prompts * max(grid)
        if cfg.aggregate == "mean-map":
            kept += buckets * min(8, prompts) * q * n
        est.layers.append(LayerCost(site.label, grid, heads, head_dim, keys, q, math.ceil(q / chunk), chunk * per_query,
                                    kept, batch * heads * q))
    if calibrate and est.layers:
        rate = _matmul_rate(device, dtype)
        flops = _step_flops(den, family, h, vf, text, batch) if h == w else 0
        est.model_step_s = flops / (rate * MODEL_EFFICIENCY)
        probe = max(est.layers, key=lambda l: l.rows_per_step * l.keys)
        est.capture_step_s, seconds = 0.0, _time_layer(probe, cfg, batch, device, LayerAccumulator)
        for layer in est.layers:
            layer.capture_s = seconds * (layer.rows_per_step * layer.keys) / (probe.rows_per_step * probe.keys)
            est.capture_step_s += layer.capture_s
        est.calibration = (f"matmul {rate / 1e9:.0f} GFLOP/s; model {flops / 1e9:.0f} GFLOP per call; "
                           f"capture timed on {probe.name} ({seconds:.3f} s per call)")
    return est


def _time_layer(layer: LayerCost, cfg: AnalysisConfig, batch: int, device: str, accumulator_cls) -> float:
    """Seconds of one capture reduction at ``layer``'s shape (random q, k; best of two)."""
    from attnprobe.core.sites import AttnSite

    class _Clock:
        prompt = 0

        def base_grid(self):
            return layer.grid

        def bucket(self):
            return 0

    site = AttnSite(layer.name, layer.name, None, joint="image_last" if layer.keys > layer.grid[0] * layer.grid[1] else None)
    acc = accumulator_cls(site=site, buckets=1, highpass_mass=cfg.highpass_mass, cutoff=cfg.cutoff, order=cfg.order,
                          queries=cfg.queries, probe_points=[], memory_budget=int(cfg.memory_budget_mb * 2**20),
                          capture=_Clock(), border=cfg.border, aggregate="per-map")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, layer.heads, layer.keys, layer.head_dim, generator=g).to(device)
    k = torch.randn(batch, layer.heads, layer.keys, layer.head_dim, generator=g).to(device)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        acc.observe(q, k, None, None)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
