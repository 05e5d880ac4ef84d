"""benchmarks/rollouts.py (the probe's rollouts): the scheduler driven by the teacher's recorded outputs rebuilds
its trajectories exactly, so a rollout loss measures the student and nothing else."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from attnprobe.core.family import denoiser_of
from attnprobe.core.registry import load_pipeline
from deltadistill.trajectory import record_trajectories

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is not a package
try:
    from rollouts import RolloutError, build_rollouts
finally:
    sys.path.pop(0)

CASES = [("tiny-pixart", ["a photo of cat", "a red dog"]), ("tiny-dit", ["cat", "dog"]), ("tiny-sd15", ["a cat", "a dog"]),
         ("tiny-sdxl", ["a cat", "a dog"])]


def _record(alias, prompts, steps=4, **kw):
    pipe, _ = load_pipeline(alias)
    traj = record_trajectories(pipe, prompts, [0, 1], steps=steps, resolution=32, sites=(), **kw)
    return pipe, traj


@pytest.mark.parametrize("alias, prompts", CASES)
def test_the_teachers_rollout_reproduces_its_samples(alias, prompts):
    """From any step, the teacher itself lands on its own recorded latents (PixArt: [uncond; cond] and a learned
    variance; DiT: [cond; uncond]; SD1.5: a UNet called with ``sample``; SDXL: an Euler scheduler, whose model input
    is the latent scaled differently at every step); the last latent is the pipeline's result."""
    from attnprobe.core.pipeline import sample

    pipe, traj = _record(alias, prompts)
    den = denoiser_of(pipe)
    ro = build_rollouts(traj, pipe.scheduler)  # the latent channels from the recording
    if alias == "tiny-sdxl":
        assert len(set(ro.scale.tolist())) == 4  # one input scale per step
    assert len(ro) == 4 and ro.steps == 4 and ro.latents.shape[1] == 5
    if alias != "tiny-dit":  # DiT's pipeline cannot return latents
        final = sample(pipe, [p for p in prompts for _ in (0, 1)], [0, 1] * 2, steps=4, resolution=32,
                       output_type="latent")
        torch.testing.assert_close(ro.latents[:, -1], final.float(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for start, k in [(0, 4), (1, 2), (3, 1)]:
            size = float(ro.latents[:, start + k].pow(2).mean())  # SDXL's latents start at σ ≈ 15
            assert float(ro.loss(den, torch.arange(4), start, k)) < 1e-10 * size
            assert float(ro.loss(den, torch.tensor([2, 0]), start, k)) < 1e-10 * size


def test_a_changed_student_is_measured_and_gets_gradients():
    pipe, traj = _record("tiny-pixart", ["a photo of cat", "a red dog"])
    teacher = denoiser_of(pipe)
    ro = build_rollouts(traj, pipe.scheduler, channels=teacher.config.in_channels)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.proj_out.weight.add_(0.05 * torch.randn_like(student.proj_out.weight))
    one, four = ro.loss(student, torch.arange(4), 0, 1), ro.loss(student, torch.arange(4), 0, 4)
    assert 0 < float(one.detach()) < float(four.detach())  # errors carried over four steps exceed one step's
    four.backward()
    assert student.proj_out.weight.grad is not None and float(student.proj_out.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="leaves the 4 sampling steps"):
        ro.loss(student, torch.arange(4), 2, 3)


def test_recordings_that_cannot_be_replayed_are_refused():
    pipe, traj = _record("tiny-pixart", ["a photo of cat", "a red dog"], keep_every=2)
    with pytest.raises(RolloutError, match="keep_every 1"):
        build_rollouts(traj, pipe.scheduler)
    pipe, traj = _record("tiny-pixart", ["a photo of cat", "a red dog"])
    traj.out = traj.out * 1.5  # outputs that are not what moved the latents
    with pytest.raises(RolloutError, match="does not reproduce its latents"):
        build_rollouts(traj, pipe.scheduler, channels=denoiser_of(pipe).config.in_channels)
