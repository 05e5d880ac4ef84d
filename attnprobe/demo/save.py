"""Writing the trained demo model: the pipeline folder, its loss-curve figure and metadata."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from attnprobe.core.outputs import staged_output_dir
from attnprobe.demo.components import TrainConfig, build_scheduler


def _tail_mean(values: list[float], n: int = 100) -> float:
    tail = values[-n:]
    return float(sum(tail) / max(1, len(tail)))


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=50):
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc = v if i == 0 else acc + (v - acc) / min(k, i + 1)
            out.append(acc)
        return out

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, ylabel, title in ((axes[0], "vae", "loss (L1 + grad + KL)", "VAE"),
                                    (axes[1], "transformer", "Min-SNR weighted MSE", "PixArt transformer")):
        c = curves[key]
        if not c["step"]:
            ax.set_title(f"{title} (not trained in this run)")
            continue
        ax.plot(c["step"], c["loss"], color="0.8", lw=0.6, label="per step")
        ax.plot(c["step"], smooth(c["loss"]), color="C0", lw=1.5, label="running mean")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _portable_tokenizer_names(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both have.

    transformers 5 saves the class under its new name (``TokenizersBackend``), which 4.x cannot
    import; ``PreTrainedTokenizerFast`` is the same class in 5.x and the original one in 4.x.
    """
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer" / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    for config_path in folder.glob("*/config.json"):  # drop local paths diffusers records on re-saved models
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pipeline(cfg: TrainConfig, out: Path, tokenizer, text_encoder, vae, transformer, curves: dict, summary: dict,
                  overwrite: bool) -> Path:
    """Write the pipeline folder atomically (temporary sibling, then rename)."""
    from diffusers import PixArtSigmaPipeline

    out = Path(out).resolve()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.float(),
        vae=vae.to(torch.float16),
        transformer=transformer.to(torch.float16),
        scheduler=build_scheduler(cfg),
    )
    with staged_output_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _portable_tokenizer_names(tmp)
        (tmp / "loss_curve.json").write_text(json.dumps(curves))
        plot_curves(curves, tmp / "loss_curve.png")
        summary = dict(summary, size_bytes=folder_size(tmp))
        record = {"config": dataclasses.asdict(cfg), "results": summary}
        (tmp / "train_config.json").write_text(json.dumps(record, indent=2))
    return out


