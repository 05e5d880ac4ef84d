"""The linear-attention peer of the bench: LinFusion's generalised linear attention (random weights)."""
from __future__ import annotations


import torch
import torch.nn as nn



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
