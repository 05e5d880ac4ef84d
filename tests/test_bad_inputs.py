"""Bad input on both command lines: one line on stderr, exit code 2, no traceback, nothing already
written changed (a hash of every pre-existing output is compared before and after each case)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnprobe.cli import app as attnprobe_app
from deltadistill.cli import app as deltadistill_app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pre-existing outputs: an analysis run, a distilled run, prompt files, damaged copies."""
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline
    from deltadistill.train import TrainConfig, train

    w = tmp_path_factory.mktemp("world")
    (w / "prompts.txt").write_text("a photo of cat\na red dog\n")
    (w / "empty.txt").write_text("# nothing\n\n")
    (w / "binary.txt").write_bytes(b"\xff\xfe\x00 prompt")
    (w / "afolder").mkdir()
    pipe, spec = load_pipeline("tiny-pixart")
    run = w / "run"
    (run / "images").mkdir(parents=True)
    report = analyze(pipe, ["a photo of cat"], steps=1, model_info={"alias": spec.alias, "source": spec.source},
                     image_dir=run / "images")
    report.save(run / "erf.json")
    d = report.to_dict()
    for name, edit in {
        "settings_null": lambda x: x.update(settings=None),
        "layers_str": lambda x: x.update(layers=["a"]),
        "model_str": lambda x: x.update(model="str"),
        "resolution_null": lambda x: x["settings"].update(resolution=None),
        "ratio_negative": lambda x: x["settings"].update(kernel_ratio=-0.5),
        "evil_image": lambda x: x.update(images=["../../../../etc/passwd"]),
    }.items():
        bad = json.loads(json.dumps(d))
        edit(bad)
        folder = w / f"bad_{name}"
        folder.mkdir()
        (folder / "erf.json").write_text(json.dumps(bad))
    (w / "truncated.json").write_text((run / "erf.json").read_text()[:500])
    train(TrainConfig(data=str(w / "prompts.txt"), out=str(w / "distilled"), model="tiny-pixart", kernel_size=3, steps=2,
                      batch_size=2, checkpoint_every=0, progress=False), log=lambda m: None)
    for name in ("truncated", "nan"):
        shutil.copytree(w / "distilled", w / f"distilled_{name}")
    weights = w / "distilled_truncated" / "delta_blocks.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    from safetensors.torch import load_file, save_file

    t = load_file(str(w / "distilled_nan" / "delta_blocks.safetensors"))
    t[next(iter(t))] = torch.full_like(t[next(iter(t))], float("nan"))
    save_file(t, str(w / "distilled_nan" / "delta_blocks.safetensors"))
    imgs = w / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(imgs / "a.png")
    (imgs / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "\xff\xfe"}\n')
    (w / "existing").mkdir()
    (w / "existing" / "keep.txt").write_text("mine")
    return w


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


