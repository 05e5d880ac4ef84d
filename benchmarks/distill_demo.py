"""Distil the demo model on a CPU and measure how close the student's samples are to the teacher's.

    python benchmarks/distill_demo.py                      # analyze → train → evaluate (defaults below)
    python benchmarks/distill_demo.py --kernel-size 7      # skip the analysis, one K for all layers
    python benchmarks/distill_demo.py --write-results      # also (re)write the section in RESULTS.md

Steps:

1. kernel sizes: ``--erf-report`` if given, else ``--kernel-size`` if given, else a short
   ``attnprobe.analyze`` of the demo model (``--analyze-prompts`` prompts × ``--analyze-steps``);
2. ``deltadistill.train`` on latents sampled from the teacher for the demo's own captions
   (``attnprobe/demo/prompts.txt``; no data set needed);
3. ``deltadistill.evaluate.evaluate_distillation``: for every evaluation prompt and seed, samples
   from the teacher, the distilled student, the untrained student (step 0) and the teacher with
   self-attention zeroed, all from the same noise; pixel MSE / PSNR to the teacher's images.

Outputs go to ``--out`` (run folder, ``eval/grid.png``, ``eval/distances.json``, ``result.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Distillation on the demo model"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="base model (default: the shipped demo model)")
    ap.add_argument("--out", default="/tmp/distill_demo", help="output folder (replaced)")
    ap.add_argument("--erf-report", default=None, help="use this erf.json for the kernel sizes")
    ap.add_argument("--kernel-size", type=int, default=None, help="one kernel size for all layers (skips the analysis)")
    ap.add_argument("--analyze-prompts", type=int, default=2)
    ap.add_argument("--analyze-steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="distillation steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--samples-per-prompt", type=int, default=2, help="teacher latents sampled per caption")
    ap.add_argument("--sample-steps", type=int, default=10, help="teacher sampling steps per training latent")
    ap.add_argument("--eval-prompts", type=int, default=None, help="first N demo captions (default: all 14)")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--eval-steps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine two threads were ~9x slower)")
    ap.add_argument("--write-results", action="store_true", help="(re)write the section in benchmarks/RESULTS.md")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date to print in RESULTS.md")
    ap.add_argument("--machine", default=None, help="machine description for RESULTS.md")
    return ap.parse_args(argv)


def kernel_spec(args, out: Path):
    """(erf_report path or None, kernel_size or None, seconds spent, analysis note)."""
    if args.erf_report:
        return args.erf_report, None, 0.0, f"kernel sizes from {args.erf_report}"
    if args.kernel_size:
        return None, args.kernel_size, 0.0, f"one kernel size K={args.kernel_size} for every layer"
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline

    from attnprobe.demo import DEMO_PROMPTS

    t0 = time.perf_counter()
    pipe, spec = load_pipeline(args.model)
    report = analyze(pipe, DEMO_PROMPTS[: args.analyze_prompts], steps=args.analyze_steps, seed=args.seed,
                     model_info={"alias": spec.alias, "source": spec.source})
    path = report.save(out / "erf.json")
    secs = time.perf_counter() - t0
    ks = sorted({layer.kernel_size for layer in report.layers})
    return str(path), None, secs, (f"kernel sizes from `attnprobe.analyze` ({args.analyze_prompts} prompts × "
                                   f"{args.analyze_steps} steps, {secs:.0f} s): K ∈ {ks}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from attnprobe.demo import PROMPTS_FILE, DEMO_PROMPTS
    from deltadistill.evaluate import evaluate_distillation, format_table
    from deltadistill.train import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, ksize, analyze_s, knote = kernel_spec(args, out)
    print(knote, flush=True)

    run = out / "run"
    cfg = TrainConfig(
        data=str(PROMPTS_FILE), out=str(run), model=args.model, erf_report=report, kernel_size=ksize,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, lr_schedule=args.lr_schedule, seed=args.seed,
        samples_per_prompt=args.samples_per_prompt, sample_steps=args.sample_steps, checkpoint_every=0,
        overwrite=True, progress=sys.stdout.isatty(), device="cpu",
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0

    prompts = DEMO_PROMPTS[: args.eval_prompts] if args.eval_prompts else list(DEMO_PROMPTS)
    t0 = time.perf_counter()
    result = evaluate_distillation(run, prompts, args.eval_seeds, steps=args.eval_steps, out=out / "eval")
    eval_s = time.perf_counter() - t0
    result.update(
        kernel_note=knote,
        train_seconds=round(train_s, 1),
        eval_seconds=round(eval_s, 1),
        analyze_seconds=round(analyze_s, 1),
        train={k: summary[k] for k in ("steps", "global_batch", "resolution", "layers", "trainable_parameters",
                                        "probe_loss_start", "probe_loss_end", "skipped_steps", "kernel_sizes")},
        threads=torch.get_num_threads(),
        command="python " + shlex.join([str(Path(__file__).relative_to(ROOT))] + (argv if argv is not None else sys.argv[1:])),
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    d = result["distances"]
    ok = d["distilled"]["mse"] < d["untrained"]["mse"] and d["distilled"]["mse"] < d["no_attention"]["mse"]
    print(f"ordering distilled < untrained, distilled < no-attention: {'yes' if ok else 'NO'}")
    if args.write_results:
        write_results(result, args)
    return result


def write_results(result: dict, args) -> None:
    """Replace (or append) this script's section of benchmarks/RESULTS.md; other sections are kept."""
    from deltadistill.evaluate import format_table

    machine = args.machine or f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU; torch threads {result['threads']}"
    tr = result["train"]
    a, b = tr["probe_loss_start"], tr["probe_loss_end"]
    d = result["distances"]
    text = f"""{SECTION}

Date: {args.date}. Machine: {machine}. Command:

    {result['command']}

What it does: {result['kernel_note']}; then `deltadistill.train` for {tr['steps']} steps (global batch
{tr['global_batch']}, AdamW lr {args.lr} with {args.warmup} warm-up steps then {args.lr_schedule}) on latents sampled from the teacher for the demo's
own captions ({args.samples_per_prompt} per caption, {args.sample_steps} sampling steps), at {tr['resolution']} px; all
{tr['layers']} self-attention layers replaced ({tr['trainable_parameters']:,} trainable parameters).
Training took {result['train_seconds']:.0f} s, the evaluation {result['eval_seconds']:.0f} s.

Probe-batch loss (fixed batch, same t and noise), start → end: L {a['loss']:.4f} → {b['loss']:.4f};
teacher gap mean w·‖ε̃ − ε̂‖² {a['gap']:.5f} → {b['gap']:.5f}; feature loss L_f {a['l_f']:.4f} → {b['l_f']:.4f}.

Samples for the first {len(result['prompts'])} demo captions × seeds {result['seeds']} ({result['steps']} DPM-Solver steps,
{result['resolution']} px), each model from the same noise; distance to the teacher's image in pixel space
(values in [0, 1]; PSNR = 10·log10(1/MSE) of the mean MSE):

{format_table(result)}

Distilled vs. untrained: {d['untrained']['mse'] / max(d['distilled']['mse'], 1e-12):.1f}× lower MSE; vs. zeroed
self-attention: {d['no_attention']['mse'] / max(d['distilled']['mse'], 1e-12):.1f}× lower. In ε space the teacher gap on the
probe batch fell {a['gap'] / max(b['gap'], 1e-12):.0f}×; pixel distances fall less because a sampling trajectory amplifies small
ε differences over its steps (a few samples' MSE is noisy for the same reason: evaluate on many prompts × seeds,
as here). The baselines: "untrained" is the converted model at step 0 (ΔConvBlocks with `proj_out` = 0 and the
global branch at the teacher's mean-field attention), "zeroed" the teacher with every self-attention output set
to 0; both are deterministic, so only the distilled row depends on training. The slow test
`tests/test_train.py::test_demo_distillation_ordering` re-runs a shorter version and checks the ordering.
"""
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start >= 0:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip() + "\n" + (old[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    print(f"wrote the section to {path}")


if __name__ == "__main__":
    main()
