"""Distillation under ``accelerate launch`` with two CPU processes (gloo) on the tiny PixArt.

accelerate's ``--cpu`` launcher starts a single process unless MPI is installed, so the test
uses the torchrun-based launcher (``--multi_gpu --num_processes 2``) and tells deltadistill to
stay on the CPU (``--device cpu`` → ``Accelerator(cpu=True)``, DDP over gloo). The same global
batch on one process must give the same losses and blocks within float tolerance, and only
rank 0 may write.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltadistill.train import TrainConfig, list_checkpoints, train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")

pytestmark = pytest.mark.skipif(
    ACCELERATE is None or not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs the accelerate launcher and torch.distributed with gloo",
)


def test_two_process_ddp_matches_single_process(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red rocket in the sky\na blue house with a tree\nthe astronaut on grass\n")
    common = ["--model", "tiny-pixart", "--kernel-size", "3", "--data", str(prompts), "--steps", "6", "--batch-size", "4",
              "--warmup", "2", "--lr", "3e-2", "--checkpoint-every", "3", "--no-progress", "--device", "cpu"]
    run = tmp_path / "ddp"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "deltadistill.cli", "train", *common, "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == "MULTI_CPU" and summary["backend"] == "gloo"
    # only rank 0 wrote: one metrics line per step, checkpoints stamped by rank 0, no stray temp folders
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step-0000003", "step-0000006"]
    assert all(json.loads((c / "state.json").read_text())["writer_rank"] == 0 for c in ckpts)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    # the same global batch on one process
    torch.set_num_threads(1)
    single = train(TrainConfig(data=str(prompts), out=str(tmp_path / "single"), model="tiny-pixart", kernel_size=3, steps=6,
                               batch_size=4, warmup=2, lr=3e-2, checkpoint_every=3, progress=False, device="cpu"),
                   log=lambda m: None)
    for got, want in zip(lines, single["history"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6), got["step"]
    from safetensors.torch import load_file

    a = load_file(str(run / "delta_blocks.safetensors"))
    b = load_file(str(tmp_path / "single" / "delta_blocks.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
