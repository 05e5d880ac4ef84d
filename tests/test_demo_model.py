"""The shipped demo model: loads offline, samples, and its training recipe and metric run."""
from __future__ import annotations

import json
import os

import pytest
import torch

from attnprobe.demo import DEFAULT_RESOLUTION, DEMO_DIR, DEMO_PROMPTS, PROMPTS_FILE, TOKEN_GRID, load_demo_pipeline

MAX_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def demo_pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not (DEMO_DIR / "model_index.json").is_file():
        pytest.fail(f"the shipped demo pipeline is missing from {DEMO_DIR}")
    return load_demo_pipeline()


def test_prompts_file_matches_captions():
    assert PROMPTS_FILE.read_text().splitlines() == DEMO_PROMPTS
    assert len(set(DEMO_PROMPTS)) == len(DEMO_PROMPTS) >= 10


def test_folder_is_small_and_complete():
    files = [f for f in DEMO_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    names = {f.relative_to(DEMO_DIR).as_posix() for f in files}
    for required in ("model_index.json", "train_config.json", "loss_curve.json", "loss_curve.png",
                     "transformer/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert required in names
    assert any(n.startswith("transformer/") and n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".ckpt")) for n in names)
    record = json.loads((DEMO_DIR / "train_config.json").read_text())
    assert record["config"]["captions"] == DEMO_PROMPTS


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnprobe.demo.train"):
        load_demo_pipeline(path=tmp_path / "nowhere")


def test_architecture(demo_pipe):
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    pipe = demo_pipe
    assert isinstance(pipe, PixArtSigmaPipeline)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    cfg = pipe.transformer.config
    assert cfg.num_layers >= 8
    assert cfg.out_channels == cfg.in_channels == pipe.vae.config.latent_channels == 4
    side = DEFAULT_RESOLUTION // pipe.vae_scale_factor // cfg.patch_size
    assert (side, side) == TOKEN_GRID and side >= 16
    assert cfg.sample_size * pipe.vae_scale_factor == DEFAULT_RESOLUTION
    assert pipe.scheduler.config.prediction_type in ("epsilon", "v_prediction")
    assert pipe.transformer.dtype == torch.float32
    ids = pipe.tokenizer(DEMO_PROMPTS[1]).input_ids
    assert pipe.tokenizer.unk_token_id not in ids and ids[-1] == pipe.tokenizer.eos_token_id


def test_generates_offline_two_steps(demo_pipe):
    gen = torch.Generator().manual_seed(0)
    out = demo_pipe(DEMO_PROMPTS[:2], num_inference_steps=2, generator=gen, output_type="pt").images
    assert out.shape == (2, 3, DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.01  # not a constant image


def test_short_and_default_sequence_length_agree(demo_pipe):
    """Padding is masked everywhere, so max_sequence_length=16 (used by our tools) equals the default 300."""
    kw = dict(num_inference_steps=2, output_type="latent")
    a = demo_pipe(DEMO_PROMPTS[0], generator=torch.Generator().manual_seed(1), max_sequence_length=16, **kw).images
    b = demo_pipe(DEMO_PROMPTS[0], generator=torch.Generator().manual_seed(1), **kw).images
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gain", [0.5, 2.0])
def test_mimetic_init_sets_scaled_orthonormal_equal_query_key(gain):
    import dataclasses

    from attnprobe.demo.train import TrainConfig, build_transformer

    cfg = dataclasses.replace(TrainConfig(), layers=2, hidden=48, heads=3, attn_init="mimetic", attn_init_gain=gain)
    model = build_transformer(cfg)
    for block in model.transformer_blocks:
        wq, wk = block.attn1.to_q.weight.double(), block.attn1.to_k.weight.double()
        assert torch.equal(wq, wk)
        for h in range(3):  # per head W_q[h] W_q[h]ᵀ = gain² I (orthonormal rows), so logits = gain²⟨Qᵀx, Qᵀx'⟩
            rows = wq[16 * h : 16 * (h + 1)]
            torch.testing.assert_close(rows @ rows.T, gain**2 * torch.eye(16, dtype=torch.float64))
        assert block.attn2.to_q.weight.abs().sum() > 0 and not torch.equal(block.attn2.to_q.weight, block.attn2.to_k.weight)
    heads = [model.transformer_blocks[i].attn1.to_q.weight[:16] for i in range(2)]
    assert not torch.allclose(heads[0], heads[1])  # each layer draws its own subspaces
    plain = build_transformer(dataclasses.replace(cfg, attn_init="xavier"))
    assert not torch.equal(plain.transformer_blocks[0].attn1.to_q.weight, plain.transformer_blocks[0].attn1.to_k.weight)
    with pytest.raises(ValueError, match="attention init"):
        build_transformer(dataclasses.replace(cfg, attn_init="orthogonal"))


@pytest.mark.parametrize("bad", [["--attn-init-gain", "0"], ["--attn-init-gain", "-1"], ["--attn-init-gain", "nan"],
                                 ["--attn-init", "orthogonal"]])
def test_training_cli_rejects_bad_attention_init(bad, capsys):
    from attnprobe.demo.train import main

    with pytest.raises(SystemExit) as info:
        main(["--out", "/nonexistent/never-written", *bad])
    assert info.value.code == 2
    assert "attn-init" in capsys.readouterr().err


@pytest.mark.slow
def test_training_recipe_runs(tmp_path):
    from attnprobe.demo.train import main

    out = tmp_path / "pipe"
    args = ["--out", str(out), "--steps", "3", "--vae-steps", "3", "--crops-per-photo", "1", "--batch", "2",
            "--vae-batch", "2", "--threads", "2", "--quiet"]
    assert main(args) == 0
    assert (out / "model_index.json").is_file() and (out / "loss_curve.png").is_file()
    record = json.loads((out / "train_config.json").read_text())
    assert record["config"]["steps"] == 3 and record["results"]["token_grid"] == list(TOKEN_GRID)
    assert main(args) == 2  # refuses to overwrite
    assert main(args + ["--overwrite"]) == 0
    assert not list(tmp_path.glob(".pipe.*"))  # no temporary folders left behind
    pipe = load_demo_pipeline(path=out)
    img = pipe(DEMO_PROMPTS[0], num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)


@pytest.mark.slow
def test_evaluation_accuracy(demo_pipe, tmp_path):
    from attnprobe.demo.evaluate import evaluate

    result = evaluate(demo_pipe, grid_path=tmp_path / "grid.png", quiet=True)
    assert result["reference_accuracy_real_crops"] >= 0.95
    assert result["accuracy"] >= 0.8, result["per_caption"]
    assert (tmp_path / "grid.png").is_file()
