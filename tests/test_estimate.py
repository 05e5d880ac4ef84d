"""attnprobe analyze --estimate (meta-device dry run) and --random-weights."""
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.cli import app
from attnprobe.config import AnalysisConfig
from attnprobe.estimate import BUFFERS, estimate_analysis

runner = CliRunner()


def test_estimate_pixart_shapes_without_weights():
    est = estimate_analysis("pixart", calibrate=False)  # PixArt-Σ XL 512 from its shipped config
    assert est.resolution == (512, 512) and len(est.layers) == 28
    assert 600e6 < est.params < 620e6
    layer = est.layers[0]
    assert layer.grid == (32, 32) and layer.heads == 16 and layer.head_dim == 72 and layer.keys == 1024
    assert layer.queries == 144  # auto: stride 3 lattice, 12 × 12
    assert layer.peak_bytes == 2 * 16 * 1024 * 4 * BUFFERS * 144  # CFG batch 2, one chunk
    assert layer.rows_per_step == 2 * 16 * 144
    small = estimate_analysis("pixart", AnalysisConfig(memory_budget_mb=16), calibrate=False).layers[0]
    assert small.chunks > 1 and small.peak_bytes <= 16 * 2**20


def test_estimate_is_calibrated_on_this_device():
    est = estimate_analysis("tiny-pixart", AnalysisConfig(steps=3), prompts=2)
    assert est.model_step_s > 0 and est.capture_step_s > 0
    assert est.total_s == pytest.approx(est.step_s * 3 * 2)
    assert "GFLOP/s" in est.calibration


def test_estimate_cli_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a photo of cat\n")
    result = runner.invoke(app, ["analyze", "-p", "p.txt", "-m", "sd15", "--resolution", "256", "--estimate"])
    assert result.exit_code == 0, result.output
    assert "16 self-attention layers" in result.output and "Estimated per denoising step" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_random_weights_refuses_unsupported_families_before_allocating():
    from attnprobe.core.registry import ModelLoadError, load_pipeline
    from attnprobe.core.sites import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="random-weights"):
        load_pipeline("flux", random_weights=True)  # 12 B parameters: refused on the meta device
    with pytest.raises(ModelLoadError, match="shipped architecture config"):
        load_pipeline("demo", random_weights=True)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["pixart", "sd15"])
def test_random_weights_real_size_generates(alias):
    from attnprobe.core.registry import load_pipeline

    pipe, _ = load_pipeline(alias, random_weights=True)
    assert pipe._attnprobe_random_weights
    den = pipe.transformer if alias == "pixart" else pipe.unet
    assert sum(p.numel() for p in den.parameters()) > 5e8
    with torch.no_grad():
        image = pipe("a photo of cat", num_inference_steps=1, height=128, width=128).images[0]
    assert image.size == (128, 128)


@pytest.mark.parametrize("alias", ["tiny-flux", "tiny-sd3"])
def test_joint_attention_keys_hold_the_text_the_pipeline_encodes(alias):
    """Joint attention's softmax runs over the text tokens too: the dry run counts as many as the pipeline encodes."""
    from attnprobe.core.registry import load_pipeline, resolve
    from deltadistill.trajectory import record_trajectories

    pipe, _ = load_pipeline(alias)
    traj = record_trajectories(pipe, ["a photo of a cat"], [0], steps=1, resolution=resolve(alias).resolution)
    text = traj.batched["encoder_hidden_states"].shape[1]
    layer = estimate_analysis(alias, AnalysisConfig(steps=1), calibrate=False).layers[0]
    assert layer.keys == layer.grid[0] * layer.grid[1] + text
    flux = estimate_analysis("flux", calibrate=False).layers[0]  # FLUX.1 at 1024 px: 64² image tokens, T5's 512
    assert flux.grid == (64, 64) and flux.keys == 64 * 64 + 512
