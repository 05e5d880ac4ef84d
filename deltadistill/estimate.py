"""``deltadistill train --estimate``: what a distillation run will cost, before any weights are loaded.

The denoiser is built from its shipped architecture config on the *meta* device and converted as
the run would convert it (same kernel sizes, block settings and student kind). On that model:

* parameters: the frozen teacher copy, the student's frozen part, the trainable blocks (fp32 master
  weights + gradients + two AdamW moments = 16 bytes per trainable parameter);
* activations kept for the backward pass: the bytes of every tensor autograd saves during one
  student forward at the per-process batch (``torch.autograd.graph.saved_tensors_hooks``;
  parameters themselves are not counted); the trajectory fine-tune with its guided term runs each
  state with its CFG partner, so there the batch has twice the rows;
* FLOPs (:func:`deltadistill.flops.flop_counter`: torch's counter, with grouped convolutions' backward mended)
  of one training step (teacher forward, in the noised recipe only —
  the trajectory recipe's targets are recorded — + student forward and backward), of one regression step of the trajectory recipe (every block forward and backward at
  ``regress_batch``), and of one sampling call (classifier-free guidance pair) for the data stage;
* data: the trajectory recipe's recorded states (denoiser outputs in fp32, the call's inputs at the
  pipeline's text length, every layer's input and output in fp16 for the regression's samples: exactly
  what :func:`deltadistill.trajectory.record_trajectories` keeps), or the noised recipe's latents.

Seconds are FLOPs ÷ this device's measured matmul rate ÷ the efficiency of
:data:`attnprobe.estimate.MODEL_EFFICIENCY`. VAE encoding of an image folder is not estimated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnprobe.estimate import MODEL_EFFICIENCY, RUNTIME_BYTES, _matmul_rate

__all__ = ["TrainEstimate", "estimate_training", "print_training_estimate"]

SAMPLING_BATCH = 28  # (prompt, seed) pairs sampled at once when recording trajectories


@dataclass
class TrainEstimate:
    model: str
    resolution: int
    device: str
    dtype: str
    recipe: str
    student: str
    batch: int  # rows of one student forward per process
    cfg_rows: bool = False  # the batch's states come with their CFG partners (trajectory fine-tune, guided term)
    layers: list = field(default_factory=list)  # (label, grid, dim, kernel size or None, trainable parameters)
    teacher_params: int = 0
    frozen_params: int = 0
    trainable_params: int = 0
    weight_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    data_bytes: int = 0
    data_states: int = 0
    data_calls: int = 0  # teacher sampling calls (each a CFG pair per prompt) of the data stage
    step_flops: int = 0
    regress_flops: int = 0
    call_flops: int = 0
    steps: int = 0
    regress_steps: int = 0
    rate: float = 0.0

    def seconds(self, flops: float) -> float:
        return flops / (self.rate * MODEL_EFFICIENCY) if self.rate else 0.0

    @property
    def data_s(self) -> float:
        return self.seconds(self.call_flops * self.data_calls)

    @property
    def step_s(self) -> float:
        return self.seconds(self.step_flops)

    @property
    def regress_step_s(self) -> float:
        return self.seconds(self.regress_flops)

    @property
    def total_s(self) -> float:
        return self.data_s + self.step_s * self.steps + self.regress_step_s * self.regress_steps

    @property
    def rss_bytes(self) -> int:
        return RUNTIME_BYTES + self.weight_bytes + self.optimizer_bytes + self.activation_bytes + self.data_bytes


def _bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _saved_bytes(fn, params: set[int]) -> tuple[int, object]:
    """Bytes of the tensors autograd saves while ``fn()`` runs (parameters excluded)."""
    total = [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def estimate_training(cfg, *, calibrate: bool = True) -> TrainEstimate:
    """Cost of ``deltadistill train`` with the resolved config ``cfg`` (a TrainConfig)."""
    from attnprobe.core.family import family_of, find_self_attention
    from attnprobe.core.registry import denoiser_from_config, resolve, text_tokens
    from deltadistill.conversion import convert, delta_modules
    from deltadistill.flops import flop_counter
    from deltadistill.train_config import chosen_layers, load_report_of, validate

    cfg = validate(cfg)
    report = load_report_of(cfg)
    model = cfg.model or ((report.model or {}).get("alias") if report is not None else None) or "demo"
    spec = resolve(model)
    den, info = denoiser_from_config(spec.alias, device="meta")
    family = family_of(den)
    vf = int(info["vae_scale_factor"])
    res = int(cfg.resolution or info.get("resolution") or spec.resolution or family.default_resolution(den.config, vf))
    family.check_resolution(den.config, vf, res, res)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    wdtype = torch.float32 if device.type == "cpu" or cfg.dtype == "fp32" else {
        "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype, torch.bfloat16)
    if wdtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32": not for a dry run
        try:
            den = den.to(wdtype)
        finally:
            diffusers_logging.set_verbosity(level)
    teacher_params = sum(p.numel() for p in den.parameters())
    sites = find_self_attention(den)
    base = family.base_grid(den.config, vf, res, res)
    spec_k = cfg.kernel_size if cfg.kernel_size is not None else report
    convert(den, spec_k if cfg.student == "deltaconv" else None, gate=cfg.gate, gate_scale=cfg.gate_scale, pool=cfg.pool,
            dw_bias=cfg.dw_bias, init="zero", kernel_ratio=cfg.kernel_ratio, preset=cfg.preset,
            inter_ratio=cfg.inter_ratio, scales=cfg.scales, key_width=cfg.key_width, student=cfg.student, layers=chosen_layers(cfg, sites))
    mods = delta_modules(den)
    for m in mods.values():
        m.block.float()
    trainable = [p for p in den.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in den.parameters() if not p.requires_grad)
    # the trajectory fine-tune with a guided term runs every state with its CFG partner: twice the rows
    # (a model sampled without guidance has no partners, and then this is 2× over)
    guided_sampling = cfg.sample_guidance is None or cfg.sample_guidance > 1  # the pipelines that convert default to CFG
    pairs_rows = cfg.recipe == "trajectory" and cfg.cfg_loss > 0 and guided_sampling
    rows = cfg.batch_size * (2 if pairs_rows else 1)
    est = TrainEstimate(model=spec.alias, resolution=res, device=str(device), dtype=str(wdtype).replace("torch.", ""),
                        recipe=cfg.recipe, student=cfg.student, batch=rows, cfg_rows=pairs_rows, teacher_params=teacher_params,
                        frozen_params=n_frozen, trainable_params=n_train, steps=cfg.steps,
                        regress_steps=cfg.regress_steps if cfg.recipe == "trajectory" else 0)
    est.weight_bytes = (teacher_params + n_frozen) * _bytes(wdtype) + n_train * 4
    est.optimizer_bytes = n_train * 4 * 3  # gradient + two AdamW moments (fp32)
    by_name = {s.name: s for s in sites}
    for name, m in mods.items():
        est.layers.append((m.label, by_name[name].grid(base), m.block.dim, m.block.kernel_size,
                           sum(p.numel() for p in m.block.parameters())))

    random = report is not None and (report.model or {}).get("weights") == "random"  # as the trainer loads it
    text_len = text_tokens(spec, family, random)
    kw = family.random_inputs(den, res, vf, text_len=text_len, device="meta", dtype=wdtype, batch=rows)
    params = {id(p) for p in den.parameters()}
    with flop_counter() as counter:
        if cfg.recipe != "trajectory":  # the trajectory fine-tune's targets are recorded: no teacher call per step
            with torch.no_grad():
                den(**kw)  # stands in for the teacher's forward (the student's costs less)
        saved, out = _saved_bytes(lambda: den(**kw), params)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        out.float().pow(2).mean().backward()
    est.activation_bytes = int(saved)
    est.step_flops = int(counter.get_total_flops())

    # data stage
    prompts = _count_prompts(cfg)
    latent = out[0].numel()
    if cfg.recipe == "trajectory":
        pairs = prompts * cfg.traj_seeds
        calls = math.ceil(cfg.traj_steps / cfg.traj_keep_every)
        est.data_states = pairs * calls * (2 if guided_sampling else 1)  # uncond + cond of every kept call
        # every kept state holds its output (fp32), the call's inputs (latent, timestep, text embedding, mask ...)
        # and, for the regression's samples, each converted layer's input and output (fp16)
        kept = latent * 4 + _call_input_bytes(family, den, res, vf, text_len, wdtype)
        per_state = kept + sum(2 * g[0] * g[1] * d * 2 for _, g, d, _, _ in est.layers)
        est.data_bytes = est.data_states * per_state
        est.data_calls = pairs * cfg.traj_steps
        more = prompts * (cfg.finetune_trajectories - cfg.traj_seeds)  # the fine-tune's samples without layer tensors
        if more:
            more_states = more * calls * (2 if guided_sampling else 1)
            est.data_states += more_states
            est.data_bytes += more_states * kept
            est.data_calls += more * cfg.traj_steps
        with flop_counter() as counter:
            for m in mods.values():
                h, w = by_name[m.site_name].grid(base)
                x = torch.empty(cfg.regress_batch, h, w, m.block.dim, device="meta")
                m.block(x).float().pow(2).mean().backward()
        est.regress_flops = int(counter.get_total_flops())
    elif prompts:
        est.data_states = prompts * cfg.samples_per_prompt
        est.data_bytes = est.data_states * latent * 4
        est.data_calls = est.data_states * cfg.sample_steps
    if est.data_calls:
        kw2 = family.random_inputs(den, res, vf, text_len=text_len, device="meta", dtype=wdtype, batch=2)
        with flop_counter() as counter, torch.no_grad():
            den(**kw2)
        est.call_flops = int(counter.get_total_flops())
    if calibrate:
        est.rate = _matmul_rate(str(device), wdtype)
    return est


def _call_input_bytes(family, den, res: int, vf: int, text_len: int, dtype) -> int:
    """Bytes of one sample's denoiser-call inputs as the trajectory recording keeps them."""
    from deltadistill.trajectory import kept_input_bytes

    return kept_input_bytes(family.random_inputs(den, res, vf, text_len=text_len, device="meta", dtype=dtype), 1)


