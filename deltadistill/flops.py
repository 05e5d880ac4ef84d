"""Analytic FLOPs of self-attention and its replacements, per layer and per model (SPEC §5).

Everything is computed from shapes: a layer is described by its token grid H×W (N = H·W tokens),
its channels C, the attention's inner width I = heads·d (C for every supported model), its heads
h and the ΔConvBlock kernel size K. Model-level numbers sum the layers that
:func:`attnprobe.core.family.find_self_attention` finds, each on its own grid at the requested
resolution (UNet levels halve the grid).

Convention: **one multiply-add = 2 FLOPs** (as :class:`torch.utils.flop_counter.FlopCounterMode`
counts), and every other arithmetic operation (add, multiply, divide, exp, compare) = 1 FLOP per
output element. Batch size 1 (everything is linear in the batch).

Every cost is a :class:`Cost` — named terms, split into ``matmul`` terms (matrix products and
convolutions: exactly what FlopCounterMode counts) and ``elementwise`` terms (bias adds, softmax,
pooling, interpolation, gates, means: FlopCounterMode counts none of them). ``Cost.matmul`` is the
like-for-like number to compare with :func:`count_measured`; ``Cost.total`` is what the tables show.

Self-attention (N tokens, C channels, inner I, h heads; SDPA)::

    q, k, v projections   3 · 2·N·C·I        (+ 3·N·I bias adds if the projections have bias)
    scale q by 1/√d       N·I
    scores  Q Kᵀ          2·N²·I             (per head 2·N²·d)
    softmax               4·h·N²             (subtract max, exp, sum, divide per score)
    A V                   2·N²·I
    out projection        2·N·I·C + N·C

  With I = C that is 8·N·C² + 4·N²·C + 4·h·N² (+ O(N·C)). The paper prints
  "4NC² + 4N²C + 4N²": taken literally it counts the four projections in multiply-adds but the two
  N×N products in FLOPs (2 × 2N²C), and the softmax once per layer instead of once per head.
  :func:`paper_attention_flops` returns that formula as printed, for reference only; all tables
  use the single convention above.

ΔConvBlock (SPEC §2; C' = ρ·C, stages s = 1/2^k, N_k = ⌈H/2^k⌉·⌈W/2^k⌉, S stages)::

    proj_in               2·N·C·C'  + N·C'
    per stage k:
      k × avgpool 2×2     4·N_j·C' for j = 1..k   (3 adds + 1 divide per pooled element)
      depth-wise K×K      2·N_k·C'·K² + N_k·C'    ('same' zero padding counted as full windows,
                                                   as FlopCounterMode does)
      gate                scaled: 2 per output (x1·x2·s) → N_k·C';  sigmoid: 5 per output
                          (neg, exp, add, divide, multiply) → 2.5·N_k·C'
      proj_out slice      2·N_k·(C'/2)·C            (each stage projected at its own size)
      bilinear up (k ≥ 1) 7 per output element (4 multiplies + 3 adds) → 7·N·C, then + N·C to sum
    proj_out bias         N_k·C, once, in the first (finest) term
    global branch         mean N·C + C,  Linear 2·C² + C,  + C into proj_out's bias

  With the defaults (ρ = ½, scales (1, ½)) the dominant terms are 2·N·C²·(1 + ½ + ⅛)·½ (proj_in
  and the two proj_out slices) and N·C·K²·(1 + ¼)·ρ·2: linear in N.

Neighbourhood (window) attention, NATTEN-style, same K: each query attends to the K×K window
around it, shifted inward at borders so every query sees exactly k_eff = min(K,H)·min(K,W) keys::

    projections as self-attention (8·N·C·I-type terms) + scale N·I
    scores 2·N·k_eff·I,  softmax 4·h·N·k_eff,  A V 2·N·k_eff·I

Linear attention of LinFusion's form ("generalised linear attention", Liu et al. 2024): the
queries and keys pass through a residual MLP before their projections, then a positive feature
map, and attention is computed right-to-left::

    q = elu(W_q (z + MLP_q(z))) + 1,   k = elu(W_k (z + MLP_k(z))) + 1,   v = W_v z
    MLP(z) = W_2 LeakyReLU(LayerNorm(W_1 z)),  W_1, W_2: C → C
    out = W_o [ q (kᵀ v / N) / (q · mean(k)) ]      per head, d = I / h

    projections q, k, v, o        3·2·N·C·I + 2·N·I·C (+ biases as self-attention)
    two MLPs                      2 × (2 · 2·N·C² + 2·N·C bias + 7·N·C LayerNorm + N·C LeakyReLU)
    residual adds                 2·N·C
    feature map elu(x)+1          2 · 2·N·I
    kᵀv (per head d×d over N)     2·N·I·d  (+ 2·N·I for the 1/√N scalings of k and v)
    q (kᵀv)                       2·N·I·d
    normaliser mean(k), q·k̄, ÷    N·I + 2·N·I + 2·N·I (mean, product, +eps and divide)

  i.e. O(N·C²) + O(N·C·d): linear in N, with a larger constant than self-attention's projections.

:func:`count_measured` runs a module under FlopCounterMode and returns the FLOPs it counts (matrix
products and convolutions only; CPU SDPA is added with torch's own SDPA formula because torch does
not register one for ``_scaled_dot_product_flash_attention_for_cpu``). Tests check that it equals
``Cost.matmul`` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "Cost",
    "LayerShape",
    "self_attention_flops",
    "paper_attention_flops",
    "deltaconv_flops",
    "window_attention_flops",
    "linear_attention_flops",
    "OPERATORS",
    "operator_flops",
    "layer_shapes",
    "model_flops",
    "count_measured",
]


@dataclass
class Cost:
    """FLOPs split into named terms; ``matmul`` terms are those FlopCounterMode counts."""

    matmul_terms: dict[str, int] = field(default_factory=dict)
    elementwise_terms: dict[str, int] = field(default_factory=dict)

    @property
    def matmul(self) -> int:
        return int(sum(self.matmul_terms.values()))

    @property
    def elementwise(self) -> int:
        return int(sum(self.elementwise_terms.values()))

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise

    def add(self, name: str, flops: float, matmul: bool) -> None:
        terms = self.matmul_terms if matmul else self.elementwise_terms
        terms[name] = terms.get(name, 0) + int(round(flops))

    def to_dict(self) -> dict:
        return {"total": self.total, "matmul": self.matmul, "elementwise": self.elementwise,
                "terms": {**self.matmul_terms, **self.elementwise_terms}}


@dataclass(frozen=True)
class LayerShape:
    """One self-attention site at one resolution: what the cost formulas need."""

    name: str
    label: str
    grid: tuple[int, int]  # (H, W) tokens
    dim: int  # C
    heads: int  # h
    inner: int  # I = h·d
    kernel_size: int  # K of the ΔConvBlock that replaces it
    qkv_bias: bool = True
    out_bias: bool = True

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads


def _projections(cost: Cost, n: int, c: int, inner: int, qkv_bias: bool, out_bias: bool) -> None:
    cost.add("qkv_proj", 3 * 2 * n * c * inner, True)  # 3 × [N, C] @ [C, I]
    cost.add("out_proj", 2 * n * inner * c, True)  # [N, I] @ [I, C]
    if qkv_bias:
        cost.add("qkv_bias", 3 * n * inner, False)
    if out_bias:
        cost.add("out_bias", n * c, False)


def self_attention_flops(n: int, dim: int, heads: int, inner: int | None = None,
                         qkv_bias: bool = True, out_bias: bool = True) -> Cost:
    """Softmax self-attention over ``n`` tokens (see the module docstring for the terms)."""
    inner = dim if inner is None else inner
    cost = Cost()
    _projections(cost, n, dim, inner, qkv_bias, out_bias)
    cost.add("scale", n * inner, False)
    cost.add("scores", 2 * n * n * inner, True)  # (h, N, d) @ (h, d, N)
    cost.add("softmax", 4 * heads * n * n, False)  # (h, N, N)
    cost.add("attn_v", 2 * n * n * inner, True)  # (h, N, N) @ (h, N, d)
    return cost


def paper_attention_flops(n: int, dim: int) -> int:
    """The paper's printed per-layer formula 4NC² + 4N²C + 4N², as printed (mixed units)."""
    return 4 * n * dim * dim + 4 * n * n * dim + 4 * n * n


