"""Report format (save/load/validate/merge) and the attnprobe CLI on the tiny PixArt."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from attnprobe import analyze, load_report, merge_reports
from attnprobe.cli import app
from attnprobe.report import SCHEMA_VERSION, Report, ReportError

runner = CliRunner()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from attnprobe.core.registry import load_pipeline

    from attnprobe.analysis import ResolutionWarning

    pipe, spec = load_pipeline("tiny-pixart")
    with pytest.warns(ResolutionWarning, match="32x48 differs from the model's native resolution 32x32"):
        return analyze(pipe, ["a photo of cat", "a red dog"], steps=2, resolution="32x48", model_info={"alias": spec.alias})


def test_resolution_warning_is_recorded(report):
    assert any("32x48" in w for w in report.run["warnings"])


def test_report_content(report):
    assert len(report.layers) == 4
    layer = report.layers[0]
    assert layer.grid == (8, 12) and layer.heads == 2
    assert layer.erf % 2 == 1 and 1 <= layer.erf <= 2 * 12 - 1
    assert layer.kernel_size % 2 == 1 and 3 <= layer.kernel_size <= 31
    assert 0.0 <= layer.bias_share <= 1.0
    assert np.all(np.diff(layer.asm_curve) >= -1e-12) and layer.asm_curve[-1] == pytest.approx(1.0)
    d = report.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    for key in ("resolution", "steps", "seed", "prompts_hash", "threshold", "cutoff", "order", "highpass_mass"):
        assert key in d["settings"]
    for key in ("erf", "kernel_size", "asm_curve", "hp_asm_curve", "bias_share", "sink_keys"):
        assert key in d["layers"][0]["results"]
    assert d["model"]["config_hash"] and d["run"]["torch"]


def test_kernel_sizes_are_recomputed_from_the_sums(report, tmp_path):
    from attnprobe.stats import recommended_kernel_size

    assert report.kernel_sizes() == {layer.name: layer.kernel_size for layer in report.layers}
    for ratio, kmin, kmax in ((0.3, 3, 31), (1.0, 5, 9), (2.5, 3, 63)):
        want = {layer.name: recommended_kernel_size(max(layer.erf, 1), ratio, kmin, kmax) for layer in report.layers}
        assert report.kernel_sizes(ratio, kmin, kmax) == want
    loaded = load_report(report.save(tmp_path / "erf.json"))  # the same from the stored sums alone
    assert loaded.kernel_sizes(1.0) == report.kernel_sizes(1.0)
    assert report.layers[0].k_axis.tolist() == list(range(1, 2 * 12, 2))
    with pytest.raises(ValueError, match="ratio"):
        report.kernel_sizes(0)


def test_analysis_settings_are_validated_once_before_running():
    from attnprobe.config import AnalysisConfig, ConfigError

    for bad, match in [(dict(threshold=0), "--threshold"), (dict(kernel_ratio=float("inf")), "--kernel-ratio"),
                       (dict(kernel_ratio=0), "--kernel-ratio"), (dict(queries="stride:0"), "--queries"),
                       (dict(kmin=9, kmax=5), "--kmin"), (dict(cutoff=-1), "--cutoff"), (dict(steps=0), "--steps"),
                       (dict(ring_backend="cuda"), "--ring-backend"), (dict(probe_points=((2, 0),)), "probe point")]:
        with pytest.raises(ConfigError, match=match):
            AnalysisConfig(**bad).validate()
    called = []
    with pytest.raises(ConfigError, match="--kernel-ratio"):  # before the pipeline is touched
        analyze(called, ["a prompt"], kernel_ratio=float("inf"))
    with pytest.raises(TypeError, match="unknown analysis setting"):
        analyze(called, ["a prompt"], kernel_size=3)
    assert AnalysisConfig().settings()["threshold"] == 0.8


def test_save_load_roundtrip(report, tmp_path):
    path = report.save(tmp_path / "erf.json")
    back = load_report(path)
    for a, b in zip(report.layers, back.layers):
        np.testing.assert_array_equal(a.ring, b.ring)
        assert (a.erf, a.kernel_size, a.sink_keys) == (b.erf, b.kernel_size, b.sink_keys)
    assert load_report(tmp_path).layers[0].name == back.layers[0].name  # a run folder works too


def test_load_rejects_bad_files(report, tmp_path):
    good = json.loads(json.dumps(report.to_dict()))
    old = dict(good, schema_version=0)
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ReportError, match="schema version 0"):
        load_report(tmp_path / "old.json")
    text = json.dumps(good)
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(ReportError, match="not valid JSON"):
        load_report(tmp_path / "cut.json")
    bad = json.loads(text)
    bad["layers"][0]["accumulators"]["ring"][0][0][0] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(bad))
    with pytest.raises(ReportError, match="NaN"):
        load_report(tmp_path / "nan.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReportError):
        load_report(tmp_path / "bin.json")
    with pytest.raises(ReportError, match="no report"):
        load_report(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def other_report():
    """The same model and settings as ``report``, other seeds: a second shard."""
    from attnprobe.core.registry import load_pipeline

    pipe, spec = load_pipeline("tiny-pixart")
    with pytest.warns(UserWarning, match="differs from the model's native resolution"):  # it says so, once
        return analyze(pipe, ["a photo of cat", "a red dog"], steps=2, resolution="32x48", seed=10,
                       model_info={"alias": spec.alias})


def test_merge_adds_sums(report, other_report):
    merged = merge_reports([report, other_report])
    for a, b, m in zip(report.layers, other_report.layers, merged.layers):
        np.testing.assert_allclose(m.ring, a.ring + b.ring)
        np.testing.assert_allclose(m.mass, a.mass + b.mass)
    assert merged.settings["prompts"] == report.settings["prompts"] * 2
    assert merged.settings["seeds"] == [0, 1, 10, 11]


def test_merge_refuses_a_run_twice_and_overlapping_shards(report, other_report):
    with pytest.raises(ReportError, match="contains run .* again"):
        merge_reports([report, report])
    twin = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    twin.run = dict(twin.run, run_id="another-id")  # a different run, but the same prompts and seeds
    with pytest.raises(ReportError, match="overlapping shards"):
        merge_reports([report, twin])
    merged = merge_reports([report, other_report])
    with pytest.raises(ReportError, match="again"):  # a part of a merged report, merged once more
        merge_reports([merged, report])


def test_merge_equals_single_run(tmp_path):
    """Two shards of one prompt each merge into exactly the two-prompt report."""
    from attnprobe.core.registry import load_pipeline

    pipe, _ = load_pipeline("tiny-pixart")
    kw = dict(steps=2, queries="stride:3")
    both = analyze(pipe, ["a photo of cat", "a red dog"], seed=5, **kw)
    a = analyze(pipe, ["a photo of cat"], seed=5, **kw)
    b = analyze(pipe, ["a red dog"], seed=6, **kw)
    merged = merge_reports([a, b])
    for x, y in zip(both.layers, merged.layers):
        np.testing.assert_allclose(y.ring, x.ring, rtol=1e-10)
        np.testing.assert_allclose(y.key_mass, x.key_mass, rtol=1e-10)


def test_merge_refuses_mismatch(report):
    from attnprobe.core.registry import load_pipeline

    pipe, _ = load_pipeline("tiny-pixart")
    other = analyze(pipe, ["a photo of cat"], steps=3, resolution=32)
    with pytest.raises(ReportError, match="differs in setting"):
        merge_reports([report, other])
    other_model = load_pipeline("tiny-dit")[0]
    dit = analyze(other_model, ["cat"], steps=2)
    with pytest.raises(ReportError, match="different model"):
        merge_reports([report, dit])


# -- CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a photo of cat\n# a comment\n\na red dog\n", encoding="utf-8")
    return p


def _err(result):
    return result.stderr if hasattr(result, "stderr") else result.output


def test_cli_analyze_writes_run(prompts, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["analyze", "-m", "tiny-pixart", "-p", str(prompts), "-o", str(out), "--steps", "2", "--no-plots"])
    assert r.exit_code == 0, _err(r)
    rep = load_report(out / "erf.json")
    assert rep.settings["prompts"] == ["a photo of cat", "a red dog"]
    assert sorted(p.name for p in (out / "images").iterdir()) == rep.images and len(rep.images) == 2
    assert "block 3" in r.stdout
    # an existing run is not clobbered without --overwrite
    before = (out / "erf.json").read_bytes()
    r = runner.invoke(app, ["analyze", "-m", "tiny-pixart", "-p", str(prompts), "-o", str(out), "--steps", "3", "--no-plots"])
    assert r.exit_code == 2 and "--overwrite" in _err(r)
    assert (out / "erf.json").read_bytes() == before
    r = runner.invoke(app, ["analyze", "-m", "tiny-pixart", "-p", str(prompts), "-o", str(out), "--steps", "3", "--no-plots", "--overwrite"])
    assert r.exit_code == 0, _err(r)
    assert load_report(out).settings["steps"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no leftovers


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("binary", "not UTF-8"),
        ("alias", "unknown model"),
        ("offline", "not available offline"),
        ("resolution", "not divisible"),
        ("queries", "--queries"),
        ("threshold", "threshold"),
        ("ratio", "--kernel-ratio"),
    ],
)
def test_cli_analyze_bad_input(case, expect, tmp_path, prompts):
    p = prompts
    model, extra = "tiny-pixart", []
    if case == "missing":
        p = tmp_path / "nope.txt"
    elif case == "empty":
        p = tmp_path / "empty.txt"
        p.write_text("\n  \n# only a comment\n")
    elif case == "binary":
        p = tmp_path / "bin.txt"
        p.write_bytes(b"\xff\xfe\xfa prompt")
    elif case == "alias":
        model = "not-a-model"
    elif case == "offline":
        model = "sdxl"
    elif case == "resolution":
        extra = ["--resolution", "30"]
    elif case == "queries":
        extra = ["--queries", "every-other"]
    elif case == "threshold":
        extra = ["--threshold", "1.5"]
    elif case == "ratio":
        extra = ["--kernel-ratio", "inf"]
    out = tmp_path / "run"
    r = runner.invoke(app, ["analyze", "-m", model, "-p", str(p), "-o", str(out), "--steps", "2", *extra])
    assert r.exit_code == 2
    err = _err(r).strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in r.output
    assert not out.exists()


def test_cli_merge_and_models(report, other_report, tmp_path):
    a = report.save(tmp_path / "a.json")
    b = other_report.save(tmp_path / "b.json")
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 0, _err(r)
    assert load_report(tmp_path / "m.json").settings["merged_from"] == 2
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "--overwrite" in _err(r)
    bad = json.loads(a.read_text())
    bad["settings"]["cutoff"] = 0.3
    (tmp_path / "c.json").write_text(json.dumps(bad))
    r = runner.invoke(app, ["merge", str(a), str(tmp_path / "c.json"), "-o", str(tmp_path / "m2.json")])
    assert r.exit_code == 2 and "cutoff" in _err(r)
    assert not (tmp_path / "m2.json").exists()
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    for alias in ("demo", "pixart", "sd15", "sdxl", "flux", "sd3", "dit", "tiny-pixart"):
        assert alias in r.stdout
