"""Where the demo student's gap to its teacher is: block capacity and fine-tune probes.

Usage:
    python benchmarks/distill_probes.py capacity '{"base": {}, "r1": {"inter_ratio": 1.0}, "s3": {"scales": [1, 0.5, 0.25]}}'
    python benchmarks/distill_probes.py finetune '{"regressed": {}, "base": {}, "onp1": {"onpolicy": 1}, "split": {"split": 1}, "s600": {"steps": 600}, "reg1": {"reg_w": 1.0}}'
    python benchmarks/distill_probes.py layers '{"blocks0-4": [0, 1, 2, 3, 4], "blocks5-7": [5, 6, 7]}'
    python benchmarks/distill_probes.py speed '{"all": null, "blocks3-7": [3, 4, 5, 6, 7]}' --resolution 1024
    python benchmarks/distill_probes.py mixing '{"student 0-4": [0, 5], "student 5-19": [5, 20]}'
    python benchmarks/distill_probes.py neighbourhood '{"report": "report", "k3": 3, "early3": [3, 3, 3, null, null, null, null, null]}'

Faster than ``distill_demo.py`` (which runs the product end to end for every row): the teacher's
trajectories (14 demo captions × seeds 1000, 1001 for training, seed 1002 held out; 20 steps) are
recorded once and cached in ``--work``; kernel sizes are the demo report's (3, 3, 5, 9, 11, 13, 13, 13).

* ``capacity``: for each block setting (``convert`` keyword arguments), the teacher-forced
  regression of the trajectory recipe (600 steps, batch 32, AdamW 2e-3, warm-up 50 then cosine,
  clip 1 per block) from the mean-field initialisation; prints the summed per-layer MSE on held-out
  states (every 7th) before and after, and per layer the share of its mean-field error left. A larger block that fitted the layers better would show here.
  A variant may also set ``augment`` (symmetries, as ``--augment``), ``wd`` (AdamW weight decay), ``film`` = n (a
  timestep-dependent scale and shift of ``proj_in``'s output per channel, n knots over t, zero at the start) or
  ``tmix`` = n (n copies of each block at t = 0 … 1000, outputs blended linearly in t) or ``keyw`` = n (a branch of n
  channels beside each block whose taps are weighted by each key position's content and normalised:
  :class:`KeyWeighted`; with ``keyw_fixed`` = 1 every key weighs alike: the same branch with fixed taps).
* ``finetune``: one regression as above (cached), then from it each fine-tune variant: ``steps``
  (default 300), ``lr`` 5e-4, warm-up 20 then cosine, batch 4 states + their CFG partners, output MSE
  + ``cfg_w`` (0.25) × guided-output MSE (``out_w`` scales the first term; each CFG pair's rows in either
  order, as the recipe before 2026-12-06 afternoon, unless ``orient`` = 1: [cond; uncond], so that the guided
  term is the sampler's u + w·(c − u)); ``lowf`` = λ adds λ × the MSE of the guided difference averaged over
  ``lowp`` × ``lowp`` (4) latent pixels (its coarse part, where a sample's layout lives); ``minsnr`` = γ draws a state
  with probability ∝ min(SNR, γ) / SNR (SNR = ᾱ / (1 − ᾱ) at its timestep: Min-SNR weighting for an ε-prediction
  loss, which draws the clean end less often); ``chw`` = a list of one weight per latent channel, or ``"vae"``
  (the demo decoder's squared pixel change per squared latent change in that channel), weights both MSE terms per
  channel (normalised to mean 1); ``reg_w`` adds the regression loss; ``early`` = a draws
  a state with probability ∝ 1 + a · t / 1000 (t its timestep: noisy states more often); ``full``
  = m also trains the rest of the student (frozen in the recipe) at m × lr; ``hard`` = h draws a
  state with probability ∝ (the student's error on it when the fine-tune starts) ** h; ``ema`` = d
  ends with an exponential moving average (decay d per step) of the trained weights; ``split`` runs the
  schedule twice over half the steps (the control for ``onpolicy``); ``fseeds`` = n fine-tunes on the teacher's
  sampling calls for seeds 2000 … 2000 + n − 1 per caption instead of the regression's trajectories (recorded
  without layer tensors, cached in ``--work``); ``onpolicy`` = n runs half the
  steps, then samples the *student* on the training captions for n seeds, labels those states
  with the teacher's outputs and runs the other half on recorded + student states. Prints the
  held-out ε error (every 5th state), the held-out error of the guided prediction u + w·(c − u) (those
  states with their CFG partners, and split into its coarse part over 4 × 4 latent pixels and the rest; the same on every 10th training state beside it) and the PSNR of the student's samples against the teacher's
  (14 captions × ``--eval-seeds``, default 0, 20 steps; with 0,1,2,3 the images of ``distill_demo.py``).
* ``layers``: which blocks cost the dB. For each list of block indices only those self-attention
  layers are converted (the others keep the teacher's attention), then the recipe as above
  (600 regression steps on those layers, 300 fine-tune steps); prints ε error and PSNR. A variant
  may also be ``{"only": [0], "k": 7, ...}``: block settings for the converted layers (``k`` an
  odd kernel size for all of them).
* ``mixing``: at which sampling steps the student's errors change the samples. The recipe's
  student (regression + the 300-step fine-tune, cached in ``--work``) denoises the sampling steps
  [a, b) of each variant and the teacher the others (20 steps, step 0 the noisiest); prints the
  PSNR against the teacher's samples as in ``finetune``.
* ``neighbourhood``: does content-dependent attention inside the report's windows keep the
  teacher? The teacher itself, each self-attention restricted to its K×K neighbourhood (no
  training; :func:`deltadistill.baselines.neighbourhood_attention`): a variant is one K for every
  layer, ``"report"`` (the demo report's sizes) or a list of one K per layer (``null``: that layer
  keeps full attention); prints the held-out ε error and the PSNR as in ``finetune``.
* ``finetune`` rollout stage (``rollouts.py``): ``rsteps`` = n adds, after the fine-tune, n steps whose loss is
  the MSE of the latent the student reaches after ``rk`` (4) sampling steps from the teacher's latent at a
  random step ≥ ``rstart_min`` (4), ``rbs`` (4) training trajectories per step, lr ``rlr`` (2e-4), warm-up 10
  then cosine; ``rmix`` = m adds m × the fine-tune's loss (4 states with their CFG partners, guided weight
  4). Every finetune row also prints the final-latent error when the student samples the held-out
  trajectories from the teacher's noise (and the first 14 training trajectories).
* ``--regress-cfg`` w: the cached regression draws 16 CFG pairs per batch (not 32 states) and adds w × the
  MSE of each layer's guided output (the recipe's ``--regress-cfg-loss``).
* Every PSNR printed also names the three captions with the largest share of the squared error
  (they set the pooled PSNR); ``--worst-figure PREFIX`` saves, per variant, the 8 lowest-PSNR
  samples beside the teacher's as PREFIX-variant.png.
* ``speed``: what a partly converted student saves. For each list of block indices (``null``: all)
  the denoiser call at ``--resolution`` px (random latents, as ``deltadistill bench --step``) of
  the student with only those layers converted, interleaved with the teacher's, median of
  ``--repeats`` rounds; prints both and the speed-up. A variant may also be ``{"only": null or a list,
  block settings}``, e.g. ``{"only": null, "key_width": 96}`` (no trajectories are recorded for this probe).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

KERNELS = [3, 3, 5, 9, 11, 13, 13, 13]  # the demo report's recommendation per block
EVAL_SEEDS = [0]  # --eval-seeds
AUGMENT = 1  # --augment
REGRESS_CFG = 0.0  # --regress-cfg
BLOCK: dict = {}  # --block: ΔConvBlock settings of every student (a variant's own settings override them)
TCTX: dict = {"t": None}  # the timesteps of the batch the blocks are called on (for ``film`` students)


def coarse_fine(d: torch.Tensor, pool: int = 4) -> tuple[float, float]:
    """Mean squares of ``d`` [N, C, H, W] split into its coarse part (``d`` averaged over ``pool`` × ``pool`` pixels,
    spread back over them) and the rest. Block averaging is an orthogonal projection: the two add up to mean(d²)."""
    low = F.interpolate(F.avg_pool2d(d, pool), scale_factor=pool, mode="nearest")
    return float(low.pow(2).mean()), float((d - low).pow(2).mean())


def decoder_channel_gain(decode, latents: torch.Tensor, scale: float, eps: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Per latent channel c, the decoded image's squared change per unit of squared change of the *scaled* latent
    (the denoiser's space, ``scale`` × the VAE's latent) in channel c alone: a random perturbation of size ``eps``
    in that channel, decoded about ``latents`` (unscaled). Finite differences of a smooth decoder, so for small
    ``eps`` this is the mean of ‖J_c v‖² / ‖v‖² over random v, J_c the decoder's Jacobian in channel c."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = decode(latents)
        gains = []
        for c in range(latents.shape[1]):
            v = torch.zeros_like(latents)
            v[:, c] = torch.randn(latents[:, c].shape, generator=g) * eps
            gains.append(float((decode(latents + v) - base).pow(2).sum() / v.pow(2).sum()) / scale ** 2)
    return torch.tensor(gains, dtype=torch.float64)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR weights min(SNR, γ) / SNR of an ε-prediction loss, SNR = ᾱ / (1 − ᾱ) at each timestep: 1 where the
    SNR is at most γ, less at the clean end."""
    abar = alphas_cumprod[timesteps.long().clamp(0, len(alphas_cumprod) - 1)].double()
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / snr).float()


