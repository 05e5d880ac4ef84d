"""How the command lines make OpenMP threads wait: passive on a busy CPU, a short spin on an idle one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attnprobe.core import cli as core

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ATTNPROBE_OMP_AUTO", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for v in WAIT_VARS:  # set first, so that undoing restores the variable's absence too (nothing leaks)
        monkeypatch.setenv(v, "unset-by-test")
        monkeypatch.delenv(v)
    return monkeypatch


def test_busy_cpus_from_two_samples():
    # 4 CPUs, 400 jiffies passed, 300 of them idle (idle + iowait): one CPU's worth of work
    assert core.busy_cpus((1000, 600), (1400, 900), 4) == pytest.approx(1.0)
    assert core.busy_cpus((1000, 600), (1400, 1000), 4) == pytest.approx(0.0)
    assert core.busy_cpus((1000, 600), (1000, 600), 4) is None  # no time passed


def test_cpu_times_reads_the_first_line(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice: guest is inside user, so not summed again
    stat.write_text("cpu  10 1 5 100 4 2 3 7 9 9\ncpu0 5 0 2 50 2 1 1 3 4 4\n")
    assert core._cpu_times(str(stat)) == (10 + 1 + 5 + 100 + 4 + 2 + 3 + 7, 100 + 4)
    stat.write_text("intr 1 2 3\n")
    with pytest.raises(ValueError):
        core._cpu_times(str(stat))


def test_cpu_busy_missing_or_odd_stat_is_none(tmp_path):
    assert core.cpu_busy(0.0, str(tmp_path / "none")) is None
    (tmp_path / "odd").write_text("garbage\n")
    assert core.cpu_busy(0.0, str(tmp_path / "odd")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_cpu_busy_sees_a_busy_loop():
    # a child spinning for the whole interval is at least ~half a CPU of work (more on an idle machine)
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        import time
        time.sleep(0.3)  # let it start
        busy = core.cpu_busy(0.5)
    finally:
        child.kill()
        child.wait()
    assert busy is not None and 0.5 <= busy <= os.cpu_count() + 0.01


def test_idle_cpu_spins_briefly(clean_env):
    assert core.calm_threads(probe=lambda: 0.05) == "spin"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # runtimes other than GNU's: passive
    assert os.environ["GOMP_SPINCOUNT"] == str(core.SPIN_WHEN_IDLE)  # GNU's: overrides the policy
    assert core.omp_wait_setting() == f"GOMP_SPINCOUNT={core.SPIN_WHEN_IDLE}"


@pytest.mark.parametrize("busy", [core.IDLE_BELOW, 1.0, None])
def test_busy_or_unknown_cpu_waits_passively(clean_env, busy):
    assert core.calm_threads(probe=lambda: busy) == "passive"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in os.environ
    assert core.omp_wait_setting() == "OMP_WAIT_POLICY=PASSIVE"


@pytest.mark.parametrize("var,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "0")])
def test_user_setting_is_kept(clean_env, var, value):
    clean_env.setenv(var, value)
    called = []
    assert core.calm_threads(probe=lambda: called.append(1) or 0.0) == "user"
    assert os.environ[var] == value and not called
    assert all(os.environ.get(v) is None for v in WAIT_VARS if v != var)


def test_a_parents_choice_is_decided_again(clean_env):
    assert core.calm_threads(probe=lambda: 0.0) == "spin"  # a parent command line on an idle CPU ...
    # ... whose child starts while the machine is busy: not taken for the user's setting
    assert core.calm_threads(probe=lambda: 1.5) == "passive"
    assert "GOMP_SPINCOUNT" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_WORLD_SIZE"])
def test_ranks_of_a_distributed_launch_wait_passively(clean_env, var):
    clean_env.setenv(var, "2")
    assert core.calm_threads(probe=lambda: 0.0) == "passive"
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize("module", ["attnprobe.cli", "deltadistill.cli"])
def test_set_before_torch_is_loaded(module):
    # OpenMP reads these when torch loads it: the CLI module must decide before anything imports torch
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    code = ("import sys, os\nimport attnprobe.core.cli as c\nseen = []\nreal = c.calm_threads\n"
            "c.calm_threads = lambda: seen.append('torch' in sys.modules) or real()\n"
            "import " + module + "\nprint(seen, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[False]", "PASSIVE"]


def test_a_malformed_world_size_is_not_a_launch(clean_env):
    clean_env.setenv("WORLD_SIZE", "abc")  # not a number: no distributed launch, and no crash at import
    assert core.calm_threads(probe=lambda: 0.0) == "spin"
