"""Plain and guided ε error of distilled students beside their PSNR, from `deltadistill evaluate` folders.

    for v in final no_cfg_loss ...; do
      deltadistill evaluate --distilled /tmp/dd6/$v --prompts demo_prompts.txt --seeds 0-3 --steps 20 \\
          --trajectory-pairs 16 --out /tmp/geval/$v
    done
    python benchmarks/guided_error.py /tmp/geval/* --json benchmarks/results/guided_error_demo.json

Prints a markdown table (one row per folder, sorted by guided ε error) and, with --json, writes the
numbers with the date and the folders they came from.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def rows(folders: list[Path]) -> list[dict]:
    out = []
    for f in folders:
        try:
            m = json.loads((f / "metrics.json").read_text())
            d = m["distances"]["distilled"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{f / 'metrics.json'} is not a metrics.json of deltadistill evaluate ({e})") from None
        if d.get("eps_guided_error") is None or not math.isfinite(d["eps_guided_error"]):
            raise ValueError(f"{f / 'metrics.json'} has no guided ε error (written before it existed, or sampled "
                             "without classifier-free guidance): evaluate the run again")
        out.append({"run": f.name, "distilled_folder": m["distilled_folder"], "psnr_db": d["psnr"],
                    "psnr_mean_db": d.get("psnr_mean"), "ssim": d["ssim"], "eps_error": d["eps_error"],
                    "eps_guided_error": d.get("eps_guided_error"), "trajectory_pairs": m["trajectory_pairs"],
                    "accuracy": (m.get("accuracy") or {}).get("distilled")})
    return sorted(out, key=lambda r: r["eps_guided_error"])


def table(rs: list[dict]) -> str:
    lines = ["| run | ε error | guided ε error | PSNR (dB) | mean per-image PSNR (dB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['eps_error']:.4f} | {r['eps_guided_error']:.4f} | {r['psnr_db']:.2f} | "
              f"{r['psnr_mean_db']:.2f} |" for r in rs]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="output folders of deltadistill evaluate")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (atomically)")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "metrics.json").is_file()]
    if missing:
        print(f"error: no metrics.json in {', '.join(missing)} (run deltadistill evaluate there first)", file=sys.stderr)
        raise SystemExit(2)
    try:
        rs = rows(args.folders)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table(rs))
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rs},
                                  indent=1) + "\n")
        os.replace(tmp, args.json)
    return rs


if __name__ == "__main__":
    main()
