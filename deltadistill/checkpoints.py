"""Atomic, resumable checkpoints of a distillation run (``<run>/checkpoints/step-N/``).

A checkpoint holds the trainable block parameters (``blocks.safetensors``), the optimizer and
scheduler state (``torch.save``, read back with ``weights_only=True``), every RNG state as tensors
(``rng.safetensors``) and ``state.json``, written last. It is written into a temporary sibling,
fsync'ed and renamed into place, so any ``step-*`` folder with a ``state.json`` is complete;
``resume="latest"`` picks the highest step.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from attnprobe.core.outputs import file_mode, replace_dir
from deltadistill.train_config import TrainError

__all__ = ["ckpt_name", "list_checkpoints", "find_checkpoint", "verify_checkpoint", "save_checkpoint", "load_checkpoint",
           "clean_stale_tmp", "check_resume_settings"]


def ckpt_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a ``step-*`` folder with ``state.json``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def verify_checkpoint(path) -> str | None:
    """None when every file of the checkpoint reads back, else what is wrong (one line)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
        for name in ("blocks.safetensors", "rng.safetensors"):
            with safe_open(str(path / name), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_tensor(key)
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated JSON, safetensors or pickle; missing files
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def _newest_intact(candidates: list[Path], what: str) -> Path:
    skipped = []
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if skipped:
                warnings.warn(f"skipped damaged checkpoint(s) {', '.join(skipped)}; resuming from {path.name}")
            return path
        skipped.append(f"{path.name} ({problem})")
    raise TrainError(f"--resume {what}: no intact checkpoint ({'; '.join(skipped)}); start a new run")


def find_checkpoint(resume: str, out) -> Path:
    """``"latest"`` → newest intact checkpoint of ``out``; a run folder → its newest intact one; a checkpoint
    folder → itself (verified). Damaged checkpoints are skipped with a warning."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise TrainError(f"--resume latest: no checkpoint in {Path(out) / 'checkpoints'}; start without --resume")
        return _newest_intact(found, "latest")
    path = Path(resume)
    if (path / "state.json").is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise TrainError(f"--resume {resume}: the checkpoint is damaged ({problem})")
        return path
    found = list_checkpoints(path)
    if found:
        return _newest_intact(found, resume)
    raise TrainError(f"--resume {resume}: not a checkpoint folder (no state.json) nor a run folder with checkpoints")


def _rng_tensors() -> tuple[dict, dict]:
    """Current RNG states as tensors (safetensors-friendly, no pickle) plus JSON scalars."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python_version": version, "python_gauss": gauss, "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    return tensors, meta


def _set_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    random.setstate((meta["python_version"], tuple(int(v) for v in tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_gauss"]))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)


def _block_state(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, step: int, student, optimizer, scheduler, state: dict, keep: int = 3) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp folder, then rename); prune to ``keep`` newest."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / ckpt_name(step)
    tmp = root / f".tmp-{ckpt_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_block_state(student), str(tmp / "blocks.safetensors"))
        os.chmod(tmp / "blocks.safetensors", file_mode())
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng, rng_meta = _rng_tensors()
        save_file(rng, str(tmp / "rng.safetensors"))
        os.chmod(tmp / "rng.safetensors", file_mode())
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_meta}, indent=2))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale_tmp(run_dir) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, student, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    blocks = load_file(str(path / "blocks.safetensors"))
    params = dict(student.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(blocks) != trainable:
        diff = sorted(set(blocks) ^ trainable)
        raise TrainError(f"--resume {path}: checkpoint blocks do not match this model, kernel sizes or block settings (e.g. {diff[0]!r})")
    with torch.no_grad():
        for n, v in blocks.items():
            if params[n].shape != v.shape:
                raise TrainError(f"--resume {path}: {n} has shape {tuple(v.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(v.to(params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    _set_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def truncate_metrics(metrics: Path, step: int) -> list[dict]:
    """Drop metrics lines past ``step`` and a torn last line (a killed run's tail), atomically; returns the kept records."""
    if not metrics.is_file():
        return []
    keep = []
    for ln in metrics.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    tmp = metrics.parent / f".{metrics.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, metrics)
    return [json.loads(ln) for ln in keep]


def prepare_run_folder(out: Path, replace_old: bool, artefacts, settings: dict) -> None:
    """Remove an old run's artefacts (``replace_old``), create ``out``, clean stale temporaries, write train_config.json."""
    if replace_old and out.is_dir():
        for name in artefacts:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    (out / "train_config.json").write_text(json.dumps(settings, indent=2))


def check_resume_settings(path: Path, now: dict, keys: tuple, requested) -> None:
    """Refuse to resume checkpoint ``path`` when one of ``keys`` of the run's settings ``now`` differs from the
    settings it recorded (a key an older checkpoint did not record is not compared). ``requested``: the config as
    given, whose None values came from the preset; the message then names the flag that restores the checkpoint's."""
    prev = json.loads((Path(path) / "state.json").read_text()).get("config", {})
    for key in keys:
        if key not in prev or prev[key] == now[key]:
            continue
        if key == "data_id":
            raise TrainError(f"--resume {path}: the checkpoint was trained on other data than --data {now['data']} "
                             "(other prompts, or other image files); resume with the same data or start a new run")
        hint = (f"{now[key]!r} is the {now['preset']} preset's value now; pass --{key.replace('_', '-')} {prev[key]} "
                "to resume with the checkpoint's" if getattr(requested, key, 0) is None else
                "resume with the same settings or start a new run")
        raise TrainError(f"--resume {path}: the checkpoint was trained with {key}={prev[key]!r}, now {now[key]!r}; {hint}")
