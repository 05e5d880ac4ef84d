"""Distil self-attention into ΔConvBlocks: ``train(TrainConfig) -> summary`` (SPEC §3).

Teacher = the base denoiser, frozen. Student = a copy converted by :func:`deltadistill.convert`
(every self-attention → ΔConvBlock); only block parameters have ``requires_grad``. Per step::

    idx, t, ε, drop ~ generator(seed, step)            global batch, identical on every rank
    z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε                          [B, C, h, w]
    ε̃ = teacher(z_t, t, c)   ε̂ = student(z_t, t, c)    c = null condition where drop (CFG)
    L = L_z + β·L_f                                     see deltadistill.losses

AdamW (lr 3e-4, betas (0.9, 0.99)), gradient clipping at 1.0, linear warm-up then constant
(or cosine) learning rate. Everything random in a step comes from a generator seeded by
(seed, step), drawn for the *global* batch (``batch_size`` is global, split evenly over
processes), so a run is deterministic under its seed, a resumed run continues exactly, and
N processes compute the same updates as one process with the same global batch.

Scale-out: runs unchanged under ``accelerate launch`` (``accelerate.Accelerator``, DDP over
the student; bf16/fp16 autocast on GPUs). Only the main process writes: the run folder, the
metrics file, checkpoints and the final model.

Run folder (``out``)::

    config.json, delta_blocks.safetensors    the distilled model (deltadistill.io format; final)
    train_config.json                        the TrainConfig of the run
    metrics.jsonl                            one line per step: loss, l_z, l_f, lr, grad_norm, skipped
    summary.json                             what train() returns, minus the per-step history
    checkpoints/step-0000100/                blocks.safetensors, optimizer.pt, scheduler.pt,
                                             rng.safetensors, state.json (written last)
    cache/data-<hash>.safetensors            with cache=True: latents + text embeddings

Checkpoints are atomic: written into ``checkpoints/.tmp-…`` and renamed into place, so any
``step-*`` folder is complete; ``resume="latest"`` picks the highest step. Safety:

* a step whose loss or gradient is NaN/inf is skipped (no update) and counted; ``max_bad_steps``
  consecutive bad steps stop the run with :class:`TrainingDiverged`;
* SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns with
  ``summary["interrupted"] = True``; a second Ctrl-C aborts at once.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnprobe.outputs import replace_dir
from deltadistill.losses import SNR_WEIGHTINGS, FeatureTaps, distill_loss

__all__ = ["TrainConfig", "train", "is_main_process", "TrainError", "TrainingDiverged", "find_checkpoint", "denoiser_kwargs"]

RUN_ARTEFACTS = ("config.json", "delta_blocks.safetensors", "train_config.json", "metrics.jsonl", "summary.json", "checkpoints")


class TrainError(ValueError):
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
    steps: int = 1000
    batch_size: int = 4  # global batch (split over processes)
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    beta: float = 1e-3  # weight of the feature loss
    gamma: float = 5.0  # Min-SNR γ
    snr_weighting: str = "standard"  # standard | paper
    clip: float = 1.0  # gradient-norm clip (0 = off)
    warmup: int = 100  # linear warm-up steps (at most a quarter of the run)
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    resolution: int | None = None  # image side in pixels; default: the model's
    seed: int = 0
    caption_dropout: float = 0.1
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
    gate: str = "scaled"
    init: str = "mean_field"
    probe: bool = True  # loss on a fixed probe batch at start and end
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Validation and set-up
# ----------------------------------------------------------------------------------------------


def _validate(cfg: TrainConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise TrainError(msg)

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
    if cfg.resolution is not None:
        need(cfg.resolution > 0, f"--resolution must be positive, got {cfg.resolution}")
    need(cfg.erf_report is not None or cfg.kernel_size is not None,
         "give --erf-report erf.json (per-layer kernel sizes) or --kernel-size K")
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
    if cfg.resume is None and out.is_dir() and not cfg.overwrite:
        present = [n for n in RUN_ARTEFACTS if (out / n).exists()]
        need(not present, f"--out {out} already holds a run ({present[0]}); pass --resume latest to continue it or --overwrite to replace it")


def _load_report(cfg: TrainConfig):
    if cfg.erf_report is None:
        return None
    from attnprobe import load_report

    try:
        return load_report(cfg.erf_report)
    except ValueError as exc:
        raise TrainError(f"--erf-report: {exc}") from None


def _check_report_model(report, den, model_name: str, overridden: bool) -> None:
    """A report must describe this model: same config hash, same self-attention layer names."""
    from attnprobe.arch import find_self_attention
    from attnprobe.registry import config_hash

    if report is None:
        return
    rm = report.model or {}
    want, have = rm.get("config_hash"), config_hash(den.config)
    names = {s.name for s in find_self_attention(den)}
    rnames = {layer.name for layer in report.layers}
    if (want and want != have) or rnames != names:
        msg = (
            f"--erf-report was measured on {rm.get('alias', '?')} (config {want}), not on --model {model_name} "
            f"(config {have}); run `attnprobe analyze --model {model_name}` or pass --kernel-size"
        )
        if overridden:
            import warnings

            warnings.warn(msg + " (ignored: --kernel-size overrides the report)", stacklevel=2)
            return
        raise TrainError(msg)


def _resolve_device(cfg: TrainConfig) -> bool:
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


def _mixed_precision(cfg: TrainConfig, cpu: bool) -> str:
    if cfg.mixed_precision != "auto":
        if cpu and cfg.mixed_precision == "fp16":
            raise TrainError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
        return cfg.mixed_precision
    if cpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def denoiser_kwargs(arch: str, den, cond: dict, resolution: int) -> dict:
    """Keyword arguments (besides latent and timestep) for one denoiser call; ``cond`` values [B, ...]."""
    if arch == "pixart":
        b = cond["encoder_hidden_states"].shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(den, "use_additional_conditions", False):
            dev, dt = cond["encoder_hidden_states"].device, cond["encoder_hidden_states"].dtype
            added = {
                "resolution": torch.tensor([[resolution, resolution]] * b, device=dev, dtype=dt),  # [B, 2]
                "aspect_ratio": torch.ones(b, 1, device=dev, dtype=dt),  # [B, 1]
            }
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],  # [B, L, D]
            "encoder_attention_mask": cond["encoder_attention_mask"],  # [B, L]
            "added_cond_kwargs": added,
        }
    if arch == "unet":
        kw = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if "text_embeds" in cond:  # SDXL
            kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return kw
    if arch == "dit":
        return {"class_labels": cond["class_labels"]}
    raise TrainError(f"cannot train architecture {arch!r}")


def _lr_lambda(cfg: TrainConfig):
    warm = min(cfg.warmup, cfg.steps // 4)

    def fn(step: int) -> float:  # step = optimizer updates done so far
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    return fn


def _step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator for (seed, step): the same draws on every rank, in every run."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + stream * 104_729) % (2**63))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _ckpt_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a ``step-*`` folder with ``state.json``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(resume: str, out) -> Path:
    """``"latest"`` → newest checkpoint of ``out``; a run folder → its newest; a checkpoint folder → itself."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise TrainError(f"--resume latest: no checkpoint in {Path(out) / 'checkpoints'}; start without --resume")
        return found[-1]
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise TrainError(f"--resume {resume}: not a checkpoint folder (no state.json) nor a run folder with checkpoints")