def _count_prompts(cfg) -> int:
    from pathlib import Path

    from deltadistill.data import read_prompts

    source = Path(cfg.data)
    if source.is_file():
        return len(read_prompts(source))
    return 0  # an image folder: its latents come from the VAE (not estimated)


def print_training_estimate(est: TrainEstimate, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"deltadistill train --estimate — {est.model} @ {est.resolution}px on {est.device} ({est.dtype}), "
                        f"{est.recipe} recipe, {est.student} student",
                  caption="K: kernel size; parameters: trainable, per block")
    table.add_column("layer", no_wrap=True, min_width=14)
    for col in ("grid", "C", "K", "parameters"):
        table.add_column(col, justify="right", no_wrap=True)
    for label, grid, dim, k, n in est.layers:
        table.add_row(label, f"{grid[0]}×{grid[1]}", str(dim), "–" if k is None else str(k), f"{n:,}")
    console.print(table)
    gib = 2**30
    lines = [
        f"{len(est.layers)} layers converted; parameters: teacher {est.teacher_params / 1e6:.1f} M, student frozen "
        f"{est.frozen_params / 1e6:.1f} M, trainable {est.trainable_params / 1e6:.2f} M.",
        f"Memory: weights {est.weight_bytes / gib:.2f} GiB + optimizer {est.optimizer_bytes / gib:.2f} GiB + activations "
        f"{est.activation_bytes / gib:.2f} GiB ({est.batch} rows per process"
        f"{', each state with its CFG partner' if est.cfg_rows else ''}) + data {est.data_bytes / gib:.2f} GiB "
        f"({est.data_states:,} states) ≈ {est.rss_bytes / gib:.1f} GiB resident per process.",
    ]
    if est.rate:
        parts = [f"data {est.data_s / 60:.1f} min ({est.data_calls:,} teacher calls)"]
        if est.regress_steps:
            parts.append(f"regression {est.regress_steps} × {est.regress_step_s:.3f} s")
        parts.append(f"training {est.steps} × {est.step_s:.2f} s")
        lines.append(f"Time: {' + '.join(parts)} ≈ {est.total_s / 60:.1f} min ({est.total_s / 3600:.2f} h) at "
                     f"{est.rate / 1e9:.0f} GFLOP/s × {MODEL_EFFICIENCY}. Estimates, not measurements; writes nothing.")
    console.print("\n".join(lines))
