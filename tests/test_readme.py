"""Every README code block runs as written, in the order shown (slow: it runs the demo model).

The shell blocks run their `attnprobe` / `deltadistill` commands (the install steps are what CI
itself does) with the steps reduced to keep the test short; the Python blocks run unchanged, in a
copy of the repository so that `runs/` of the user is untouched.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks():
    return [(lang, body) for lang, body in FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))]


def _commands(body: str) -> list[str]:
    out = []
    for line in body.splitlines():
        line = line.split("  #")[0].strip()
        for part in line.split("&&"):
            part = part.strip()
            for tool in ("attnprobe", "deltadistill"):
                m = re.match(rf"(?:\.venv/bin/)?{tool}\s+(.*)", part)
                if m:
                    out.append(f"{tool} {m.group(1)}")
    return out


def _shrink(cmd: str) -> str:
    cmd = re.sub(r"--steps \d+", "--steps 2", cmd)
    cmd = re.sub(r"--regress-steps \d+", "--regress-steps 2", cmd)
    cmd = re.sub(r"--traj-seeds \d+", "--traj-seeds 1", cmd)
    if cmd.startswith("attnprobe analyze") and "--steps" not in cmd:
        cmd += " --steps 2"
    if cmd.startswith("deltadistill bench"):
        cmd = cmd.replace("512,1024,2048,4096", "512,1024")
    return cmd


def test_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _ in blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 3
    assert any(c.startswith("attnprobe analyze") for _, b in blocks() for c in _commands(b))


@pytest.mark.slow
def test_every_readme_block_runs_in_order(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info"))
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", PYTHONPATH=str(work))
    for lang, body in blocks():
        if lang == "bash":
            for cmd in _commands(body):
                tool, _, rest = _shrink(cmd).partition(" ")
                args = [sys.executable, "-m", f"{tool}.cli", *rest.split()]
                res = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
                assert res.returncode == 0, f"{cmd}\n{res.stderr[-3000:]}"
            if "nbclient" in body:  # the notebook command: checked by tests/test_notebook.py
                continue
        elif lang == "python":
            res = subprocess.run([sys.executable, "-c", body], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
            assert res.returncode == 0, f"{body}\n{res.stderr[-3000:]}"
