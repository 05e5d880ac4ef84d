"""How much of the demo model's attention locality is learned, and how much comes from its init?

Usage:  python benchmarks/demo_locality.py [--steps 20] [--markdown]

Runs `attnprobe analyze` (default settings: the 14 demo captions, 20 steps, τ = 0.8, Butterworth
cut-off 0.1, order 2) on the demo pipeline three times, changing only the transformer:

- ``xavier init``: the recipe's transformer before training with ``--attn-init xavier``,
- ``mimetic init``: the same with the recipe's mimetic query/key initialisation
  (``--attn-init mimetic --attn-init-gain`` from the shipped ``train_config.json``),
- ``trained``: the shipped weights.

Both untrained transformers are built by :func:`attnprobe.demo.train.build_transformer` with the
shipped config's seed, i.e. they are exactly the starting points of training. Prints ERF and bias
share per layer; the comparison says how far training moved each layer from where it started.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="denoising steps per caption")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for RESULTS.md)")
    args = p.parse_args(argv)

    import torch

    from attnprobe.analysis import analyze
    from attnprobe.demo import DEMO_DIR, DEMO_PROMPTS, load_demo_pipeline
    from attnprobe.demo.train import TrainConfig, build_transformer

    torch.set_num_threads(args.threads)
    record = json.loads((DEMO_DIR / "train_config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in record["config"].items() if k in known})
    pipe = load_demo_pipeline()
    trained = pipe.transformer
    variants = {
        "xavier init": build_transformer(dataclasses.replace(cfg, attn_init="xavier")),
        f"mimetic init (gain {cfg.attn_init_gain:g})": build_transformer(dataclasses.replace(cfg, attn_init="mimetic")),
        f"trained ({cfg.steps} steps, {cfg.attn_init} init)": trained,
    }
    rows: dict[str, list] = {}
    grid = None
    for name, model in variants.items():
        pipe.transformer = model.eval()
        t0 = time.time()
        report = analyze(pipe, list(DEMO_PROMPTS), steps=args.steps)
        rows[name] = [(layer.erf, layer.bias_share) for layer in report.layers]
        grid = report.layers[0].grid
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    names = list(rows)
    n_layers = len(rows[names[0]])
    print(f"ERF (τ = 0.8, high-pass) and bias share per layer, {grid[0]}×{grid[1]} tokens, "
          f"{len(DEMO_PROMPTS)} captions × {args.steps} steps")
    if args.markdown:
        print("| layer | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for i in range(n_layers):
            print(f"| block {i} | " + " | ".join(f"{rows[n][i][0]} ({rows[n][i][1]:.2f})" for n in names) + " |")
        small = [sum(e < min(grid) for e, _ in rows[n]) for n in names]
        print("| ERF < grid | " + " | ".join(f"{s} / {n_layers}" for s in small) + " |")
    else:
        width = max(len(n) for n in names)
        for n in names:
            print(f"{n:<{width}}  " + "  ".join(f"{e:>2} ({b:.2f})" for e, b in rows[n]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
