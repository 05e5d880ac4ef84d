"""ΔConvBlock: a pyramid of depth-wise convolutions plus a global branch (SPEC §2).

Input and output are channels-last, ``z`` of shape ``[B, H, W, C]`` (tokens reshaped row-major
onto their H×W grid). With ρ = ``inter_ratio`` and C' = C·ρ::

    x      = proj_in(z)                                     1×1, C → C'
    g_s    = up_{H×W}( gate( dwconv_K( pool_s(x) ) ) )      one stage per s in ``scales``, C'/2 channels
    y      = proj_out( concat_s g_s )                       1×1, C'/2·|scales| → C
    out    = y + global_proj( mean_{H×W} z )                global branch, broadcast over H×W

* ``pool_s`` for s = 1/2^k: with ``pool="ceil"`` (default) k successive 2×2 average pools
  (stride 2, ceil mode: an odd side keeps its last row/column, partial windows average only real
  pixels); with ``pool="adaptive"`` one adaptive average pool to (⌊H·s⌋, ⌊W·s⌋), the official
  ΔConvFusion code's choice (overlapping windows on odd sides: 7 → 3). The two agree on sides
  divisible by 2^k. s = 1 skips it.
* ``dwconv_K`` is a depth-wise K×K convolution (K odd, zero 'same' padding), its own weights per
  stage, with a bias when ``dw_bias`` (the official PixArt/SD checkpoints have none).
* ``gate`` splits channels into halves x1, x2: ``scaled`` = x1·x2·s with s = ``gate_scale``
  (default 1/√C', the paper's printed FP16-safe gate; the official SD code multiplies by
  √(C'/2)), ``sigmoid`` = x1·σ(x2) (the official PixArt blocks).
* ``up_{H×W}`` is bilinear resizing back to H×W (align_corners=False); identity for s = 1.

With ``key_width`` = n > 0 the block adds a branch that is **not in the paper**: taps weighted by the
content of each key (the local form of an attention-free transformer). From q, k, v = one linear map
of z (n channels each), per stage s and channel::

    a_s    = up_{H×W}( pool_s(e^k · v) ⊛ w_s  /  pool_s(e^k) ⊛ w_s )      w_s = e^{θ_s} > 0, K×K
    out   += key_out( concat_s σ(q) · a_s )                               n·|scales| → C

a normalised average of v over the K×K window (of pooled cells at the coarse stages), each key weighted
by a learnt positive tap for its offset times e^{k_j} for its content: attention confined to the window,
whose logits are a per-offset bias plus a key-only score. It costs one depth-wise convolution of 2n
channels per stage. ``key_out`` starts at zero (the block starts as the plain ΔConvBlock) and θ at zero
(uniform taps). On the demo teacher, with n = 96 and the toolkit's trajectory recipe, the all-ΔConv
student's samples move from 20.9 to 22.8 dB PSNR from the teacher's and its noise-prediction error
falls by 57% (``benchmarks/RESULTS.md``, "The key-weighted branch in the product").

How it is computed (the same function, less work): ``proj_out`` splits into one slice W_s per
stage, and a 1×1 projection commutes with bilinear resizing (both linear; the resize acts per
channel and its weights sum to one, so it keeps constants such as biases), so
``y = Σ_s up_{H×W}( W_s · gate(…) )``: each coarse stage is projected at its own resolution
(a quarter of the pixels for s = ½) and then resized, and ``proj_out``'s bias and the global
branch are added once, in the first term. For the default scales (1, ½) this removes 3/16 of the
block's projection FLOPs. Where the compiled CPU kernel runs the block (:func:`ops.folds_biases`), the
biases ride in its passes instead of the matmuls (PyTorch adds a matmul's bias in a pass of its own):
``proj_in``'s as each stage packs its input (pooling averages, so it commutes with the add; the
convolution's zero padding stays zero), ``proj_out``'s with the global branch in the upsample-add.

All primitives go through :mod:`deltadistill.ops` (the single backend dispatch point: PyTorch
reference anywhere, Triton on CUDA when available); ``backend=`` forces one.

Initialisation (chosen for distillation from a frozen teacher):

* ``proj_out`` is zero, and ``global_proj`` is zero here (``convert`` overwrites it with the
  teacher's mean-field attention, see :mod:`deltadistill.conversion`). A freshly built block
  therefore adds nothing to the host's residual stream: the student starts as the teacher with
  this self-attention removed (or replaced by its mean-field value), not as the teacher plus
  random noise in every layer — outputs stay finite and sensible, the first losses are
  bounded by the teacher's attention output, and no layer has to unlearn a random projection.
  This is the zero-init-last-layer rule of ControlNet and adaLN-Zero: ``proj_out`` still gets
  gradients at step 0 (its input is non-zero) and the inner layers follow from step 1.
* ``proj_in`` and the depth-wise kernels are scaled so that, for a unit-variance input (the host
  block's LayerNorm output), the gated features entering ``proj_out`` have about unit variance.
  With the scaled gate that needs Var(x) ≈ √C' (the 1/√C' of the gate would otherwise shrink the
  features by √C' ≈ 24 for PixArt, and ``proj_out`` would need thousands of Adam steps just to
  grow); depth-wise kernels are N(0, 1/K²) so they preserve variance. Biases start at zero.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltadistill import ops

__all__ = ["DeltaConvBlock", "GATES", "scale_level"]

GATES = ("scaled", "sigmoid")


def scale_level(s) -> int:
    """k for a pyramid scale s = 1/2^k (k ≥ 0); raises ValueError for anything else."""
    try:
        frac = Fraction(s).limit_denominator(1 << 20)
    except (TypeError, ValueError):
        raise ValueError(f"pyramid scale {s!r} is not a number; use 1, 0.5, 0.25, ...") from None
    if frac.numerator != 1 or frac.denominator & (frac.denominator - 1) or abs(float(frac) - float(s)) > 1e-9:
        raise ValueError(f"pyramid scale {s!r} is not 1/2^k; use scales such as (1, 0.5) or (1, 0.5, 0.25)")
    return frac.denominator.bit_length() - 1


class _DepthwiseStage(nn.Module):
    """Weights of one pyramid stage: a depth-wise K×K kernel per channel, and optionally a bias."""

    def __init__(self, channels: int, kernel_size: int, level: int, bias: bool = True):
        super().__init__()
        self.level = level  # k of s = 1/2^k
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, kernel_size))  # [C', K, K]
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None  # [C']

    def extra_repr(self) -> str:
        c, k, _ = self.weight.shape
        return f"channels={c}, kernel_size={k}, scale=1/{2 ** self.level}"


class DeltaConvBlock(nn.Module):
    """ΔConvBlock over a channels-last grid ``[B, H, W, C] → [B, H, W, C]`` (see module docstring).

    Args:
        dim: channels C.
        kernel_size: odd K ≥ 3, shared by all stages.
        scales: pyramid stages, each 1/2^k, distinct (default ``(1, 0.5)``).
        inter_ratio: ρ; C·ρ must be an even integer (the gate halves it).
        gate: ``"scaled"`` (x1·x2·gate_scale) or ``"sigmoid"`` (x1·σ(x2)).
        gate_scale: the scaled gate's factor; ``None`` = 1/√(C·ρ) (the paper's text), ``"official"`` =
            √(C·ρ/2) (the official SD1.5/SDXL code), or a number.
        pool: ``"ceil"`` (2×2 average pools) or ``"adaptive"`` (the official code), see above.
        dw_bias: a bias in each depth-wise convolution.
        backend: ``None`` (auto), ``"reference"`` or ``"triton"``; passed to every op.
        key_width: n channels of the key-weighted branch (see the module docstring; not in the paper);
            0 (default) = the paper's block.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        scales=(1, 0.5),
        inter_ratio: float = 0.5,
        gate: str = "scaled",
        backend: str | None = None,
        *,
        gate_scale: float | str | None = None,
        pool: str = "ceil",
        dw_bias: bool = True,
        key_width: int = 0,
    ):
        super().__init__()
        dim, kernel_size = int(dim), int(kernel_size)
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3 (centred 'same' conv), got {kernel_size}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
        if pool not in ops.POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {ops.POOLS}")
        if gate_scale is not None and gate != "scaled":
            raise ValueError(f"gate_scale only applies to the scaled gate (gate={gate!r})")
        if isinstance(gate_scale, str) and gate_scale != "official":
            raise ValueError(f"gate_scale must be a positive number, None (1/√C') or 'official' (√(C'/2)), got {gate_scale!r}")
        if gate_scale is not None and not isinstance(gate_scale, str) and not (math.isfinite(gate_scale) and gate_scale > 0):
            raise ValueError(f"gate_scale must be a positive number, got {gate_scale}")
        scales = tuple(scales)
        if not scales:
            raise ValueError("scales must name at least one pyramid stage, e.g. (1, 0.5)")
        levels = [scale_level(s) for s in scales]
        if len(set(levels)) != len(levels):
            raise ValueError(f"scales {scales} repeat a stage; each 1/2^k may appear once")
        inner_f = dim * float(inter_ratio)
        inner = int(round(inner_f))
        if inner < 2 or abs(inner - inner_f) > 1e-6 or inner % 2:
            raise ValueError(
                f"dim·inter_ratio = {dim}·{inter_ratio} = {inner_f:g} must be an even integer ≥ 2 "
                "(the gate splits it in halves); pick another inter_ratio"
            )
        self.dim, self.kernel_size, self.inter_dim = dim, kernel_size, inner
        self.scales = tuple(float(1.0 / 2**k) for k in levels)
        self.inter_ratio = float(inter_ratio)
        self.gate = gate
        self.backend = backend
        self.pool, self.dw_bias = pool, bool(dw_bias)
        if gate != "scaled":
            self.gate_scale = 1.0
        elif gate_scale is None:
            self.gate_scale = 1.0 / math.sqrt(inner)  # the paper's text
        elif gate_scale == "official":
            self.gate_scale = math.sqrt(inner / 2)  # the official SD code: x1 · (x2 / (C'/2)^-½)
        else:
            self.gate_scale = float(gate_scale)

        self.proj_in = nn.Linear(dim, inner)  # C → C'
        self.stages = nn.ModuleList(_DepthwiseStage(inner, kernel_size, k, bias=dw_bias) for k in levels)
        self.proj_out = nn.Linear(inner // 2 * len(levels), dim)  # C'/2·S → C
        self.global_proj = nn.Linear(dim, dim)  # C → C
        if isinstance(key_width, bool) or int(key_width) != key_width or key_width < 0:
            raise ValueError(f"key_width must be a whole number ≥ 0 (0: no key-weighted branch), got {key_width!r}")
        self.key_width = n = int(key_width)
        if n:
            self.key_qkv = nn.Linear(dim, 3 * n)  # C → q, k, v
            self.key_taps = nn.Parameter(torch.empty(len(levels), n, kernel_size, kernel_size))  # θ: log-taps [S, n, K, K]
            self.key_out = nn.Linear(n * len(levels), dim, bias=False)  # n·S → C (proj_out's bias serves both)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The distillation-friendly initialisation described in the module docstring."""
        # Var(x) = gain² for unit-variance z: √C' for the scaled gate, 1 for the sigmoid gate.
        gain2 = 1.0 / self.gate_scale if self.gate == "scaled" else 1.0
        nn.init.normal_(self.proj_in.weight, std=math.sqrt(gain2 / self.dim))
        nn.init.zeros_(self.proj_in.bias)
        for stage in self.stages:
            nn.init.normal_(stage.weight, std=1.0 / self.kernel_size)
            if stage.bias is not None:
                nn.init.zeros_(stage.bias)
        for lin in (self.proj_out, self.global_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.key_width:
            self.key_qkv.reset_parameters()  # PyTorch's default: U(±1/√C)
            nn.init.zeros_(self.key_taps)  # uniform taps
            nn.init.zeros_(self.key_out.weight)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, scales={self.scales}, "
            f"inter_ratio={self.inter_ratio:g}, gate={self.gate!r}, gate_scale={self.gate_scale:.4g}, pool={self.pool!r}, "
            f"dw_bias={self.dw_bias}" + (f", key_width={self.key_width}" if self.key_width else "")
        )

    def _check(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[-1] != self.dim:
            raise ValueError(f"DeltaConvBlock expects [B, H, W, {self.dim}] (channels last), got {tuple(z.shape)}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z)
        glob = self.global_proj(z.mean(dim=(1, 2)))  # [B, C]
        # the global branch rides in proj_out's bias: one pass over the output instead of two
        out = self._mix(z, self.proj_out.bias + glob)
        return out + self._keyed(z) if self.key_width else out

    def local(self, z: torch.Tensor) -> torch.Tensor:
        """The local branches alone (no global branch): ``proj_out(concat_s g_s)`` (+ the key-weighted branch),
        [B, H, W, C]."""
        self._check(z)
        out = self._mix(z, self.proj_out.bias.expand(z.shape[0], -1))
        return out + self._keyed(z) if self.key_width else out

    def _keyed(self, z: torch.Tensor) -> torch.Tensor:
        """The key-weighted branch ``key_out(concat_s σ(q)·a_s)`` (module docstring), [B, H, W, C]."""
        h, w = z.shape[1:3]
        n, be = self.key_width, self.backend
        q, k, v = self.key_qkv(z).split(n, dim=-1)  # [B, H, W, n] each
        # the ratio runs in float32 whatever the model's dtype: fp16 would round e^k to 0 a few units below the
        # largest key (0/0), and sums of up to K² weighted terms could overflow it
        dt = torch.promote_types(k.dtype, torch.float32)
        k, v = k.to(dt), v.to(dt)
        # the grid's largest key cancels in the ratio (so it carries no gradient); the floor keeps e^k a normal
        # float32 (no 0/0 in a window whose keys all sit far below it)
        e = torch.exp((k - k.amax(dim=(1, 2), keepdim=True).detach()).clamp_min(-60.0))
        x = torch.cat([e * v, e], dim=-1)  # numerator and denominator: one convolution of 2n channels per stage
        gate = torch.sigmoid(q)
        taps = self.key_taps.to(dt).exp()  # [S, n, K, K], positive
        out = None
        for i, stage in enumerate(self.stages):
            xp = x
            if stage.level > 0 and self.pool == "ceil":
                for _ in range(stage.level):
                    xp = ops.avgpool2_nhwc(xp, backend=be)
            elif stage.level > 0:
                xp = ops.adaptive_pool_nhwc(xp, ops.adaptive_size(h, w, stage.level), backend=be)
            t = taps[i]
            nd = ops.dwconv_nhwc(xp.contiguous(), torch.cat([t, t]), None, backend=be)  # [B, h_s, w_s, 2n]
            a = nd[..., :n] / nd[..., n:]
            if stage.level > 0:
                a = ops.upsample_bilinear_nhwc(a.contiguous(), (h, w), backend=be)
            y = F.linear(gate * a.to(gate.dtype), self.key_out.weight[:, i * n:(i + 1) * n])
            out = y if out is None else out + y
        return out

    def _mix(self, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``proj_out(concat_s g_s)`` with per-sample bias [B, C], each stage projected at its own size."""
        b, h, w, _ = z.shape
        half = self.inter_dim // 2
        out = None
        order = sorted(range(len(self.stages)), key=lambda i: self.stages[i].level)
        # the CPU kernel adds the bias in its first upsample-add pass (PyTorch's matmul would add it in a pass of
        # its own); elsewhere the output is born from a projection with its bias, full-resolution stages first
        late = len(order) > 1 and self.stages[order[0]].level == 0 and ops.folds_biases(z, self.backend)
        feats = self._stages(z)
        for i in order:
            y = _linear(feats[i], self.proj_out.weight[:, i * half:(i + 1) * half], bias if out is None and not late else None)
            if out is None and self.stages[i].level > 0:  # no full-resolution stage: the output starts resized
                out = ops.upsample_bilinear_nhwc(y, (h, w), backend=self.backend).contiguous()
            elif out is None:
                out = y.contiguous()
            else:  # out += up_{H×W}(y) (+ the bias, once): one fused pass with the CPU kernel
                out = ops.upsample_add(out, y, backend=self.backend, bias=bias if late else None)  # [B, H, W, C]
                late = False
        return out  # [B, H, W, C]

    def _stages(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``gate(dwconv_K(pool_s(x)))`` per stage at its own resolution, each [B, h_s, w_s, C'/2]."""
        h, w = z.shape[1:3]
        be, mode, scale = self.backend, self.gate, self.gate_scale
        # with the CPU kernel proj_in's bias is added while each stage packs its input, not in a pass of its own
        # (not where proj_in is wrapped or hooked, e.g. by an adapter: then it runs as the module it is)
        plain = type(self.proj_in) is nn.Linear and not (self.proj_in._forward_hooks or self.proj_in._forward_pre_hooks)
        in_bias = self.proj_in.bias if plain and ops.folds_biases(z, be) else None
        x = self.proj_in(z) if in_bias is None else F.linear(z, self.proj_in.weight)  # [B, H, W, C'] (+ in_bias)
        feats = []
        for stage in self.stages:
            xp, pool, size = x, None, None
            if stage.level > 0 and self.pool == "ceil":
                for _ in range(stage.level - 1):
                    xp = ops.avgpool2_nhwc(xp, backend=be)  # [B, ⌈H/2⌉, ⌈W/2⌉, C'], repeated
                pool = "ceil"
            elif stage.level > 0:
                pool, size = "adaptive", ops.adaptive_size(h, w, stage.level)  # (⌊H·s⌋, ⌊W·s⌋)
            # [pool →] conv → gate, fused on GPU: [B, h_k, w_k, C'/2]
            feats.append(ops.stage(xp, stage.weight, stage.bias, mode, scale, pool=pool, size=size, backend=be,
                                   in_bias=in_bias))
        return feats

    def _pyramid(self, z: torch.Tensor) -> torch.Tensor:
        """``concat_s g_s``: the gated stages resized to H×W, [B, H, W, C'/2·S] (the definition; tests)."""
        h, w = z.shape[1:3]
        feats = [g if st.level == 0 else ops.upsample_bilinear_nhwc(g, (h, w), backend=self.backend)
                 for st, g in zip(self.stages, self._stages(z))]
        return torch.cat(feats, dim=-1)


def _linear(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``g @ weightᵀ (+ bias[b])`` over channels-last ``g`` [B, h, w, Ci]; bias is per sample, [B, C]."""
    if bias is None:
        return F.linear(g, weight)
    b, h, w, ci = g.shape
    if b == 1:
        return F.linear(g, weight, bias[0])
    out = torch.baddbmm(bias[:, None, :], g.reshape(b, h * w, ci), weight.t().expand(b, -1, -1))
    return out.view(b, h, w, weight.shape[0])
