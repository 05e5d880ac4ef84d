"""`deltadistill evaluate`: same-noise comparison, baselines, DINOv2/CLIP paths on tiny local encoders."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltadistill.baselines import neighbourhood_attention, neighbourhood_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_neighbourhood_mask_brute_force():
    for grid, k in (((5, 7), 3), ((4, 4), 13), ((9, 6), 5)):
        m = neighbourhood_mask(grid, k)
        h, w = grid
        for q in range(h * w):
            allowed = {j for j in range(h * w) if m[q, j] == 0}
            r, c = divmod(q, w)
            assert len(allowed) == min(k, h) * min(k, w) and q in allowed
            rows = sorted({j // w for j in allowed})
            cols = sorted({j % w for j in allowed})
            assert rows == list(range(rows[0], rows[0] + min(k, h))) and cols == list(range(cols[0], cols[0] + min(k, w)))
            assert allowed == {a * w + b for a in rows for b in cols}


def test_neighbourhood_attention_is_full_attention_for_a_large_window(tiny_pipes):
    from attnprobe.core.pipeline import sample

    pipe = tiny_pipes("tiny-pixart")
    full = sample(pipe, ["a cat"], [0], steps=2, output_type="latent")
    with neighbourhood_attention(pipe, 31):  # 8×8 tokens: the window covers everything
        same = sample(pipe, ["a cat"], [0], steps=2, output_type="latent")
    with neighbourhood_attention(pipe, 3):
        local = sample(pipe, ["a cat"], [0], steps=2, output_type="latent")
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-5)
    assert (local - full).abs().max() > 1e-4


def test_neighbourhood_attention_per_layer_kernels(tiny_pipes):
    """A {layer: K} mapping masks only the layers it names, each with its own K; an int is every layer's K."""
    from attnprobe.core.family import denoiser_of, find_self_attention
    from attnprobe.core.pipeline import sample

    pipe = tiny_pipes("tiny-pixart")
    names = [s.name for s in find_self_attention(denoiser_of(pipe))]
    assert len(names) >= 2

    def run(kernel=None):
        if kernel is None:
            return sample(pipe, ["a cat"], [0], steps=2, output_type="latent")
        with neighbourhood_attention(pipe, kernel):
            return sample(pipe, ["a cat"], [0], steps=2, output_type="latent")

    full, all3 = run(), run(3)
    torch.testing.assert_close(run({n: 3 for n in names}), all3, atol=0, rtol=0)  # the same masks as the int
    torch.testing.assert_close(run({n: 31 for n in names}), full, atol=1e-5, rtol=1e-5)
    first = run({names[0]: 3})  # only the first layer local: neither the full nor the all-local model
    assert (first - full).abs().max() > 1e-4 and (first - all3).abs().max() > 1e-4
    torch.testing.assert_close(run({names[0]: 3, **{n: 31 for n in names[1:]}}), first, atol=1e-5, rtol=1e-5)
    assert not any(len(m._forward_pre_hooks) for m in denoiser_of(pipe).modules())  # hooks removed on exit
    with pytest.raises(ValueError, match="not self-attention layers"):
        with neighbourhood_attention(pipe, {"no.such.layer": 3}):
            pass
    with pytest.raises(ValueError, match="positive odd"):
        with neighbourhood_attention(pipe, {names[0]: 4}):
            pass


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random-config DINOv2 (with an ImageNet-style head) and CLIP, saved locally like Hub folders."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Dinov2Config,
                              Dinov2ForImageClassification)

    from attnprobe.core.tiny import tiny_tokenizer, vocab_size

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                              image_size=28, patch_size=14, num_labels=10)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(root / "dino")
    text = dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, eos_token_id=2, bos_token_id=3, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                  tokenizer=tiny_tokenizer(16)).save_pretrained(root / "clip")
    return root


