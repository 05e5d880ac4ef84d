"""The ``trajectory`` recipe's trainer: record teacher trajectories, regress every block, fine-tune end to end.

Steps are counted over both stages, so checkpoints, ``--resume`` and the metrics file work as in
the noised recipe: steps 1 … ``regress_steps`` are the teacher-forced regression
(:func:`deltadistill.trajectory.regression_loss`, AdamW at ``regress_lr``, warm-up min(50, a quarter) then cosine
to 0, gradients clipped per block; each step's states turned or flipped by one of the first
``regress_symmetries`` symmetries of the square, :func:`~deltadistill.trajectory.dihedral` — exact
training pairs, since self-attention commutes with any reordering of its tokens; with
``regress_cfg_loss`` > 0 the ``regress_batch`` states are drawn as CFG pairs and every layer's guided
output enters the loss with that weight), the next ``steps`` the end-to-end fine-tune on recorded
states (output MSE + ``cfg_loss`` · guided-output MSE, each CFG pair as [cond; uncond] so that the
guided output is the sampler's u + w·(c − u), on the ε channels the sampler uses; AdamW at ``lr``,
warm-up then cosine, clip ``clip``). The fine-tune's states are those of the regression's ``traj_seeds``
samples per prompt and, up to ``finetune_seeds``, of more samples recorded without layer tensors
(:func:`~deltadistill.trajectory.join_states`): new noise in its batches is what carries the fit to noise the
student has not seen. A fresh optimizer starts at the stage boundary. Every draw of a step comes from
:func:`~deltadistill.train_config.step_generator` (seed, step) for the global batch; the
trajectories are re-recorded identically (seeded sampling) when a run resumes.

With several processes every rank records the same trajectories; the regression's gradients
are averaged over ranks by hand (the blocks are called directly, outside DDP), the fine-tune
runs through the DDP-wrapped student as the noised recipe does.
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch
import torch.nn.functional as F

from deltadistill.trainer import Trainer
from deltadistill.train_config import TrainError, step_generator
from deltadistill.trajectory import (TrajectoryMemoryError, cfg_pairs, guided, join_states, record_trajectories,
                                    regression_loss, replay, sampler_output)

__all__ = ["TrajectoryTrainer", "trajectory_seeds", "REGRESS_WARMUP"]

REGRESS_WARMUP = 50
PROBE_STATES = 16


def trajectory_seeds(seed: int, n: int) -> list[int]:
    """Sampling seeds of the recorded trajectories: 1000 + 1000·seed + i, clear of the evaluation's 0 … 3."""
    return [1000 + 1000 * int(seed) + i for i in range(n)]


def _cosine(warmup: int, steps: int):
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))
    return f


class _TrajectoryData:
    def __init__(self, traj):
        self.traj = traj
        self.info = {"kind": "trajectories", **traj.info}

    def __len__(self) -> int:
        return len(self.traj)