class FiLM(torch.nn.Module):
    """Timestep-dependent per-channel scale and shift of ``proj_in``'s output: a table of ``knots`` values over
    t ∈ [0, 1000], linearly interpolated, zero at the start (the block unchanged)."""

    def __init__(self, channels: int, knots: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(knots, channels))
        self.shift = torch.nn.Parameter(torch.zeros(knots, channels))

    def forward(self, x):
        n = self.scale.shape[0]
        pos = (TCTX["t"].to(x.device).float() / 1000 * (n - 1)).clamp(0, n - 1)
        i0 = pos.floor().long().clamp(max=n - 2)
        f = (pos - i0)[:, None]
        s = self.scale[i0] * (1 - f) + self.scale[i0 + 1] * f
        b = self.shift[i0] * (1 - f) + self.shift[i0 + 1] * f
        return x * (1 + s[:, None, None]) + b[:, None, None]


class Blend(torch.nn.Module):
    """``knots`` copies of a block at t = 0 … 1000; the output is their outputs interpolated linearly in t
    (hat weights), so every state trains the two copies around its timestep."""

    def __init__(self, block, knots: int):
        super().__init__()
        self.copies = torch.nn.ModuleList(copy.deepcopy(block) for _ in range(knots))

    def forward(self, z):
        n = len(self.copies)
        pos = (TCTX["t"].to(z.device).float() / 1000 * (n - 1)).clamp(0, n - 1)
        out = 0
        for m, blk in enumerate(self.copies):
            w = (1 - (pos - m).abs()).clamp(min=0)
            if bool((w > 0).any()):
                out = out + w[:, None, None, None] * blk(z)
        return out


