"""Real-size smoke test on CPU (slow): PixArt-Σ XL with random weights, analysis + conversion + 2 training steps."""
import pytest


@pytest.mark.slow
def test_pixart_xl_random_weights_analyse_convert_train(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size_smoke.py"
    spec = importlib.util.spec_from_file_location("real_size_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)

    row = smoke.smoke("pixart", 256, tmp_path)
    assert row["analyze"]["layers"] == 28 and row["analyze"]["weights"] == "random"
    assert 0.5 <= row["analyze"]["rss_vs_estimate"] <= 2.0, row  # the dry run's memory estimate holds within 2×
    assert row["train"]["converted"] == 1  # conversion and 2 optimizer steps wrote the distilled blocks
    assert 0.5 <= row["train"]["rss_vs_estimate"] <= 2.0, row  # deltadistill train --estimate holds within 2× too