def test_evaluate_cli_with_baselines_and_encoders(tmp_path, encoders):
    from PIL import Image

    from deltadistill.cli import app
    from deltadistill.train import TrainConfig, train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na red rocket\n")
    train(TrainConfig(data=str(prompts), out=str(tmp_path / "run"), model="tiny-pixart", kernel_size=3, steps=3,
                      batch_size=2, checkpoint_every=0, progress=False), log=lambda m: None)
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype("uint8")).save(refs / f"{i}.png")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--distilled", str(tmp_path / "run"), "--prompts", str(prompts), "--out",
                                      str(out), "--seeds", "0-1", "--steps", "2", "--baselines", "--dino", str(encoders / "dino"),
                                      "--clip", str(encoders / "clip"), "--reference-images", str(refs), "--device", "cpu"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((out / "metrics.json").read_text())
    assert data["variants"] == ["distilled", "untrained", "no_attention", "neighbourhood"]
    for name, d in data["distances"].items():
        # an 8×8 token grid lies inside one 13×13 window: neighbourhood attention is the teacher there
        assert (d["psnr"] == float("inf")) == (name == "neighbourhood"), name
        assert -1 <= d["ssim"] <= 1 and len(d["mse_per_image"]) == 4
        assert len(d["eps_error_per_step"]) == 2 and all(e >= 0 for e in d["eps_error_per_step"])  # one per denoising step
        # the pipeline guides (CFG batch): one guided error per step too, zero exactly where the model is the teacher
        assert len(d["eps_guided_error_per_step"]) == 2
        assert (d["eps_guided_error"] == 0) == (name == "neighbourhood") and d["eps_guided_error"] >= 0, name
    for name in ("teacher", "distilled"):
        s = data["scores"][name]
        assert s["dino_score"] >= 1.0 and np.isfinite(s["fdd_reference"]) and 0 <= s["clip_score"] <= 100
    assert data["scores"]["distilled"]["fdd_teacher"] >= 0
    for f in ("grid.png", "evaluation.png", "metrics.csv", "per_prompt.csv"):
        assert (out / f).is_file()
    import pandas as pd

    per = pd.read_csv(out / "per_prompt.csv")
    assert list(per["prompt"]) == ["a photo of a cat", "a red rocket"]
    d = data["distances"]["distilled"]
    for i, row in per.iterrows():  # each prompt's PSNR is that of its own two seeds' pooled MSE
        mse = np.mean(d["mse_per_image"][2 * i: 2 * i + 2])
        assert row["distilled_psnr_db"] == pytest.approx(10 * np.log10(1 / mse))
    assert per["distilled_error_share"].sum() == pytest.approx(1.0)
    assert "largest share of the student's error: 'a " in result.stdout
    assert "neighbourhood attention K=13" in result.stdout


def test_evaluate_neighbourhood_at_the_students_kernel_sizes(tmp_path):
    """--neighbourhood-kernel student: each converted layer's window is the run's own kernel size."""
    from deltadistill import io as dio
    from deltadistill.cli import app
    from deltadistill.evaluate import evaluate, student_kernels, table_rows

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    train_kw = dict(data=str(prompts), model="tiny-pixart", kernel_size=3, steps=1, batch_size=2, checkpoint_every=0,
                    progress=False)
    from deltadistill.train import TrainConfig, train

    train(TrainConfig(out=str(tmp_path / "run"), **train_kw), log=lambda m: None)
    ks = student_kernels(dio.read_config(tmp_path / "run"))
    assert len(ks) >= 2 and set(ks.values()) == {3}
    kw = dict(steps=2, variants=("neighbourhood",), trajectory_pairs=1)
    by_student = evaluate(tmp_path / "run", ["a photo of a cat"], [0], neighbourhood_kernel="student", **kw)
    by_int = evaluate(tmp_path / "run", ["a photo of a cat"], [0], neighbourhood_kernel=3, **kw)
    a, b = by_student["distances"]["neighbourhood"], by_int["distances"]["neighbourhood"]
    assert by_student["neighbourhood_windows"] == ks and np.isfinite(a["psnr"])  # 3×3 on 8×8 tokens: not the teacher
    assert a["mse_per_image"] == b["mse_per_image"] and a["eps_error_per_step"] == b["eps_error_per_step"]
    assert table_rows(by_student)[1]["model"] == "neighbourhood attention at the student's kernel sizes (no training)"
    for bad in ("4", "seven"):
        res = CliRunner().invoke(app, ["evaluate", "--distilled", str(tmp_path / "run"), "--prompts", str(prompts), "--out",
                                       str(tmp_path / f"e{bad}"), "--baselines", "--neighbourhood-kernel", bad])
        assert res.exit_code != 0 and "--neighbourhood-kernel" in res.stderr and not (tmp_path / f"e{bad}").exists()
    train(TrainConfig(out=str(tmp_path / "lin"), student="linear", **{**train_kw, "kernel_size": None}), log=lambda m: None)
    with pytest.raises(ValueError, match="no kernel sizes"):
        evaluate(tmp_path / "lin", ["a photo of a cat"], [0], neighbourhood_kernel="student", **kw)
    lin = evaluate(tmp_path / "lin", ["a photo of a cat"], [0], neighbourhood_kernel="student", steps=2, trajectory_pairs=0)
    assert list(lin["distances"]) == ["distilled"]  # without the baseline the setting is not used, so no error