class KeyWeighted(torch.nn.Module):
    """A ΔConvBlock plus a branch whose taps are weighted by the content of each key position and normalised
    (the form of an attention-free transformer's local variant): per channel c and pyramid stage,
    σ(q_i) · Σ_j w_{i−j} e^{k_j} v_j / Σ_j w_{i−j} e^{k_j}, with w = e^{log-taps} > 0 (K × K, 'same', zero padding,
    which the normalisation discounts), q, k, v from one linear map of z, the ½ stage on 2 × 2-pooled k and v and
    upsampled bilinearly. Two depth-wise convolutions per stage, so it runs at convolution speed; its output
    projection starts at zero, so the student starts as the plain block. A probe: does weighting taps by content
    close the gap that fixed taps leave?"""

    def __init__(self, block, width: int, kernel_size: int, content: bool = True):
        super().__init__()
        self.block, self.width, self.k, self.content = block, width, kernel_size, content
        self.qkv = torch.nn.Linear(block.dim, 3 * width)
        self.logw = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(width, 1, kernel_size, kernel_size))
                                           for _ in range(2))
        self.out = torch.nn.Linear(2 * width, block.dim)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, z):
        base = self.block(z)
        h, w = z.shape[1:3]
        q, k, v = self.qkv(z).permute(0, 3, 1, 2).chunk(3, dim=1)  # [B, width, H, W] each
        feats = []
        for level, logw in enumerate(self.logw):
            ks, vs = (k, v) if level == 0 else (F.avg_pool2d(k, 2, ceil_mode=True), F.avg_pool2d(v, 2, ceil_mode=True))
            # the max cancels in the ratio; without ``content`` every key weighs alike (the control: fixed taps)
            e = torch.exp(ks - ks.amax(dim=(2, 3), keepdim=True)) if self.content else torch.ones_like(ks)
            taps = logw.exp()
            num = F.conv2d(e * vs, taps, padding=self.k // 2, groups=self.width)
            den = F.conv2d(e, taps, padding=self.k // 2, groups=self.width)
            r = num / den
            if level:
                r = F.interpolate(r, size=(h, w), mode="bilinear", align_corners=False)
            feats.append(torch.sigmoid(q) * r)
        return base + self.out(torch.cat(feats, dim=1).permute(0, 2, 3, 1))


def attach_film(student, blocks, knots: int) -> None:
    """Give each block a :class:`FiLM` on ``proj_in``'s output, fed the call's timesteps."""
    for b in blocks:
        b.film = FiLM(b.inter_dim, knots)
        b.proj_in.register_forward_hook(lambda m, i, o, b=b: b.film(o))
    pass_timesteps(student)


def pass_timesteps(student) -> None:
    """A pre-hook on the student that puts each call's timesteps (one per sample) into ``TCTX``."""

    def set_t(module, args, kwargs):
        t = torch.as_tensor(kwargs["timestep"]).flatten()
        n = kwargs["hidden_states"].shape[0]
        TCTX["t"] = t.expand(n) if t.numel() == 1 else t

    student.register_forward_pre_hook(set_t, with_kwargs=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=["capacity", "finetune", "layers", "speed", "mixing", "neighbourhood", "tbins",
                                      "experts", "fit"])
    ap.add_argument("variants", help="JSON object: variant name → settings (see the module docstring)")
    ap.add_argument("--steps", type=int, default=600, help="regression steps")
    ap.add_argument("--work", default="/tmp/distill_probes", help="cache of trajectories, teacher images, regressed blocks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worst-figure", default=None, help="path prefix: save each variant's 8 lowest-PSNR samples beside the teacher's")
    ap.add_argument("--augment", type=int, default=1, choices=range(1, 9), metavar="N",
                    help="the cached regression draws each batch moved by one of the first N symmetries of the square "
                         "(1: none, 8: all turns and flips; finetune, mixing)")
    ap.add_argument("--regress-cfg", type=float, default=0.0,
                    help="the cached regression draws 16 CFG pairs per batch and adds this weight × the guided layer-output MSE")
    ap.add_argument("--block", default="{}", help='JSON: ΔConvBlock settings of every student, e.g. \'{"gate": "sigmoid"}\'')
    ap.add_argument("--eval-seeds", default="0", help="comma-separated sampling seeds of the PSNR (14 captions each)")
    ap.add_argument("--resolution", type=int, default=1024, help="speed: image side in pixels")
    ap.add_argument("--repeats", type=int, default=5, help="speed: timed rounds (median reported)")
    return ap.parse_args(argv)


def cosine(w, n):
    return lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * min(1, (s - w) / max(1, n - w))))


