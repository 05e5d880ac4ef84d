"""deltadistill.flops (analytic counts, checked by hand and against FlopCounterMode) and the bench."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from deltadistill import flops as fl

# A tiny layer: grid 4×6 (N = 24), C = 8, h = 2 (d = 4), K = 3, ρ = ½ (C' = 4), scales (1, ½).
GRID, N, C, HEADS, K = (4, 6), 24, 8, 2, 3


def test_self_attention_flops_by_hand():
    cost = fl.self_attention_flops(N, C, HEADS)
    by_hand = {
        "qkv_proj": 3 * 2 * 24 * 8 * 8,  # 9216
        "out_proj": 2 * 24 * 8 * 8,  # 3072
        "qkv_bias": 3 * 24 * 8,  # 576
        "out_bias": 24 * 8,  # 192
        "scale": 24 * 8,  # 192
        "scores": 2 * 24 * 24 * 8,  # 9216
        "softmax": 4 * 2 * 24 * 24,  # 4608
        "attn_v": 2 * 24 * 24 * 8,  # 9216
    }
    assert {**cost.matmul_terms, **cost.elementwise_terms} == by_hand
    assert cost.total == 36288
    assert cost.matmul == 9216 + 3072 + 9216 + 9216
    assert fl.paper_attention_flops(N, C) == 4 * 24 * 64 + 4 * 576 * 8 + 4 * 576


def test_deltaconv_flops_by_hand():
    cost = fl.deltaconv_flops(GRID, C, K)
    # full stage on 4×6, half stage on ⌈4/2⌉×⌈6/2⌉ = 2×3 (N_1 = 6)
    matmul = {
        "proj_in": 2 * 24 * 8 * 4,  # 1536
        "dwconv_s0": 2 * 24 * 4 * 9,  # 1728
        "dwconv_s1": 2 * 6 * 4 * 9,  # 432
        "proj_out": 2 * 24 * 2 * 8 + 2 * 6 * 2 * 8,  # 960: each stage's C'/2 = 2 channels at its own size
        "global_proj": 2 * 8 * 8,  # 128
    }
    elementwise = {
        "proj_in_bias": 24 * 4,  # 96
        "dwconv_bias": 24 * 4 + 6 * 4,  # 120
        "gate": 2 * 24 * 2 + 2 * 6 * 2,  # 120: x1·x2·s per output channel
        "pool": 4 * 6 * 4,  # 96
        "upsample": 7 * 24 * 8,  # 1344: the half stage, projected to C = 8, resized to 4×6
        "proj_out_bias": 24 * 8,  # 192
        "stage_sum": 24 * 8,  # 192
        "global_mean": 24 * 8 + 8,  # 200
        "global_bias_add": 8 + 8,  # 16: global_proj's bias, then folded into proj_out's bias
    }
    assert cost.matmul_terms == matmul
    assert cost.elementwise_terms == elementwise
    assert cost.total == 1536 + 1728 + 432 + 960 + 128 + 96 + 120 + 120 + 96 + 1344 + 192 + 192 + 200 + 16
    sig = fl.deltaconv_flops(GRID, C, K, gate="sigmoid")
    assert sig.elementwise_terms["gate"] == 5 * 24 * 2 + 5 * 6 * 2


def test_window_and_linear_attention_flops_by_hand():
    win = fl.window_attention_flops(GRID, C, HEADS, K)
    keys = 9
    assert win.matmul == 9216 + 3072 + 2 * 24 * keys * 8 * 2
    assert win.total == 9216 + 3072 + 576 + 192 + 192 + 2 * (2 * 24 * keys * 8) + 4 * 2 * 24 * keys
    # a window larger than the grid sees the whole 4×6 grid: window attention = full attention
    assert fl.window_attention_flops(GRID, C, HEADS, 7).total == fl.self_attention_flops(N, C, HEADS).total
    lin = fl.linear_attention_flops(N, C, HEADS)
    d = 4
    matmul = 12288 + 2 * 2 * (2 * 24 * 8 * 8) + 2 * 24 * 8 * d * 2 + 2 * 24 * 8  # proj, MLPs, kv & q·kv, normaliser
    elementwise = 768 + 2 * 2 * 24 * 8 + 2 * 7 * 24 * 8 + 2 * 24 * 8 + 2 * 24 * 8 + 4 * 24 * 8 + 2 * 24 * 8 + 24 * 8 + 2 * 24 * 8
    assert lin.matmul == matmul
    assert lin.total == matmul + elementwise


def test_costs_scale_as_claimed():
    """Self-attention quadratic in N, the others linear (up to the constant terms)."""
    sa = [fl.self_attention_flops(s * s, 64, 4).total for s in (32, 64)]
    dc = [fl.deltaconv_flops((s, s), 64, 13).total for s in (32, 64)]
    la = [fl.linear_attention_flops(s * s, 64, 4).total for s in (32, 64)]
    assert sa[1] / sa[0] > 12  # → 16 as N² dominates
    assert 3.9 < dc[1] / dc[0] < 4.01
    assert 3.9 < la[1] / la[0] < 4.01


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package; a script there may import its neighbours)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _seeded(module):
    torch.manual_seed(0)
    return module.eval()


@pytest.mark.parametrize("processor", ["sdpa", "bmm"])
def test_attention_matches_flop_counter(processor):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attn = _seeded(Attention(C, heads=HEADS, dim_head=C // HEADS, bias=True))
    if processor == "bmm":
        attn.set_processor(AttnProcessor())  # explicit baddbmm/softmax/bmm
    measured, by_op = fl.count_measured(attn, torch.randn(1, N, C), by_op=True)
    assert measured == fl.self_attention_flops(N, C, HEADS).matmul, by_op


@pytest.mark.parametrize("grid,k", [((4, 6), 3), ((7, 5), 5), ((8, 8), 13)])
def test_deltaconv_matches_flop_counter(grid, k):
    from deltadistill.block import DeltaConvBlock

    block = _seeded(DeltaConvBlock(C, k))
    measured, by_op = fl.count_measured(block, torch.randn(1, *grid, C), by_op=True)
    assert measured == fl.deltaconv_flops(grid, C, k).matmul, by_op


@pytest.mark.parametrize("grid,k", [((4, 6), 3), ((7, 5), 5)])
def test_key_weighted_branch_matches_flop_counter(grid, k):
    """The key-weighted branch's projections and convolutions, as PyTorch's FLOP counter sees them."""
    from deltadistill.block import DeltaConvBlock

    block = _seeded(DeltaConvBlock(C, k, key_width=8))
    measured, by_op = fl.count_measured(block, torch.randn(1, *grid, C), by_op=True)
    plain = fl.deltaconv_flops(grid, C, k).matmul
    assert measured == fl.deltaconv_flops(grid, C, k, key_width=8).matmul > plain, by_op


@pytest.mark.parametrize("groups", [1, 4, 24])
def test_training_flop_counter_counts_grouped_convolution_backward_by_hand(groups):
    """Each gradient of a convolution (input, weight) costs what its forward costs: 2·B·C_out·H·W·(C_in/groups)·K²."""
    b, c, k, h = 2, 24, 5, 7
    x = torch.empty(b, c, h, h, device="meta", requires_grad=True)
    w = torch.empty(c, c // groups, k, k, device="meta", requires_grad=True)
    with fl.flop_counter() as counter:
        torch.nn.functional.conv2d(x, w, padding=k // 2, groups=groups).sum().backward()
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    forward = 2 * b * c * h * h * (c // groups) * k * k
    assert counts["aten.convolution"] == forward and counts["aten.convolution_backward"] == 2 * forward
    w.requires_grad_(False)  # the weight gradient alone is the term torch miscounts; here only the input's
    with fl.flop_counter() as counter:
        torch.nn.functional.conv2d(x, w, padding=k // 2, groups=groups).sum().backward()
    assert counter.get_flop_counts()["Global"][torch.ops.aten.convolution_backward] == forward


def test_linear_attention_matches_flop_counter():
    from deltadistill.bench import GeneralizedLinearAttention

    mod = _seeded(GeneralizedLinearAttention(C, HEADS))
    x = torch.randn(1, N, C)
    assert mod(x).shape == (1, N, C)
    assert fl.count_measured(mod, x) == fl.linear_attention_flops(N, C, HEADS).matmul


EXPECTED_SITES = {"pixart": 28, "pixart-1024": 28, "pixart-alpha": 28, "sd15": 16, "sdxl": 70, "dit": 28,
                  "flux": 19 + 38, "sd3": 24}


@pytest.mark.parametrize("alias", sorted(EXPECTED_SITES))
def test_shipped_configs_instantiate_on_meta(alias):
    from attnprobe.core import registry
    from attnprobe.core.family import find_self_attention

    den, info = registry.denoiser_from_config(alias)
    assert next(den.parameters()).device.type == "meta"
    assert type(den).__name__ == info["class"]
    assert len(find_self_attention(den)) == EXPECTED_SITES[alias]


def test_model_level_flops_sum_the_layers():
    from attnprobe.core import registry

    den, info = registry.denoiser_from_config("sd15")
    layers = fl.layer_shapes(den, info["vae_scale_factor"], 512, kernel_sizes=13)
    # SD1.5 at 512 px: 64×64 latent; levels 0..3 at 64, 32, 16, 8 with 320, 640, 1280, 1280 channels
    grids = sorted({(la.grid, la.dim) for la in layers})
    assert grids == [((8, 8), 1280), ((16, 16), 1280), ((32, 32), 640), ((64, 64), 320)]
    assert sum(la.grid == (64, 64) for la in layers) == 5  # down.0 ×2, up.3 ×3
    totals = fl.model_flops(layers)
    for op in fl.OPERATORS:
        assert totals[op].total == sum(fl.operator_flops(op, la).total for la in layers)
    assert totals["deltaconv"].total < totals["self_attention"].total


def test_latency_harness_on_a_tiny_block():
    from deltadistill.bench import LiveTensorBytes, peak_memory_bytes, time_callable
    from deltadistill.block import DeltaConvBlock

    block = _seeded(DeltaConvBlock(16, 3))
    x = torch.randn(1, 8, 8, 16)
    calls = []

    def fn():
        calls.append(1)
        return block(x)

    t = time_callable(fn, repeats=4, warmup=2)
    assert len(calls) == 6 and t.repeats == 4
    assert all(math.isfinite(v) and v > 0 for v in t.times_ms)
    assert t.min <= t.median <= t.max
    with pytest.raises(ValueError):
        time_callable(fn, repeats=0)
    # peak memory: at least the [1, 8, 8, 16] fp32 output, far below anything quadratic
    peak = peak_memory_bytes(lambda: block(x), "cpu", known=[x, *block.parameters()])
    assert 8 * 8 * 16 * 4 <= peak < 1 << 20
    # the tracker frees what dies: two sequential 1 MiB temporaries peak at 1 MiB, not 2
    with torch.no_grad(), LiveTensorBytes() as mode:
        for _ in range(2):
            y = torch.zeros(1 << 18)  # 1 MiB
            del y
    assert mode.peak == 1 << 20 and mode.current == 0


def test_run_bench_tiny_rows_are_ordered_and_sane():
    from deltadistill.bench import run_bench

    res = run_bench("tiny-pixart", [64, 32], repeats=2, warmup=1, step=False, kernel_size=3)
    assert res.meta["resolutions"] == [32, 64]
    assert [(r["resolution"], r["operator"]) for r in res.flops if r["operator"] in fl.OPERATORS] == [
        (r, op) for r in (32, 64) for op in fl.OPERATORS]
    modules = [r for r in res.latency if r["scope"] == "module"]
    assert [r["resolution"] for r in modules] == sorted(r["resolution"] for r in modules)
    for row in modules:
        assert row["repeats"] == 2
        assert row["ms_median"] is not None and 0 < row["ms_min"] <= row["ms_median"] < 60_000
        assert row["peak_mb"] >= 0 and math.isfinite(row["speedup_vs_sa"])


def test_cli_bench_tiny_pixart(tmp_path):
    from typer.testing import CliRunner

    try:
        from deltadistill.cli import app
    except ImportError:  # the CLI is not there yet: mount the command on a local app
        import typer

        from deltadistill.bench import register

        app = typer.Typer()
        app.callback()(lambda: None)
        register(app)
    from attnprobe.core.cli import omp_wait_setting

    runner = CliRunner()
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--model", "tiny-pixart", "--resolutions", "32", "--repeats", "1",
                                 "--warmup", "0", "--kernel-size", "3", "--out", str(out), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "ΔConv" in result.output and "teacher step" in result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert {r["operator"] for r in data["latency"]} >= {"self_attention", "deltaconv", "teacher_step", "student_step"}
    from deltadistill import cpu_kernel

    if cpu_kernel.available():  # the compiled kernel is timed beside the reference, and the student step runs it
        assert "ΔConvBlock (CPU kernel)" in result.output
        assert {r["backend"] for r in data["latency"] if r["operator"] in ("deltaconv_cpu", "student_step")} == {"cpu"}
    assert "CPU" in data["meta"]["device"] and "None" not in result.output  # the device is named, on CPU too
    # how OpenMP threads waited is recorded and printed with the timings
    assert data["meta"]["omp_wait"] == omp_wait_setting() and f"threads wait by {omp_wait_setting()}" in " ".join(result.output.split())
    assert (out / "flops.csv").is_file() and (out / "latency.csv").is_file()
    bad = runner.invoke(app, ["bench", "--model", "pixart", "--resolutions", "500", "--flops"])  # not a multiple of 16
    assert bad.exit_code == 2 and "divisible" in bad.output
    bad = runner.invoke(app, ["bench", "--model", "tiny-pixart", "--kernel-size", "4", "--flops"])
    assert bad.exit_code == 2


def test_cli_bench_flops_from_a_real_report(tmp_path):
    """`deltadistill bench --erf-report RUN/erf.json --flops`: per-layer kernel sizes from an analysis."""
    from typer.testing import CliRunner

    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline
    from deltadistill.cli import app

    pipe, spec = load_pipeline("tiny-sd15")
    report = analyze(pipe, ["a photo of cat"], steps=1, model_info={"alias": spec.alias, "source": spec.source})
    path = report.save(tmp_path / "run" / "erf.json")
    result = CliRunner().invoke(app, ["bench", "--model", "tiny-sd15", "--resolutions", "32,64", "--flops",
                                      "--erf-report", str(path), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    sizes = report.kernel_sizes()
    per_layer = {(r["layer"], r["resolution"]): r["kernel_size"] for r in data["flops_per_layer"] if r["operator"] == "deltaconv"}
    assert per_layer and all(per_layer[(name, r)] == k for name, k in sizes.items() for r in (32, 64))
    assert "erf.json" in data["meta"]["kernel_sizes"]
    other = CliRunner().invoke(app, ["bench", "--model", "tiny-pixart", "--flops", "--erf-report", str(path)])
    assert other.exit_code == 2 and "another model" in other.stderr


def test_cpu_block_floor_script_on_a_small_shape():
    cpu_block_floor = _benchmark("cpu_block_floor")
    row = cpu_block_floor.measure("tiny", 32, 4, 3, 8, True, 2)
    assert set(row["ms"]) == {"sdpa", "concat", "block", "kernel", "floor"} and all(v > 0 for v in row["ms"].values())
    assert set(row["ms_warm"]) == set(row["ms"]) and all(v > 0 for v in row["ms_warm"].values())  # back to back
    # the back-to-back ratio is the back-to-back times' (within their rounding to 0.01 ms), not the other column's
    kw, fw = row["ms_warm"]["kernel"], row["ms_warm"]["floor"]
    assert (kw - 0.005) / (fw + 0.005) <= row["kernel_over_floor_warm"] <= (kw + 0.005) / max(fw - 0.005, 1e-9)
    assert row["kernel_rel_error"] < 1e-5  # the CPU kernel's block computes the reference's output
    assert row["flops_ratio"] == pytest.approx(fl.self_attention_flops(64, 32, 4).total / fl.deltaconv_flops((8, 8), 32, 3).total)
    md = cpu_block_floor.table([row], markdown=True).splitlines()
    assert len(md) == 3 and md[2].count("|") == 15 and "8²" in md[2]


def test_cpu_block_floor_rounds_run_in_seeded_random_orders():
    """No operator always follows the same one (what ran before changes a call's time), and reruns repeat the order."""
    cpu_block_floor = _benchmark("cpu_block_floor")
    names = ["sdpa", "concat", "block", "kernel", "floor"]
    orders = [cpu_block_floor.round_order(names, r) for r in range(15)]
    assert all(sorted(o) == sorted(names) for o in orders)  # every operator once per round
    assert orders == [cpu_block_floor.round_order(names, r) for r in range(15)]  # seeded
    before = {n: {o[o.index(n) - 1] for o in orders if o.index(n) > 0} for n in names}
    assert all(len(prev) >= 2 for prev in before.values()), before  # each follows more than one other operator
    assert len({o[0] for o in orders}) >= 3  # and the rounds start with different ones


def test_cpu_train_step_script_on_a_small_shape():
    from deltadistill import cpu_kernel

    cpu_train_step = _benchmark("cpu_train_step")
    row = cpu_train_step.measure("tiny", 32, (3, 9), 2, 6, 1)
    assert row["ms"]["reference"] > 0 and row["batch"] == 2 and row["kernel_sizes"] == [3, 9]
    if cpu_kernel.available():
        assert row["ms"]["cpu"] > 0 and row["grad_rel_diff"] < 1e-4  # the two backends' gradients agree
    md = cpu_train_step.table([row], markdown=True).splitlines()
    assert len(md) == 3 and md[2].count("|") == 7 and "2 × 2 × 6²" in md[2]


def _distill_demo():
    return _benchmark("distill_demo")


def test_distill_demo_captions_paragraph_is_computed_from_the_per_prompt_psnr():
    """benchmarks/distill_demo.py names the captions that carry the error, with numbers computed from the evaluation."""
    distill_demo = _distill_demo()
    mse = {"cat": 0.04, "dog": 0.02, "sky": 0.001, "sea": 0.002, "sun": 0.01}  # per caption, 2 seeds each

    def groups(scale=1.0):
        total = sum(mse.values()) * scale
        return [{"prompt": p, "n": 2, "psnr": -10 * math.log10(m * scale), "mse_share": m * scale / total} for p, m in mse.items()]

    d = {"psnr_per_prompt": groups(), "psnr_per_image": [v for m in mse.values() for v in (-10 * math.log10(m),) * 2]}
    text = distill_demo._captions_clause(d, 2, {"untrained": {"psnr_per_prompt": groups(10.0)}})
    share = (0.04 + 0.02 + 0.01) / sum(mse.values())
    assert f"carry {100 * share:.0f}% of it" in text
    assert text.index("“cat”") < text.index("“dog”") < text.index("“sun”") and "“sky”" not in text.split("Without")[0]
    rest = -10 * math.log10((0.001 + 0.002) / 2)  # the pooled PSNR of the two captions left
    assert f"other 2 captions is {rest:.2f} dB" in text
    assert "On the same 3 captions: untrained student (step 0) " + " / ".join(
        f"{-10 * math.log10(10 * mse[p]):.1f}" for p in ("cat", "dog", "sun")) + " dB" in text
    assert distill_demo._captions_clause({"psnr_per_prompt": groups()[:3]}, 2) == ""  # too few captions to single out


def test_distill_demo_reuse_rows_skips_only_rows_with_the_same_changes(tmp_path, monkeypatch):
    """--reuse-rows takes a variant's row from OUT/rows.json instead of training again, unless its changes differ."""
    import copy
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    distill_demo = _distill_demo()
    committed = json.loads((root / "benchmarks" / "results" / "distill_demo.json").read_text())
    row = copy.deepcopy(next(r for r in committed["ablation"] if "untrained" in r))  # a row with the baselines
    calls = []

    def fake_run(name, report, out, args, baselines):
        calls.append(name)
        return {**copy.deepcopy(row), "variant": name, "changes": distill_demo.VARIANTS[name],
                "recipe_of": distill_demo.RECIPE_OF}

    monkeypatch.setattr(distill_demo, "run_variant", fake_run)
    argv = ["--out", str(tmp_path), "--erf-report", "unused.json", "--variants", "final"]
    distill_demo.main(argv)
    assert calls == ["final"] and json.loads((tmp_path / "rows.json").read_text())[0]["variant"] == "final"
    distill_demo.main(argv + ["--reuse-rows"])
    assert calls == ["final"]  # reused, not run again
    distill_demo.main(argv)
    assert calls == ["final", "final"]  # without the flag it runs
    monkeypatch.setitem(distill_demo.VARIANTS, "final", {**distill_demo.FINAL, "steps": 7})
    distill_demo.main(argv + ["--reuse-rows"])
    assert calls == ["final", "final", "final"]  # the variant changed since: its old row is not reused
    distill_demo.main(["--out", str(tmp_path), "--erf-report", "unused.json", "--variants", "one_seed"])
    kept = {r["variant"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(kept) == {"final", "one_seed"}  # a run of another variant keeps the rows measured before it
    assert kept["final"]["changes"] == {**distill_demo.FINAL, "steps": 7}


def test_distill_demo_reads_rows_of_an_earlier_preset_against_that_preset():
    """A final row measured on an earlier preset becomes that preset's recipe_<date> row; rows measured on it are
    read against it (not against today's final), in the table, the toggles and the change clauses."""
    distill_demo = _distill_demo()

    def row(variant, psnr, recipe_of, changes=None, eps=0.05):
        d = {"psnr_db": psnr, "psnr_mean_db": None, "ssim": 0.8, "eps_error": eps, "eps_guided_error": 2 * eps,
             "accuracy": 0.9}
        return {"variant": variant, "description": distill_demo.DESCRIPTIONS[variant], "train_seconds": 600.0,
                "changes": changes or distill_demo.VARIANTS[variant], "distilled": d, "teacher_accuracy": 0.93,
                **({"recipe_of": recipe_of} if recipe_of else {})}

    old_final = row("final", 19.4, "2026-12-06b", distill_demo.FINAL)
    rows = distill_demo.migrate([old_final, row("scaled_gate", 19.5, "2026-12-06b"), row("recipe_2026_12_06", 19.3, "2026-12-06b"),
                                 row("recipe_2026_12_04", 19.0, "2026-12-06"), row("one_seed", 18.0, None)])
    assert [r["variant"] for r in rows] == ["recipe_2026_12_06b", "scaled_gate", "recipe_2026_12_06", "recipe_2026_12_04",
                                            "one_seed"]
    assert rows[0]["measured_as"]["recipe_of"] == "2026-12-06b" and rows[0]["distilled"]["psnr_db"] == 19.4
    new_final = row("final", 20.5, distill_demo.RECIPE_OF, eps=0.04)
    by = {r["variant"]: r for r in rows + [new_final]}
    assert distill_demo.base_of(by["scaled_gate"], by) is by["recipe_2026_12_06b"]
    assert distill_demo.base_of(by["recipe_2026_12_06"], by) is by["recipe_2026_12_06b"]
    assert distill_demo.base_of(by["recipe_2026_12_04"], by) is by["recipe_2026_12_06"]
    assert distill_demo.base_of(by["one_seed"], by) is by["recipe_2026_12_04"]  # no recipe_of: the 2026-12-04 preset
    assert distill_demo.recipe_label(by["one_seed"], by) == "2026-12-04"
    assert distill_demo.base_of(by["recipe_2026_12_06b"], by) is by["final"]
    assert distill_demo.on_old_recipe(by["scaled_gate"], by) and not distill_demo.on_old_recipe(by["recipe_2026_12_06"], by)
    assert distill_demo.recipe_label(by["scaled_gate"], by) == "2026-12-06b"
    # a final row of an earlier preset is dropped when that preset's own row was measured
    assert [r["variant"] for r in distill_demo.migrate([old_final, row("recipe_2026_12_06b", 19.0, distill_demo.RECIPE_OF)])] \
        == ["recipe_2026_12_06b"]
    # one more preset later: the evening's final becomes recipe_2026_12_06c, and the afternoon's row (migrated under
    # the evening's preset, as the committed results hold it) is read against it
    by["recipe_2026_12_06b"]["recipe_of"] = "2026-12-06c"
    [c_row] = distill_demo.migrate([row("final", 20.2, "2026-12-06c", distill_demo.FINAL, eps=0.045)])
    assert c_row["variant"] == "recipe_2026_12_06c"
    assert c_row["changes"] == {**distill_demo.FINAL, "steps": 900, "finetune_seeds": 16}  # the evening's preset, spelled out
    by["recipe_2026_12_06c"] = c_row
    # and one more: the night's final becomes recipe_2026_12_06d, between the evening's row and today's final
    [d_row] = distill_demo.migrate([row("final", 20.3, "2026-12-06d", distill_demo.FINAL, eps=0.042)])
    assert d_row["variant"] == "recipe_2026_12_06d" and d_row["changes"] == {**distill_demo.FINAL, "steps": 900}
    by["recipe_2026_12_06d"] = d_row
    # and one more: the 2026-12-07 final becomes recipe_2026_12_07, between the night's row and today's final
    [e_row] = distill_demo.migrate([row("final", 20.4, "2026-12-07", distill_demo.FINAL, eps=0.041)])
    assert e_row["variant"] == "recipe_2026_12_07" and e_row["changes"] == {**distill_demo.FINAL, "steps": 1200}
    by["recipe_2026_12_07"] = e_row
    assert distill_demo.base_of(by["recipe_2026_12_06b"], by) is c_row
    assert distill_demo.base_of(c_row, by) is by["final"] and distill_demo.base_of(d_row, by) is by["final"]
    by["finetune_seeds_4"] = row("finetune_seeds_4", 20.4, "2026-12-06c", eps=0.047)
    assert distill_demo.base_of(by["finetune_seeds_4"], by) is c_row
    result = {"ablation": distill_demo._ordered(list(by.values())), "teacher_accuracy": 0.93, "baselines": {},
              "evaluation": {"seeds": [0, 1]}}
    text = distill_demo.verdict(result)
    assert "+0.10 dB against the 2026-12-06b recipe it was measured on" in text  # scaled_gate: 19.5 against 19.4
    # every change of the preset, each against the preset before it
    assert all(f"PSNR {a} → {b} dB" in text for a, b in (("20.40", "20.50"), ("20.30", "20.40"), ("20.20", "20.30"),
                                                         ("19.40", "20.20"),
                                                         ("19.30", "19.40"), ("19.00", "19.30")))
    assert "guided ε error 0.0820 → 0.0800 (-2%)" in text and "guided ε error 0.0840 → 0.0820 (-2%)" in text
    assert "guided ε error 0.0900 → 0.0840 (-7%)" in text
    assert "guided ε error 0.1000 → 0.0900 (-10%)" in text
    assert "undone alone: fine-tune on the regression's 4 samples per caption (not 16), 900 steps: ε error 0.0470, " \
           "guided 0.0940, 20.40 dB" in text  # the row that undoes the evening's change, with its guided error
    assert "(on the 2026-12-06b recipe" in distill_demo.table(result)


def test_distill_demo_hybrid_paragraph_states_the_targets_from_its_rows():
    """The hybrids paragraph (blocks 0-1 / 0-2 keep attention) reads its numbers and its verdicts off the rows."""
    import copy
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    distill_demo = _distill_demo()
    result = json.loads((root / "benchmarks" / "results" / "distill_demo.json").read_text())
    result["ablation"] = [r for r in result["ablation"] if r["variant"] not in ("keep_blocks0_1", "keep_blocks0_2")]
    assert "Hybrids that keep" not in distill_demo.verdict(result)  # no rows, no paragraph
    final = next(r for r in result["ablation"] if r["variant"] == "final")
    t_acc = final["teacher_accuracy"]

    def hybrid(name, psnr, eps, acc):
        row = copy.deepcopy(final)
        row.update(variant=name, date="2026-01-02")
        row["distilled"].update(psnr_db=psnr, psnr_mean_db=25.0, eps_error=eps, accuracy=acc)
        return row

    rows = [hybrid("keep_blocks0_2", 23.456, 0.0051, t_acc - 0.10), hybrid("keep_blocks0_1", 21.5, 0.0123, t_acc)]
    text = distill_demo.verdict({**result, "ablation": result["ablation"] + rows})
    para = text[text.index("**Hybrids that keep"):]
    assert "measured 2026-01-02" in para
    two, three = para.index("keeping blocks 0–1"), para.index("keeping blocks 0–2")
    assert two < three  # fewer kept blocks first
    assert f"21.50 dB ({21.5 - final['distilled']['psnr_db']:+.2f} dB" in para[two:three] and "below 22 dB" in para[two:three]
    assert "23.46 dB" in para[three:] and "ε error 0.0051" in para[three:] and "22 dB met, accuracy not" in para[three:]
    rows[0]["distilled"]["accuracy"] = t_acc - 0.04
    text = distill_demo.verdict({**result, "ablation": result["ablation"] + rows})
    assert "both targets met" in text[text.index("keeping blocks 0–2"):]


def test_bench_times_and_costs_the_block_that_train_builds(monkeypatch):
    """The bench's ΔConvBlock has the toolkit preset's settings (the sigmoid gate), and its FLOPs count that gate."""
    import deltadistill.block as block_mod
    from deltadistill.bench.runner import run_bench
    from deltadistill.presets import TOOLKIT_BLOCK

    built = []
    real = block_mod.DeltaConvBlock

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append((self.gate, self.pool, self.dw_bias))

    monkeypatch.setattr(block_mod, "DeltaConvBlock", Spy)
    res = run_bench("tiny-pixart", [32], repeats=1, warmup=0, step=False, kernel_size=3)
    assert built and set(built) == {(TOOLKIT_BLOCK["gate"], TOOLKIT_BLOCK["pool"], TOOLKIT_BLOCK["dw_bias"])}
    row = next(r for r in res.flops if r["operator"] == "deltaconv")
    rep = fl.LayerShape("x", "x", tuple(int(v) for v in row["grid"].split("x")), row["dim"], 1, row["dim"], 3, True, True)
    assert row["layer_flops"] == fl.operator_flops("deltaconv", rep, gate=TOOLKIT_BLOCK["gate"]).total
    assert row["layer_flops"] != fl.operator_flops("deltaconv", rep, gate="scaled").total


def test_guided_error_script_reads_evaluate_folders(tmp_path, capsys):
    """benchmarks/guided_error.py: rows from metrics.json, sorted by guided ε error; a folder without one is refused."""
    import json

    guided_error = _benchmark("guided_error")
    for name, eps, guided, psnr in (("a", 0.02, 0.09, 18.0), ("b", 0.03, 0.05, 20.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "distilled_folder": f"/runs/{name}", "trajectory_pairs": 16, "accuracy": {"distilled": 0.9},
            "distances": {"distilled": {"psnr": psnr, "psnr_mean": psnr + 3, "ssim": 0.8, "eps_error": eps,
                                        "eps_guided_error": guided}}}))
    out = tmp_path / "rows.json"
    rs = guided_error.main([str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out)])
    assert [r["run"] for r in rs] == ["b", "a"]  # smaller guided error first
    assert json.loads(out.read_text())["rows"][1]["eps_guided_error"] == 0.09
    assert "| b | 0.0300 | 0.0500 | 20.00 | 23.00 |" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit) as e:
        guided_error.main([str(tmp_path / "c")])
    assert e.value.code == 2 and "no metrics.json" in capsys.readouterr().err
    # a corrupt file, and one written before the guided error existed: one line each, exit 2, nothing written
    (tmp_path / "c" / "metrics.json").write_text("{not json")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text(json.dumps({"distances": {"distilled": {"psnr": 1.0, "eps_error": 0.1}}}))
    for folder, words in (("c", "is not a metrics.json"), ("d", "has no guided ε error")):
        with pytest.raises(SystemExit) as e:
            guided_error.main([str(tmp_path / folder), "--json", str(tmp_path / "new.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new.json").exists()


def test_gpu_kernels_script_runs_every_section_in_smoke_mode(tmp_path):
    """The GPU benchmark has never had a GPU here; ``--smoke`` runs all of it on the CPU in Triton's interpreter (tiny
    shapes, fp32), so that the script itself cannot be what fails on the first GPU. Every check must pass and every
    section must write its rows."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_kernels.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"checks", "block", "dwconv", "ringmass"} <= set(res) and res["args"]["dtype"] == "torch.float32"
    assert len(res["checks"]) == 8 and all(r[-1] == "ok" for r in res["checks"]), res["checks"]
    assert [r[0] for r in res["block"]] == ["8x8"] and float(res["block"][0][-1]) < 1e-4  # triton block = reference
    assert [r[0] for r in res["dwconv"]] == ["8x8"] and [r[0] for r in res["ringmass"]] == ["4x4"]
    assert all(isinstance(v, float) and v > 0 for v in res["block"][0][2:5] + res["dwconv"][0][2:6])
    assert "FAILED" not in run.stdout and "Ring mass" in run.stdout


def test_gpu_kernels_script_fails_the_run_when_a_check_fails(monkeypatch, capsys):
    gpu = _benchmark("gpu_kernels")
    args = argparse.Namespace(skip=["block", "dwconv", "ringmass"], quick=True, json=None, dtype=torch.float32)
    monkeypatch.setattr(gpu, "run_checks", lambda dev, quick, dtypes: [["dwconv K=13", "float32", "1e-1", "1e-1", "FAIL"]])
    assert gpu._sections(args, torch.device("cpu"), "cpu", "-") == 1
    assert "Some checks FAILED" in capsys.readouterr().out
    monkeypatch.setattr(gpu, "run_checks", lambda dev, quick, dtypes: [["dwconv K=13", "float32", "1e-7", "1e-7", "ok"]])
    assert gpu._sections(args, torch.device("cpu"), "cpu", "-") == 0


def test_distill_demo_key_weighted_clause_is_computed_from_its_rows():
    """The key-weighted student's paragraph states its distances against the all-ΔConv student of the same recipe,
    says it is not the paper's block, and reads the target off its own PSNR."""
    distill_demo = _distill_demo()

    def row(variant, psnr, eps, seconds):
        d = {"psnr_db": psnr, "psnr_mean_db": psnr + 4, "ssim": 0.8, "eps_error": eps, "eps_guided_error": 2 * eps,
             "accuracy": 0.9}
        return {"variant": variant, "description": distill_demo.DESCRIPTIONS[variant], "train_seconds": seconds,
                "changes": distill_demo.VARIANTS[variant], "distilled": d, "recipe_of": distill_demo.RECIPE_OF,
                "machine": "m"}

    final, keyed = row("final", 20.9, 0.02, 1000.0), row("key_weighted", 21.4, 0.012, 1800.0)
    rows = {"final": final, "key_weighted": keyed}
    assert distill_demo.base_of(keyed, rows) is final
    text = distill_demo._key_clause(keyed, final, rows)
    assert "+0.50 dB against the all-ΔConv student" in text and "0.0120 against 0.0200 (-40%)" in text
    assert "0.0240 against 0.0400 (-40%)" in text and "1800 s on m, against 1000 s" in text
    assert "not in the ΔConvFusion paper" in text and "still 0.60 dB short" in text
    keyed["distilled"]["psnr_db"] = 22.3
    assert "meets the 22 dB target" in distill_demo._key_clause(keyed, final, rows)
    rows["key_weighted_short"] = row("key_weighted_short", 22.1, 0.015, 900.0)
    assert "With half the steps (600 regression, 1200 fine-tune) it reaches 22.10 dB (mean per-image 26.10 dB), " \
           "ε error 0.0150, SSIM 0.800, accuracy 90%, in 900 s on m." in distill_demo._key_clause(keyed, final, rows)
    result = {"machine": "m", "ablation": [final, {**keyed, "machine": "other"}]}
    assert distill_demo._machines_line(result) == "Rows `key_weighted`: other. "