def _rng_tensors() -> tuple[dict, dict]:
    """Current RNG states as tensors (safetensors-friendly, no pickle) plus JSON scalars."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python_version": version, "python_gauss": gauss, "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    return tensors, meta


def _set_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    random.setstate((meta["python_version"], tuple(int(v) for v in tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_gauss"]))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)


def _block_state(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, step: int, student, optimizer, scheduler, state: dict, keep: int = 3) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp folder, then rename); prune to ``keep`` newest."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / _ckpt_name(step)
    tmp = root / f".tmp-{_ckpt_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_block_state(student), str(tmp / "blocks.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng, rng_meta = _rng_tensors()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_meta}, indent=2))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_stale_tmp(run_dir) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _load_checkpoint(path: Path, student, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    blocks = load_file(str(path / "blocks.safetensors"))
    params = dict(student.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(blocks) != trainable:
        diff = sorted(set(blocks) ^ trainable)
        raise TrainError(f"--resume {path}: checkpoint blocks do not match this model/kernel sizes (e.g. {diff[0]!r})")
    with torch.no_grad():
        for n, v in blocks.items():
            if params[n].shape != v.shape:
                raise TrainError(f"--resume {path}: {n} has shape {tuple(v.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(v.to(params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    _set_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


# ----------------------------------------------------------------------------------------------
# Progress display
# ----------------------------------------------------------------------------------------------


class _Progress:
    """Rich progress bar on the main process (step, losses, it/s, ETA); a no-op elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]distil"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, losses="", rate="")
        self.t0, self.n = time.perf_counter(), 0

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, rec: dict) -> None:
        if self.bar is None:
            return
        self.n += 1
        rate = self.n / max(1e-9, time.perf_counter() - self.t0)
        losses = f"L {rec['loss']:.4g}  L_z {rec['l_z']:.4g}  L_f {rec['l_f']:.4g}" + (
            f"  skipped {rec['skipped_total']}" if rec["skipped_total"] else ""
        )
        self.bar.update(self.task, completed=step, losses=losses, rate=f"{rate:.2f} it/s")