class Probe:
    def __init__(self, work: str, data: bool = True):
        from attnprobe.core.family import denoiser_of, find_self_attention
        from attnprobe.core.registry import load_pipeline
        from attnprobe.demo import DEMO_PROMPTS
        from deltadistill.trajectory import record_trajectories

        os.makedirs(work, exist_ok=True)
        self.work = work
        self.worst_figure = None
        self.pipe, _ = load_pipeline("demo")
        den = denoiser_of(self.pipe)
        self.sites = find_self_attention(den)
        self.prompts = list(DEMO_PROMPTS)
        cache = os.path.join(work, "traj.pt")
        if not data:  # the speed probe times denoiser calls on random latents: no trajectories
            self.tr = self.te = None
        elif os.path.exists(cache):
            self.tr, self.te = torch.load(cache, weights_only=False)  # written by this script
        else:
            kw = dict(steps=20, resolution=256, sites=self.sites)
            self.tr = record_trajectories(self.pipe, self.prompts, [1000, 1001], **kw)
            self.te = record_trajectories(self.pipe, self.prompts, [1002], **kw)
            torch.save((self.tr, self.te), cache)
        if data:
            print("states", len(self.tr), len(self.te), flush=True)
        self.teacher = copy.deepcopy(den).eval().requires_grad_(False)
        self.base = copy.deepcopy(den)
        self.ks = {s.name: k for s, k in zip(self.sites, KERNELS)}
        self.switch = None  # {"n": experts, "g": the expert in use} while timestep experts are installed

    def make_student(self, block_kw: dict, only=None):
        """Student with every (or only the ``only``-indexed) self-attention layer converted."""
        from deltadistill.conversion import convert, delta_modules

        self.pipe.transformer = copy.deepcopy(self.base)
        kw = {**BLOCK, **block_kw}
        film, tmix, kwb = kw.pop("film", 0), kw.pop("tmix", 0), kw.pop("keyw", 0)
        kwc = not kw.pop("keyw_fixed", 0)
        if not kwc and not kwb:
            raise SystemExit("keyw_fixed needs keyw (the width of the branch whose keys it weighs alike)")
        k, ks = kw.pop("k", None), kw.pop("ks", None)  # one K for all layers / one per block (list of 8)
        sites = self.sites if only is None else [self.sites[i] for i in only]
        ks = dict(zip((s.name for s in self.sites), ks)) if ks else self.ks
        spec = k if k else {s.name: ks[s.name] for s in sites}
        convert(self.pipe, spec, layers=None if only is None else [s.name for s in sites], **kw)
        mods = delta_modules(self.pipe.transformer)
        blocks = [mods[s.name].block for s in sites]
        if film:
            attach_film(self.pipe.transformer, blocks, film)

        def install(wrap):  # every converted block replaced in the student by wrap(block)
            wrapped = [wrap(b) for b in blocks]
            for s, b in zip(sites, wrapped):
                mods[s.name].block = b
            return wrapped

        if kwb:  # a key-weighted, normalised branch of kwb channels beside each block (its kernel size)
            blocks = install(lambda b: KeyWeighted(b, kwb, b.kernel_size, content=kwc))
        if tmix:  # timestep-blended copies of each block
            blocks = install(lambda b: Blend(b, tmix))
            pass_timesteps(self.pipe.transformer)
        return self.pipe.transformer, blocks

    def restrict(self, only) -> None:
        """Keep the recorded layer inputs/outputs of the ``only``-indexed layers (regression on those)."""
        self.tr = dataclasses.replace(self.tr, x=[self.tr.x[i] for i in only], y=[self.tr.y[i] for i in only],
                                      grids=[self.tr.grids[i] for i in only])

    def regress(self, blocks, steps: int, pool: torch.Tensor | None = None, augment: int = 0, cfg_w: float = 0.0,
                wd: float = 0.0) -> None:
        """Teacher-forced regression of ``blocks``; ``pool``: draw the states only from these indices;
        ``augment`` n: each step's batch moved by one of the first n symmetries of the square (1: none);
        ``cfg_w`` > 0: the batch is 16 CFG pairs, with the guided term of weight ``cfg_w`` (``--regress-cfg``)."""
        from deltadistill.trajectory import cfg_pairs, regression_loss

        params = [p for b in blocks for p in b.parameters()]
        opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.99), weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(min(50, steps // 4), steps))
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(len(self.tr) if pool is None else len(pool), (32,), generator=g)
            if pool is not None:
                idx = pool[idx]
            k = int(torch.randint(augment, (1,), generator=g)) if augment > 1 else 0
            if cfg_w:  # 16 CFG pairs instead of 32 states, and the guided term
                idx = cfg_pairs(self.tr, idx[:16])
            TCTX["t"] = self.tr.batched["timestep"][idx]
            loss, _ = regression_loss(blocks, self.tr, idx, symmetry=k, cfg_weight=cfg_w)
            opt.zero_grad()
            loss.backward()
            for b in blocks:
                torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
            opt.step()
            sched.step()

    def held_regression(self, blocks, idx: torch.Tensor | None = None):
        from deltadistill.trajectory import regression_loss

        idx = torch.arange(0, len(self.te), 7) if idx is None else idx
        TCTX["t"] = self.te.batched["timestep"][idx]
        with torch.no_grad():
            tot, parts = regression_loss(blocks, self.te, idx)
        return float(tot), parts

    def replay(self, student, data, idx: torch.Tensor) -> torch.Tensor:
        """The student's output on recorded states; with timestep experts installed, each state by its own expert."""
        from deltadistill.trajectory import replay

        if self.switch is None:
            return replay(student, data, idx)
        group = sampling_step(data) * self.switch["n"] // 20
        out = None
        for gi in torch.unique(group[idx]).tolist():
            sel = (group[idx] == gi).nonzero().flatten()
            self.switch["g"] = gi
            o = replay(student, data, idx[sel])
            out = o.new_zeros((len(idx),) + o.shape[1:]) if out is None else out
            out[sel] = o
        return out

    def held_eps(self, student) -> float:
        with torch.no_grad():
            idx = torch.arange(0, len(self.te), 5)
            return float(F.mse_loss(self.replay(student, self.te, idx).float(), self.te.out[idx]))

    def guided_difference(self, student, data, every: int) -> torch.Tensor:
        """The student's guided prediction u + w·(c − u), which the sampler steps with, minus the teacher's, on every
        ``every``-th state of ``data`` with its CFG partner."""
        from deltadistill.trajectory import cfg_pairs, guided

        idx = cfg_pairs(data, torch.arange(0, len(data), every))
        with torch.no_grad():
            out, target = self.replay(student, data, idx).float(), data.out[idx]
        b, w = len(idx) // 2, data.guidance
        return guided(out[:b], out[b:], w) - guided(target[:b], target[b:], w)

    def guided_error(self, student, data, every: int) -> float:
        """Mean squared error of the guided prediction (see :meth:`guided_difference`)."""
        return float(self.guided_difference(student, data, every).pow(2).mean())

    def guided_bands(self, student, pool: int = 4) -> str:
        """The held-out guided error (the states of :meth:`held_guided`) split by :func:`coarse_fine`."""
        coarse, fine = coarse_fine(self.guided_difference(student, self.te, 5), pool)
        return f"coarse (÷{pool}) {coarse:.4f} + fine {fine:.4f}"

    def held_guided(self, student) -> float:
        """Held-out guided error (the states of :meth:`held_eps`)."""
        return self.guided_error(student, self.te, 5)

    def train_guided(self, student) -> float:
        """The guided error on training states (every 10th)."""
        return self.guided_error(student, self.tr, 10)

    def fresh_states(self, n: int):
        """The teacher's sampling calls for the 14 captions × seeds 2000 … 2000 + n − 1, without layer tensors
        (cached in --work): more noise for the fine-tune than the regression's trajectories."""
        from deltadistill.trajectory import record_trajectories

        path = os.path.join(self.work, f"traj_states_{n}.pt")
        if os.path.exists(path):
            return torch.load(path, weights_only=False)  # written by this script
        student, self.pipe.transformer = self.pipe.transformer, self.base
        t0 = time.perf_counter()
        states = record_trajectories(self.pipe, self.prompts, list(range(2000, 2000 + n)), steps=20, resolution=256)
        print(f"recorded {len(states)} states for the fine-tune in {time.perf_counter() - t0:.0f}s", flush=True)
        self.pipe.transformer = student
        torch.save(states, path)
        return states

    def channel_gain(self) -> torch.Tensor:
        """:func:`decoder_channel_gain` of the demo VAE about the latents of 16 of the teacher's evaluation images."""
        vae = self.pipe.vae
        x = torch.from_numpy(self.teacher_images()).float().permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            z = torch.cat([vae.encode(c).latent_dist.mean for c in x[:16].split(8)])  # 16 of the 56 images
        gain = decoder_channel_gain(lambda v: vae.decode(v).sample, z, vae.config.scaling_factor)
        print("decoder gain per channel", [round(float(v), 3) for v in gain], flush=True)
        return gain

    def held_eps_by_steps(self, student) -> str:
        """Held-out ε error over the sampling steps 0-4, 5-9, 10-14, 15-19 (step 0 the noisiest)."""
        step = sampling_step(self.te)
        idx = torch.arange(0, len(self.te), 5)
        with torch.no_grad():
            err = ((self.replay(student, self.te, idx).float() - self.te.out[idx]) ** 2).flatten(1).mean(1)
        parts = [float(err[(step[idx] >= a) & (step[idx] < a + 5)].mean()) for a in range(0, 20, 5)]
        return "/".join(f"{v:.4f}" for v in parts)

    def _images(self):
        from attnprobe.core.pipeline import sample

        imgs = []
        for s in EVAL_SEEDS:  # one sampling batch per seed (14 captions), as the cached teacher images
            imgs += sample(self.pipe, self.prompts, [s] * len(self.prompts), steps=20)
        return np.stack([np.asarray(im) for im in imgs]) / 255.0

    def teacher_images(self):
        name = "teacher_imgs.npy" if EVAL_SEEDS == [0] else f"teacher_imgs_{'-'.join(map(str, EVAL_SEEDS))}.npy"
        path = os.path.join(self.work, name)
        if not os.path.exists(path):
            student = self.pipe.transformer
            self.pipe.transformer = self.base
            np.save(path, self._images())
            self.pipe.transformer = student
        return np.load(path)

    def quick_psnr(self, name: str | None = None) -> str:
        """PSNR of the mean MSE (what the tables report), the median of the per-image PSNRs, and the three
        captions with the largest share of the squared error (they set the first; the median is robust to them).
        With ``--worst-figure`` and a ``name``, the 8 worst images beside the teacher's go to PREFIX-name.png."""
        from deltadistill.metrics import psnr, psnr_by_group

        self.pipe.transformer.eval()
        images, teacher = self._images(), self.teacher_images()
        d = psnr(images, teacher)
        groups = sorted(psnr_by_group(images, teacher, [i % len(self.prompts) for i in range(len(images))]),
                        key=lambda g: -g["mse_share"])[:3]
        if self.worst_figure and name:
            worst_figure(images, teacher, d["psnr_per_image"], self.prompts, f"{self.worst_figure}-{name}.png")
        return (f"{d['psnr']:.2f} (median per image {float(np.median(d['psnr_per_image'])):.2f}; largest error share: "
                + ", ".join(f"'{self.prompts[g['group']]}' {g['psnr']:.1f} dB {100 * g['mse_share']:.0f}%" for g in groups) + ")")

    def finetune(self, student, blocks, steps=300, lr=5e-4, warmup=20, bs=4, cfg_w=0.25, reg_w=0.0, data=None,
                 early=0.0, full=0.0, hard=0.0, ema=0.0, out_w=1.0, orient=0, lowf=0.0, lowp=4, minsnr=0.0,
                 chw=None):
        from deltadistill.trajectory import cfg_pairs, guided, regression_loss, replay

        data = data or self.tr
        cw = None
        if chw is not None:  # per-channel weights of both MSE terms, mean 1 ("vae": the decoder's gain per channel)
            cw = (self.channel_gain() if chw == "vae" else torch.tensor(chw, dtype=torch.float64)).float()
            if cw.numel() != data.out.shape[1]:
                raise SystemExit(f"chw names {cw.numel()} channel weights; the denoiser's output has {data.out.shape[1]} channels")
            cw = (cw / cw.mean()).view(1, -1, 1, 1)
            print("channel weights", [round(float(v), 3) for v in cw.flatten()], flush=True)
        params = [p for b in blocks for p in b.parameters()]
        groups = [{"params": params, "lr": lr}]
        if full:  # also the rest of the student (frozen in the recipe), at lr · full
            own = {id(p) for p in params}
            rest = [p for p in student.parameters() if id(p) not in own]
            for p in rest:
                p.requires_grad_(True)
            groups.append({"params": rest, "lr": lr * full})
            params = params + rest
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(warmup, steps))
        g = torch.Generator().manual_seed(1)
        weights = 1 + early * data.batched["timestep"].float() / 1000  # early > 0: draw noisy states more often
        if hard:  # draw each state ∝ (the student's error on it at the start) ** hard
            with torch.no_grad():
                err = torch.cat([((replay(student, data, i).float() - data.out[i]) ** 2).flatten(1).mean(1)
                                 for i in torch.arange(len(data)).split(56)])
            weights = weights * (err / err.mean()) ** hard
        if minsnr:  # draw each state ∝ min(SNR, γ) / SNR: the clean end, where the SNR is high, less often
            weights = weights * min_snr_weights(self.pipe.scheduler.alphas_cumprod, data.batched["timestep"], minsnr)
        avg = [p.detach().clone() for p in params] if ema else None  # an exponential moving average of the weights
        group = None if self.switch is None else sampling_step(data) * self.switch["n"] // 20
        for _ in range(steps):
            idx = torch.multinomial(weights, bs, replacement=True, generator=g) if (early or hard or minsnr) else \
                torch.randint(len(data), (bs,), generator=g)
            if group is not None:  # timestep experts: the whole batch from the expert of its first state
                pool = (group == group[idx[0]]).nonzero().flatten()
                idx = pool[torch.randint(len(pool), (bs,), generator=g)]
            idx = cfg_pairs(data, idx) if orient else torch.cat([idx, data.pair[idx]])
            target = data.out[idx]
            out = self.replay(student, data, idx).float()
            b = len(idx) // 2
            d = guided(out[:b], out[b:], data.guidance) - guided(target[:b], target[b:], data.guidance)
            if cw is None:
                loss = out_w * F.mse_loss(out, target) + cfg_w * d.pow(2).mean()
            else:
                loss = out_w * ((out - target).pow(2) * cw).mean() + cfg_w * (d.pow(2) * cw).mean()
            if lowf:  # the guided difference's coarse part, weighted once more
                loss = loss + lowf * F.avg_pool2d(d, lowp).pow(2).mean()
            if reg_w and data is self.tr:
                TCTX["t"] = self.tr.batched["timestep"][idx[:b]]
                r, _ = regression_loss(blocks, self.tr, idx[:b])
                loss = loss + reg_w * r
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if avg is not None:
                with torch.no_grad():
                    for a, p in zip(avg, params):
                        a.lerp_(p, 1 - ema)
        if avg is not None:  # the student keeps the averaged weights
            with torch.no_grad():
                for p, a in zip(params, avg):
                    p.copy_(a)

    def rollout_tune(self, student, blocks, steps: int, k: int = 4, bs: int = 4, lr: float = 2e-4, start_min: int = 4,
                     warmup: int = 10, mix: float = 0.0, cfg_w: float = 4.0) -> None:
        """The rollout stage: each step, ``bs`` training trajectories from the teacher's latent at a random step
        s ≥ ``start_min``, ``k`` student steps (fewer at the end), MSE to the teacher's latent there; ``mix`` > 0
        adds that weight × the fine-tune's loss (4 states with their CFG partners, guided weight ``cfg_w``)."""
        from rollouts import build_rollouts
        from deltadistill.trajectory import cfg_pairs, guided

        if not hasattr(self, "rollouts"):
            self.rollouts = build_rollouts(self.tr, self.pipe.scheduler, channels=4)
        ro = self.rollouts
        params = [p for b in blocks for p in b.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(warmup, steps))
        g = torch.Generator().manual_seed(2)
        for _ in range(steps):
            ids = torch.randperm(len(ro), generator=g)[:bs]
            start = int(torch.randint(start_min, ro.steps, (1,), generator=g))
            loss = ro.loss(student, ids, start, min(k, ro.steps - start))
            if mix:
                idx = cfg_pairs(self.tr, torch.randint(len(self.tr), (4,), generator=g))
                out, target = self.replay(student, self.tr, idx).float(), self.tr.out[idx]
                w = self.tr.guidance
                loss = loss + mix * (F.mse_loss(out, target) + cfg_w * F.mse_loss(guided(out[:4], out[4:], w),
                                                                                  guided(target[:4], target[4:], w)))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()

    def held_rollout(self, student) -> str:
        """Mean squared difference of the final latents when the student samples the held-out trajectories
        from the teacher's noise (all 20 steps), and the same on the first 14 training trajectories."""
        from rollouts import build_rollouts

        if not hasattr(self, "held_rollouts"):
            self.held_rollouts = build_rollouts(self.te, self.pipe.scheduler, channels=4)
            self.train_rollouts = build_rollouts(self.tr, self.pipe.scheduler, channels=4)
        with torch.no_grad():
            held = float(self.held_rollouts.loss(student, torch.arange(len(self.held_rollouts)), 0, 20))
            train = float(self.train_rollouts.loss(student, torch.arange(14), 0, 20))
        return f"{held:.4f} (training trajectories {train:.4f})"

    def relabel(self, student, seeds):
        """Student rollouts on the training captions, labelled with the teacher's outputs."""
        from deltadistill.trajectory import record_trajectories, replay

        student.eval()
        d = record_trajectories(self.pipe, self.prompts, seeds, steps=20, resolution=256, sites=())
        with torch.no_grad():
            d.out = torch.cat([replay(self.teacher, d, torch.arange(i, min(i + 56, len(d)))).float()
                               for i in range(0, len(d), 56)])
        student.train()
        n = len(self.tr)
        return dataclasses.replace(self.tr, batched={k: torch.cat([self.tr.batched[k], d.batched[k]]) for k in self.tr.batched},
                                   out=torch.cat([self.tr.out, d.out]), pair=torch.cat([self.tr.pair, d.pair + n]), x=[], y=[])


def sampling_step(data) -> torch.Tensor:
    """The sampling step (0 = the noisiest of the 20) of each recorded state."""
    t = data.batched["timestep"].float()
    order = torch.unique(t).flip(0)  # descending: step 0 first
    return torch.searchsorted(-order, -t)


class Switch(torch.nn.Module):
    """One ΔConvBlock per range of sampling steps in place of one block: ``state["g"]`` picks the block."""

    def __init__(self, blocks, state: dict):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.state = state

    def forward(self, z):
        return self.blocks[self.state["g"]](z)


def install_experts(probe: Probe, student, experts: list[list]) -> list:
    """Put ``experts[g][l]`` (expert g of layer l) into the student's converted layers; a pre-hook on the
    student picks the expert from the call's timestep while it samples. Returns the layers' Switch modules."""
    from deltadistill.conversion import delta_modules

    n = len(experts)
    probe.switch = {"n": n, "g": 0, "sampled": set()}
    order = torch.unique(probe.tr.batched["timestep"].float()).flip(0)
    mods = delta_modules(student)
    switches = []
    for li, site in enumerate(probe.sites):
        sw = Switch([experts[g][li] for g in range(n)], probe.switch)
        mods[site.name].block = sw
        switches.append(sw)

    def pick(module, args, kwargs):
        t = kwargs.get("timestep")
        if t is not None and probe.switch is not None:
            t = torch.as_tensor(t).float().flatten()
            if bool((t == t[0]).all()):  # a sampling call (one timestep for the batch)
                step = int((order - t[0]).abs().argmin())
                probe.switch["g"] = step * n // 20
                probe.switch["sampled"].add(probe.switch["g"])

    student.register_forward_pre_hook(pick, with_kwargs=True)
    return switches


def tbins(probe: Probe, variants: dict, steps: int) -> None:
    """Held-out regression loss, per quarter of the sampling steps, of one block set regressed per range of
    steps (n ranges, ``steps`` regression steps each) against one block set for all of them (n = 1)."""
    tr_group, te_step = sampling_step(probe.tr), sampling_step(probe.te)
    held = torch.arange(0, len(probe.te), 7)
    for name, n in variants.items():
        t0 = time.perf_counter()
        quarters = [0.0] * 4
        saved = []
        for gi in range(n):
            _, blocks = probe.make_student({})
            pool = (tr_group * n // 20 == gi).nonzero().flatten()
            probe.regress(blocks, steps, pool=pool, augment=AUGMENT)
            saved.append([b.state_dict() for b in blocks])
            for q in range(4):  # the quarters of the steps this expert covers
                sel = held[(te_step[held] // 5 == q) & (te_step[held] * n // 20 == gi)]
                if len(sel):
                    quarters[q] += probe.held_regression(blocks, sel)[0] * len(sel) / int((te_step[held] // 5 == q).sum())
        torch.save(saved, os.path.join(probe.work, f"tbins_{n}{cache_suffix(steps)}.pt"))
        counts = [int((te_step[held] // 5 == q).sum()) for q in range(4)]
        total = sum(v * c for v, c in zip(quarters, counts)) / sum(counts)
        print(f"{name}: {n} range(s) of steps, held-out regression loss {total:.4f}; steps 0-4/5-9/10-14/15-19: "
              + "/".join(f"{v:.4f}" for v in quarters) + f" ({time.perf_counter() - t0:.0f}s)", flush=True)


def experts(probe: Probe, variants: dict, steps: int) -> None:
    """End to end: the all-ΔConv student with one block set per range of sampling steps (regressed by ``tbins``,
    cached in --work, or regressed here), fine-tuned as the recipe; each step's batch comes from one range.
    A variant: {"n": ranges, "steps": fine-tune steps (300)}."""
    probe.teacher_images()
    for name, kw in variants.items():
        kw = dict(kw)
        n = kw.pop("n")
        path = os.path.join(probe.work, f"tbins_{n}{cache_suffix(steps)}.pt")
        if not os.path.exists(path):
            tbins(probe, {f"regress {n}": n}, steps)
        student, _ = probe.make_student({})
        sets = []
        for states in torch.load(path, weights_only=True):
            _, blocks = probe.make_student({})
            for b, sd in zip(blocks, states):
                b.load_state_dict(sd)
            sets.append(blocks)
        probe.pipe.transformer = student
        install_experts(probe, student, sets)
        blocks = [b for s in sets for b in s]
        for p in student.parameters():
            p.requires_grad_(False)
        for b in blocks:
            b.requires_grad_(True)
        print(f"{name} regressed: eps {probe.held_eps(student):.4f} "
              f"(steps 0-4/5-9/10-14/15-19: {probe.held_eps_by_steps(student)})", flush=True)
        student.train()
        t0 = time.perf_counter()
        probe.finetune(student, blocks, **kw)
        t = time.perf_counter() - t0
        print(f"{name}: eps {probe.held_eps(student):.4f} guided {probe.held_guided(student):.4f} (steps 0-4/5-9/10-14/15-19: {probe.held_eps_by_steps(student)}) "
              f"psnr {probe.quick_psnr(name)} ({t:.0f}s)", flush=True)
        if probe.switch["sampled"] != set(range(n)):
            raise SystemExit(f"{name}: sampling used the experts {sorted(probe.switch['sampled'])}, not all {n}")
        probe.switch = None


def worst_figure(images, teacher, per_image, prompts, path: str, k: int = 8) -> None:
    """Teacher (top) and student (bottom) for the ``k`` images with the lowest PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(per_image)[:k]
    fig, ax = plt.subplots(2, k, figsize=(2 * k, 4.6))
    for j, i in enumerate(order):
        ax[0, j].imshow(teacher[i])
        ax[1, j].imshow(images[i])
        ax[0, j].set_title(f"{prompts[i % len(prompts)].removeprefix('a photo of ')}, seed {EVAL_SEEDS[i // len(prompts)]}\n"
                           f"{per_image[i]:.1f} dB", fontsize=8)
        for a in ax[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    ax[0, 0].set_ylabel("teacher")
    ax[1, 0].set_ylabel("student")
    fig.suptitle("the student's lowest-PSNR samples beside the teacher's (same noise)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def capacity(probe: Probe, variants: dict, steps: int) -> None:
    for name, kw in variants.items():
        kw = dict(kw)
        augment, wd = kw.pop("augment", 0), kw.pop("wd", 0.0)
        _, blocks = probe.make_student(kw)
        t0 = time.perf_counter()
        h0, parts0 = probe.held_regression(blocks)
        probe.regress(blocks, steps, augment=augment, wd=wd)
        h1, parts = probe.held_regression(blocks)
        n = sum(p.numel() for b in blocks for p in b.parameters())
        print(f"{name}: held-out {h0:.4f} -> {h1:.4f} ({h1 / h0:.3f}), params {n}, {time.perf_counter() - t0:.0f}s, "
              f"layers {[round(p, 4) for p in parts]}, share of each layer's mean-field error left "
              f"{[round(p / max(q, 1e-12), 3) for p, q in zip(parts, parts0)]}", flush=True)


def fit(probe: Probe, variants: dict, steps: int) -> None:
    """How well the cached regression (--steps, --augment, --block) fits each layer on training and held-out states:
    per block and quarter of the sampling steps, the MSE to the teacher's output as a share of that output's variance
    over the tokens (the part a mean-field block cannot give). ``variants`` is unused."""
    _, blocks = regressed_student(probe, steps)
    for label, data in (("training", probe.tr), ("held-out", probe.te)):
        step, idx = sampling_step(data), torch.arange(0, len(data), 7)
        rows = []
        with torch.no_grad():
            for block, x, y, (h, w) in zip(blocks, data.x, data.y, data.grids):
                xb, yb = x[idx].float(), y[idx].float()  # [b, N, C]
                err = ((block(xb.reshape(len(idx), h, w, -1)).reshape(yb.shape) - yb) ** 2).mean((1, 2))
                var = ((yb - yb.mean(1, keepdim=True)) ** 2).mean((1, 2))
                rows.append([float(err[step[idx] // 5 == q].mean() / var[step[idx] // 5 == q].mean()) for q in range(4)])
        print(f"{label} states, share of each layer's token variance left, steps 0-4/5-9/10-14/15-19:", flush=True)
        for i, r in enumerate(rows):
            print(f"  block {i}: " + "/".join(f"{v:.3f}" for v in r), flush=True)


def finetune(probe: Probe, variants: dict, steps: int) -> None:
    probe.teacher_images()
    student, blocks = regressed_student(probe, steps)
    start = copy.deepcopy(student.state_dict())  # every variant starts here (``full`` changes more than the blocks)
    trained = {id(p) for b in blocks for p in b.parameters()}
    variants = dict(variants)
    if variants.pop("regressed", None) is not None:
        print(f"regressed: eps {probe.held_eps(student):.4f} guided {probe.held_guided(student):.4f} "
              f"[{probe.guided_bands(student)}] psnr {probe.quick_psnr()}", flush=True)
    for name, kw in variants.items():
        kw = dict(kw)
        student.load_state_dict(start)
        for p in student.parameters():
            p.requires_grad_(id(p) in trained)
        student.train()
        t0 = time.perf_counter()
        onp, split, total = kw.pop("onpolicy", 0), kw.pop("split", 0), kw.pop("steps", 300)
        if kw.get("fseeds"):  # the fine-tune's states from this many fresh samples per caption
            kw["data"] = probe.fresh_states(kw.pop("fseeds"))
            t0 = time.perf_counter()
        rollout = {k[1:]: kw.pop(k) for k in [k for k in kw if k.startswith("r") and k != "reg_w"]}
        if split or onp:
            probe.finetune(student, blocks, steps=total // 2, **kw)
            data = probe.relabel(student, [1000, 1001][:onp]) if onp else None
            probe.finetune(student, blocks, steps=total - total // 2, data=data, **kw)
        else:
            probe.finetune(student, blocks, steps=total, **kw)
        if rollout:
            print(f"{name} before the rollout stage: guided {probe.held_guided(student):.4f} "
                  f"final latent {probe.held_rollout(student)} ({time.perf_counter() - t0:.0f}s)", flush=True)
            probe.rollout_tune(student, blocks, **rollout)
        t = time.perf_counter() - t0
        print(f"{name}: eps {probe.held_eps(student):.4f} guided {probe.held_guided(student):.4f} "
              f"[{probe.guided_bands(student)}] (on training states {probe.train_guided(student):.4f}) final latent {probe.held_rollout(student)} (steps 0-4/5-9/10-14/15-19: {probe.held_eps_by_steps(student)}) "
              f"psnr {probe.quick_psnr(name)} ({t:.0f}s)", flush=True)


def cache_suffix(steps: int = 600) -> str:
    """Names the cached regression / recipe blocks after --steps, --augment and the block settings (--block over the
    toolkit preset's gate), so that a cache is never loaded into blocks of another form."""
    from deltadistill.presets import TOOLKIT_BLOCK

    block = {"gate": TOOLKIT_BLOCK["gate"], **BLOCK}
    parts = ([f"steps{steps}"] if steps != 600 else []) + ([f"aug{AUGMENT}"] if AUGMENT > 1 else []) + \
        ([f"rcfg{REGRESS_CFG:g}"] if REGRESS_CFG else []) + \
        [f"{k}-{v}" for k, v in sorted(block.items())]
    return "".join("_" + "".join(c if c.isalnum() or c in ".-" else "-" for c in p) for p in parts)


def regressed_student(probe: Probe, steps: int):
    """The all-ΔConv student after the recipe's regression (cached in ``--work``)."""
    student, blocks = probe.make_student({})
    path = os.path.join(probe.work, f"regressed{cache_suffix(steps)}.pt")
    if os.path.exists(path):
        for b, s in zip(blocks, torch.load(path, weights_only=True)):
            b.load_state_dict(s)
    else:
        t0 = time.perf_counter()
        probe.regress(blocks, steps, augment=AUGMENT, cfg_w=REGRESS_CFG)
        print(f"regression {time.perf_counter() - t0:.0f}s", flush=True)
        torch.save([b.state_dict() for b in blocks], path)
    return student, blocks


def mixing(probe: Probe, variants: dict, steps: int) -> None:
    probe.teacher_images()
    student, blocks = regressed_student(probe, steps)
    path = os.path.join(probe.work, f"recipe{cache_suffix(steps)}.pt")
    if os.path.exists(path):
        for b, s in zip(blocks, torch.load(path, weights_only=True)):
            b.load_state_dict(s)
    else:
        student.train()
        probe.finetune(student, blocks)
        torch.save([b.state_dict() for b in blocks], path)
    student.eval()
    own = student.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):  # steps [a, b) by the student, the others by the teacher
        i = calls["n"] % 20  # 20 sampling steps per batch
        calls["n"] += 1
        return (own if a <= i < b else probe.teacher)(*args, **kwargs)

    student.forward = forward
    for name, (a, b) in variants.items():
        calls["n"] = 0
        print(f"{name}: student on steps [{a}, {b}), psnr {probe.quick_psnr()}", flush=True)


def layers(probe: Probe, variants: dict, steps: int) -> None:
    probe.teacher_images()
    full = probe.tr
    for name, only in variants.items():
        kw = {}
        if isinstance(only, dict):  # {"only": [...], plus convert() settings, e.g. "k": 7 or "inter_ratio": 1}
            kw = dict(only)
            only = kw.pop("only")
        probe.tr = full
        student, blocks = probe.make_student(kw, only=list(only))
        probe.restrict(list(only))
        t0 = time.perf_counter()
        probe.regress(blocks, steps)
        student.train()
        probe.tr = full
        probe.finetune(student, blocks)
        t = time.perf_counter() - t0
        print(f"{name}: eps {probe.held_eps(student):.4f} guided {probe.held_guided(student):.4f} (steps 0-4/5-9/10-14/15-19: {probe.held_eps_by_steps(student)}) "
              f"psnr {probe.quick_psnr(name)} ({t:.0f}s)", flush=True)


def neighbourhood(probe: Probe, variants: dict, steps: int) -> None:
    """The teacher with its self-attention restricted to K×K windows (no training), K per variant."""
    from deltadistill.baselines import neighbourhood_attention

    probe.teacher_images()
    probe.pipe.transformer = probe.base.eval()
    for name, k in variants.items():
        ks = KERNELS if k == "report" else [k] * len(probe.sites) if isinstance(k, int) else list(k)
        if len(ks) != len(probe.sites):
            raise SystemExit(f"{name}: give one K per self-attention layer ({len(probe.sites)}), got {ks}")
        kernel = {s.name: v for s, v in zip(probe.sites, ks) if v is not None}  # None: that layer keeps full attention
        with neighbourhood_attention(probe.pipe, kernel):
            print(f"{name}: K {ks}, eps {probe.held_eps(probe.base):.4f} guided {probe.held_guided(probe.base):.4f} "
                  f"[{probe.guided_bands(probe.base)}] "
                  f"(steps 0-4/5-9/10-14/15-19: {probe.held_eps_by_steps(probe.base)}) psnr {probe.quick_psnr(name)}",
                  flush=True)


def speed(probe: Probe, variants: dict, resolution: int, repeats: int) -> None:
    import statistics

    from deltadistill.bench.inputs import _load_model, denoiser_inputs

    kw = denoiser_inputs(_load_model("demo"), resolution, "cpu", torch.float32)
    nets = {"teacher": probe.base.eval()}
    for name, v in variants.items():  # a list of block indices (null: all), or {"only": ..., block settings}
        only, block = (v.get("only"), {k: x for k, x in v.items() if k != "only"}) if isinstance(v, dict) else (v, {})
        nets[name] = probe.make_student(block, only=None if only is None else list(only))[0].eval()
    times = {name: [] for name in nets}
    with torch.inference_mode():
        for net in nets.values():  # warm-up
            net(**kw)
        for _ in range(repeats):
            for name, net in nets.items():
                t0 = time.perf_counter()
                net(**kw)
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    for name, v in ms.items():
        print(f"{name}: {resolution} px denoiser call {v:.0f} ms, speed-up {ms['teacher'] / v:.2f}x", flush=True)


def main(argv=None):
    args = parse_args(argv)
    EVAL_SEEDS[:] = [int(v) for v in args.eval_seeds.split(",")]
    global AUGMENT, REGRESS_CFG
    AUGMENT, REGRESS_CFG = args.augment, args.regress_cfg
    BLOCK.update(json.loads(args.block))
    torch.set_num_threads(args.threads)
    probe = Probe(args.work, data=args.probe != "speed")
    probe.worst_figure = args.worst_figure
    if args.probe == "speed":
        speed(probe, json.loads(args.variants), args.resolution, args.repeats)
        return
    {"capacity": capacity, "finetune": finetune, "layers": layers, "mixing": mixing,
     "neighbourhood": neighbourhood, "tbins": tbins, "experts": experts, "fit": fit}[args.probe](probe, json.loads(args.variants), args.steps)


if __name__ == "__main__":
    main()
