"""``deltadistill`` command line: ``train``, ``generate``, ``plot`` and ``bench``.

Errors in what the user passed (missing or empty files, a report of another model, an existing
output without ``--overwrite``, ...) print one line on stderr and exit with code 2; a run that
diverges (NaN/inf losses) exits with 1; Ctrl-C during training saves a checkpoint and exits
with 130; unexpected failures exit with 1 (``--debug`` shows the traceback). See
:mod:`attnprobe.core.cli`. Multi-GPU: ``accelerate launch --num_processes N -m deltadistill.cli train ...``.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from attnprobe.core.cli import UsageError, calm_threads, check_device, command, escape_help_markup, fail, make_app

calm_threads()  # before torch is imported (the bench command below imports it)

from deltadistill._version import __version__  # noqa: E402
from deltadistill.bench import register as register_bench  # noqa: E402

app = make_app(
    "deltadistill",
    "Replace the self-attention of a diffusion model with ΔConvBlocks and distil them from the original (teacher) "
    "model. Start from an `attnprobe analyze` report (erf.json) or one kernel size.",
    __version__,
)


class SNRWeighting(str, Enum):
    standard = "standard"
    paper = "paper"
    none = "none"


class Preset(str, Enum):
    toolkit = "toolkit"
    paper = "paper"


class FeatureTarget(str, Enum):
    attention = "attention"
    residual = "residual"


def _gate_scale(text: str | None):
    if text is None or text == "official":
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--gate-scale must be a number or 'official', got {text!r}") from None


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--scales must be comma-separated numbers such as 1,0.5,0.25, got {text!r}") from None


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


def _device(device: str) -> str:
    return check_device(device)


@app.command(no_args_is_help=True)
@command
def train(
    data: Path = typer.Option(..., "--data", help="Folder of images with captions (sidecar .txt or captions.jsonl), or a prompt file (.txt, one per line) to sample latents from the teacher."),
    out: Path = typer.Option(..., "--out", help="Run folder; ends up holding the distilled model (config.json + delta_blocks.safetensors), checkpoints and metrics."),
    erf_report: Optional[Path] = typer.Option(None, "--erf-report", help="erf.json from `attnprobe analyze`: per-layer kernel sizes (and the model, if --model is not given)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model: alias (demo, pixart, sd15, tiny-pixart, ...), local diffusers folder or Hub id. Default: the report's model, else demo."),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="One odd kernel size for every layer; overrides the report."),
    kernel_ratio: Optional[float] = typer.Option(None, "--kernel-ratio", help="Recompute the report's kernel sizes as odd(ceil(ratio × ERF)) (default: the report's ratio, 0.6)."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps in total (a resumed run continues up to this)."),
    preset: Preset = typer.Option(Preset.toolkit, "--preset", help="Recipe for every option not given: toolkit (this toolkit's defaults) or paper (the official ΔConvFusion code for the model family: gate, pooling, kernel table, residual-stream feature loss, no Min-SNR, AdamW wd 1e-2, 500 warm-up steps, batch 16, caption dropout 0.15)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size, split evenly over processes [toolkit 4, paper 16]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate [3e-4]."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay [toolkit 0, paper 1e-2]."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Weight β of the feature loss: L = L_z + β·L_f [1e-3]."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Min-SNR γ [5]."),
    snr_weighting: Optional[SNRWeighting] = typer.Option(None, "--snr-weighting", help="standard: min(SNR, γ)/SNR (Min-SNR for ε-prediction) [toolkit]; paper: min(γ·SNR, 1) as printed in the ΔConvFusion paper; none: plain MSE [paper preset, the official code]."),
    feature_target: Optional[FeatureTarget] = typer.Option(None, "--feature-target", help="What L_f compares per layer: attention (block output vs attention output) [toolkit] or residual (the host's residual stream after the step) [paper]."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clipping, 0 disables [1.0]."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear learning-rate warm-up steps, at most a quarter of --steps [toolkit 100, paper 500]."),
    lr_schedule: Schedule = typer.Option(Schedule.constant, "--lr-schedule", help="Learning rate after warm-up."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Training image side in pixels (default: the model's)."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, batches, noise and timesteps (runs are deterministic)."),
    cache: bool = typer.Option(False, "--cache/--no-cache", help="Cache latents + text embeddings once in <out>/cache (safetensors)."),
    caption_dropout: Optional[float] = typer.Option(None, "--caption-dropout", help="Probability of training on the empty caption, for classifier-free guidance [toolkit 0.1, paper 0.15]."),
    sample_steps: int = typer.Option(8, "--sample-steps", help="Teacher sampling steps per latent when --data is a prompt file."),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", help="Latents sampled per prompt (different seeds) when --data is a prompt file."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Write a checkpoint every N steps (0: only at the end)."),
    keep_checkpoints: int = typer.Option(3, "--keep-checkpoints", help="How many recent checkpoints to keep."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (newest checkpoint in --out) or a checkpoint/run folder; refused when the data or the settings that define the losses differ from the checkpoint's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (its checkpoints and model)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i] (under accelerate launch, accelerate places processes)."),
    dtype: str = typer.Option("auto", "--dtype", help="dtype of the frozen weights: auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16. Blocks train in fp32."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="Autocast: auto (bf16/fp16 on GPU, none on CPU), no, bf16, fp16."),
    max_bad_steps: int = typer.Option(10, "--max-bad-steps", help="Stop after this many consecutive steps with NaN/inf loss or gradients (each is skipped)."),
    init: str = typer.Option("mean_field", "--init", help="Global-branch initialisation: mean_field (the teacher's attention under uniform weights) or zero."),
    inter_ratio: float = typer.Option(0.5, "--inter-ratio", help="ΔConvBlock width ρ: the pyramid runs on C' = ρ·C channels (C·ρ must be an even integer)."),
    key_width: int = typer.Option(0, "--key-width", help="Add to every ΔConvBlock a key-weighted branch of this many channels: a normalised K×K average of values, each key weighted by a learnt positive tap for its offset times e^(its key) (not in the paper; on the demo model, 96 channels take the all-ΔConv student from 20.9 to 22.2-22.8 dB PSNR from the teacher's, for 19-34% more time per denoiser call at 1024 px; see the README) [0: the paper's block]."),
    scales: str = typer.Option("1,0.5", "--scales", help="ΔConvBlock pyramid stages, comma-separated, each 1/2^k (e.g. 1,0.5,0.25)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Convert only these self-attention layers: comma-separated regexes on names or labels (as in attnprobe analyze --layers, e.g. 'blocks\\.[3-7]\\.'); the others keep the teacher's attention [all]."),
    keep_attention: Optional[str] = typer.Option(None, "--keep-attention", help="Leave these self-attention layers out of the conversion (regexes as --layers, e.g. 'blocks\\.0\\.': keep the first block's attention) [none]."),
    student: str = typer.Option("deltaconv", "--student", help="What replaces self-attention: deltaconv (the ΔConvBlock) or linear (a linear attention of LinFusion's form, projections copied from the teacher: the baseline, needs no kernel sizes)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="Block gate: scaled (x1·x2·s, the paper's text) or sigmoid (x1·σ(x2)) [toolkit sigmoid; paper: sigmoid for PixArt, scaled for SD]."),
    gate_scale: Optional[str] = typer.Option(None, "--gate-scale", help="Scaled gate's factor s: a number, or 'official' for √(C'/2) [1/√C' (the paper's text); paper SD: official]."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Half-scale pooling: ceil (2×2, ⌈n/2⌉) or adaptive (⌊n/2⌋, overlapping windows, the official code) [toolkit ceil, paper adaptive]."),
    dw_bias: Optional[bool] = typer.Option(None, "--dw-bias/--no-dw-bias", help="Bias in the depth-wise convolutions [toolkit yes, paper no]."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="trajectory: record the teacher's own sampling "
                                         "trajectories, regress every block on its layer's input/output, then fine-tune "
                                         "on the recorded states; noised: noised data latents with output + feature "
                                         "loss (the paper's) [preset's]."),
    regress_steps: Optional[int] = typer.Option(None, "--regress-steps", help="trajectory: teacher-forced regression "
                                                "steps before the --steps fine-tune steps [toolkit 1200]."),
    regress_symmetries: Optional[int] = typer.Option(None, "--regress-symmetries", help="trajectory: turn or flip each "
                                                     "regression batch's token grids by one of the first N of the "
                                                     "square's 8 symmetries (1: none). Self-attention commutes with "
                                                     "them, so every moved state is an exact training pair; models "
                                                     "with rotary position embeddings use 1 [toolkit 8]."),
    regress_cfg_loss: Optional[float] = typer.Option(None, "--regress-cfg-loss", help="trajectory: draw each regression "
                                                   "batch as CFG pairs and add this weight × the MSE of every layer's "
                                                   "guided output u + w·(c − u), the difference the sampler multiplies "
                                                   "by w (0: plain per-layer MSE) [toolkit 1]."),
    regress_batch: int = typer.Option(32, "--regress-batch", help="trajectory: recorded states per regression step."),
    regress_lr: float = typer.Option(2e-3, "--regress-lr", help="trajectory: regression learning rate (cosine to 0)."),
    traj_seeds: int = typer.Option(4, "--traj-seeds", help="trajectory: teacher samples per prompt."),
    finetune_seeds: Optional[int] = typer.Option(None, "--finetune-seeds", help="trajectory: teacher samples per prompt "
                                                 "the fine-tune draws its states from: the --traj-seeds of the "
                                                 "regression and more, recorded without layer inputs/outputs (cheap "
                                                 "in memory). More noise seeds is what lets the student generalise to "
                                                 "new noise [toolkit 8]."),
    traj_steps: int = typer.Option(20, "--traj-steps", help="trajectory: sampling steps of the recorded trajectories."),
    traj_keep_every: int = typer.Option(1, "--traj-keep-every", help="trajectory: keep every k-th denoiser call (memory)."),
    cfg_loss: Optional[float] = typer.Option(None, "--cfg-loss", help="trajectory: weight of the guided-output MSE "
                                             "(u + w·(c − u) over each CFG pair) [toolkit 4]."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    estimate: bool = typer.Option(False, "--estimate", help="Dry run: build the model from its shipped config on the meta device, convert it as this run would, and print parameters, memory (weights, optimizer, activations, recorded data) and the estimated time of each stage on --device; loads no weights, writes nothing."),
):
    """Distil every self-attention layer into a ΔConvBlock (teacher frozen, only blocks train).

    Example: deltadistill train --erf-report erf.json --data prompts.txt --out runs/demo --steps 300
    """
    from deltadistill.train import TrainConfig, TrainingDiverged
    from deltadistill.train import train as run_train

    cfg = TrainConfig(
        data=str(data), out=str(out), model=model, erf_report=str(erf_report) if erf_report else None,
        kernel_size=kernel_size, kernel_ratio=kernel_ratio, steps=steps, preset=preset.value, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, beta=beta, gamma=gamma, snr_weighting=snr_weighting.value if snr_weighting else None,
        feature_target=feature_target.value if feature_target else None, clip=clip, warmup=warmup,
        lr_schedule=lr_schedule.value, gate=gate, gate_scale=_gate_scale(gate_scale), pool=pool, dw_bias=dw_bias,
        resolution=resolution, seed=seed, cache=cache, caption_dropout=caption_dropout, sample_steps=sample_steps,
        samples_per_prompt=samples_per_prompt, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        resume=resume, overwrite=overwrite, device=device, dtype=dtype, mixed_precision=mixed_precision,
        max_bad_steps=max_bad_steps, init=init, inter_ratio=inter_ratio, scales=_scales(scales), key_width=key_width, student=student, layers=layers, keep_attention=keep_attention, progress=progress, recipe=recipe, regress_steps=regress_steps,
        regress_batch=regress_batch, regress_lr=regress_lr, regress_symmetries=regress_symmetries, regress_cfg_loss=regress_cfg_loss, traj_seeds=traj_seeds, finetune_seeds=finetune_seeds, traj_steps=traj_steps,
        traj_keep_every=traj_keep_every, cfg_loss=cfg_loss,
    )
    if estimate:
        from deltadistill.estimate import estimate_training, print_training_estimate

        print_training_estimate(estimate_training(cfg))
        return
    try:
        summary = run_train(cfg)
    except TrainingDiverged as exc:
        fail(exc, 1)
    if summary["interrupted"]:
        from deltadistill.progress import is_main_process

        if is_main_process():  # once, not once per rank
            typer.echo(f"interrupted at step {summary['steps']}; checkpoint saved to {summary['checkpoint']}; "
                       f"continue with --resume latest", err=True)
        raise typer.Exit(code=130)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from deltadistill.train import is_main_process

    if not is_main_process():
        return
    table = Table(title=f"deltadistill train → {summary['out']}", show_header=True)
    table.add_column("")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    a, b = summary.get("probe_loss_start") or {}, summary.get("probe_loss_end") or {}
    if (summary.get("data") or {}).get("kind") == "trajectories":
        rows = (("loss", "probe loss L"), ("l_z", "output MSE on recorded states"), ("gap", "guided-output MSE"))
    else:
        rows = (("loss", "probe loss L"), ("l_z", "L_z"), ("gap", "‖ε̃ − ε̂‖² (weighted)"), ("l_f", "L_f"))
    for key, label in rows:
        if key in a and key in b:
            table.add_row(label, f"{a[key]:.5g}", f"{b[key]:.5g}")
    Console().print(table)
    Console().print(
        f"steps {summary['start_step']}→{summary['steps']}, skipped {summary['skipped_steps']}, "
        f"{summary['layers']} layers, {summary['trainable_parameters']:,} trainable parameters, {summary['seconds']:.1f} s"
    )


@app.command(no_args_is_help=True)
@command
def generate(
    distilled: Path = typer.Option(..., "--distilled", help="Distilled model folder (the --out of `deltadistill train`)."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file, one prompt per line (class names or ids for DiT models)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the images."),
    compare: bool = typer.Option(False, "--compare", help="Also sample the teacher with the same seeds and write compare.png (teacher | student)."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    seed: list[int] = typer.Option([0], "--seed", help="Seed(s); every prompt is sampled with each (repeat --seed)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image side in pixels (default: the training resolution)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the pipeline's)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present, else cpu), cpu or cuda[:i]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
):
    """Sample images from a distilled model (optionally side by side with the teacher)."""
    from deltadistill.generate import generate as run_generate

    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    meta = run_generate(distilled, prompts, out, compare=compare, seeds=seed, steps=steps, resolution=resolution,
                        guidance=guidance, device=_device(device), overwrite=overwrite)
    typer.echo(f"wrote {len(meta['images'])} image(s) to {out}" + (f"; comparison grid {meta['compare']}" if meta["compare"] else ""))


def _parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                seeds.extend(range(a, b + 1))
            elif part:
                seeds.append(int(part))
        except ValueError:
            raise UsageError(f"--seeds {text!r}: use e.g. 0-3 or 0,1,5") from None
    if not seeds:
        raise UsageError(f"--seeds {text!r} names no seed")
    return seeds


@app.command(no_args_is_help=True)
@command
def evaluate(
    distilled: Path = typer.Option(..., "--distilled", help="Distilled model folder (the --out of `deltadistill train`)."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file, one prompt per line; every prompt is sampled with every seed."),
    out: Path = typer.Option(..., "--out", help="Folder for the images, grid.png, evaluation.png, metrics.json, metrics.csv and per_prompt.csv."),
    seeds: str = typer.Option("0-3", "--seeds", help="Seeds, e.g. 0-3 or 0,1,5."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    baselines: bool = typer.Option(False, "--baselines", help="Also the untrained student, the teacher with self-attention zeroed, and training-free neighbourhood attention, from the same noise."),
    neighbourhood_kernel: str = typer.Option("13", "--neighbourhood-kernel", help="Window of the neighbourhood-attention baseline: an odd K for every layer, or 'student' for each converted layer's own kernel size (would the teacher's attention, cut to the student's windows, keep its images?)."),
    dino: Optional[str] = typer.Option(None, "--dino", help="DINOv2 weights (local folder or cached Hub id): FD-DINOv2 and the DINOv2 score."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP weights (local folder or cached Hub id): CLIP score."),
    reference_images: Optional[Path] = typer.Option(None, "--reference-images", help="Folder of real images for FD-DINOv2."),
    trajectory_pairs: int = typer.Option(4, "--trajectory-pairs", min=0, help="Samples whose teacher trajectory is replayed for the ε error per step."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image side in pixels (default: the training resolution)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the pipeline's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:i]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
):
    """Teacher vs distilled student (and baselines) from the same noise: PSNR, SSIM, ε error, DS/FDD/CLIP."""
    from rich.console import Console
    from rich.table import Table

    from attnprobe.core.outputs import check_output_dir, read_prompts
    from deltadistill.evaluate import evaluate as run_evaluate

    prompt_list = read_prompts(prompts)
    seed_list = _parse_seeds(seeds)
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if reference_images is not None and not reference_images.is_dir():
        raise UsageError(f"--reference-images {reference_images} is not a folder")
    window: int | str = neighbourhood_kernel.strip().lower()
    if window != "student":
        try:
            window = int(window)
        except ValueError:
            raise UsageError(f"--neighbourhood-kernel must be an odd integer or 'student', got {neighbourhood_kernel!r}") from None
        if window < 1 or window % 2 == 0:
            raise UsageError(f"--neighbourhood-kernel must be a positive odd integer, got {window}")
    check_output_dir(out, overwrite)
    variants = ("distilled", "untrained", "no_attention", "neighbourhood") if baselines else ("distilled",)
    err = Console(stderr=True)
    with err.status("evaluating") as status:
        result = run_evaluate(distilled, prompt_list, seed_list, steps=steps, resolution=resolution, guidance=guidance,
                              out=out, device=_device(device), variants=variants, neighbourhood_kernel=window,
                              dino=dino, clip=clip, reference_images=reference_images, trajectory_pairs=trajectory_pairs,
                              log=lambda msg: status.update(f"evaluating: {msg}"))
    rows = result["table"]
    table = Table(title=f"{result['base_model']}: vs the teacher, {len(prompt_list)} prompts × {len(seed_list)} seeds, {steps} steps")
    cols = [c for c in rows[0] if any(r.get(c) is not None for r in rows)]
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        table.add_row(*["" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    import sys

    (Console() if sys.stdout.isatty() else Console(width=200)).print(table)  # files/pipes: no 80-column wrap
    from deltadistill.evaluate import worst_prompts

    worst = worst_prompts(result)
    if len(prompt_list) > 1 and worst:
        typer.echo("largest share of the student's error: " + "; ".join(
            f"{g['prompt']!r} {g['psnr']:.1f} dB ({100 * g['mse_share']:.0f}%)" for g in worst))
    for note in result["notes"]:
        err.print(f"note: {note}", highlight=False)
    typer.echo(f"wrote {out}/metrics.json, metrics.csv, per_prompt.csv, grid.png, evaluation.png")


@app.command(no_args_is_help=True)
@command
def plot(
    distilled: Path = typer.Option(..., "--distilled", help="Distilled model folder (the --out of `deltadistill train`)."),
    erf_report: Path = typer.Option(..., "--erf-report", help="The erf.json of the teacher the student was distilled from."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the figure (default: the report's RUN/figures)."),
    formats: str = typer.Option("png,svg", "--format", help="Comma-separated file formats: png, svg, pdf."),
    dpi: int = typer.Option(120, min=50, max=600, help="Resolution of raster formats (dots per inch)."),
    max_layers: int = typer.Option(4, "--max-layers", min=1, help="Layers to show (spread over depth, most local and most global always in)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing gradient_erf figure."),
):
    """Draw the teacher-vs-student gradient-ERF figure (the paper's Fig. 9) into the run's figures."""
    from attnprobe.report import load_report
    from deltadistill.gradient_erf import load_teacher_student, plot_gradient_erf

    fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    if not fmts or any(f not in ("png", "svg", "pdf") for f in fmts):
        raise UsageError(f"--format {formats!r}: choose from png, svg, pdf (comma-separated)")
    if not distilled.is_dir():
        raise UsageError(f"--distilled {distilled} is not a folder")
    report = load_report(erf_report)
    run_dir = erf_report if erf_report.is_dir() else erf_report.parent
    out = out if out is not None else run_dir / "figures"
    existing = [out / f"gradient_erf.{f}" for f in fmts if (out / f"gradient_erf.{f}").exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite to replace it")
    teacher, student = load_teacher_student(report, distilled)
    paths = plot_gradient_erf(report, out, teacher, student, max_layers=max_layers, formats=fmts, dpi=dpi)
    if not paths:
        raise UsageError(f"{distilled} has no converted layer in common with {erf_report}")
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")


@app.command("import-official", no_args_is_help=True)
@command
def import_official(
    checkpoint: Path = typer.Argument(..., help="An official ΔConvFusion checkpoint: .safetensors, or a torch file (read with weights_only=True)."),
    model: str = typer.Option(..., "--model", help="Its base model: sd15, sdxl, pixart (pixart-1024, ...), or a local diffusers folder."),
    out: Path = typer.Option(..., "--out", help="Distilled-model folder to write (use it with deltadistill.load / generate --distilled)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
):
    """Convert an official ΔConvFusion checkpoint (blocks mounted as `conv1`) into a distilled folder."""
    from deltadistill.io import read_config
    from deltadistill.official import import_official as run_import

    folder = run_import(checkpoint, model, out, overwrite=overwrite)
    layers = read_config(folder)["layers"]
    ks = sorted({layer["kernel_size"] for layer in layers})
    typer.echo(f"wrote {folder}: {len(layers)} blocks (kernel sizes {ks}, gate {layers[0]['gate']}, pool {layers[0]['pool']})")


register_bench(app)
escape_help_markup(app)  # last: every command is registered


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
