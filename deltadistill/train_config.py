"""Settings of a distillation run (``TrainConfig``), validated before anything is loaded or written.

:func:`validate` is the one place that checks a :class:`TrainConfig`: every option's range, that
the data source and report exist, and that ``--out`` does not already hold a run (unless
``--resume`` or ``--overwrite``). Errors are :class:`TrainError` (a user error: one line, exit 2).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from attnprobe.core.errors import UserError
from deltadistill.block import scale_level
from deltadistill.losses import SNR_WEIGHTINGS

__all__ = ["TrainConfig", "TrainError", "TrainingDiverged", "validate", "RUN_ARTEFACTS", "resolve_device", "chosen_layers",
           "mixed_precision", "lr_lambda", "step_generator", "load_report_of", "check_report_model"]

RUN_ARTEFACTS = ("config.json", "delta_blocks.safetensors", "train_config.json", "metrics.jsonl", "summary.json", "checkpoints")


class TrainError(UserError):
    """Bad training input (usage error): the message says what to change."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


@dataclass
class TrainConfig:
    """Settings of one distillation run (the CLI flags of ``deltadistill train``)."""

    data: str  # folder of captioned images, or a prompt file
    out: str  # run folder (becomes the distilled model folder)
    model: str | None = None  # alias / folder / Hub id; default: the report's model, else "demo"
    erf_report: str | None = None  # erf.json giving per-layer kernel sizes
    kernel_size: int | None = None  # one K for all layers (overrides the report)
    kernel_ratio: float | None = None  # recompute the report's kernel sizes as odd(ceil(ratio · ERF))
    steps: int = 1000
    preset: str = "toolkit"  # toolkit | paper: the values of every option left at None below
    recipe: str | None = None  # trajectory (teacher sampling states) | noised (noised data latents)
    regress_steps: int | None = None  # trajectory: teacher-forced per-layer regression steps before --steps
    regress_batch: int = 32
    regress_lr: float = 2e-3
    regress_symmetries: int | None = None  # trajectory: each regression batch turned/flipped by one of the first n of 8
    regress_cfg_loss: float | None = None  # trajectory: weight of the guided layer-output term of the regression
    traj_seeds: int = 4  # trajectory: teacher samples per prompt
    finetune_seeds: int | None = None  # trajectory: samples per prompt the fine-tune draws from (≥ traj_seeds; None: preset's)
    traj_steps: int = 20  # trajectory: sampling steps (the scheduler and guidance of the pipeline)
    traj_keep_every: int = 1  # keep every k-th denoiser call
    cfg_loss: float | None = None  # trajectory: weight of the guided-output term
    batch_size: int | None = None  # global batch (split over processes)
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    beta: float | None = None  # weight of the feature loss
    gamma: float | None = None  # Min-SNR γ
    snr_weighting: str | None = None  # standard | paper | none
    feature_target: str | None = None  # attention (block vs attention output) | residual (host residual stream)
    clip: float | None = None  # gradient-norm clip (0 = off)
    warmup: int | None = None  # linear warm-up steps (at most a quarter of the run)
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    resolution: int | None = None  # image side in pixels; default: the model's
    seed: int = 0
    caption_dropout: float | None = None
    cache: bool = False
    sample_steps: int = 8  # teacher sampling steps for prompt-file data
    sample_guidance: float | None = None
    samples_per_prompt: int = 1
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    resume: str | None = None  # None | "latest" | checkpoint or run folder
    overwrite: bool = False
    device: str = "auto"  # auto | cpu | cuda[:i]
    dtype: str = "auto"  # frozen weights: auto (fp32 on CPU, bf16/fp16 on GPU) | fp32 | bf16 | fp16
    mixed_precision: str = "auto"  # auto (bf16/fp16 on GPU, no on CPU) | no | bf16 | fp16
    max_bad_steps: int = 10
    gate: str | None = None  # scaled | sigmoid (None: the preset's)
    gate_scale: float | str | None = None  # None: the preset's (toolkit 1/√C'; paper SD √(C'/2)); a number; official
    pool: str | None = None  # ceil | adaptive (None: the preset's)
    dw_bias: bool | None = None
    init: str = "mean_field"
    inter_ratio: float = 0.5  # ΔConvBlock width ρ: C' = ρ·C
    scales: tuple = (1, 0.5)  # ΔConvBlock pyramid stages (each 1/2^k)
    key_width: int = 0  # channels of the key-weighted branch (not in the paper; 0: none)
    student: str = "deltaconv"  # deltaconv (ΔConvBlock) | linear (LinFusion-form linear attention, a baseline)
    layers: str | None = None  # comma-separated regexes on layer names/labels: convert only those (None: all)
    keep_attention: str | None = None  # comma-separated regexes: layers left out of the conversion
    probe: bool = True  # loss on a fixed probe batch at start and end
    progress: bool = True

    @property
    def finetune_trajectories(self) -> int:
        """Teacher samples per prompt of the trajectory fine-tune: the regression's ``traj_seeds`` and, up to
        ``finetune_seeds``, more recorded without layer tensors (none when there is no fine-tune)."""
        if self.steps <= 0:
            return self.traj_seeds
        return max(self.traj_seeds, self.finetune_seeds or 0)

    def resolved(self) -> "TrainConfig":
        """A copy with every option left at None filled in from the preset (training part)."""
        from deltadistill.presets import train_settings

        values = train_settings(self.preset, self.recipe)
        return replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        if "scales" in kw:
            kw["scales"] = tuple(kw["scales"])
        return cls(**kw)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every option (preset values filled in); returns the resolved config."""
    from deltadistill.presets import PRESETS

    def need(cond, msg):
        if not cond:
            raise TrainError(msg)

    need(cfg.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    cfg = cfg.resolved()
    need(cfg.feature_target in ("attention", "residual"), f"--feature-target must be attention or residual, got {cfg.feature_target!r}")
    need(cfg.gate in (None, "scaled", "sigmoid"), f"--gate must be scaled or sigmoid, got {cfg.gate!r}")
    need(cfg.pool in (None, "ceil", "adaptive"), f"--pool must be ceil or adaptive, got {cfg.pool!r}")
    need(cfg.init in ("mean_field", "zero"), f"--init must be mean_field or zero, got {cfg.init!r}")
    need(cfg.inter_ratio > 0 and math.isfinite(cfg.inter_ratio), f"--inter-ratio must be a positive number, got {cfg.inter_ratio}")
    need(isinstance(cfg.key_width, int) and not isinstance(cfg.key_width, bool) and cfg.key_width >= 0,
         f"--key-width must be a whole number >= 0 (0: no key-weighted branch), got {cfg.key_width!r}")
    need(cfg.key_width == 0 or cfg.student == "deltaconv", "--key-width is a ΔConvBlock branch; it does not apply to --student linear")
    try:
        levels = [scale_level(s) for s in cfg.scales]
    except ValueError as exc:
        raise TrainError(f"--scales: {exc}") from None
    need(levels and len(set(levels)) == len(levels), f"--scales must name distinct stages 1/2^k, got {list(cfg.scales)}")

    need(cfg.recipe in ("trajectory", "noised"), f"--recipe must be trajectory or noised, got {cfg.recipe!r}")
    need(cfg.regress_steps >= 0, f"--regress-steps must be >= 0, got {cfg.regress_steps}")
    need(cfg.regress_batch >= 1, f"--regress-batch must be >= 1, got {cfg.regress_batch}")
    need(1 <= cfg.regress_symmetries <= 8,
         f"--regress-symmetries must be 1 (none) to 8 (every turn and flip of the grid), got {cfg.regress_symmetries}")
    need(cfg.regress_lr > 0 and math.isfinite(cfg.regress_lr), f"--regress-lr must be a positive number, got {cfg.regress_lr}")
    need(cfg.traj_seeds >= 1 and cfg.traj_steps >= 1 and cfg.traj_keep_every >= 1,
         "--traj-seeds, --traj-steps and --traj-keep-every must be >= 1")
    need(cfg.finetune_seeds is None or cfg.finetune_seeds >= 1, f"--finetune-seeds must be >= 1, got {cfg.finetune_seeds}")
    need(cfg.cfg_loss >= 0 and math.isfinite(cfg.cfg_loss), f"--cfg-loss must be a number >= 0, got {cfg.cfg_loss}")
    need(cfg.regress_cfg_loss >= 0 and math.isfinite(cfg.regress_cfg_loss),
         f"--regress-cfg-loss must be a number >= 0, got {cfg.regress_cfg_loss}")
    need(cfg.recipe != "trajectory" or cfg.regress_steps == 0 or cfg.regress_cfg_loss == 0 or cfg.regress_batch >= 2,
         f"--regress-cfg-loss needs --regress-batch >= 2 (it draws CFG pairs), got {cfg.regress_batch}")
    if cfg.recipe == "trajectory" and cfg.regress_steps > 0:
        need(cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}")
    else:
        need(cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    need(cfg.beta >= 0, f"--beta must be >= 0, got {cfg.beta}")
    need(cfg.gamma > 0, f"--gamma must be > 0, got {cfg.gamma}")
    need(cfg.snr_weighting in SNR_WEIGHTINGS, f"--snr-weighting must be one of {SNR_WEIGHTINGS}, got {cfg.snr_weighting!r}")
    need(cfg.clip >= 0, f"--clip must be >= 0 (0 disables clipping), got {cfg.clip}")
    need(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.lr_schedule in ("constant", "cosine"), f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    need(0.0 <= cfg.caption_dropout < 1.0, f"--caption-dropout must be in [0, 1), got {cfg.caption_dropout}")
    need(cfg.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}")
    need(cfg.samples_per_prompt >= 1, f"--samples-per-prompt must be >= 1, got {cfg.samples_per_prompt}")
    need(cfg.sample_steps >= 1, f"--sample-steps must be >= 1, got {cfg.sample_steps}")
    need(cfg.mixed_precision in ("auto", "no", "bf16", "fp16"), "--mixed-precision must be auto, no, bf16 or fp16")
    if cfg.kernel_size is not None:
        need(cfg.kernel_size >= 3 and cfg.kernel_size % 2 == 1, f"--kernel-size must be odd and >= 3, got {cfg.kernel_size}")
    if cfg.kernel_ratio is not None:
        need(cfg.kernel_ratio > 0 and math.isfinite(cfg.kernel_ratio),
             f"--kernel-ratio must be a finite number > 0, got {cfg.kernel_ratio}")
    if cfg.resolution is not None:
        need(cfg.resolution > 0, f"--resolution must be positive, got {cfg.resolution}")
    need(cfg.student in ("deltaconv", "linear"), f"--student must be deltaconv or linear, got {cfg.student!r}")
    need(cfg.erf_report is not None or cfg.kernel_size is not None or cfg.preset == "paper" or cfg.student == "linear",
         "give --erf-report erf.json (per-layer kernel sizes), --kernel-size K, or --preset paper (its kernel table)")
    data = Path(cfg.data)
    need(data.exists(), f"--data {data} does not exist; pass a folder of captioned images or a prompt file")
    if data.is_file():
        need(data.stat().st_size > 0, f"--data {data} is empty; write one prompt per line")
        from deltadistill.data import DataError, read_prompts

        try:
            read_prompts(data)
        except DataError as exc:
            raise TrainError(f"--data: {exc}") from None
    if cfg.erf_report is not None:
        rp = Path(cfg.erf_report)
        need(rp.exists(), f"--erf-report {rp} does not exist; run `attnprobe analyze` first or pass --kernel-size")
    out = Path(cfg.out)
    need(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    from attnprobe.core.outputs import check_writable

    check_writable(out)
    if cfg.resume is None and out.is_dir() and not cfg.overwrite:
        present = [n for n in RUN_ARTEFACTS if (out / n).exists()]
        if present:
            raise TrainError(f"--out {out} already holds a run ({present[0]}); pass --resume latest to continue it or "
                             "--overwrite to replace it")
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        need(not others, f"--out {out} already exists and holds other files ({others[0]}, ...); choose an empty or new folder")
    return cfg


def chosen_layers(cfg: TrainConfig, sites) -> list[str] | None:
    """Names of the self-attention sites ``--layers`` selects, in model order (``None``: all of them).

    ``--layers`` picks layers, ``--keep-attention`` then removes some. The others keep the teacher's
    self-attention: they are not converted, not recorded and not trained.
    """
    if not cfg.layers and not cfg.keep_attention:
        return None
    from attnprobe.core.sites import select_sites

    sites = list(sites)
    try:
        chosen = select_sites(sites, cfg.layers) if cfg.layers else sites
        kept = {s.name for s in select_sites(sites, cfg.keep_attention, "--keep-attention")} if cfg.keep_attention else set()
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    names = [s.name for s in chosen if s.name not in kept]
    if not names:
        raise TrainError(f"--keep-attention {cfg.keep_attention!r} keeps every layer --layers selects; nothing is left to convert")
    return names


def resolve_device(cfg: TrainConfig) -> bool:
    """True to force CPU in the Accelerator."""
    if cfg.device == "auto":
        return not torch.cuda.is_available()
    if cfg.device == "cpu":
        return True
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device} requested but no CUDA device is available; use --device cpu")
        return False
    raise TrainError(f"--device must be auto, cpu or cuda[:i], got {cfg.device!r}")


def mixed_precision(cfg: TrainConfig, cpu: bool) -> str:
    if cfg.mixed_precision != "auto":
        if cpu and cfg.mixed_precision == "fp16":
            raise TrainError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
        return cfg.mixed_precision
    if cpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def lr_lambda(cfg: TrainConfig):
    warm = min(cfg.warmup, cfg.steps // 4)

    def fn(step: int) -> float:  # step = optimizer updates done so far
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    return fn


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator for (seed, step): the same draws on every rank, in every run."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + stream * 104_729) % (2**63))


def load_report_of(cfg: TrainConfig):
    if cfg.erf_report is None:
        return None
    from attnprobe.report import load_report

    try:
        return load_report(cfg.erf_report)
    except ValueError as exc:
        raise TrainError(f"--erf-report: {exc}") from None


def check_report_model(report, den, model_name: str, overridden: bool) -> None:
    """A report must describe this model: same config hash, same self-attention layer names."""
    from attnprobe.core.family import find_self_attention
    from attnprobe.core.registry import config_hash

    if report is None:
        return
    rm = report.model or {}
    want, have = rm.get("config_hash"), config_hash(den.config)
    names = {s.name for s in find_self_attention(den)}
    if (want and want != have) or {layer.name for layer in report.layers} != names:
        msg = (f"--erf-report was measured on {rm.get('alias', '?')} (config {want}), not on --model {model_name} "
               f"(config {have}); run `attnprobe analyze --model {model_name}` or pass --kernel-size")
        if overridden:
            warnings.warn(msg + " (ignored: --kernel-size overrides the report)", stacklevel=2)
            return
        raise TrainError(msg)
