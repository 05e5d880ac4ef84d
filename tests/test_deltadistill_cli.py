"""The ``deltadistill`` CLI: bad input → one line on stderr and exit code 2 (nothing written or
destroyed); divergence → exit 1; a report-driven train run and ``generate --compare`` work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltadistill.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "prompts.txt").write_text("a photo of a cat\na red rocket\n")
    (d / "empty.txt").write_text("")
    (d / "comments.txt").write_text("# only a comment\n\n")
    return d


@pytest.fixture(scope="module")
def sd15_report(tmp_path_factory):
    """A real erf.json of tiny-sd15 (attnprobe.analyze, 2 steps)."""
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline

    torch.set_num_threads(1)
    pipe, spec = load_pipeline("tiny-sd15")
    report = analyze(pipe, ["a photo of cat"], steps=2, model_info={"alias": spec.alias, "source": spec.source})
    return report.save(tmp_path_factory.mktemp("report") / "erf.json")


def _one_line_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    return err


def _train(*args):
    return runner.invoke(app, ["train", "--no-progress", *map(str, args)])


def test_help_explains():
    for cmd in (["--help"], ["train", "--help"], ["generate", "--help"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0
    res = runner.invoke(app, ["train", "--help"])
    for flag in ("--erf-report", "--kernel-size", "--resume", "--snr-weighting", "--cache", "--max-bad-steps", "--key-width"):
        assert flag in res.output
    # the preset values in brackets survive rich's markup (it took "[toolkit 16]" for a style tag and dropped it)
    wide = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    for hint in ("[toolkit 8]", "[toolkit 1200]", "[toolkit 4, paper 16]", "[preset's]"):
        assert hint in wide.output, hint
    assert "\\[" not in wide.output  # escaped, not shown with its backslash


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "{d}/missing.txt", "--kernel-size", "3"], "does not exist"),
        (["--data", "{d}/empty.txt", "--kernel-size", "3"], "is empty"),
        (["--data", "{d}/comments.txt", "--kernel-size", "3"], "holds no prompts"),
        (["--data", "{d}/prompts.txt"], "--erf-report"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "4"], "odd"),
        (["--data", "{d}/prompts.txt", "--erf-report", "{d}/nope.json"], "does not exist"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--model", "no-such-model"], "unknown model"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--resolution", "30"], "not divisible"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--steps", "0"], "--steps"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--resume", "latest"], "no checkpoint"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--scales", "1,0.3"], "1/2^k"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--scales", "1,half"], "--scales"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--inter-ratio", "0.3"], "even integer"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--inter-ratio", "-1"], "--inter-ratio"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--key-width", "-2"], "--key-width must be a whole number"),
        (["--data", "{d}/prompts.txt", "--student", "linear", "--key-width", "8"], "does not apply to --student linear"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--layers", "nosuchlayer"], "matches no self-attention"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--layers", "blocks.(1"], "not a valid regular expression"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--keep-attention", "nosuchlayer"], "--keep-attention 'nosuchlayer' matches no"),
        (["--data", "{d}/prompts.txt", "--kernel-size", "3", "--recipe", "trajectory", "--finetune-seeds", "0"],
         "--finetune-seeds must be >= 1"),
    ],
)
def test_train_bad_input(files, tmp_path, args, needle):
    args = [a.format(d=files) for a in args]
    res = _train("--model", "tiny-pixart", "--out", tmp_path / "run", *args) if "--model" not in args else _train(
        "--out", tmp_path / "run", *args)
    err = _one_line_error(res)
    assert needle in err
    run = tmp_path / "run"
    assert not run.exists() or not any(p.name in ("config.json", "checkpoints") for p in run.iterdir())


def test_report_of_another_model_is_refused(files, tmp_path, sd15_report):
    res = _train("--model", "tiny-pixart", "--erf-report", sd15_report, "--data", files / "prompts.txt",
                 "--out", tmp_path / "run")
    assert "measured on" in _one_line_error(res)


def test_existing_output_is_kept(files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"keep": true}')
    res = _train("--model", "tiny-pixart", "--kernel-size", "3", "--data", files / "prompts.txt", "--out", run)
    assert "--overwrite" in _one_line_error(res)
    assert json.loads((run / "config.json").read_text()) == {"keep": True}


def test_report_run_then_generate_compare(files, tmp_path, sd15_report):
    run = tmp_path / "run"
    res = _train("--erf-report", sd15_report, "--data", files / "prompts.txt", "--out", run, "--steps", "3",
                 "--batch-size", "2", "--warmup", "1", "--cache", "--checkpoint-every", "0")
    assert res.exit_code == 0, res.output + res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["base_model"]["alias"] == "tiny-sd15" and cfg["kernel_source"] == "report" and cfg["report_hash"]
    assert list((run / "cache").glob("data-*.safetensors"))
    # a second run on the same data reuses the cache
    res = _train("--erf-report", sd15_report, "--data", files / "prompts.txt", "--out", run, "--steps", "3",
                 "--batch-size", "2", "--warmup", "1", "--cache", "--checkpoint-every", "0", "--overwrite")
    assert res.exit_code == 0 and json.loads((run / "summary.json").read_text())["data"]["cache"]["hit"]

    out = tmp_path / "images"
    res = runner.invoke(app, ["generate", "--distilled", str(run), "--prompts", str(files / "prompts.txt"), "--out", str(out),
                              "--compare", "--steps", "2", "--seed", "0", "--seed", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    from PIL import Image

    meta = json.loads((out / "generate.json").read_text())
    assert len(meta["images"]) == 4
    grid = Image.open(out / "compare.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] > 4 * 32  # 2 columns (teacher | student), 4 rows

    # generate: existing output, missing folder, empty prompts
    res = runner.invoke(app, ["generate", "--distilled", str(run), "--prompts", str(files / "prompts.txt"), "--out", str(out)])
    assert "--overwrite" in _one_line_error(res)
    res = runner.invoke(app, ["generate", "--distilled", str(tmp_path / "nope"), "--prompts", str(files / "prompts.txt"),
                              "--out", str(tmp_path / "o2")])
    assert "config.json" in _one_line_error(res)
    res = runner.invoke(app, ["generate", "--distilled", str(run), "--prompts", str(files / "empty.txt"), "--out", str(tmp_path / "o3")])
    assert "no prompts" in _one_line_error(res)


def test_divergence_exits_1_without_traceback(files, tmp_path):
    """A learning rate of 1e30 blows the blocks up after one update: every later step is NaN."""
    cmd = [sys.executable, "-m", "deltadistill.cli", "train", "--model", "tiny-pixart", "--kernel-size", "3", "--data",
           str(files / "prompts.txt"), "--out", str(tmp_path / "run"), "--steps", "20", "--batch-size", "2", "--warmup", "0",
           "--lr", "1e30", "--max-bad-steps", "3", "--no-progress", "--checkpoint-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "3 consecutive steps had a NaN/inf" in errors[0]
    assert "Traceback" not in res.stderr
