"""A linear-attention student of LinFusion's form: the baseline the ΔConvBlock is compared with.

LinFusion (Liu et al., 2024) replaces softmax self-attention with non-causal linear attention and
distils it from the original model. Per head, with queries q_i, keys k_j, values v_j and a positive
feature map φ:

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j))

so the cost is linear in the number of tokens N (the sums over j are shared by every query). Here
φ(x) = elu(x + M x) + 1, with M a learned d×d map per block (zero at start, so φ starts as
elu + 1), and the q/k/v/out projections start as copies of the teacher's. It takes and returns a
token grid [B, H', W', C] like :class:`~deltadistill.block.DeltaConvBlock`, so conversion, the
trajectory recipe, saving and loading treat it as one more block kind (``student="linear"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearAttentionBlock", "linear_attention"]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised linear attention of positive features ``q``, ``k`` [B, h, N, d] over ``v`` [B, h, N, e]."""
    kv = k.transpose(-1, -2) @ v  # [B, h, d, e]
    norm = q @ k.sum(dim=-2, keepdim=True).transpose(-1, -2)  # [B, h, N, 1]
    return (q @ kv) / norm.clamp_min(eps)


class LinearAttentionBlock(nn.Module):
    """``[B, H', W', C] → [B, H', W', C]`` by linear attention (see the module docstring)."""

    kind = "linear"

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, bias: bool = True):
        super().__init__()
        head_dim = head_dim or dim // heads
        if heads < 1 or head_dim < 1:
            raise ValueError(f"heads and head_dim must be >= 1, got {heads}, {head_dim}")
        self.dim, self.heads, self.head_dim = int(dim), int(heads), int(head_dim)
        inner = self.heads * self.head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        self.kernel_q = nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.kernel_k = nn.Linear(self.head_dim, self.head_dim, bias=False)
        nn.init.zeros_(self.kernel_q.weight)
        nn.init.zeros_(self.kernel_k.weight)

    @property
    def kernel_size(self) -> None:  # a ΔConvBlock's K; a linear attention has none
        return None

    def settings(self) -> dict:
        """What config.json records to rebuild the block."""
        return {"student": self.kind, "heads": self.heads, "head_dim": self.head_dim, "bias": self.to_q.bias is not None}

    @classmethod
    @torch.no_grad()
    def from_attention(cls, attn: nn.Module, name: str = "attention") -> "LinearAttentionBlock":
        """A block whose projections are copies of a plain diffusers ``Attention``'s."""
        to_out = attn.to_out[0] if isinstance(attn.to_out, (nn.ModuleList, nn.Sequential)) else attn.to_out
        plain = (getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
                 and not getattr(attn, "residual_connection", False)
                 and float(getattr(attn, "rescale_output_factor", 1.0)) == 1.0
                 and getattr(attn, "group_norm", None) is None and getattr(attn, "spatial_norm", None) is None)
        if not plain:
            raise ValueError(f"{name}: the linear-attention student copies plain attention only (this one has "
                             "q/k norms, a residual connection, an output rescale or a group/spatial norm)")
        heads = int(attn.heads)
        block = cls(attn.to_q.in_features, heads, attn.to_q.out_features // heads, bias=attn.to_q.bias is not None)
        if attn.to_q.weight.is_meta:  # a dry run (deltadistill train --estimate): shapes only
            return block
        for mine, theirs in ((block.to_q, attn.to_q), (block.to_k, attn.to_k), (block.to_v, attn.to_v),
                             (block.to_out, to_out)):
            mine.weight.copy_(theirs.weight)
            if mine.bias is not None and theirs.bias is not None:
                mine.bias.copy_(theirs.bias)
        return block

    def _features(self, x: torch.Tensor, kernel: nn.Linear) -> torch.Tensor:
        return F.elu(x + kernel(x)) + 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, h, w, c = z.shape
        x = z.reshape(b, h * w, c)

        def split(t):  # [B, N, h·d] → [B, h, N, d]
            return t.view(b, h * w, self.heads, self.head_dim).transpose(1, 2)

        acc = torch.promote_types(x.dtype, torch.float32)  # the sums over N in fp32 at least
        q = self._features(split(self.to_q(x)), self.kernel_q).to(acc)
        k = self._features(split(self.to_k(x)), self.kernel_k).to(acc)
        v = split(self.to_v(x)).to(acc)
        out = linear_attention(q, k, v).to(x.dtype)  # [B, h, N, d]
        out = out.transpose(1, 2).reshape(b, h * w, self.heads * self.head_dim)
        return self.to_out(out).reshape(b, h, w, c)