def deltaconv_flops(grid: tuple[int, int], dim: int, kernel_size: int, scales=(1, 0.5),
                    inter_ratio: float = 0.5, gate: str = "scaled", key_width: int = 0) -> Cost:
    """ΔConvBlock on an H×W grid (see the module docstring for the terms); ``key_width`` n > 0 adds the
    key-weighted branch (:class:`~deltadistill.block.DeltaConvBlock`: q, k, v, one convolution of 2n channels
    per stage, the ratio, the gate, the projection)."""
    from deltadistill.block import scale_level

    h, w = grid
    n, c, k2 = h * w, dim, kernel_size * kernel_size
    ci = int(round(dim * inter_ratio))  # C'
    levels = [scale_level(s) for s in scales]
    finest = min(levels)  # the first term of the sum, which carries proj_out's bias
    cost = Cost()
    cost.add("proj_in", 2 * n * c * ci, True)  # [N, C] @ [C, C']
    cost.add("proj_in_bias", n * ci, False)
    for lvl in levels:
        hk, wk = h, w
        for _ in range(lvl):
            hk, wk = math.ceil(hk / 2), math.ceil(wk / 2)
            cost.add("pool", 4 * hk * wk * ci, False)  # 2×2 mean per pooled element
        nk = hk * wk
        cost.add(f"dwconv_s{lvl}", 2 * nk * ci * k2, True)  # [C', 1, K, K] over N_k outputs
        cost.add("dwconv_bias", nk * ci, False)
        cost.add("gate", (2 if gate == "scaled" else 5) * nk * (ci // 2), False)
        cost.add("proj_out", 2 * nk * (ci // 2) * c, True)  # this stage's slice: [N_k, C'/2] @ [C'/2, C]
        if lvl:
            cost.add("upsample", 7 * n * c, False)  # 4-tap bilinear per output element, C channels
    hf, wf = h, w
    for _ in range(finest):
        hf, wf = math.ceil(hf / 2), math.ceil(wf / 2)
    cost.add("proj_out_bias", hf * wf * c, False)  # once, in the first (finest) term
    if len(levels) > 1:
        cost.add("stage_sum", (len(levels) - 1) * n * c, False)
    cost.add("global_mean", n * c + c, False)
    cost.add("global_proj", 2 * c * c, True)  # [1, C] @ [C, C]
    cost.add("global_bias_add", 2 * c, False)  # global_proj's bias, then into proj_out's bias
    if key_width:
        _key_weighted_flops(cost, h, w, c, kernel_size, levels, key_width)
    return cost


def _key_weighted_flops(cost: Cost, h: int, w: int, c: int, kernel_size: int, levels, m: int) -> None:
    """The key-weighted branch of width ``m`` on an H×W grid of N = ``n`` tokens."""
    n = h * w
    cost.add("key_qkv", 2 * n * c * 3 * m, True)  # [N, C] @ [C, 3n]
    cost.add("key_qkv_bias", n * 3 * m, False)
    cost.add("key_exp", 4 * n * m + m * kernel_size**2 * len(levels), False)  # max, subtract, exp; e·v; exp of the taps
    cost.add("key_gate", 4 * n * m, False)  # σ(q)
    for lvl in levels:
        hk, wk = h, w
        for _ in range(lvl):
            hk, wk = math.ceil(hk / 2), math.ceil(wk / 2)
            cost.add("key_pool", 4 * hk * wk * 2 * m, False)
        cost.add(f"key_dwconv_s{lvl}", 2 * hk * wk * 2 * m * kernel_size**2, True)  # numerator and denominator
        cost.add("key_ratio", hk * wk * m, False)
        if lvl:
            cost.add("key_upsample", 7 * n * m, False)
        cost.add("key_gate_mul", n * m, False)
        cost.add("key_out", 2 * n * m * c, True)  # this stage's slice of key_out: [N, n] @ [n, C]
        cost.add("key_sum", n * c, False)


def window_attention_flops(grid: tuple[int, int], dim: int, heads: int, kernel_size: int,
                           inner: int | None = None, qkv_bias: bool = True, out_bias: bool = True) -> Cost:
    """Neighbourhood attention with a K×K window (k_eff = min(K,H)·min(K,W) keys per query)."""
    inner = dim if inner is None else inner
    h, w = grid
    n = h * w
    keys = min(kernel_size, h) * min(kernel_size, w)
    cost = Cost()
    _projections(cost, n, dim, inner, qkv_bias, out_bias)
    cost.add("scale", n * inner, False)
    cost.add("scores", 2 * n * keys * inner, True)
    cost.add("softmax", 4 * heads * n * keys, False)
    cost.add("attn_v", 2 * n * keys * inner, True)
    return cost


def linear_attention_flops(n: int, dim: int, heads: int, inner: int | None = None,
                           qkv_bias: bool = True, out_bias: bool = True, mlp: bool = True) -> Cost:
    """LinFusion-form generalised linear attention (see the module docstring for the formula)."""
    inner = dim if inner is None else inner
    d = inner // heads
    c = dim
    cost = Cost()
    _projections(cost, n, c, inner, qkv_bias, out_bias)
    if mlp:
        cost.add("phi_mlp", 2 * 2 * (2 * n * c * c), True)  # q and k: two [N, C] @ [C, C] each
        cost.add("phi_mlp_bias", 2 * 2 * n * c, False)
        cost.add("phi_layernorm", 2 * 7 * n * c, False)  # mean, centre, square, mean, rsqrt-mul, affine
        cost.add("phi_leakyrelu", 2 * n * c, False)
        cost.add("phi_residual", 2 * n * c, False)
    cost.add("feature_map", 2 * 2 * n * inner, False)  # elu(x) + 1 on q and k
    cost.add("kv_scale", 2 * n * inner, False)  # k/√N, v/√N
    cost.add("kv", 2 * n * inner * d, True)  # (h, d, N) @ (h, N, d)
    cost.add("q_kv", 2 * n * inner * d, True)  # (h, N, d) @ (h, d, d)
    cost.add("k_mean", n * inner, False)
    cost.add("normaliser", 2 * n * inner, True)  # (h, N, d) @ (h, d, 1)
    cost.add("normalise", 2 * n * inner, False)  # + eps, divide
    return cost


OPERATORS = ("self_attention", "deltaconv", "window_attention", "linear_attention")
"""Operator keys, in table order."""

OPERATOR_NAMES = {
    "self_attention": "self-attention",
    "deltaconv": "ΔConvBlock",
    "window_attention": "window attention",
    "linear_attention": "linear attention (LinFusion)",
}


def operator_flops(op: str, layer: LayerShape, scales=(1, 0.5), inter_ratio: float = 0.5, gate: str = "scaled",
                   key_width: int = 0) -> Cost:
    """The :class:`Cost` of operator ``op`` (one of :data:`OPERATORS`) for ``layer``."""
    if op == "self_attention":
        return self_attention_flops(layer.tokens, layer.dim, layer.heads, layer.inner, layer.qkv_bias, layer.out_bias)
    if op == "deltaconv":
        return deltaconv_flops(layer.grid, layer.dim, layer.kernel_size, scales, inter_ratio, gate, key_width)
    if op == "window_attention":
        return window_attention_flops(layer.grid, layer.dim, layer.heads, layer.kernel_size, layer.inner,
                                      layer.qkv_bias, layer.out_bias)
    if op == "linear_attention":
        return linear_attention_flops(layer.tokens, layer.dim, layer.heads, layer.inner, layer.qkv_bias, layer.out_bias)
    raise ValueError(f"unknown operator {op!r}; choose one of {OPERATORS}")


# ----------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------


def _site_dims(module) -> tuple[int, int, int, bool, bool]:
    """(C, heads, inner, qkv_bias, out_bias) of a diffusers Attention module."""
    to_q = module.to_q
    out = getattr(module, "to_out", None)
    out = out[0] if isinstance(out, (torch.nn.ModuleList, torch.nn.Sequential)) else out
    return (int(to_q.in_features), int(module.heads), int(to_q.out_features),
            to_q.bias is not None, out is None or out.bias is not None)


def layer_shapes(denoiser, vae_factor: int, resolution: int | tuple[int, int], kernel_sizes=13) -> list[LayerShape]:
    """One :class:`LayerShape` per self-attention site of ``denoiser`` at ``resolution`` pixels.

    ``denoiser`` may live on the meta device (see :func:`attnprobe.core.registry.denoiser_from_config`);
    ``kernel_sizes`` is one odd int or ``{module name: K}`` covering every site.
    """
    from attnprobe.core.family import family_of, find_self_attention

    hgt, wid = (resolution, resolution) if isinstance(resolution, int) else resolution
    base = family_of(denoiser).base_grid(denoiser.config, vae_factor, hgt, wid)
    out = []
    for site in find_self_attention(denoiser):
        if isinstance(kernel_sizes, int):
            k = kernel_sizes
        else:
            if site.name not in kernel_sizes:
                raise KeyError(f"no kernel size for {site.name}")
            k = int(kernel_sizes[site.name])
        c, heads, inner, qb, ob = _site_dims(site.module)
        out.append(LayerShape(site.name, site.label, site.grid(base), c, heads, inner, k, qb, ob))
    return out


def model_flops(layers: list[LayerShape], ops=OPERATORS, **block_kw) -> dict[str, Cost]:
    """``{operator: Cost summed over layers}``."""
    totals = {}
    for op in ops:
        acc = Cost()
        for layer in layers:
            c = operator_flops(op, layer, **block_kw)
            for name, v in c.matmul_terms.items():
                acc.add(name, v, True)
            for name, v in c.elementwise_terms.items():
                acc.add(name, v, False)
        totals[op] = acc
    return totals


# ----------------------------------------------------------------------------------------------
# Measured counts
# ----------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's count for ``convolution_backward`` with the weight gradient divided by ``groups``.

    torch 2.13 counts a grouped convolution's weight gradient as if every input channel met every output
    channel: a depth-wise convolution's backward came out ~C times too large (32 GFLOP instead of 0.3 for
    a demo block at batch 32)."""
    from torch.utils.flop_counter import conv_backward_flop

    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape) if output_mask[0] else 0
    grad_weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape) if output_mask[1] else 0
    return grad_input + grad_weight // max(1, int(groups))


def flop_counter():
    """``FlopCounterMode`` with the counts torch gets wrong mended: SDPA's CPU kernel, grouped convolutions'
    backward."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten.convolution_backward: _conv_backward_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_measured(module, inputs, by_op: bool = False):
    """FLOPs FlopCounterMode counts for one forward of ``module(*inputs)`` (no grad).

    Counted: mm, addmm, bmm, baddbmm, convolutions and SDPA (the two N×N products), each as
    2 FLOPs per multiply-add, biases excluded. Not counted: softmax, bias adds, pooling,
    interpolation, elementwise gates, normalisation, means — compare with ``Cost.matmul``.
    ``inputs``: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
    ``by_op=True`` also returns ``{op name: FLOPs}``.
    """
    counter = flop_counter()
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    from attnprobe.core import backends

    # PyTorch ops only (compiled kernels are invisible to the counter), whatever backend a module asks for
    with counter, torch.no_grad(), backends.preferring("reference", over_explicit=True):
        module(*args, **kwargs)
    total = int(counter.get_total_flops())
    if by_op:
        return total, {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return total
