"""The linear-attention baseline student (LinFusion's form): its arithmetic, conversion, training, saving."""
import pytest
import torch
from torch import nn

from deltadistill.linear_attention import LinearAttentionBlock, linear_attention


def test_linear_attention_is_the_normalised_kernel_sum():
    torch.manual_seed(0)
    q, k = torch.rand(2, 3, 10, 4, dtype=torch.float64) + 0.1, torch.rand(2, 3, 10, 4, dtype=torch.float64) + 0.1
    v = torch.randn(2, 3, 10, 5, dtype=torch.float64)
    brute = torch.empty_like(v)
    for i in range(10):  # out_i = Σ_j (q_i·k_j) v_j / Σ_j q_i·k_j
        w = (q[:, :, i : i + 1] * k).sum(-1, keepdim=True)  # [B, h, N, 1]
        brute[:, :, i] = (w * v).sum(-2) / w.sum(-2)
    torch.testing.assert_close(linear_attention(q, k, v), brute, rtol=1e-12, atol=1e-12)


def test_block_copies_the_teacher_projections_and_computes_by_hand():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=True)
    block = LinearAttentionBlock.from_attention(attn).double()
    for mine, theirs in ((block.to_q, attn.to_q), (block.to_v, attn.to_v), (block.to_out, attn.to_out[0])):
        assert torch.equal(mine.weight.float(), theirs.weight) and torch.equal(mine.bias.float(), theirs.bias)
    with torch.no_grad():
        block.kernel_q.weight.normal_(0, 0.2)
    z = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    x = z.reshape(2, 12, 16)

    def heads(t):
        return t.view(2, 12, 2, 8).transpose(1, 2)

    with torch.no_grad():
        q = heads(block.to_q(x))
        q = torch.nn.functional.elu(q + q @ block.kernel_q.weight.T) + 1
        k = torch.nn.functional.elu(heads(block.to_k(x))) + 1  # kernel_k starts at zero
        v = heads(block.to_v(x))
        w = q @ k.transpose(-1, -2)  # [B, h, N, N]
        ref = block.to_out(((w / w.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, 12, 16))
        torch.testing.assert_close(block(z), ref.reshape(2, 3, 4, 16), rtol=1e-10, atol=1e-10)


def test_attention_with_qk_norms_is_refused():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="plain attention only"):
        LinearAttentionBlock.from_attention(attn, "x.attn1")


def test_unknown_student_is_refused():
    from attnprobe.core.registry import load_pipeline
    from deltadistill.conversion import convert

    pipe, _ = load_pipeline("tiny-pixart")
    with pytest.raises(ValueError, match="unknown student"):
        convert(pipe, 3, student="mamba")


def test_linear_student_trains_saves_and_loads(tmp_path):
    """student="linear": no kernel sizes needed; the run folder reloads to the same outputs."""
    import json

    import deltadistill
    from attnprobe.core.family import denoiser_of
    from attnprobe.core.registry import load_pipeline
    from deltadistill.conversion import delta_modules
    from deltadistill.train import TrainConfig, train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na red dog\n")
    cfg = TrainConfig(data=str(prompts), out=str(tmp_path / "run"), model="tiny-pixart", student="linear",
                      recipe="trajectory", regress_steps=4, steps=3, regress_batch=4, batch_size=2, traj_seeds=1,
                      traj_steps=2, warmup=1, lr=1e-2, checkpoint_every=0, progress=False, seed=0)
    summary = train(cfg, log=lambda m: None)
    assert summary["steps"] == 7
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {layer["student"] for layer in config["layers"]} == {"linear"}
    assert all(layer["kernel_size"] is None for layer in config["layers"])

    pipe, _ = load_pipeline("tiny-pixart")
    deltadistill.load(pipe, tmp_path / "run")
    mods = delta_modules(pipe)
    assert mods and all(isinstance(m.block, LinearAttentionBlock) for m in mods.values())
    # trained: the kernel maps moved away from zero; the attention modules are gone
    assert any(float(m.block.kernel_q.weight.detach().abs().sum()) > 0 for m in mods.values())
    den = denoiser_of(pipe)
    assert not any(type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", True) is False
                   for m in den.modules())
    x = torch.randn(1, 4, 4, next(iter(mods.values())).block.dim)
    again, _ = load_pipeline("tiny-pixart")
    deltadistill.load(again, tmp_path / "run")
    b1, b2 = next(iter(mods.values())).block, next(iter(delta_modules(again).values())).block
    with torch.no_grad():
        assert torch.equal(b1(x), b2(x))
    assert isinstance(b1.to_q, nn.Linear)


def test_cli_refuses_an_unknown_student(tmp_path):
    from typer.testing import CliRunner

    from deltadistill.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    res = CliRunner().invoke(app, ["train", "--model", "tiny-pixart", "--data", str(prompts), "--out", str(tmp_path / "run"),
                                   "--student", "mamba"])
    assert res.exit_code == 2 and "--student must be deltaconv or linear" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()