def test_evaluate_without_encoders_says_how_to_get_them(tmp_path):
    from deltadistill.evaluate import evaluate
    from deltadistill.train import TrainConfig, train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    train(TrainConfig(data=str(prompts), out=str(tmp_path / "run"), model="tiny-pixart", kernel_size=3, steps=2,
                      batch_size=2, checkpoint_every=0, progress=False), log=lambda m: None)
    res = evaluate(tmp_path / "run", ["a photo of a cat"], [0], steps=2, dino=str(tmp_path / "missing"))
    assert any("not available offline" in n and "hf download" in n for n in res["notes"])
    assert "distilled" in res["distances"] and res["distances"]["distilled"]["psnr"] > 0


@pytest.mark.parametrize("cond_first", [False, True])
def test_guided_eps_error_by_hand(cond_first):
    """The guided ε error compares u + w·(c − u) of student and teacher, on the ε channels, for the
    family's row order; a batch that is not a CFG pair batch adds no guided entry."""
    from deltadistill.evaluate import trajectory_error

    g = torch.Generator().manual_seed(0)
    C, w, n = 4, 4.5, 3

    class Den(torch.nn.Module):  # a learned-σ denoiser: 2C output channels
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Conv2d(C, 2 * C, 1)

        def forward(self, hidden_states, timestep=None, return_dict=True):
            return (self.lin(hidden_states),)

    den = Den()
    x_cfg, x_plain = torch.randn(2 * n, C, 5, 5, generator=g), torch.randn(n, C, 5, 5, generator=g)
    t_cfg, t_plain = torch.randn(2 * n, 2 * C, 5, 5, generator=g), torch.randn(n, 2 * C, 5, 5, generator=g)
    calls = [((), {"hidden_states": x_cfg}, t_cfg), ((), {"hidden_states": x_plain}, t_plain)]
    guided: list = []
    errors = trajectory_error(den, calls, C, samples=n, guidance=w, cond_first=cond_first, guided_errors=guided)
    with torch.no_grad():
        out = den(x_cfg)[0].double()[:, :C]
        want_plain = float(((den(x_plain)[0].double()[:, :C] - t_plain.double()[:, :C]) ** 2).mean())
    tgt = t_cfg.double()[:, :C]
    (cs, us), (ct, ut) = ((out[:n], out[n:]), (tgt[:n], tgt[n:])) if cond_first else ((out[n:], out[:n]), (tgt[n:], tgt[:n]))
    want = float((((us + w * (cs - us)) - (ut + w * (ct - ut))) ** 2).mean())
    assert errors[0] == pytest.approx(float(((out - tgt) ** 2).mean()), rel=1e-12)
    assert errors[1] == pytest.approx(want_plain, rel=1e-12)
    assert guided == [pytest.approx(want, rel=1e-12)]  # one entry: the plain batch has no CFG pairs
    # the other row order gives another number (the check can tell the orders apart)
    other: list = []
    trajectory_error(den, calls[:1], C, samples=n, guidance=w, cond_first=not cond_first, guided_errors=other)
    assert other[0] != pytest.approx(want, rel=1e-6)


def test_eps_part_keeps_packed_tokens_whole():
    """Only a learned-σ image output loses its variance half; FLUX's packed tokens [B, N, C] are not sliced by
    token, and a UNet's ε output is kept whole."""
    from deltadistill.evaluate import _eps

    learned = torch.randn(2, 8, 4, 4)
    assert torch.equal(_eps(learned, 4), learned[:, :4].double())
    packed = torch.randn(2, 64, 64)  # 64 tokens of 64 packed channels, latent channels 16
    assert torch.equal(_eps(packed, 16), packed.double())
    unet = torch.randn(2, 4, 4, 4)
    assert torch.equal(_eps(unet, 4), unet.double())