class _StopFlag:
    """SIGINT → request a clean stop (checkpoint, then return); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    batch_hook: Callable | None = None,
    setup_hook: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run a distillation; returns a summary dict (see the module docstring for the run folder).

    ``batch_hook(step, latents, cond) -> (latents, cond)`` may edit each local batch before the
    forward passes (tests inject NaNs with it). ``setup_hook(teacher, student)`` is called once
    with both denoisers before the first step (tests snapshot the frozen weights). ``log`` receives one-line messages on the main
    process (default: print).

    Raises :class:`TrainError` (bad input; nothing already written is touched), and
    :class:`TrainingDiverged` after ``max_bad_steps`` consecutive non-finite steps.
    """
    from accelerate import Accelerator

    from attnprobe.arch import base_grid, default_resolution, denoiser_of, detect_arch, vae_scale_factor
    from attnprobe.registry import ModelLoadError, config_hash, load_pipeline
    from deltadistill.conversion import convert, delta_modules
    from deltadistill.data import DataError, prepare_data

    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    _validate(cfg)
    cpu = _resolve_device(cfg)
    accelerator = Accelerator(cpu=cpu, mixed_precision=_mixed_precision(cfg, cpu))
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {world} processes")
    local_bs = cfg.batch_size // world
    say = (log or print) if main else (lambda msg: None)
    out = Path(cfg.out)
    t_start = time.perf_counter()

    # ---- inputs: report, model, kernel sizes (no writes yet) ------------------------------------
    report = _load_report(cfg)
    model_name = cfg.model or ((report.model or {}).get("alias") if report is not None else None) or "demo"
    resume_path = find_checkpoint(cfg.resume, out) if cfg.resume else None
    device = accelerator.device
    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp32" if cpu else "auto")
    try:
        pipe, spec = load_pipeline(model_name, dtype=dtype, device=device)
    except ModelLoadError as exc:
        raise TrainError(f"--model {model_name}: {exc}") from None
    den = denoiser_of(pipe)
    arch = detect_arch(den)
    _check_report_model(report, den, model_name, overridden=cfg.kernel_size is not None)
    vae_f = vae_scale_factor(pipe)
    if arch == "dit":
        resolution = default_resolution(arch, den.config, vae_f)
        if cfg.resolution not in (None, resolution):
            raise TrainError(f"DiT models have a fixed resolution ({resolution}); drop --resolution")
    else:
        resolution = int(cfg.resolution or spec.resolution or default_resolution(arch, den.config, vae_f))
    try:
        base_grid(arch, den.config, vae_f, resolution, resolution)
    except ValueError as exc:
        raise TrainError(f"--resolution: {exc}") from None
    if resume_path is not None:
        prev = json.loads((resume_path / "state.json").read_text()).get("config", {})
        now = {**asdict(cfg), "model": model_name, "resolution": resolution}
        for key in ("model", "seed", "batch_size", "resolution"):  # kernel sizes: checked by block shapes
            if key in prev and prev[key] != now[key]:
                raise TrainError(
                    f"--resume {resume_path}: the checkpoint was trained with {key}={prev[key]!r}, now {now[key]!r}; "
                    "resume with the same settings or start a new run"
                )
    sched = pipe.scheduler
    if not hasattr(sched, "alphas_cumprod"):
        raise TrainError(f"{type(sched).__name__} has no alphas_cumprod; only DDPM-family (ε/v) models can be distilled")
    alphas_cumprod = sched.alphas_cumprod.detach().float().cpu()  # [T]
    num_train_t = int(sched.config.num_train_timesteps)
    prediction_type = sched.config.get("prediction_type", "epsilon")

    # ---- data (nothing of an earlier run is touched before everything is validated) -----------
    accelerator.wait_for_everyone()  # every rank has validated --out before the main process writes
    cache_dir = out / "cache" if cfg.cache else None
    try:
        with accelerator.main_process_first():  # with a cache, the main process writes it, the others read it
            data = prepare_data(
                pipe, arch, cfg.data, resolution=resolution, model_id=f"{model_name}:{config_hash(den.config)}",
                seed=cfg.seed, sample_steps=cfg.sample_steps, sample_guidance=cfg.sample_guidance,
                samples_per_prompt=cfg.samples_per_prompt, cache_dir=cache_dir, log=say,
            )
    except DataError as exc:
        raise TrainError(f"--data: {exc}") from None
    if not torch.isfinite(data.latents).all():
        raise TrainError(f"--data: {int((~torch.isfinite(data.latents)).sum())} latent values are NaN/inf; check the images or the VAE")
    if data.info.get("skipped"):
        say(f"data: skipped {data.info['skipped']} unreadable image(s), e.g. {data.info['skipped_files'][0]['file']}")

    # ---- teacher and student --------------------------------------------------------------------
    teacher = copy.deepcopy(den).eval().requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "vae"):  # not needed for training any more
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    torch.manual_seed(cfg.seed)
    kernel_spec = cfg.kernel_size if cfg.kernel_size is not None else report
    try:
        convert(pipe, kernel_spec, gate=cfg.gate, init=cfg.init)
    except ValueError as exc:
        raise TrainError(f"cannot convert {model_name}: {exc}") from None
    student = denoiser_of(pipe)
    student.train()
    names = list(delta_modules(student))
    for mod in delta_modules(student).values():
        mod.block.float()  # fp32 master weights, whatever the frozen weights' dtype
    params = [p for p in student.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    kernel_sizes = {n: m.block.kernel_size for n, m in delta_modules(student).items()}
    say(f"model {model_name} ({arch}): {len(names)} self-attention layers → ΔConvBlocks, "
        f"{n_trainable:,} trainable parameters; {len(data)} training samples at {resolution}px; "
        f"{world} process(es), global batch {cfg.batch_size}")

    if setup_hook is not None:
        setup_hook(teacher, student)

    # ---- the run folder (main process only) -----------------------------------------------------
    if main:
        if cfg.overwrite and cfg.resume is None and out.is_dir():
            for name in RUN_ARTEFACTS:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale_tmp(out)
        cfg_json = {**asdict(cfg), "model": model_name, "resolution": resolution}
        (out / "train_config.json").write_text(json.dumps(cfg_json, indent=2))
    accelerator.wait_for_everyone()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    student_ddp, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(device)

    start_step, history, skipped_total = 0, [], 0
    if resume_path is not None:
        state = _load_checkpoint(resume_path, student, optimizer, scheduler)
        start_step, skipped_total = int(state["step"]), int(state.get("skipped_total", 0))
        say(f"resumed from {resume_path} at step {start_step}")
        if main and (out / "metrics.jsonl").is_file():  # drop lines past the checkpoint (a killed run's tail)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start_step]
            history = [json.loads(ln) for ln in keep]
            tmp = out / f".metrics.jsonl.tmp-{os.getpid()}"
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, out / "metrics.jsonl")
    elif main:
        (out / "metrics.jsonl").write_text("")

    ac = alphas_cumprod.to(device)
    wdtype = next(p for p in teacher.parameters()).dtype
    c, hl = data.latents.shape[1], data.latents.shape[2:]

    def draw(step: int, stream: int = 0):
        """Global-batch draws for ``step``; returns this rank's slice."""
        g = _step_generator(cfg.seed, step, stream)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        t = torch.randint(num_train_t, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, c, *hl), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < (cfg.caption_dropout if stream == 0 else 0.0)
        sl = slice(rank * local_bs, (rank + 1) * local_bs)
        return idx[sl], t[sl].to(device), noise[sl].to(device), drop[sl]

    def forward(taps: FeatureTaps, step: int, stream: int = 0, grad: bool = True):
        idx, t, noise, drop = draw(step, stream)
        z0, cond = data.batch(idx, drop, device=device, dtype=wdtype)
        if batch_hook is not None and stream == 0:
            z0, cond = batch_hook(step, z0, cond)
        a = ac[t].reshape(-1, 1, 1, 1)  # [b, 1, 1, 1]
        z_t = (a.sqrt() * z0.float() + (1 - a).sqrt() * noise).to(wdtype)  # [b, C, h, w]
        kw = denoiser_kwargs(arch, teacher, cond, resolution)
        with accelerator.autocast():
            with torch.no_grad():
                t_out = teacher(z_t, timestep=t, return_dict=False, **kw)[0]  # [b, C_out, h, w]
            with torch.set_grad_enabled(grad):
                s_out = (student_ddp if grad else student)(z_t, timestep=t, return_dict=False, **kw)[0]
                lf = taps.loss()
                parts = distill_loss(
                    student_out=s_out, teacher_out=t_out, noise=noise, z_t=z_t, t=t, alphas_cumprod=ac,
                    feature=lf, prediction_type=prediction_type, beta=cfg.beta, gamma=cfg.gamma,
                    weighting=cfg.snr_weighting,
                )
        return parts

    def probe_loss(taps) -> dict:
        with torch.no_grad():
            parts = forward(taps, 0, stream=1, grad=False)
        vals = accelerator.reduce(torch.stack([parts.total, parts.output, parts.feature, parts.gap]).detach().float(), "mean")
        return {"loss": float(vals[0]), "l_z": float(vals[1]), "l_f": float(vals[2]), "gap": float(vals[3])}

    def ckpt_state(step: int) -> dict:
        return {"config": {**asdict(cfg), "model": model_name, "resolution": resolution}, "skipped_total": skipped_total,
                "world_size": world, "writer_rank": rank, "kernel_sizes": kernel_sizes, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "last": history[-1] if history else None}

    def checkpoint(step: int) -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if main:
            path = save_checkpoint(out, step, student, optimizer, scheduler, ckpt_state(step), cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    interrupted, consecutive, last_ckpt = False, 0, None
    with FeatureTaps(teacher, student, names) as taps, _StopFlag() as stop, \
            _Progress(main and cfg.progress, cfg.steps, start_step) as bar:
        probe_start = probe_loss(taps) if cfg.probe else None
        metrics = open(out / "metrics.jsonl", "a") if main else None
        try:
            step = start_step
            while step < cfg.steps:
                parts = forward(taps, step)
                local = torch.stack([parts.total, parts.output, parts.feature, parts.gap]).detach().float()
                bad_loss = accelerator.reduce((~torch.isfinite(local).all()).float().reshape(1), "sum")
                accelerator.backward(parts.total)
                gnorm = accelerator.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
                gnorm = float(gnorm) if gnorm is not None else float("nan")
                bad = bool(bad_loss.item() > 0) or not math.isfinite(gnorm)
                lr_now = optimizer.param_groups[0]["lr"]
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    skipped_total += 1
                    consecutive += 1
                else:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    consecutive = 0
                step += 1
                vals = accelerator.reduce(local, "mean")
                rec = {"step": step, "loss": float(vals[0]), "l_z": float(vals[1]), "l_f": float(vals[2]), "gap": float(vals[3]),
                       "lr": lr_now, "grad_norm": gnorm, "skipped": bad, "skipped_total": skipped_total}
                history.append(rec)
                if metrics is not None:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                bar.update(step, rec)
                if consecutive >= cfg.max_bad_steps:
                    raise TrainingDiverged(
                        f"{consecutive} consecutive steps had a NaN/inf loss or gradient (last at step {step}; "
                        f"{skipped_total} skipped in total); lower --lr, check the data, or raise --max-bad-steps"
                    )
                stop_all = accelerator.reduce(torch.tensor([float(stop.requested)], device=device), "sum")
                if stop_all.item() > 0:
                    interrupted = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    last_ckpt = checkpoint(step)
        finally:
            if metrics is not None:
                metrics.close()
        final_step = step
        last_ckpt = checkpoint(final_step) if (last_ckpt is None or last_ckpt.name != _ckpt_name(final_step)) else last_ckpt
        probe_end = probe_loss(taps) if cfg.probe and not interrupted else None

    summary = {
        "model": model_name,
        "arch": arch,
        "out": str(out),
        "steps": final_step,
        "start_step": start_step,
        "interrupted": interrupted,
        "skipped_steps": skipped_total,
        "world_size": world,
        "distributed": str(accelerator.distributed_type.value if hasattr(accelerator.distributed_type, "value") else accelerator.distributed_type),
        "backend": str(getattr(accelerator.state, "backend", None)),
        "global_batch": cfg.batch_size,
        "resolution": resolution,
        "layers": len(names),
        "trainable_parameters": n_trainable,
        "kernel_sizes": kernel_sizes,
        "data": data.info,
        "probe_loss_start": probe_start,
        "probe_loss_end": probe_end,
        "loss_first": history[0] if history else None,
        "loss_last": history[-1] if history else None,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not interrupted:
        if main:
            _save_model(pipe, out, model_name, summary)
        accelerator.wait_for_everyone()
        say(f"saved the distilled model to {out} (config.json + delta_blocks.safetensors)")
    else:
        say(f"interrupted at step {final_step}; checkpoint {last_ckpt}; continue with --resume latest")
    summary["history"] = history
    return summary


def is_main_process() -> bool:
    """True on the main process (or when not launched distributed)."""
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # pragma: no cover
        return True


def _save_model(pipe, out: Path, model_name: str, summary: dict) -> None:
    """deltadistill.io.save into a temp folder, then move its two files into the run folder.

    ``io.save`` replaces whole folders; the run folder also holds checkpoints and metrics, so the
    model is staged beside them and its files are renamed in (weights first, config.json last:
    a config.json always describes complete weights).
    """
    from deltadistill import io as dio

    stage = out / f".model-tmp-{uuid.uuid4().hex[:8]}"
    try:
        extra = {k: summary[k] for k in ("steps", "skipped_steps", "resolution", "global_batch", "probe_loss_start",
                                         "probe_loss_end", "loss_last")}
        extra["train_config"] = "train_config.json"
        dio.save(pipe, stage, base_model=model_name, extra=extra)
        os.replace(stage / dio.WEIGHTS_NAME, out / dio.WEIGHTS_NAME)
        os.replace(stage / dio.CONFIG_NAME, out / dio.CONFIG_NAME)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
