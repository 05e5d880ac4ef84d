"""convert / save / load on the tiny offline pipelines (PixArt-Σ, SD1.5, SDXL, DiT; FLUX/SD3 refused)."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from attnprobe.core.family import denoiser_of, family_of, find_self_attention, vae_scale_factor
from attnprobe.core.registry import config_hash, load_pipeline
from deltadistill import load, save
from deltadistill.conversion import (
    AlreadyConvertedError,
    DeltaConvAttention,
    KernelSpecError,
    conversion_info,
    convert,
    delta_modules,
)
from deltadistill.io import FolderMismatchError

ALIASES = ["tiny-pixart", "tiny-sd15", "tiny-sdxl", "tiny-dit", "tiny-hunyuan"]


def _generate(pipe, alias, height=32, width=48, seed=0):
    """Two denoising steps at a non-square size (DiT's pipeline only makes its square sample size)."""
    kw = dict(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(seed))
    if alias == "tiny-dit":
        return pipe(class_labels=[1], **kw).images
    if alias == "tiny-pixart":
        kw.update(use_resolution_binning=False, max_sequence_length=16)
    if alias == "tiny-hunyuan":  # its pipeline assumes an 8× VAE: 32×48 px is a 2×3 token grid
        kw.update(use_resolution_binning=False)
    return pipe(prompt="a photo of a cat", height=height, width=width, **kw).images


def _perturb(pipe, seed=0):
    """Random block weights (fresh blocks have proj_out = 0, which would hide load/save errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in delta_modules(pipe).values():
            for p in mod.block.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("alias", ALIASES)
def test_convert_replaces_self_attention_only(alias):
    pipe, _ = load_pipeline(alias)
    den = denoiser_of(pipe)
    sites = find_self_attention(den)
    cross = {n: m for n, m in den.named_modules() if n.endswith(".attn2")}
    if alias != "tiny-dit":  # DiT blocks have no cross-attention
        assert cross

    assert convert(pipe, 3) is pipe
    mods = delta_modules(pipe)
    assert list(mods) == [s.name for s in sites]  # every attn1, in order
    assert all(n.endswith(".attn1") for n in mods)
    for name, mod in cross.items():  # attn2 untouched: the very same modules
        assert den.get_submodule(name) is mod and not isinstance(mod, DeltaConvAttention)

    trainable = {
        id(p) for comp in pipe.components.values() if isinstance(comp, torch.nn.Module) for p in comp.parameters() if p.requires_grad
    }
    block_params = {id(p) for m in mods.values() for p in m.block.parameters()}
    assert trainable == block_params and block_params

    # the pipeline still runs, at a non-square resolution where the pipeline allows it
    out = _generate(pipe, alias)
    assert torch.isfinite(out).all()
    assert out.shape[-2:] == ((32, 32) if alias == "tiny-dit" else (32, 48))


@pytest.mark.parametrize("alias, size", [("tiny-sdxl", (32, 48)), ("tiny-pixart", (48, 32)), ("tiny-dit", (24, 24))])
def test_token_grid_follows_latent_and_level(alias, size):
    """Each block sees its site's true H'×W' grid (no transposition), at every UNet level.

    DiT's own unpatchify only handles square latents, so it is checked at a square size other
    than its configured one.
    """
    pipe, _ = load_pipeline(alias)
    den = denoiser_of(pipe)
    sites = {s.name: s for s in find_self_attention(den)}
    convert(pipe, 3)
    seen = {}
    hooks = [
        m.block.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, tuple(args[0].shape[1:3])))
        for name, m in delta_modules(den).items()
    ]
    h_px, w_px = size
    vae = vae_scale_factor(pipe)
    latent = torch.randn(1, den.config.in_channels, h_px // vae, w_px // vae)
    t = torch.tensor([10])
    with torch.no_grad():
        if alias == "tiny-dit":
            den(latent, timestep=t, class_labels=torch.tensor([1]))
        elif alias == "tiny-pixart":
            cond = torch.randn(1, 5, den.config.caption_channels)
            den(latent, encoder_hidden_states=cond, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        else:
            cond = torch.randn(1, 5, den.config.cross_attention_dim)
            added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
            den(latent, t, encoder_hidden_states=cond, added_cond_kwargs=added)
    for hk in hooks:
        hk.remove()
    base = family_of(den).base_grid(den.config, vae, h_px, w_px)
    assert seen == {name: site.grid(base) for name, site in sites.items()}
    assert len(set(seen.values())) == (2 if alias == "tiny-sdxl" else 1)


def test_mean_field_init_reproduces_uniform_attention():
    """With uniform attention (zero queries) the converted layer equals the teacher's attention."""
    pipe, _ = load_pipeline("tiny-pixart")
    den = denoiser_of(pipe)
    attn = den.transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_q.weight.zero_()
        if attn.to_q.bias is not None:
            attn.to_q.bias.zero_()
    x = torch.randn(2, 24, attn.to_q.in_features)  # 4×6 grid
    with torch.no_grad():
        teacher = attn(x)
    convert(pipe, 5)
    student = delta_modules(pipe)["transformer_blocks.0.attn1"]
    student.recorder.base_grid = (4, 6)  # as if the denoiser ran on a 8×12 latent (patch 2)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher, atol=1e-5, rtol=1e-5)
    assert conversion_info(pipe)["init"] == "mean_field"

    fresh, _ = load_pipeline("tiny-pixart")
    convert(fresh, 5, init="zero")
    assert all(m.block(torch.randn(1, 3, 3, m.block.dim)).abs().max() == 0 for m in delta_modules(fresh).values())


def test_kernel_sizes_from_dict_and_layer_subset():
    pipe, _ = load_pipeline("tiny-sd15")
    sites = find_self_attention(denoiser_of(pipe))
    sizes = {s.name: 3 + 2 * (i % 3) for i, s in enumerate(sites)}
    sizes[sites[0].label] = sizes.pop(sites[0].name)  # labels work as keys too
    convert(pipe, sizes, gate="sigmoid")
    got = {n: m.block.kernel_size for n, m in delta_modules(pipe).items()}
    assert got == {s.name: 3 + 2 * (i % 3) for i, s in enumerate(sites)}
    assert {m.block.gate for m in delta_modules(pipe).values()} == {"sigmoid"}

    subset, _ = load_pipeline("tiny-sd15")
    convert(subset, {sites[1].name: 7}, layers=[sites[1].name])
    assert {n: m.block.kernel_size for n, m in delta_modules(subset).items()} == {sites[1].name: 7}

    for bad, match in [({"nope.attn1": 3}, "not in this model"), ({sites[0].name: 3}, "no kernel size"), (4, "odd"), (True, "odd int")]:
        fresh, _ = load_pipeline("tiny-sd15")
        with pytest.raises(KernelSpecError, match=match):
            convert(fresh, bad)
        assert not delta_modules(fresh)  # a refused conversion leaves the model alone


def _report(pipe, alias, sizes, names=None):
    den = denoiser_of(pipe)
    sites = find_self_attention(den)
    layers = [
        SimpleNamespace(name=n, label=s.label, grid=(8, 8), kernel_size=k)
        for s, k, n in zip(sites, sizes, names or [s.name for s in sites])
    ]
    return SimpleNamespace(model={"alias": alias, "source": f"builtin:{alias}", "config_hash": config_hash(den.config)}, layers=layers)


def test_kernel_sizes_from_report(tmp_path, monkeypatch):
    pipe, _ = load_pipeline("tiny-dit")
    report = _report(pipe, "tiny-dit", [3, 5, 7, 9])
    convert(pipe, report)
    assert [m.block.kernel_size for m in delta_modules(pipe).values()] == [3, 5, 7, 9]
    info = conversion_info(pipe)
    assert info["kernel_source"] == "report" and len(info["report_hash"]) == 16

    # a path goes through attnprobe.load_report
    import attnprobe

    (tmp_path / "erf.json").write_text("{}")
    monkeypatch.setattr(attnprobe, "load_report", lambda path: report, raising=False)
    by_path, _ = load_pipeline("tiny-dit")
    convert(by_path, tmp_path)  # the folder holding erf.json
    assert conversion_info(by_path)["report_hash"] == info["report_hash"]

    other, _ = load_pipeline("tiny-dit")
    wrong = _report(other, "tiny-pixart", [3, 3, 3, 3], names=[f"blocks.{i}.attn" for i in range(4)])
    with pytest.raises(KernelSpecError, match="another model"):
        convert(other, wrong)
    # same layer names (PixArt and DiT both have transformer_blocks.i.attn1) but another architecture
    pixart_report = _report(other, "tiny-pixart", [3, 3, 3, 3])
    pixart_report.model.update(arch="pixart", denoiser="PixArtTransformer2DModel")
    with pytest.raises(KernelSpecError, match="PixArtTransformer2DModel model"):
        convert(other, pixart_report)
    assert not delta_modules(other)


@pytest.mark.parametrize("alias", ["tiny-flux", "tiny-sd3"])
def test_joint_attention_models_are_refused(alias):
    pipe, _ = load_pipeline(alias)
    with pytest.raises(ValueError, match="joint attention.*text conditioning"):
        convert(pipe, 3)


def test_model_without_self_attention_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, norm_num_groups=4, cross_attention_dim=8,
    )
    with pytest.raises(ValueError, match="no self-attention"):
        convert(unet, 3)


