"""Distil self-attention into ΔConvBlocks: ``train(TrainConfig) -> summary`` (SPEC §3).

Teacher = the base denoiser, frozen. Student = a copy converted by :func:`deltadistill.convert`
(every self-attention → ΔConvBlock); only block parameters have ``requires_grad``. Per step::

    idx, t, ε, drop ~ generator(seed, step)            global batch, identical on every rank
    z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε                          [B, C, h, w]
    ε̃ = teacher(z_t, t, c)   ε̂ = student(z_t, t, c)    c = null condition where drop (CFG)
    L = L_z + β·L_f                                     see deltadistill.losses

The loop is :class:`Trainer` (``setup()``, ``step()``, ``probe()``, ``checkpoint()``, ``run()``);
:func:`train` runs it. AdamW (lr 3e-4, betas (0.9, 0.99)), gradient clipping at 1.0, linear warm-up then constant
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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from deltadistill.checkpoints import (check_resume_settings, ckpt_name, find_checkpoint, list_checkpoints, load_checkpoint,  # noqa: F401
                                      prepare_run_folder, save_checkpoint, truncate_metrics)
from deltadistill.io import save_into_run
from deltadistill.kernel_spec import check_kernels_fit
from deltadistill.losses import FeatureTaps, distill_loss, feature_targets
from deltadistill.progress import StopFlag, TrainProgress, is_main_process  # noqa: F401  (re-exported)
from deltadistill.train_config import (
    RUN_ARTEFACTS,
    TrainConfig,
    check_report_model,
    chosen_layers,
    load_report_of,
    TrainError,
    TrainingDiverged,
    lr_lambda,
    mixed_precision,
    resolve_device,
    step_generator,
    validate,
)

__all__ = ["Trainer"]


class Trainer:
    """One distillation run: :meth:`setup` (inputs, data, teacher and student), then :meth:`run`.

    :meth:`step` is one optimizer update and returns its metrics record; :meth:`probe` the losses on
    a fixed batch; :meth:`checkpoint` writes an atomic checkpoint (main process). Everything
    random in a step comes from :func:`step_generator` (seed, step), drawn for the global batch.
    """

    def __init__(self, cfg: TrainConfig, *, batch_hook: Callable | None = None, setup_hook: Callable | None = None,
                 log: Callable[[str], None] | None = None):
        from accelerate import Accelerator

        if isinstance(cfg, dict):
            cfg = TrainConfig.from_dict(cfg)
        self.requested = cfg  # as given (None = "the preset's value")
        cfg = validate(cfg)  # preset values filled in
        self.cfg = cfg
        self.batch_hook, self.setup_hook = batch_hook, setup_hook
        cpu = resolve_device(cfg)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision(cfg, cpu))
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if cfg.batch_size % self.world:
            raise TrainError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {self.world} processes")
        self.local_bs = cfg.batch_size // self.world
        self.say = (log or print) if self.main else (lambda msg: None)
        self.out = Path(cfg.out)
        self.device = self.accelerator.device
        self.t_start = time.perf_counter()
        self.history: list[dict] = []
        self.skipped_total = 0
        self.start_step = 0

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        """Load the report, the model, the data; build teacher, student, optimizer; resume."""
        from attnprobe.core.family import denoiser_of, family_of, find_self_attention, vae_scale_factor
        from attnprobe.core.registry import config_hash, load_pipeline
        from deltadistill.conversion import convert

        cfg, acc = self.cfg, self.accelerator
        report = load_report_of(cfg)
        self.model_name = cfg.model or ((report.model or {}).get("alias") if report is not None else None) or "demo"
        self.resume_path = find_checkpoint(cfg.resume, self.out) if cfg.resume else None
        dtype = cfg.dtype if cfg.dtype != "auto" else ("fp32" if self.device.type == "cpu" else "auto")
        random = bool(report is not None and (report.model or {}).get("weights") == "random")  # same seeded weights
        pipe, spec = load_pipeline(self.model_name, dtype=dtype, device=self.device, random_weights=random)
        den = denoiser_of(pipe)
        self.family = family_of(den)
        check_report_model(report, den, self.model_name, overridden=cfg.kernel_size is not None)
        vae_f = vae_scale_factor(pipe)
        self.resolution = int(cfg.resolution or spec.resolution or self.family.default_resolution(den.config, vae_f))
        try:
            self.family.check_resolution(den.config, vae_f, self.resolution, self.resolution)
        except ValueError as exc:
            raise TrainError(f"--resolution: {exc}") from None
        from deltadistill.data import data_identity

        self.data_id = data_identity(cfg.data)
        if self.resume_path is not None:
            self._check_resume_settings()
        self.layer_names = chosen_layers(cfg, find_self_attention(den))  # None: every self-attention layer
        sched = pipe.scheduler
        if not hasattr(sched, "alphas_cumprod"):
            raise TrainError(f"{type(sched).__name__} has no alphas_cumprod; only DDPM-family (ε/v) models can be distilled")
        self.alphas_cumprod = sched.alphas_cumprod.detach().float().to(self.device)  # [T]
        self.num_train_t = int(sched.config.num_train_timesteps)
        self.prediction_type = sched.config.get("prediction_type", "epsilon")

        # data: nothing of an earlier run is touched before everything is validated
        acc.wait_for_everyone()  # every rank has validated --out before the main process writes
        self.prepare_data(pipe, den, f"{self.model_name}:{config_hash(den.config)}")
        torch.manual_seed(cfg.seed)
        self.teacher = copy.deepcopy(den).eval().requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2", "vae"):  # not needed for training any more
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        kernel_spec = cfg.kernel_size if cfg.kernel_size is not None else report
        try:
            convert(pipe, kernel_spec if cfg.student == "deltaconv" else None, gate=cfg.gate, gate_scale=cfg.gate_scale,
                    pool=cfg.pool, dw_bias=cfg.dw_bias, init=cfg.init, kernel_ratio=cfg.kernel_ratio, preset=cfg.preset,
                    inter_ratio=cfg.inter_ratio, scales=cfg.scales, key_width=cfg.key_width, layers=self.layer_names,
                    student=cfg.student)
        except ValueError as exc:
            raise TrainError(f"cannot convert {self.model_name}: {exc}") from None
        self.finish_setup(pipe, den, vae_f)
        return self

    def apply_step(self, bad: bool) -> None:
        """Step the optimizer and schedule, or count a skipped (non-finite) step; then clear the gradients."""
        if bad:
            self.skipped_total += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def prepare_data(self, pipe, den, model_id: str) -> None:
        """Noised-data recipe: latents of the images (or teacher samples of the prompts) + conditions."""
        from deltadistill.data import prepare_data

        cfg = self.cfg
        with self.accelerator.main_process_first():  # with a cache, the main process writes it, the others read it
            self.data = prepare_data(
                pipe, cfg.data, resolution=self.resolution, model_id=model_id, seed=cfg.seed,
                sample_steps=cfg.sample_steps, sample_guidance=cfg.sample_guidance,
                samples_per_prompt=cfg.samples_per_prompt, cache_dir=self.out / "cache" if cfg.cache else None, log=self.say,
            )
        if not torch.isfinite(self.data.latents).all():
            bad = int((~torch.isfinite(self.data.latents)).sum())
            raise TrainError(f"--data: {bad} latent values are NaN/inf; check the images or the VAE")
        if self.data.info.get("skipped"):
            self.say(f"data: skipped {self.data.info['skipped']} unreadable image(s), e.g. "
                     f"{self.data.info['skipped_files'][0]['file']}")

    def finish_setup(self, pipe, den, vae_f) -> None:
        """Student, kernel checks, optimizer, resume, run folder (after conversion)."""
        from attnprobe.core.family import denoiser_of, find_self_attention
        from deltadistill.conversion import delta_modules

        cfg, acc = self.cfg, self.accelerator
        self.pipe = pipe
        self.student = denoiser_of(pipe).train()
        blocks = delta_modules(self.student)
        self.names = list(blocks)
        for mod in blocks.values():
            mod.block.float()  # fp32 master weights, whatever the frozen weights' dtype
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        self.kernel_sizes = {n: m.block.kernel_size for n, m in blocks.items()}
        try:
            if cfg.student == "deltaconv":
                check_kernels_fit(self.kernel_sizes, find_self_attention(self.teacher),
                                  self.family.base_grid(den.config, vae_f, self.resolution, self.resolution),
                                  self.resolution)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self.say(f"model {self.model_name} ({self.family.name}): {len(self.names)} self-attention layers → "
                 f"{'ΔConvBlocks' if cfg.student == 'deltaconv' else 'linear attention'}, "
                 f"{self.n_trainable:,} trainable parameters; {len(self.data)} training samples at {self.resolution}px; "
                 f"{self.world} process(es), global batch {cfg.batch_size}")
        if self.setup_hook is not None:
            self.setup_hook(self.teacher, self.student)

        self.make_optimizer(cfg.lr, lr_lambda(cfg))
        self.student_ddp, self.optimizer = acc.prepare(self.student, self.optimizer)
        self.teacher.to(self.device)
        self.wdtype = next(p for p in self.teacher.parameters()).dtype
        if self.resume_path is not None:
            self._check_resume_settings(late=True)  # the settings preparing the data may have changed
            self._resume()  # before anything of the run folder is rewritten: a failure changes nothing
        self._prepare_run_folder()
        if self.resume_path is None and self.main:
            (self.out / "metrics.jsonl").write_text("")

    def make_optimizer(self, lr: float, schedule) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    def _run_settings(self) -> dict:
        return {**asdict(self.cfg), "model": self.model_name, "resolution": self.resolution,
                "data_id": getattr(self, "data_id", None)}

    # Settings a resumed run must share with its checkpoint, compared as resolved by the preset. They are checked
    # before the data are prepared (a refusal costs nothing and writes nothing), except RESUME_LATE_KEYS, which
    # preparing the data may still change (the trajectory recipe's no-CFG and rotary fallbacks): those after it.
    RESUME_KEYS = ("model", "seed", "batch_size", "resolution", "layers", "keep_attention",  # kernel sizes: block shapes
                   "recipe", "student", "sample_guidance", "data_id")
    RESUME_RECIPE_KEYS = ("beta", "gamma", "snr_weighting", "feature_target", "caption_dropout", "sample_steps",
                          "samples_per_prompt")  # the noised recipe's losses and data
    RESUME_LATE_KEYS: tuple = ()

    def _check_resume_settings(self, late: bool = False) -> None:
        keys = self.RESUME_LATE_KEYS if late else \
            self.RESUME_KEYS + tuple(k for k in self.RESUME_RECIPE_KEYS if k not in self.RESUME_LATE_KEYS)
        check_resume_settings(self.resume_path, self._run_settings(), keys, self.requested)

    def _prepare_run_folder(self) -> None:
        """Main process: replace an old run (--overwrite), create the folder, write train_config.json."""
        if self.main:
            prepare_run_folder(self.out, self.cfg.overwrite and self.cfg.resume is None, RUN_ARTEFACTS, self._run_settings())
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        state = load_checkpoint(self.resume_path, self.student, self.optimizer, self.scheduler)
        self.start_step, self.skipped_total = int(state["step"]), int(state.get("skipped_total", 0))
        self.say(f"resumed from {self.resume_path} at step {self.start_step}")
        if self.main:
            self.history = truncate_metrics(self.out / "metrics.jsonl", self.start_step)

    # -- one step --------------------------------------------------------------------------------
    def draw(self, step: int, stream: int = 0):
        """Global-batch draws for ``step`` (stream 1: the probe batch); returns this rank's slice."""
        cfg = self.cfg
        g = step_generator(cfg.seed, step, stream)
        c, hl = self.data.latents.shape[1], self.data.latents.shape[2:]
        idx = torch.randint(len(self.data), (cfg.batch_size,), generator=g)
        t = torch.randint(self.num_train_t, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, c, *hl), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < (cfg.caption_dropout if stream == 0 else 0.0)
        sl = slice(self.rank * self.local_bs, (self.rank + 1) * self.local_bs)
        return idx[sl], t[sl].to(self.device), noise[sl].to(self.device), drop[sl]

    def forward(self, taps: FeatureTaps, step: int, stream: int = 0, grad: bool = True):
        """Teacher and student on the same noisy latents; returns the :class:`LossParts`."""
        idx, t, noise, drop = self.draw(step, stream)
        z0, cond = self.data.batch(idx, drop, device=self.device, dtype=self.wdtype)
        if self.batch_hook is not None and stream == 0:
            z0, cond = self.batch_hook(step, z0, cond)
        ac = self.alphas_cumprod
        a = ac[t].reshape(-1, 1, 1, 1)  # [b, 1, 1, 1]
        z_t = (a.sqrt() * z0.float() + (1 - a).sqrt() * noise).to(self.wdtype)  # [b, C, h, w]
        kw = self.family.denoiser_kwargs(self.teacher, cond, self.resolution)
        with self.accelerator.autocast():
            with torch.no_grad():
                t_out = self.teacher(z_t, timestep=t, return_dict=False, **kw)[0]  # [b, C_out, h, w]
            with torch.set_grad_enabled(grad):
                s_out = (self.student_ddp if grad else self.student)(z_t, timestep=t, return_dict=False, **kw)[0]
                return distill_loss(
                    student_out=s_out, teacher_out=t_out, noise=noise, z_t=z_t, t=t, alphas_cumprod=ac,
                    feature=taps.loss(), prediction_type=self.prediction_type, beta=self.cfg.beta, gamma=self.cfg.gamma,
                    weighting=self.cfg.snr_weighting,
                )

    def _reduced(self, parts) -> torch.Tensor:
        return torch.stack([parts.total, parts.output, parts.feature, parts.gap]).detach().float()

    def probe(self, taps: FeatureTaps) -> dict:
        """Losses on the fixed probe batch (stream 1, no caption dropout), averaged over processes."""
        with torch.no_grad():
            parts = self.forward(taps, 0, stream=1, grad=False)
        vals = self.accelerator.reduce(self._reduced(parts), "mean")
        return {"loss": float(vals[0]), "l_z": float(vals[1]), "l_f": float(vals[2]), "gap": float(vals[3])}

    def step(self, taps: FeatureTaps, step: int) -> dict:
        """One optimizer update (skipped when the loss or gradient is not finite); the metrics record."""
        acc, cfg = self.accelerator, self.cfg
        parts = self.forward(taps, step)
        local = self._reduced(parts)
        bad_loss = acc.reduce((~torch.isfinite(local).all()).float().reshape(1), "sum")
        acc.backward(parts.total)
        gnorm = acc.clip_grad_norm_(self.params, cfg.clip if cfg.clip > 0 else float("inf"))
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        bad = bool(bad_loss.item() > 0) or not math.isfinite(gnorm)
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.apply_step(bad)
        vals = acc.reduce(local, "mean")
        return {"step": step + 1, "loss": float(vals[0]), "l_z": float(vals[1]), "l_f": float(vals[2]),
                "gap": float(vals[3]), "lr": lr_now, "grad_norm": gnorm, "skipped": bad,
                "skipped_total": self.skipped_total}

    def checkpoint(self, step: int) -> Path | None:
        """Write ``checkpoints/step-N`` (main process; all processes wait for it)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.main:
            state = {"config": self._run_settings(), "skipped_total": self.skipped_total, "world_size": self.world,
                     "writer_rank": self.rank, "kernel_sizes": self.kernel_sizes,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "last": self.history[-1] if self.history else None}
            path = save_checkpoint(self.out, step, self.student, self.optimizer, self.scheduler, state,
                                   self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train up to ``cfg.steps``; returns the summary (see :func:`train`)."""
        cfg, acc = self.cfg, self.accelerator
        interrupted, consecutive, last_ckpt = False, 0, None
        with FeatureTaps(self.teacher, self.student, self.names,
                         feature_targets(self.cfg.feature_target, self.teacher, self.names)) as taps, StopFlag() as stop, \
                TrainProgress(self.main and cfg.progress, self.total_steps, self.start_step) as bar:
            probe_start = self.probe(taps) if cfg.probe else None
            metrics = open(self.out / "metrics.jsonl", "a") if self.main else None
            try:
                step = self.start_step
                while step < self.total_steps:
                    rec = self.step(taps, step)
                    step = rec["step"]
                    consecutive = consecutive + 1 if rec["skipped"] else 0
                    self.history.append(rec)
                    if metrics is not None:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    bar.update(step, rec)
                    if consecutive >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"{consecutive} consecutive steps had a NaN/inf loss or gradient (last at step {step}; "
                            f"{self.skipped_total} skipped in total); lower --lr, check the data, or raise --max-bad-steps"
                        )
                    if acc.reduce(torch.tensor([float(stop.requested)], device=self.device), "sum").item() > 0:
                        interrupted = True
                        break
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.total_steps:
                        last_ckpt = self.checkpoint(step)
            finally:
                if metrics is not None:
                    metrics.close()
            if last_ckpt is None or last_ckpt.name != ckpt_name(step):
                last_ckpt = self.checkpoint(step)
            probe_end = self.probe(taps) if cfg.probe and not interrupted else None
        summary = self._summary(step, interrupted, probe_start, probe_end, last_ckpt)
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if not interrupted:
            if self.main:
                extra = {k: summary[k] for k in ("steps", "skipped_steps", "resolution", "global_batch", "probe_loss_start",
                                                 "probe_loss_end", "loss_last")}
                save_into_run(self.pipe, self.out, base_model=self.model_name, extra={**extra, "train_config": "train_config.json"})
            acc.wait_for_everyone()
            self.say(f"saved the distilled model to {self.out} (config.json + delta_blocks.safetensors)")
        else:
            self.say(f"interrupted at step {step}; checkpoint {last_ckpt}; continue with --resume latest")
        summary["history"] = self.history
        return summary

    def _summary(self, final_step, interrupted, probe_start, probe_end, last_ckpt) -> dict:
        acc = self.accelerator
        dist = acc.distributed_type
        return {
            "model": self.model_name, "family": self.family.name, "out": str(self.out), "steps": final_step,
            "start_step": self.start_step, "interrupted": interrupted, "skipped_steps": self.skipped_total,
            "world_size": self.world, "distributed": str(dist.value if hasattr(dist, "value") else dist),
            "backend": str(getattr(acc.state, "backend", None)), "global_batch": self.cfg.batch_size,
            "resolution": self.resolution, "layers": len(self.names), "trainable_parameters": self.n_trainable,
            "kernel_sizes": self.kernel_sizes, "data": self.data.info, "probe_loss_start": probe_start,
            "probe_loss_end": probe_end, "loss_first": self.history[0] if self.history else None,
            "loss_last": self.history[-1] if self.history else None,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "seconds": round(time.perf_counter() - self.t_start, 2),
        }
