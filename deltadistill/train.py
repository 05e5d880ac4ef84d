"""``train(TrainConfig) -> summary``: one distillation run with the recipe the config names.

The recipes: ``noised`` (:class:`deltadistill.trainer.Trainer`: noised data latents, output loss +
feature loss, the paper's) and ``trajectory`` (:class:`deltadistill.trajectory_train.TrajectoryTrainer`:
the teacher's own sampling trajectories, per-layer regression, then end-to-end fine-tuning). The
run folder, checkpoints, resume and safety rules are the same for both (see
:mod:`deltadistill.trainer`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

from attnprobe.core.outputs import claim_output
from deltadistill.checkpoints import find_checkpoint, list_checkpoints, save_checkpoint  # noqa: F401  (re-exported)
from deltadistill.progress import is_main_process  # noqa: F401  (re-exported)
from deltadistill.trainer import Trainer
from deltadistill.train_config import TrainConfig, TrainError, TrainingDiverged, validate  # noqa: F401  (re-exported)
from deltadistill.trajectory_train import TrajectoryTrainer

__all__ = ["TrainConfig", "Trainer", "TrajectoryTrainer", "train", "is_main_process", "TrainError", "TrainingDiverged",
           "find_checkpoint", "list_checkpoints", "save_checkpoint"]


def train(cfg: TrainConfig, *, batch_hook: Callable | None = None, setup_hook: Callable | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Run a distillation; returns a summary dict (see the module docstring for the run folder).

    ``batch_hook(step, latents, cond) -> (latents, cond)`` may edit each local batch before the
    forward passes (tests inject NaNs with it). ``setup_hook(teacher, student)`` is called once
    with both denoisers before the first step. ``log`` receives one-line messages on the main
    process (default: print).

    Raises :class:`TrainError` (bad input; nothing already written is touched), and
    :class:`TrainingDiverged` after ``max_bad_steps`` consecutive non-finite steps.
    """
    cls = TrajectoryTrainer if validate(cfg).recipe == "trajectory" else Trainer
    trainer = cls(cfg, batch_hook=batch_hook, setup_hook=setup_hook, log=log)
    with claim_output(trainer.out) if trainer.main else contextlib.nullcontext():  # one run per folder at a time
        return trainer.setup().run()
