"""Real-size smoke run on CPU: analysis, conversion and training at the real architectures, random weights.

Usage:  python benchmarks/real_size_smoke.py [--models pixart,sd15] [--resolution 256] [--markdown] [--json OUT]

For each model (an alias with a shipped config), in fresh subprocesses so that peak RSS is the
stage's own:

1. ``attnprobe analyze --random-weights --estimate`` (the dry run's numbers, incl. its RSS estimate),
2. ``attnprobe analyze --random-weights`` on 1 prompt × 2 steps,
3. ``deltadistill train --erf-report`` of that report for 2 steps (conversion + 2 optimizer steps;
   the teacher is rebuilt from the same seeded random weights, data are 2 teacher samples).

Prints wall time, time per step and peak RSS of each stage, and the ratio of the measured
analysis RSS to the estimate. The slow test ``tests/test_real_size.py`` runs this with one model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes of the child, output) of one command in a fresh Python process."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    code = ("import resource, sys, runpy; mod = sys.argv[1]; sys.argv = [mod] + sys.argv[2:]\n"
            "try:\n    runpy.run_module(mod, run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(code)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    rss = [int(line.split()[1]) * 1024 for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return seconds, rss[-1] if rss else 0, out


def smoke(model: str, resolution: int, work: Path) -> dict:
    from attnprobe.config import AnalysisConfig
    from attnprobe.estimate import estimate_analysis

    (work / "p.txt").write_text("a photo of cat\n")
    est = estimate_analysis(model, AnalysisConfig(resolution=resolution, steps=2), prompts=1, random_weights=True)
    row = {"model": model, "resolution": resolution, "params_m": round(est.params / 1e6, 1),
           "estimate": {"step_s": round(est.step_s, 2), "model_step_s": round(est.model_step_s, 2),
                        "capture_step_s": round(est.capture_step_s, 2), "rss_gib": round(est.rss_bytes / 2**30, 2)}}
    secs, rss, _ = _run(["attnprobe.cli", "analyze", "-m", model, "--random-weights", "-p", "p.txt", "--steps", "2",
                         "--resolution", str(resolution), "-o", "analysis", "--no-plots"], work)
    report = json.loads((work / "analysis" / "erf.json").read_text())
    row["analyze"] = {"seconds": round(secs, 1), "rss_gib": round(rss / 2**30, 2), "layers": len(report["layers"]),
                      "weights": report["model"].get("weights"),
                      "rss_vs_estimate": round(rss / est.rss_bytes, 2) if est.rss_bytes else None}
    from deltadistill.estimate import estimate_training
    from deltadistill.train import TrainConfig

    test = estimate_training(TrainConfig(data=str(work / "p.txt"), out=str(work / "train"), erf_report=str(work / "analysis" / "erf.json"),
                                         steps=2, batch_size=1, sample_steps=2, resolution=resolution, checkpoint_every=0))
    row["train_estimate"] = {"seconds": round(test.total_s, 1), "rss_gib": round(test.rss_bytes / 2**30, 2),
                             "trainable_m": round(test.trainable_params / 1e6, 2)}
    secs, rss, out = _run(["deltadistill.cli", "train", "--erf-report", "analysis/erf.json", "--data", "p.txt",
                           "--out", "train", "--steps", "2", "--batch-size", "1", "--sample-steps", "2",
                           "--resolution", str(resolution), "--checkpoint-every", "0", "--no-progress"], work)
    row["train"] = {"seconds": round(secs, 1), "rss_gib": round(rss / 2**30, 2),
                    "converted": sum(1 for _ in (work / "train").glob("delta_blocks.safetensors")),
                    "rss_vs_estimate": round(rss / test.rss_bytes, 2) if test.rss_bytes else None}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="pixart,sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(smoke(model.strip(), args.resolution, Path(tmp)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    head = ["model", "params", "estimate s/step", "analyze 2 steps", "analyze RSS (÷ est.)", "train 2 steps (est.)",
            "train RSS (÷ est.)"]
    table = [[r["model"], f"{r['params_m']:.0f} M", f"{r['estimate']['step_s']:.1f}", f"{r['analyze']['seconds']:.0f} s",
              f"{r['analyze']['rss_gib']:.2f} GiB ({r['analyze']['rss_vs_estimate']}×)",
              f"{r['train']['seconds']:.0f} s ({r['train_estimate']['seconds']:.0f} s)",
              f"{r['train']['rss_gib']:.2f} GiB ({r['train']['rss_vs_estimate']}×)"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        for r in [head, *table]:
            print("  ".join(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "resolution": args.resolution,
                                               "rows": rows}, indent=1))
    _ = resource  # the children report their own peak RSS
    return 0


if __name__ == "__main__":
    sys.exit(main())
