"""Recipes: ``toolkit`` (this toolkit's defaults) and ``paper`` (the official ΔConvFusion code).

A preset fixes the block (gate, gate scale, pooling, depth-wise bias), where no kernel sizes are
given the kernel table, and the training recipe (feature-loss tensor, loss weighting, optimizer,
schedule, batch, caption dropout). Any single option given explicitly overrides its preset value;
the values used are written to the run's ``train_config.json`` and the model's ``config.json``.

The official block settings and kernel tables are family knowledge and live in the family
adapters (``paper_block``, ``paper_kernel_size``: PixArt-Σ x1·σ(x2), K = 13; SD1.5/SDXL
x1·x2·√(C'/2) with their per-block tables; all adaptive pooling, no depth-wise bias). Where the
paper's text, the official code and this toolkit differ, see the table in the README.
"""
from __future__ import annotations

from attnprobe.core.errors import UserError

__all__ = ["PRESETS", "block_settings", "preset_kernel_sizes", "train_settings", "TOOLKIT_BLOCK", "TRAIN"]

PRESETS = ("toolkit", "paper")

# the sigmoid gate x1·σ(x2) (the official PixArt blocks' choice) fits the demo teacher's layers better than the
# paper's printed x1·x2/√C' (held-out regression loss −20%; benchmarks/RESULTS.md, "Timestep experts, the gate,
# and the grid's symmetries")
TOOLKIT_BLOCK = {"gate": "sigmoid", "gate_scale": None, "pool": "ceil", "dw_bias": True}

# training recipes (TrainConfig fields); "paper" = the official configs (cfgs/train/py/*_dist.py). The toolkit's guided
# terms (regress_cfg_loss, cfg_loss) lower the error of the guided prediction u + w·(c − u) the sampler steps with:
# benchmarks/RESULTS.md, "The guided terms"
TRAIN = {
    "toolkit": {"recipe": "noised", "feature_target": "attention", "snr_weighting": "standard", "lr": 3e-4,
                "betas": (0.9, 0.99), "weight_decay": 0.0, "warmup": 100, "clip": 1.0, "batch_size": 4,
                "caption_dropout": 0.1, "beta": 1e-3, "gamma": 5.0, "regress_steps": 1200, "regress_symmetries": 8,
                "regress_cfg_loss": 1.0, "cfg_loss": 4.0},
    "paper": {"recipe": "noised", "feature_target": "residual", "snr_weighting": "none", "lr": 3e-4, "betas": (0.9, 0.99),
              "weight_decay": 1e-2, "warmup": 500, "clip": 1.0, "batch_size": 16, "caption_dropout": 0.15,
              "beta": 1e-3, "gamma": 5.0, "regress_steps": 0, "regress_symmetries": 1, "regress_cfg_loss": 0.0,
              "cfg_loss": 0.0},
}


def _check(preset: str | None) -> str:
    preset = preset or "toolkit"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset


def _paper_block(family) -> dict:
    if family.paper_block is None:
        raise UserError(f"the official ΔConvFusion code has no recipe for {family.name} models (it covers PixArt-Σ, "
                        "SD1.5 and SDXL); use --preset toolkit")
    return dict(family.paper_block)


def block_settings(preset: str | None, family, **overrides) -> dict:
    """``{gate, gate_scale, pool, dw_bias}`` of the preset for ``family``; non-None overrides win."""
    preset = _check(preset)
    base = dict(TOOLKIT_BLOCK) if preset == "toolkit" else _paper_block(family)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["gate"] != "scaled":
        base["gate_scale"] = None
    return base


def preset_kernel_sizes(preset: str | None, family, sites) -> dict[str, int]:
    """Kernel size per site from the preset's table (``paper``); the toolkit has none (needs a report or K)."""
    preset = _check(preset)
    if preset == "toolkit":
        raise UserError("give kernel sizes: an erf.json report (--erf-report), one --kernel-size, or --preset paper")
    _paper_block(family)
    sizes = {s.name: family.paper_kernel_size(s) for s in sites}
    missing = [n for n, k in sizes.items() if not k]
    if missing:
        raise UserError(f"the official kernel table has no entry for {len(missing)} layer(s) of this {family.name} model "
                        f"(e.g. {missing[0]!r}: another architecture than the official one?); pass --kernel-size or "
                        "--erf-report")
    return sizes


# the toolkit's fine-tune stage of the trajectory recipe (measured best on the demo, benchmarks/distill_demo.py)
# finetune_seeds: the fine-tune draws its states from 8 teacher samples per prompt (the regression's 4 and 4 more,
# recorded without layer tensors): new noise carries the fit to unseen noise (benchmarks/RESULTS.md, "More noise for
# the fine-tune"); 16 cut the demo's guided error by a further 4% for 2.7 more minutes of recording, past its ~20-minute
# budget
TRAJECTORY = {"toolkit": {"lr": 5e-4, "warmup": 20, "finetune_seeds": 8}, "paper": {}}


def train_settings(preset: str | None, recipe: str | None = None) -> dict:
    """The preset's training options (TrainConfig field → value) for ``recipe`` (None: the preset's)."""
    preset = _check(preset)
    values = dict(TRAIN[preset])
    if (recipe or values["recipe"]) == "trajectory":
        values.update(TRAJECTORY[preset])
    return values