def test_double_conversion_is_refused():
    pipe, _ = load_pipeline("tiny-dit")
    convert(pipe, 3)
    with pytest.raises(AlreadyConvertedError, match="already converted"):
        convert(pipe, 5)


def test_deepcopied_student_keeps_its_own_grid():
    pipe, _ = load_pipeline("tiny-dit")
    convert(pipe, 3)
    student = copy.deepcopy(pipe.transformer)
    rec = next(iter(delta_modules(student).values())).recorder
    assert rec is not pipe.transformer._deltadistill_recorder
    assert all(m.recorder is rec for m in delta_modules(student).values())
    with torch.no_grad():
        student(torch.randn(1, 4, 12, 12), timestep=torch.tensor([3]), class_labels=torch.tensor([0]))
    assert rec.base_grid == (6, 6) and pipe.transformer._deltadistill_recorder.base_grid is None  # 12×12 latent, patch 2


def test_save_load_roundtrip_and_mismatches(tmp_path):
    pipe, spec = load_pipeline("tiny-pixart")
    convert(pipe, {f"block {i}": k for i, k in enumerate([3, 5, 3, 7])}, gate="scaled")  # the gate with a scale to save
    _perturb(pipe)
    folder = save(pipe, tmp_path / "distilled", base_model=spec, extra={"step": 12})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "delta_blocks.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["distilled"]  # no temporary folder left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model"]["alias"] == "tiny-pixart" and config["extra"] == {"step": 12}
    assert [layer["kernel_size"] for layer in config["layers"]] == [3, 5, 3, 7]
    assert config["layers"][0] == {
        "name": "transformer_blocks.0.attn1", "label": "block 0", "dim": 32, "kernel_size": 3,
        "scales": [1.0, 0.5], "inter_ratio": 0.5, "gate": "scaled", "gate_scale": 0.25, "pool": "ceil", "dw_bias": True,
        "key_width": 0,
    }  # gate_scale = 1/√C' with C' = 32 · 0.5

    fresh, _ = load_pipeline("tiny-pixart")
    assert load(fresh, folder) is fresh
    torch.testing.assert_close(_generate(fresh, "tiny-pixart"), _generate(pipe, "tiny-pixart"), atol=0, rtol=0)
    assert all(not p.requires_grad for p in fresh.text_encoder.parameters())

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(pipe, folder, base_model="tiny-pixart")
    save(pipe, folder, base_model="tiny-pixart", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["distilled"]

    # another model
    dit, _ = load_pipeline("tiny-dit")
    with pytest.raises(FolderMismatchError, match="distilled from tiny-pixart.*config hash"):
        load(dit, folder)
    assert not delta_modules(dit)

    # an edited kernel size no longer fits the stored tensors
    config["layers"][1]["kernel_size"] = 9
    (folder / "config.json").write_text(json.dumps(config))
    fresh2, _ = load_pipeline("tiny-pixart")
    with pytest.raises(FolderMismatchError, match=r"transformer_blocks\.1\.attn1.*kernel_size"):
        load(fresh2, folder)
    assert not delta_modules(fresh2)

    # loading onto an already converted pipeline
    with pytest.raises(AlreadyConvertedError):
        load(fresh, folder)


def test_key_weighted_blocks_save_and_load(tmp_path):
    """A student with the key-weighted branch: convert builds it in every layer, and a fresh pipeline loads the
    same images back (the branch's settings travel in config.json, its weights in the safetensors file)."""
    pipe, spec = load_pipeline("tiny-pixart")
    convert(pipe, 3, key_width=6)
    blocks = [m.block for m in delta_modules(pipe).values()]
    assert blocks and all(b.key_width == 6 and b.key_taps.shape == (2, 6, 3, 3) for b in blocks)
    _perturb(pipe)
    folder = save(pipe, tmp_path / "distilled", base_model=spec)
    assert {layer["key_width"] for layer in json.loads((folder / "config.json").read_text())["layers"]} == {6}
    fresh, _ = load_pipeline("tiny-pixart")
    load(fresh, folder)
    torch.testing.assert_close(_generate(fresh, "tiny-pixart"), _generate(pipe, "tiny-pixart"), atol=0, rtol=0)
    # the branch matters: the same weights without it make other images
    plain, _ = load_pipeline("tiny-pixart")
    convert(plain, 3)
    state = {k: v for k, v in delta_modules(pipe)["transformer_blocks.0.attn1"].block.state_dict().items()
             if not k.startswith("key_")}
    delta_modules(plain)["transformer_blocks.0.attn1"].block.load_state_dict(state)
    assert not torch.equal(_generate(plain, "tiny-pixart"), _generate(pipe, "tiny-pixart"))
    # a config.json whose key width no longer fits the stored tensors, or is not a width at all
    config = json.loads((folder / "config.json").read_text())
    for bad, needle in ((0, "key_"), (-1, "invalid settings.*key_width")):
        config["layers"][0]["key_width"] = bad
        (folder / "config.json").write_text(json.dumps(config))
        other, _ = load_pipeline("tiny-pixart")
        with pytest.raises(FolderMismatchError, match=needle):
            load(other, folder)
        assert not delta_modules(other)


def test_save_needs_a_converted_pipeline(tmp_path):
    pipe, _ = load_pipeline("tiny-dit")
    with pytest.raises(ValueError, match="convert"):
        save(pipe, tmp_path / "x", base_model="tiny-dit")
    assert not (tmp_path / "x").exists()


def test_package_exports():
    import deltadistill

    import deltadistill.conversion

    assert callable(deltadistill.convert) and callable(deltadistill.save) and callable(deltadistill.load)
    assert deltadistill.convert is deltadistill.conversion.convert  # the function, not a module
    assert deltadistill.DeltaConvBlock.__name__ == "DeltaConvBlock"


def test_kernel_ratio_recomputes_the_report_sizes(tmp_path):
    from attnprobe import analyze

    pipe, spec = load_pipeline("tiny-pixart")
    report = analyze(pipe, ["a photo of cat"], steps=1, model_info={"alias": spec.alias, "source": spec.source})
    path = report.save(tmp_path / "erf.json")
    for ratio in (None, 0.3, 1.5):
        fresh, _ = load_pipeline("tiny-pixart")
        convert(fresh, path, kernel_ratio=ratio)
        got = {n: m.block.kernel_size for n, m in delta_modules(fresh).items()}
        assert got == report.kernel_sizes(ratio)
    assert report.kernel_sizes(0.3) != report.kernel_sizes(1.5)