A, D = "attnprobe", "deltadistill"
CASES = [
    # attnprobe analyze
    (A, "analyze -p {w}/nope.txt -m tiny-pixart -o {t}/o", "does not exist"),
    (A, "analyze -p {w}/afolder -m tiny-pixart -o {t}/o", "is a folder"),
    (A, "analyze -p {w}/empty.txt -m tiny-pixart -o {t}/o", "is empty"),
    (A, "analyze -p {w}/binary.txt -m tiny-pixart -o {t}/o", "not UTF-8"),
    (A, "analyze -p {w}/prompts.txt -m not-a-model -o {t}/o", "unknown model"),
    (A, "analyze -p {w}/prompts.txt -m sdxl -o {t}/o", "not available offline"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --resolution 30", "not divisible"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --resolution 100000", "at most"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --resolution 0", "positive"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --resolution -32", "positive"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --resolution 32xfoo", "bad resolution"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --layers [", "regular expression"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --layers nothing-like-this", "matches no"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --device tpu", "--device"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --kmax 1", "--kmin/--kmax"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --cutoff 5", "--cutoff"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --kernel-ratio 0", "--kernel-ratio"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --kernel-ratio inf", "--kernel-ratio"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --threshold 1.5", "--threshold"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --queries every-other", "--queries"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --aggregate mean", "--aggregate"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --border reflect", "--border"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --erf-from lower", "--erf-from"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --aggregate mean-map --memory-budget-mb 0.001", "mean-map"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {t}/o --steps 0", "--steps"),
    (A, "analyze -p {w}/prompts.txt -m tiny-pixart -o {w}/existing", "--overwrite"),
    # merge, report, plot
    (A, "merge {w}/run/erf.json {w}/nope.json -o {t}/m.json", "no report"),
    (A, "merge {w}/run/erf.json {w}/run/erf.json -o {t}/m.json", "again"),
    (A, "merge {w}/run/erf.json {w}/bad_ratio_negative/erf.json -o {t}/m.json", "kernel_ratio"),
    (A, "merge {w}/run/erf.json {w}/run/erf.json -o {w}/existing", "exists"),
    (A, "report {w}/nope", "no report"),
    (A, "report {w}/bad_evil_image --html -o {t}/r.html", "refusing to embed"),
    (A, "report {w}/truncated.json", "not valid JSON"),
    (A, "report {w}/bad_settings_null", "settings"),
    (A, "report {w}/bad_layers_str", "layers[0]"),
    (A, "report {w}/bad_model_str", "model"),
    (A, "report {w}/bad_resolution_null", "settings.resolution"),
    (A, "report {w}/bad_ratio_negative", "settings.kernel_ratio"),
    (A, "plot {w}/run/erf.json -o {t}/f --format gif", "--format"),
    (A, "plot {w}/truncated.json -o {t}/f", "not valid JSON"),
    # deltadistill train
    (D, "train --data {w}/nope.txt --out {t}/r --kernel-size 3 --model tiny-pixart", "does not exist"),
    (D, "train --data {w}/empty.txt --out {t}/r --kernel-size 3 --model tiny-pixart", "holds no prompts"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 4 --model tiny-pixart", "odd"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 999 --model tiny-pixart", "at most"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 31 --model tiny-pixart --steps 1", "exceeds its 8×8 token grid"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 3 --model tiny-pixart --init garbage", "--init"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 3 --model tiny-pixart --pool wide", "--pool"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 3 --model tiny-pixart --gate-scale big", "--gate-scale"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 3 --model tiny-pixart --device tpu", "--device"),
    (D, "train --data {w}/prompts.txt --out {t}/r --kernel-size 3 --model tiny-pixart --resume latest", "no checkpoint"),
    (D, "train --data {w}/prompts.txt --out {w}/existing --kernel-size 3 --model tiny-pixart", "exists"),
    (D, "train --data {w}/prompts.txt --out {t}/r --erf-report {w}/run/erf.json --model tiny-sd15", "measured on"),
    (D, "train --data {w}/imgs --out {t}/r --kernel-size 3 --model tiny-pixart", "not UTF-8"),
    # generate, evaluate, import, bench
    (D, "generate --distilled {w}/nope --prompts {w}/prompts.txt --out {t}/g", "config.json"),
    (D, "generate --distilled {w}/distilled_truncated --prompts {w}/prompts.txt --out {t}/g", "damaged"),
    (D, "generate --distilled {w}/distilled_nan --prompts {w}/prompts.txt --out {t}/g", "NaN"),
    (D, "generate --distilled {w}/distilled --prompts {w}/prompts.txt --out {t}/g --resolution 33", "divisible"),
    (D, "generate --distilled {w}/distilled --prompts {w}/prompts.txt --out {t}/g --device tpu", "--device"),
    (D, "generate --distilled {w}/distilled --prompts {w}/empty.txt --out {t}/g", "is empty"),
    (D, "generate --distilled {w}/distilled --prompts {w}/prompts.txt --out {w}/existing", "--overwrite"),
    (D, "evaluate --distilled {w}/distilled --prompts {w}/prompts.txt --out {t}/e --seeds x", "--seeds"),
    (D, "import-official {w}/prompts.txt --model tiny-pixart --out {t}/i", "not a readable checkpoint"),
    (D, "bench --model tiny-pixart --kernel-size 4 --flops", "--kernel-size"),
    (D, "bench --model tiny-pixart --resolutions abc --flops", "--resolutions"),
    (D, "plot --distilled {w}/distilled --erf-report {w}/nope.json", "no report"),
]


@pytest.mark.parametrize("cli,args,needle", CASES, ids=[f"{c[0][0]}-{i}-{c[1].split()[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(cli, args, needle, world, tmp_path):
    before = _digest(world)
    argv = [a.format(w=world, t=tmp_path) for a in args.split()]
    result = runner.invoke(attnprobe_app if cli == A else deltadistill_app, argv)
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert "Traceback" not in result.output + err
    assert _digest(world) == before
    assert not any(p.name.endswith(".partial") for p in world.rglob("*")), "a partial folder was left behind"


def test_case_table_is_large():
    assert len(CASES) >= 40


def test_read_only_output_fails_before_loading(world, tmp_path, monkeypatch):
    """(Root ignores permissions, so the check itself is exercised through os.access.)"""
    import attnprobe.core.registry as registry

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real_access(p, mode))
    loaded = []
    monkeypatch.setattr(registry, "load_pipeline", lambda *a, **k: loaded.append(1))
    for app, argv in (
        (attnprobe_app, ["analyze", "-p", str(world / "prompts.txt"), "-m", "tiny-pixart", "-o", str(tmp_path / "o")]),
        (deltadistill_app, ["train", "--data", str(world / "prompts.txt"), "--out", str(tmp_path / "r"), "--kernel-size", "3",
                            "--model", "tiny-pixart"]),
        (deltadistill_app, ["generate", "--distilled", str(world / "distilled"), "--prompts", str(world / "prompts.txt"),
                            "--out", str(tmp_path / "g")]),
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and "not writable" in result.stderr, result.stderr
    assert not loaded  # nothing expensive ran


def test_a_second_run_into_the_same_output_is_refused(world, tmp_path):
    from attnprobe.core.outputs import claim_output

    out = tmp_path / "shared"
    with claim_output(out):  # another run holds it
        result = runner.invoke(attnprobe_app, ["analyze", "-p", str(world / "prompts.txt"), "-m", "tiny-pixart", "-o",
                                               str(out), "--steps", "1", "--no-plots"])
        assert result.exit_code == 2 and "being written by another run" in result.stderr
        assert not out.exists()
    (tmp_path / ".shared.lock").write_text("ghost:999999\n")  # a killed run's claim is taken over
    (tmp_path / ".shared.ghost.999999.partial").mkdir()
    import attnprobe.core.outputs as outputs

    (tmp_path / ".shared.lock").write_text(f"{outputs._HOST}:999999\n")
    (tmp_path / f".shared.{outputs._HOST}.999999.partial").mkdir()
    result = runner.invoke(attnprobe_app, ["analyze", "-p", str(world / "prompts.txt"), "-m", "tiny-pixart", "-o", str(out),
                                           "--steps", "1", "--no-plots"])
    assert result.exit_code == 0, result.stderr
    assert (out / "erf.json").is_file() and not (tmp_path / ".shared.lock").exists()
    assert not (tmp_path / f".shared.{outputs._HOST}.999999.partial").exists()
