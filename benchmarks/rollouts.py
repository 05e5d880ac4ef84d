"""Rollouts for ``distill_probes.py``: the student samples a few steps of the teacher's own trajectories, and the
latent it reaches is compared with the teacher's.

The fine-tune of the trajectory recipe compares one denoiser call at a time on the teacher's states.
What a user sees is the end of the sampling loop, where the errors of many calls have been carried
through the scheduler and through the student's answers to its own, already shifted, latents. A
*rollout* starts a group of recorded trajectories at the teacher's latent of sampling step ``s``,
lets the student take ``k`` scheduler steps (classifier-free guidance as the pipeline applies it)
and returns the mean squared difference from the teacher's latent at step ``s + k``. Gradients flow
through all ``k`` calls, so a student trained on it also learns how its error at one step moves the next.

Nothing is sampled from the teacher again: the scheduler is driven through steps ``0 … s − 1`` by
the teacher's recorded outputs, which rebuilds its multistep history and the latent exactly.
:func:`build_rollouts` checks that replaying the recorded outputs reproduces every recorded
latent before a rollout is trusted; a pipeline whose loop it cannot reproduce is refused with the
reason. The probe's rollout stage did not bring the demo student closer to its teacher (RESULTS,
"Training through the sampling loop"), so the toolkit does not offer it; it lives here with its probe.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltadistill.evaluate import guided_eps
from deltadistill.trajectory import Trajectories, sampler_output

__all__ = ["RolloutError", "Rollouts", "build_rollouts"]


class RolloutError(ValueError):
    """The recorded trajectories cannot be replayed step by step (the message says why)."""


def _input_key(traj: Trajectories) -> str:
    for key in ("hidden_states", "sample"):
        if key in traj.batched:
            return key
    raise RolloutError("the recorded denoiser calls have no 'hidden_states' or 'sample' argument")


@dataclass
class Rollouts:
    """Recorded trajectories arranged per (prompt, seed): ``rows[j, s]`` = the recorded rows of trajectory j's
    call at sampling step s in the pipeline's CFG order (2 rows, or 1 without guidance)."""

    traj: Trajectories
    scheduler: object  # a fresh copy of the pipeline's scheduler
    rows: torch.Tensor  # [trajectories, steps, 1 or 2]
    timesteps: torch.Tensor  # [steps] scheduler timesteps
    scale: torch.Tensor  # [steps] the scheduler's input scale (model input = scale · latent)
    latents: torch.Tensor  # [trajectories, steps + 1, ...] the teacher's latents, the last one its result
    channels: int | None
    key: str

    @property
    def steps(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _eps(self, out: torch.Tensor) -> torch.Tensor:
        """The sampler's step input from a call's output rows (pipeline order): guided when there are 2 rows."""
        if self.rows.shape[2] == 1:
            return sampler_output(out, self.channels)
        return guided_eps(out, self.channels, self.traj.guidance, self.traj.cond_first).to(out.dtype)

    def _scheduler_at(self, ids: torch.Tensor, start: int, device=None):
        """A scheduler copy driven through steps 0 … start − 1 by the teacher's recorded outputs (its history)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(self.steps, device=device)
        for s in range(start):
            out = self.traj.out[self.rows[ids, s].T.flatten()].to(device)
            sched.step(self._eps(out), self.timesteps[s], self.latents[ids, s].to(device), return_dict=False)
        return sched

    def loss(self, student, ids: torch.Tensor, start: int, k: int, device=None, dtype=None) -> torch.Tensor:
        """Mean squared difference between the latent the student reaches from the teacher's latent at step
        ``start`` after ``k`` steps and the teacher's latent there (trajectories ``ids``)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not 0 <= start < start + k <= self.steps:
            raise ValueError(f"a rollout of {k} steps from step {start} leaves the {self.steps} sampling steps")
        sched = self._scheduler_at(ids, start, device)
        x = self.latents[ids, start].to(device)
        for s in range(start, start + k):
            rows = self.rows[ids, s].T.flatten()  # [first rows of every trajectory; second rows]
            kw = self.traj.call_kwargs(rows, device=device, dtype=dtype)
            inp = (x * self.scale[s]).to(dtype) if dtype is not None else x * self.scale[s]
            kw[self.key] = inp.repeat(self.rows.shape[2], *([1] * (x.ndim - 1)))
            kw["return_dict"] = False
            out = student(**kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            x = sched.step(self._eps(out.float()), self.timesteps[s], x, return_dict=False)[0]
        return F.mse_loss(x, self.latents[ids, start + k].to(x.device))


def build_rollouts(traj: Trajectories, scheduler, *, channels: int | None = None, tol: float = 1e-3) -> Rollouts:
    """Arrange ``traj`` per trajectory and check that the scheduler, driven by the recorded outputs, reproduces
    every recorded latent (to ``tol`` relative). Raises :class:`RolloutError` when it cannot."""
    if traj.info.get("keep_every", 1) != 1:
        raise RolloutError("rollouts need every denoiser call of a trajectory; record with keep_every 1")
    key = _input_key(traj)
    t = traj.batched.get("timestep")
    if t is None:
        raise RolloutError("the recorded denoiser calls have no 'timestep' argument")
    # calls are contiguous blocks of rows with one timestep; consecutive calls of one sampling run differ in it
    t = t.float().flatten() if t.ndim == 1 else t.float().reshape(len(t), -1)[:, 0]
    bounds = [0] + [i for i in range(1, len(t)) if t[i] != t[i - 1]] + [len(t)]
    calls = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    steps = int(traj.info.get("steps", 0))
    if steps <= 0 or len(calls) % steps:
        raise RolloutError(f"{len(calls)} recorded calls are not whole runs of {steps} steps")
    cfg = bool((traj.pair != torch.arange(len(traj))).any())
    per = 2 if cfg else 1
    rows = []
    for run in range(len(calls) // steps):
        blocks = calls[run * steps:(run + 1) * steps]
        sizes = {b - a for a, b in blocks}
        if len(sizes) != 1 or next(iter(sizes)) % per:
            raise RolloutError("the calls of one sampling run differ in batch size")
        n = next(iter(sizes)) // per
        for j in range(n):
            rows.append([[a + j + h * n for h in range(per)] for a, _ in blocks])
    rows_t = torch.tensor(rows, dtype=torch.long)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[:steps].clone()
    inputs = traj.batched[key]
    if channels is None and inputs.ndim == 4:  # image latents [B, C, h, w]; packed tokens [B, N, C] keep None
        channels = int(inputs.shape[1])

    def input_scale(s: int) -> torch.Tensor:
        # on a fresh copy each time: Euler-family schedulers take the step index from their first call
        fresh = copy.deepcopy(scheduler)
        fresh.set_timesteps(steps)
        if not hasattr(fresh, "scale_model_input"):
            return torch.ones(())
        return fresh.scale_model_input(torch.ones(()), timesteps[s]).float().reshape(())

    scale = torch.stack([input_scale(s) for s in range(steps)])
    ro = Rollouts(traj=traj, scheduler=copy.deepcopy(scheduler), rows=rows_t, timesteps=timesteps, scale=scale,
                  latents=torch.empty(0), channels=channels, key=key)
    # the teacher's latents by replay, checked against the recorded inputs at every step
    ids = torch.arange(len(rows_t))
    run = copy.deepcopy(sched)
    run.set_timesteps(steps)
    x = inputs[rows_t[:, 0, 0]].float() / scale[0]
    latents = []
    for s in range(steps):
        rec = inputs[rows_t[:, s, 0]].float() / scale[s]
        err = float((x - rec).norm() / rec.norm().clamp_min(1e-12))
        if err > tol:
            raise RolloutError(f"replaying the teacher's recorded outputs through {type(scheduler).__name__} does not "
                               f"reproduce its latents (step {s}: relative difference {err:.2g}); "
                               "this pipeline's sampling loop does more than guidance and scheduler steps")
        out = traj.out[rows_t[ids, s].T.flatten()]
        latents.append(rec)
        x = run.step(ro._eps(out), timesteps[s], rec, return_dict=False)[0]
    latents.append(x)  # the teacher's result
    ro.latents = torch.stack(latents, 1)
    return ro
