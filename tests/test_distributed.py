"""Analysis over several processes equals one process: ``--shard i/n`` + ``attnprobe merge``, and
``torchrun`` with two CPU ranks (gloo) writing one report from rank 0.

Every statistic is a sum over prompts and prompt i always uses seed + i, so the accumulators must
agree to float-addition order (rtol 1e-9) and ERFs, kernel sizes, settings and images exactly.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.cli import app
from attnprobe.report import load_report

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red rocket in the sky", "a blue house with a tree"]
COMMON = ["-m", "tiny-pixart", "--steps", "2", "--no-plots", "--device", "cpu"]
SUMS = ("ring", "hp_ring", "mass", "hp_pos", "rows", "key_mass", "probe_maps", "far_key_mass", "far_rows",
        "prompt_hp_ring")
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def single(prompts, tmp_path_factory):
    """One process over all prompts, per aggregate: {aggregate: run folder} (computed on first use)."""
    runs: dict[str, Path] = {}

    def get(aggregate: str = "per-map", prompt_file: Path = prompts) -> Path:
        key = f"{aggregate}-{prompt_file.name}"
        if key not in runs:
            out = tmp_path_factory.mktemp("single") / key
            r = runner.invoke(app, ["analyze", *COMMON, "-p", str(prompt_file), "-o", str(out), "--aggregate", aggregate])
            assert r.exit_code == 0, r.output
            runs[key] = out
        return runs[key]

    return get


def assert_same_report(got, want) -> float:
    """Same layers, ERFs, kernel sizes, sums and prompt settings; returns the largest relative difference."""
    worst = 0.0
    for key in ("prompts", "seeds", "prompts_hash", "n_prompts"):
        assert got.settings[key] == want.settings[key], key
    assert [(l.name, l.grid, l.heads) for l in got.layers] == [(l.name, l.grid, l.heads) for l in want.layers]
    assert got.kernel_sizes() == want.kernel_sizes()
    for a, b in zip(got.layers, want.layers):
        assert (a.erf, a.erf_interval, a.probe_rows) == (b.erf, b.erf_interval, b.probe_rows), a.name
        for key in SUMS:
            x, y = getattr(a, key), getattr(b, key)
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=0, err_msg=f"{a.name}.{key}")
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-300))))
        assert (a.mean_map is None) == (b.mean_map is None)
        if a.mean_map is not None:
            np.testing.assert_allclose(a.mean_map["rings"], b.mean_map["rings"], rtol=1e-9, err_msg=a.name)
            assert a.mean_map["groups"] == b.mean_map["groups"]
    return worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_free_port()),
           "-m", "attnprobe", "analyze", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), ATTNPROBE_DIST_TIMEOUT="120")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_shards_merge_into_the_single_run(prompts, single, tmp_path):
    parts = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        r = runner.invoke(app, ["analyze", *COMMON, "-p", str(prompts), "-o", str(out), "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
        parts.append(out)
    first, second = (load_report(p) for p in parts)
    assert first.settings["seeds"] == [0, 1] and second.settings["seeds"] == [2]  # global seeds
    assert first.run["shard"] == "0/2" and second.images == ["002_a-blue-house-with-a-tree.png"]
    r = runner.invoke(app, ["merge", str(parts[0]), str(parts[1]), "-o", str(tmp_path / "merged.json")])
    assert r.exit_code == 0, r.output
    assert_same_report(load_report(tmp_path / "merged.json"), load_report(single()))


@needs_gloo
@pytest.mark.parametrize("aggregate", ["per-map", pytest.param("mean-map", marks=pytest.mark.slow)])  # ~20 s a launch
def test_two_processes_write_the_single_run(prompts, single, tmp_path, aggregate):
    out = tmp_path / "ddp"
    res = torchrun(2, *COMMON, "-p", str(prompts), "-o", str(out), "--aggregate", aggregate)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = load_report(out), load_report(single(aggregate))
    assert_same_report(got, want)
    assert got.run["world_size"] == 2 and got.run["shards"] == [[0, 1], [2]]
    assert want.run["world_size"] == 1 and want.run["shards"] == [[0, 1, 2]]
    assert got.images == want.images and len(got.images) == 3
    for name in got.images:  # rank 1's image travelled to rank 0, unchanged
        assert (out / "images" / name).read_bytes() == (single(aggregate) / "images" / name).read_bytes(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder, no lock left
    assert res.stderr.count("progress of rank 0") == 1


@needs_gloo
def test_a_failing_rank_fails_the_job_with_one_line(prompts, tmp_path):
    """The output check runs on rank 0 only: rank 0 fails, rank 1 leaves quietly, nothing hangs."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = torchrun(2, *COMMON, "-p", str(prompts), "-o", str(out))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already exists" in errors[0], res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("value", ["2/2", "1", "-1/2", "a/b", "0/0", "1/2/3", ""])
def test_bad_shard_values(prompts, tmp_path, value):
    r = runner.invoke(app, ["analyze", *COMMON, "-p", str(prompts), "-o", str(tmp_path / "x"), "--shard", value])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: --shard must be i/n with 0 <= i < n"), r.stderr


@pytest.mark.parametrize("extra, message", [(["--shard", "3/4"], "shard 3 gets no prompts"),
                                            (["--shard", "0/2", "--aggregate", "mean-map"], "do not merge")])
def test_shards_that_cannot_work(prompts, tmp_path, extra, message):
    r = runner.invoke(app, ["analyze", *COMMON, "-p", str(prompts), "-o", str(tmp_path / "x"), *extra])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.output
    assert not (tmp_path / "x").exists()


@needs_gloo
@pytest.mark.slow
def test_more_processes_than_prompts(tmp_path, single):
    """Three ranks, two prompts: the rank without prompts adds zero sums of the shapes the others saw."""
    few = tmp_path / "two.txt"
    few.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "ddp3"
    res = torchrun(3, *COMMON, "-p", str(few), "-o", str(out), "--aggregate", "mean-map")
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_report(out)
    assert got.run["shards"] == [[0], [1], []]
    assert_same_report(got, load_report(single("mean-map", few)))