class TrajectoryTrainer(Trainer):
    """:class:`~deltadistill.trainer.Trainer` with the trajectory recipe (see the module docstring)."""

    RESUME_RECIPE_KEYS = ("regress_steps", "regress_batch", "regress_symmetries", "regress_cfg_loss", "cfg_loss",
                          "traj_seeds", "finetune_seeds", "traj_steps", "traj_keep_every")
    RESUME_LATE_KEYS = ("regress_symmetries", "regress_cfg_loss", "cfg_loss")  # prepare_data's fallbacks set them

    @property
    def total_steps(self) -> int:
        return self.cfg.regress_steps + self.cfg.steps

    def prepare_data(self, pipe, den, model_id: str) -> None:
        from attnprobe.core.family import find_self_attention
        from deltadistill.data import read_image_folder, read_prompts

        cfg = self.cfg
        source = __import__("pathlib").Path(cfg.data)
        if source.is_dir():
            prompts = sorted({cap for _, cap in read_image_folder(source)[0] if cap})
            if not prompts:
                raise TrainError(f"--data {source}: the trajectory recipe samples from captions and these images have none")
        else:
            prompts = read_prompts(source)
        sites = find_self_attention(den)
        if self.layer_names is not None:  # --layers: only the layers that are converted are recorded
            sites = [s for s in sites if s.name in set(self.layer_names)]
        seeds = trajectory_seeds(cfg.seed, cfg.traj_seeds)
        self.say(f"data: recording teacher trajectories, {len(prompts)} prompts × {len(seeds)} seeds × "
                 f"{cfg.traj_steps} steps")
        try:
            self.traj = record_trajectories(pipe, prompts, seeds, steps=cfg.traj_steps, resolution=self.resolution,
                                            guidance=cfg.sample_guidance, sites=sites, keep_every=cfg.traj_keep_every,
                                            log=self.say)
        except TrajectoryMemoryError as e:
            raise TrainError(str(e)) from None
        self.traj.site_names = [s.name for s in sites]
        self.ft_traj = self.traj  # the fine-tune's states: the regression's, and more samples without layer tensors
        more = trajectory_seeds(cfg.seed, cfg.finetune_trajectories)[len(seeds):]
        if more:
            self.say(f"data: recording {len(prompts)} prompts × {len(more)} more seeds for the fine-tune (no layer tensors)")
            try:
                extra = record_trajectories(pipe, prompts, more, steps=cfg.traj_steps, resolution=self.resolution,
                                            guidance=cfg.sample_guidance, keep_every=cfg.traj_keep_every, log=self.say)
            except TrajectoryMemoryError as e:
                raise TrainError(f"{e}; these are the fine-tune's {len(more)} further samples per prompt: lower "
                                 f"--finetune-seeds (now {cfg.finetune_seeds})") from None
            self.ft_traj = join_states(self.traj, extra)
        self.data = _TrajectoryData(self.traj)
        self.data.info.update(finetune_seeds=len(seeds) + len(more), finetune_states=len(self.ft_traj))
        if cfg.regress_symmetries > 1 and not self.family.attention_equivariant:
            self.say(f"regression: {self.family.name} self-attention uses rotary position embeddings, so a turned or "
                     "flipped state is not one of its own; regressing without symmetries (--regress-symmetries 1)")
            self.cfg = cfg = dataclasses.replace(cfg, regress_symmetries=1)
        if (cfg.regress_cfg_loss > 0 or cfg.cfg_loss > 0) and bool((self.traj.pair == torch.arange(len(self.traj))).all()):
            self.say("trajectories: sampled without classifier-free guidance (no CFG pairs), so there is no guided "
                     "prediction to train; dropping the guided terms (--regress-cfg-loss 0 --cfg-loss 0)")
            self.cfg = cfg = dataclasses.replace(cfg, regress_cfg_loss=0.0, cfg_loss=0.0)
        square = all(h == w for h, w in self.traj.grids)
        self.symmetries = [k for k in range(cfg.regress_symmetries) if square or k % 2 == 0]  # odd k: quarter turns
        self.say(f"data: {len(self.traj)} states, {self.traj.info['layer_bytes'] / 2**30:.2f} GiB of layer inputs/outputs"
                 + (f"; the fine-tune draws from {len(self.ft_traj)} states" if self.ft_traj is not self.traj else ""))

    def make_optimizer(self, lr: float, schedule) -> None:
        cfg = self.cfg
        if cfg.regress_steps > 0 and not getattr(self, "_finetuning", False):
            lr, schedule = cfg.regress_lr, _cosine(min(REGRESS_WARMUP, max(1, cfg.regress_steps // 4)), cfg.regress_steps)
        else:
            schedule = _cosine(cfg.warmup, cfg.steps)
        super().make_optimizer(lr, schedule)

    def _start_finetune(self) -> None:
        self._finetuning = True
        self.make_optimizer(self.cfg.lr, None)
        self.optimizer = self.accelerator.prepare(self.optimizer)

    def _resume(self) -> None:
        state = json.loads((self.resume_path / "state.json").read_text())
        if int(state["step"]) >= self.cfg.regress_steps:
            self._start_finetune()  # the checkpoint holds the fine-tune optimizer's state
        super()._resume()

    def _blocks(self) -> list:
        from deltadistill.conversion import delta_modules

        mods = delta_modules(self.student)
        missing = [n for n in self.traj.site_names if n not in mods]
        if missing:
            raise TrainError(f"recorded layers {missing[:3]} were not converted; the trajectory recipe converts every recorded one")
        return [mods[n].block for n in self.traj.site_names]

    def _symmetry(self, step: int) -> int:
        """The symmetry of the square that regression step ``step`` moves its states by (0: none)."""
        if len(self.symmetries) == 1:
            return self.symmetries[0]
        g = step_generator(self.cfg.seed, step, stream=2)
        return self.symmetries[int(torch.randint(len(self.symmetries), (1,), generator=g))]

    def _indices(self, step: int, batch: int, stream: int = 0, traj=None) -> torch.Tensor:
        g = step_generator(self.cfg.seed, step, stream)
        return torch.randint(len(self.traj if traj is None else traj), (batch,), generator=g)

    def _finetune_loss(self, idx: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, traj = self.cfg, self.ft_traj
        if cfg.cfg_loss > 0:
            idx = cfg_pairs(traj, idx)  # [cond rows; uncond rows]
        latents = traj.batched.get("hidden_states", traj.batched.get("sample"))
        channels = int(latents.shape[1]) if latents is not None and latents.ndim == 4 else None
        target = sampler_output(traj.out[idx], channels).to(self.device)
        with self.accelerator.autocast():
            out = sampler_output(replay(model, traj, idx, device=self.device, dtype=self.wdtype), channels).float()
        l_out = F.mse_loss(out, target)
        l_cfg = torch.zeros((), device=self.device)
        if cfg.cfg_loss > 0:
            b = len(idx) // 2
            l_cfg = F.mse_loss(guided(out[:b], out[b:], traj.guidance), guided(target[:b], target[b:], traj.guidance))
        return l_out + cfg.cfg_loss * l_cfg, l_out, l_cfg

    def probe(self, taps) -> dict:
        """Output and guided-output MSE on a fixed set of recorded states (stream 1)."""
        idx = self._indices(0, min(PROBE_STATES, len(self.ft_traj)), stream=1, traj=self.ft_traj)
        with torch.no_grad():
            total, l_out, l_cfg = self._finetune_loss(idx, self.student)
        vals = self.accelerator.reduce(torch.stack([total, l_out, l_cfg]).detach().float(), "mean")
        return {"loss": float(vals[0]), "l_z": float(vals[1]), "l_f": 0.0, "gap": float(vals[2])}

    def step(self, taps, step: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        regress = step < cfg.regress_steps
        if not regress and not getattr(self, "_finetuning", False):
            self._start_finetune()
        if regress:
            idx = self._indices(step, cfg.regress_batch)
            if cfg.regress_cfg_loss > 0:  # regress_batch // 2 CFG pairs [cond; uncond]
                idx = cfg_pairs(self.traj, idx[: cfg.regress_batch // 2])
            blocks = self._blocks()
            loss, parts = regression_loss(blocks, self.traj, idx, device=self.device, symmetry=self._symmetry(step),
                                          cfg_weight=cfg.regress_cfg_loss)
            loss.backward()
            if self.world > 1:  # blocks were called outside DDP: average their gradients by hand
                for p in self.params:
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, "mean")
            norms = [float(torch.nn.utils.clip_grad_norm_(list(b.parameters()), cfg.clip if cfg.clip > 0 else float("inf")))
                     for b in blocks]
            gnorm = math.sqrt(sum(n * n for n in norms))
            record = {"stage": "regress", "l_z": 0.0, "l_f": float(loss.detach()), "gap": 0.0, "layers": [round(v, 6) for v in parts]}
        else:
            sl = slice(self.rank * self.local_bs, (self.rank + 1) * self.local_bs)
            idx = self._indices(step, cfg.batch_size, traj=self.ft_traj)[sl]
            loss, l_out, l_cfg = self._finetune_loss(idx, self.student_ddp)
            acc.backward(loss)
            gnorm = acc.clip_grad_norm_(self.params, cfg.clip if cfg.clip > 0 else float("inf"))
            gnorm = float(gnorm) if gnorm is not None else float("nan")
            record = {"stage": "finetune", "l_z": float(l_out.detach()), "l_f": 0.0, "gap": float(l_cfg.detach())}
        lr_now = self.optimizer.param_groups[0]["lr"]
        value = acc.reduce(loss.detach().float().reshape(1), "mean")
        bad = not (torch.isfinite(value).all() and math.isfinite(gnorm))
        self.apply_step(bad)
        return {"step": step + 1, "loss": float(value), **record, "lr": lr_now, "grad_norm": gnorm, "skipped": bad,
                "skipped_total": self.skipped_total}
