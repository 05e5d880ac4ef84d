"""deltadistill train --estimate: a dry run on the meta device that matches what a real run builds."""
import pytest
import torch

from deltadistill.estimate import estimate_training
from deltadistill.train import TrainConfig, train


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a photo of a cat\na red dog\n")
    return p


def _cfg(prompts, out, **kw):
    base = dict(data=str(prompts), out=str(out), model="tiny-pixart", kernel_size=3, steps=1, batch_size=2, warmup=0,
                checkpoint_every=0, progress=False, seed=0, sample_steps=2, samples_per_prompt=1)
    base.update(kw)
    return TrainConfig(**base)


def test_parameters_match_a_real_run(prompts, tmp_path):
    from attnprobe.core.family import denoiser_of
    from attnprobe.core.registry import load_pipeline

    est = estimate_training(_cfg(prompts, tmp_path / "est"), calibrate=False)
    assert not (tmp_path / "est").exists()  # writes nothing
    summary = train(_cfg(prompts, tmp_path / "run"), log=lambda m: None)
    assert est.trainable_params == summary["trainable_parameters"] > 0
    pipe, _ = load_pipeline("tiny-pixart")
    assert est.teacher_params == sum(p.numel() for p in denoiser_of(pipe).parameters())
    assert len(est.layers) == summary["layers"] and {k for _, _, _, k, _ in est.layers} == {3}
    assert est.step_flops > 0 and est.activation_bytes > 0 and est.rate == 0


@pytest.fixture()
def untrimmed(monkeypatch):
    """Recordings keep every text position: the size the estimate counts (PixArt's recordings then drop the positions
    no caption uses, so a run keeps at most this)."""
    from attnprobe.core.families.pixart import PixArt

    monkeypatch.setattr(PixArt, "trim_text", lambda self, kwargs: None)


def test_recorded_states_match_a_real_recording(prompts, tmp_path, untrimmed):
    from attnprobe.core.family import denoiser_of, find_self_attention
    from attnprobe.core.registry import load_pipeline
    from deltadistill.trajectory import record_trajectories

    kw = dict(recipe="trajectory", traj_seeds=2, traj_steps=3, resolution=32)
    est = estimate_training(_cfg(prompts, tmp_path / "est", finetune_seeds=2, **kw), calibrate=False)
    pipe, _ = load_pipeline("tiny-pixart")
    traj = record_trajectories(pipe, ["a photo of a cat", "a red dog"], [0, 1], steps=3, resolution=32,
                               sites=find_self_attention(denoiser_of(pipe)))
    assert est.data_states == len(traj)
    # outputs, layer tensors and the call inputs kept with them (latents, timesteps, text embeddings, masks)
    assert est.data_bytes == traj.info["layer_bytes"] + traj.out.numel() * 4 + _input_bytes(traj)
    # the fine-tune's further samples are recorded without layer tensors
    more = estimate_training(_cfg(prompts, tmp_path / "est", finetune_seeds=3, **kw), calibrate=False)
    extra = record_trajectories(pipe, ["a photo of a cat", "a red dog"], [2], steps=3, resolution=32)
    assert more.data_states == len(traj) + len(extra) and more.data_calls == est.data_calls + 2 * 3
    assert more.data_bytes == est.data_bytes + extra.out.numel() * 4 + _input_bytes(extra)
    from deltadistill.presets import TRAIN

    assert est.data_calls == 2 * 2 * 3 and est.regress_flops > 0
    assert est.regress_steps == TRAIN["toolkit"]["regress_steps"]  # the preset's, as the run resolves it


def _input_bytes(traj) -> int:
    return sum(v.numel() * v.element_size() for v in traj.batched.values())


def test_demo_states_are_sized_with_the_pipelines_text_length(tmp_path, untrimmed):
    """The demo pipeline encodes 300 tokens (not the 16 of the test tokenizers); its states hold them."""
    from attnprobe.core.family import denoiser_of, family_of, find_self_attention
    from attnprobe.core.registry import denoiser_from_config, load_pipeline
    from deltadistill.estimate import _call_input_bytes
    from deltadistill.trajectory import record_trajectories

    pipe, _ = load_pipeline("demo")
    traj = record_trajectories(pipe, ["a photo of a cat"], [0], steps=1, resolution=256,
                               sites=find_self_attention(denoiser_of(pipe)))
    den, info = denoiser_from_config("demo", device="meta")
    per_state = _call_input_bytes(family_of(den), den, 256, int(info["vae_scale_factor"]), 300, torch.float32)
    assert traj.batched["encoder_attention_mask"].shape[-1] == 300
    assert per_state * len(traj) == _input_bytes(traj)
    p = tmp_path / "p.txt"
    p.write_text("a photo of a cat\n")
    est = estimate_training(TrainConfig(data=str(p), out=str(tmp_path / "o"), model="demo", recipe="trajectory",
                                        traj_seeds=1, finetune_seeds=1, traj_steps=1, kernel_size=3), calibrate=False)
    assert est.data_states == len(traj)
    assert est.data_bytes == traj.info["layer_bytes"] + traj.out.numel() * 4 + _input_bytes(traj)


