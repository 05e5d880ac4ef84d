"""Distillation losses (SPEC §3): feature loss, Min-SNR-weighted output loss, their sum.

Notation: ᾱ_t is the scheduler's cumulative alpha, z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε, and
SNR(t) = ᾱ_t / (1 − ᾱ_t). ε̃ is the teacher's noise prediction, ε̂ the student's.

* Feature loss ``L_f = Σ_layers MSE(student block output, teacher self-attention output)``,
  each MSE a mean over batch, tokens and channels. :class:`FeatureTaps` collects both outputs
  with forward hooks on the modules of the same qualified name in the two denoisers.
* Output loss ``L_z = mean_b w(t_b) · (‖ε̃_b − ε̂_b‖² + ‖ε_b − ε̂_b‖²)``, each ‖·‖² a mean over
  the latent's elements of sample b (so values are comparable across resolutions).
* ``L = L_z + β·L_f`` with β = 0.001 by default.

Min-SNR-γ weighting, γ = 5 by default (:func:`snr_weight`):

* ``"standard"`` (default): ``w = min(SNR, γ) / SNR``. This is Min-SNR-γ of Hang et al. (2023)
  rewritten for ε-prediction: the x₀-space weight min(SNR, γ) divided by SNR, because an ε
  error e corresponds to an x₀ error e/√SNR. It is 1 for noisy steps (SNR ≤ γ) and γ/SNR < 1
  for nearly clean steps, i.e. it *down-weights the low-noise end*, where ε is hard to predict
  and its gradient conflicts with the other timesteps.
* ``"paper"``: ``w = min(γ·SNR, 1)``, the formula as printed in the ΔConvFusion paper. It is 1
  for SNR ≥ 1/γ and γ·SNR < 1 for very noisy steps, i.e. it *down-weights the high-noise end*
  instead: the opposite emphasis of the standard rule. We keep it as an option for
  reproducing the paper; for the standard behaviour use the default.
* ``"none"``: ``w = 1``, what the official ΔConvFusion training code does.

Model outputs are first turned into ε predictions (:func:`to_epsilon`): learned-sigma outputs
(PixArt and DiT have ``out_channels = 2 × in_channels``) keep the first half; ``v_prediction``
uses ε = √ᾱ·v + √(1−ᾱ)·z_t; ``sample`` (x₀) prediction uses ε = (z_t − √ᾱ·x̂₀)/√(1−ᾱ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SNR_WEIGHTINGS",
    "snr",
    "snr_weight",
    "to_epsilon",
    "output_loss",
    "FeatureTaps",
    "feature_loss",
    "LossParts",
    "distill_loss",
]

SNR_WEIGHTINGS = ("standard", "paper", "none")


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """ᾱ_t for integer timesteps t [B], shaped [B, 1, ...] to broadcast over ``ndim`` dims (float32)."""
    a = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()]  # [B]
    return a.reshape(-1, *([1] * (ndim - 1)))


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for integer timesteps t [B] → [B] (float32)."""
    a = _gather(alphas_cumprod, t, 1)
    return a / (1.0 - a).clamp_min(1e-12)


def snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0, mode: str = "standard") -> torch.Tensor:
    """Min-SNR-γ weight w(t) [B] for ε-prediction losses; see the module docstring for the two modes."""
    if mode not in SNR_WEIGHTINGS:
        raise ValueError(f"unknown SNR weighting {mode!r}; choose one of {SNR_WEIGHTINGS}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    s = snr(alphas_cumprod, t)  # [B]
    if mode == "none":  # the official code: plain MSE
        return torch.ones_like(s)
    if mode == "standard":
        return torch.minimum(s, torch.full_like(s, gamma)) / s.clamp_min(1e-12)
    return torch.clamp(gamma * s, max=1.0)


def to_epsilon(
    output: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Model output [B, C_out, h, w] → ε prediction [B, C, h, w] (float32), C = z_t's channels.

    ``C_out = 2C`` (learned sigma) keeps the first C channels; other mismatches raise.
    """
    c = z_t.shape[1]
    if output.shape[1] == 2 * c:
        output = output[:, :c]  # [B, 2C, h, w] → [B, C, h, w]: drop the learned variance
    elif output.shape[1] != c:
        raise ValueError(f"denoiser output has {output.shape[1]} channels; expected {c} or {2 * c} (learned sigma)")
    output = output.float()
    if prediction_type == "epsilon":
        return output
    a = _gather(alphas_cumprod, t, output.ndim)  # [B, 1, 1, 1]
    sa, s1a = a.sqrt(), (1.0 - a).clamp_min(1e-12).sqrt()
    if prediction_type == "v_prediction":
        return sa * output + s1a * z_t.float()
    if prediction_type == "sample":
        return (z_t.float() - sa * output) / s1a
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def output_loss(
    eps_student: torch.Tensor,
    eps_teacher: torch.Tensor,
    eps_true: torch.Tensor,
    weight: torch.Tensor,
    return_parts: bool = False,
):
    """L_z = mean_b w_b·(‖ε̃ − ε̂‖² + ‖ε − ε̂‖²); tensors [B, C, h, w], weight [B] → scalar.

    With ``return_parts`` also returns the two weighted terms (teacher gap, ground-truth error).
    """
    dims = tuple(range(1, eps_student.ndim))
    w = weight.float()
    to_teacher = (w * (eps_teacher.detach().float() - eps_student.float()).pow(2).mean(dim=dims)).mean()
    to_truth = (w * (eps_true.float() - eps_student.float()).pow(2).mean(dim=dims)).mean()
    total = to_teacher + to_truth
    return (total, to_teacher, to_truth) if return_parts else total


class FeatureTaps:
    """Forward hooks that record same-named tensors in a teacher and a student denoiser.

    ``names`` are the student's replaced self-attention sites. What is compared per site
    (``targets``, default: the site's own output):

    * ``(module name, "output")``: the output of that module — the self-attention output of the
      teacher vs the ΔConvBlock output of the student (``feature_target="attention"``);
    * ``(module name, "input")``: the first input of that module, e.g. the host block's residual
      stream right after the self-attention step, hidden + gate · output (``"residual"``, what the
      official code compares; the family adapter names the module: ``Family.residual_tap``).

    Use as a context manager; hooks are removed on exit, even on error::

        with FeatureTaps(teacher, student, names) as taps:
            teacher(...); student(...)
            lf = taps.loss()    # Σ_sites MSE(student, teacher)

    Tensors are kept only until :meth:`clear` (called by :meth:`loss`) so that memory does not grow.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, names, targets: dict | None = None):
        self.names = list(names)
        if not self.names:
            raise ValueError("FeatureTaps needs at least one module name; the student has no replaced layers")
        self.targets = {n: (targets or {}).get(n, (n, "output")) for n in self.names}
        self.teacher, self.student = teacher, student
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.student_out: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, store: dict, name: str):
        def fn(module, args, output):
            store[name] = output[0] if isinstance(output, (tuple, list)) else output  # [B, N, C]

        return fn

    def _pre_hook(self, store: dict, name: str):
        def fn(module, args, kwargs):
            store[name] = args[0] if args else kwargs["hidden_states"]  # [B, N, C]

        return fn

    def __enter__(self) -> "FeatureTaps":
        if self._handles:
            raise RuntimeError("FeatureTaps is already active; exit it before entering again")
        try:
            for name in self.names:
                module, kind = self.targets[name]
                for model, store in ((self.teacher, self.teacher_out), (self.student, self.student_out)):
                    mod = model.get_submodule(module)
                    if kind == "input":
                        self._handles.append(mod.register_forward_pre_hook(self._pre_hook(store, name), with_kwargs=True))
                    else:
                        self._handles.append(mod.register_forward_hook(self._hook(store, name)))
        except AttributeError as exc:
            self.__exit__(None, None, None)
            raise ValueError(f"cannot tap module: {exc}; teacher and student must share module names") from None
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.teacher_out.clear()
        self.student_out.clear()

    def loss(self) -> torch.Tensor:
        """Σ over tapped sites of MSE(student, teacher.detach()) (float32 scalar); then clears."""
        missing = [n for n in self.names if n not in self.teacher_out or n not in self.student_out]
        if missing:
            raise RuntimeError(
                f"{len(missing)} tapped layer(s) produced no output this step (e.g. {missing[0]!r}); "
                "run both teacher and student forward passes before taking the loss"
            )
        total = feature_loss([self.student_out[n] for n in self.names], [self.teacher_out[n] for n in self.names])
        self.clear()
        return total


def feature_targets(mode: str, teacher: nn.Module, names) -> dict:
    """FeatureTaps ``targets`` for ``feature_target`` = ``"attention"`` (the sites' outputs) or ``"residual"``."""
    if mode == "attention":
        return {}
    from attnprobe.core.family import family_of, find_self_attention

    family = family_of(teacher)
    sites = {s.name: s for s in find_self_attention(teacher)}
    return {n: (family.residual_tap(sites[n]), "input") for n in names}


def feature_loss(student_feats, teacher_feats) -> torch.Tensor:
    """Σ_i MSE(student_i, teacher_i) over paired [B, N, C] tensors (teacher detached, float32)."""
    total = None
    for s, t in zip(student_feats, teacher_feats, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"feature shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        term = F.mse_loss(s.float(), t.detach().float())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("feature_loss needs at least one layer")
    return total


@dataclass
class LossParts:
    """The scalar pieces of one step's loss (tensors; ``total`` carries the graph)."""

    total: torch.Tensor
    output: torch.Tensor  # L_z
    feature: torch.Tensor  # L_f (before β)
    gap: torch.Tensor  # the teacher term of L_z, mean_b w_b·‖ε̃ − ε̂‖² (0 when the student matches)


def distill_loss(
    *,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    noise: torch.Tensor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    feature: torch.Tensor,
    prediction_type: str = "epsilon",
    beta: float = 1e-3,
    gamma: float = 5.0,
    weighting: str = "standard",
) -> LossParts:
    """L = L_z + β·L_f from raw denoiser outputs [B, C_out, h, w] and a precomputed L_f."""
    eps_s = to_epsilon(student_out, z_t, t, alphas_cumprod, prediction_type)
    with torch.no_grad():
        eps_t = to_epsilon(teacher_out, z_t, t, alphas_cumprod, prediction_type)
    w = snr_weight(alphas_cumprod, t, gamma, weighting)  # [B]
    lz, gap, _ = output_loss(eps_s, eps_t, noise, w, return_parts=True)
    return LossParts(total=lz + beta * feature, output=lz, feature=feature, gap=gap.detach())
