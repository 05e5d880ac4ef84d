"""Progress that reads in a log file: plain lines when the output is not a terminal."""
import io
import os
import subprocess
import sys
import time
from pathlib import Path

from attnprobe.core.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def test_plain_lines_at_start_on_interval_and_at_the_end():
    stream = io.StringIO()  # not a TTY
    with Progress("work", 10, interval=0.0, stream=stream) as p:
        for i in range(1, 11):
            p.update(i, loss=0.5 / i)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("work: 0/10 (0%)") and "starting" in lines[0]
    assert lines[-1].startswith("work: 10/10 (100%)") and "loss 0.05" in lines[-1] and "it/s" in lines[-1]
    quiet = io.StringIO()
    with Progress("work", 10, interval=3600, stream=quiet) as p:
        for i in range(1, 10):
            p.update(i)
    assert len(quiet.getvalue().splitlines()) == 2  # the start, and the unfinished end: no flood


def test_a_redirected_run_reports_progress_before_it_finishes(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    cmd = [sys.executable, "-m", "attnprobe.cli", "analyze", "-m", "tiny-pixart", "-p", str(prompts), "-o",
           str(tmp_path / "run"), "--steps", "30", "--no-plots"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        t0 = time.time()
        line = ""
        while not line.startswith("analyze:") and time.time() - t0 < 120:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        still_running = proc.poll() is None
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert line.startswith("analyze: 0/60"), line + rest
    assert still_running, "the first progress line only came when the run had ended"
    assert proc.returncode == 0 and "analyze: 60/60 (100%)" in rest