def test_layers_restricts_the_estimate_to_the_converted_layers(prompts, tmp_path):
    kw = dict(recipe="trajectory", traj_seeds=1, traj_steps=2, resolution=32)
    every = estimate_training(_cfg(prompts, tmp_path / "all", **kw), calibrate=False)
    one = estimate_training(_cfg(prompts, tmp_path / "one", layers=r"blocks\.1\.", **kw), calibrate=False)
    assert len(every.layers) == 4 and [row[0] for row in one.layers] == ["block 1"]
    assert one.trainable_params * 4 == every.trainable_params  # the four blocks are the same size
    assert 0 < one.data_bytes < every.data_bytes  # only the converted layer's inputs and outputs are recorded


def test_activations_grow_with_the_batch(prompts, tmp_path):
    one = estimate_training(_cfg(prompts, tmp_path / "a", batch_size=1), calibrate=False)
    four = estimate_training(_cfg(prompts, tmp_path / "b", batch_size=4), calibrate=False)
    assert four.activation_bytes == pytest.approx(4 * one.activation_bytes, rel=0.1)
    assert four.step_flops == pytest.approx(4 * one.step_flops, rel=0.1)


def test_linear_student_needs_no_kernel_sizes(prompts, tmp_path):
    est = estimate_training(_cfg(prompts, tmp_path / "x", kernel_size=None, student="linear"), calibrate=False)
    assert est.student == "linear" and all(k is None for _, _, _, k, _ in est.layers) and est.trainable_params > 0


def test_cli_estimate_at_real_size_writes_nothing(prompts, tmp_path):
    from typer.testing import CliRunner

    from deltadistill.cli import app

    out = tmp_path / "run"
    torch.set_num_threads(1)
    res = CliRunner().invoke(app, ["train", "--model", "pixart", "--data", str(prompts), "--out", str(out),
                                   "--kernel-size", "13", "--resolution", "256", "--batch-size", "1", "--estimate"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "28 layers converted" in res.output and "GiB resident" in res.output and "block 27" in res.output
    assert not out.exists()
    bad = CliRunner().invoke(app, ["train", "--model", "pixart", "--data", str(prompts), "--out", str(out),
                                   "--erf-report", str(tmp_path / "none.json"), "--estimate"])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_guided_fine_tune_counts_the_cfg_partners(prompts, tmp_path):
    """The trajectory fine-tune with a guided term runs every state with its CFG partner: twice the rows."""
    kw = dict(recipe="trajectory", traj_seeds=1, traj_steps=2, resolution=32, batch_size=2)
    paired = estimate_training(_cfg(prompts, tmp_path / "a", cfg_loss=4.0, **kw), calibrate=False)
    single = estimate_training(_cfg(prompts, tmp_path / "b", cfg_loss=0.0, **kw), calibrate=False)
    unguided = estimate_training(_cfg(prompts, tmp_path / "c", cfg_loss=4.0, sample_guidance=1.0, **kw), calibrate=False)
    assert (paired.batch, single.batch, unguided.batch) == (4, 2, 2) and paired.cfg_rows and not single.cfg_rows
    assert paired.activation_bytes == pytest.approx(2 * single.activation_bytes, rel=0.05)
    assert paired.step_flops == pytest.approx(2 * single.step_flops, rel=0.05)
    assert unguided.data_states == single.data_states // 2  # sampled without CFG: one recorded row per call
    noised = estimate_training(_cfg(prompts, tmp_path / "d", recipe="noised", resolution=32, batch_size=2), calibrate=False)
    # the noised step adds a teacher forward (no backward) to the student's forward and backward; the trajectory
    # fine-tune reads its targets from the recording
    assert 1.15 < noised.step_flops / single.step_flops < 1.6
