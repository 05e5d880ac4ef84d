"""Timing and memory of one call: synchronised wall-clock times, peak bytes, and a FLOP-rate estimator
that decides which cases are too slow to run."""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves



@dataclass
class Timing:
    """Wall-clock times of ``repeats`` synchronised calls, in milliseconds."""

    times_ms: list[float]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)

    @property
    def max(self) -> float:
        return max(self.times_ms)


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, device="cpu") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, synchronising around each call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and still alive) during the mode, CPU or GPU.

    Every op output whose storage is new (not a storage seen before entering, e.g. weights or
    inputs, or a view of one) is counted until its last Python reference dies. Kernel-internal
    workspaces (e.g. SDPA's per-thread blocks) are not visible; use under ``torch.no_grad()`` so
    that autograd does not keep tensors alive behind Python's back.
    """

    def __init__(self, known: list[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in known if isinstance(t, torch.Tensor)}
        self._live: dict[int, list[int]] = {}  # data_ptr → [nbytes, python references]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except Exception:  # sparse / meta-like tensors without storage
            return
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self._known:
            return
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = entry = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory_bytes(fn: Callable[[], object], device="cpu", known: list[torch.Tensor] = ()) -> int:
    """Peak memory one call of ``fn`` adds: CUDA max allocated above the start; CPU live tensor bytes."""
    device = torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn()
            synchronize(device)
            del out
            return int(torch.cuda.max_memory_allocated(device) - before)
        mode = LiveTensorBytes(known)
        with mode:
            out = fn()
        del out
        return int(mode.peak)


def _matmul_rate(device, dtype) -> float:
    """FLOP/s of a square matmul on this device and dtype (seeds the skip estimates)."""
    n = 2048 if torch.device(device).type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = time_callable(lambda: a @ a, repeats=10, warmup=3, device=device)  # best of 10: robust to a busy CPU
    return 2 * n**3 / (t.min / 1e3)


# Rate of each timed operator relative to a plain matmul, before anything was measured
# (conservative: overestimating the time skips a case, underestimating could hang the bench).
_INITIAL_EFFICIENCY = {"self_attention": 0.4, "deltaconv": 0.2, "deltaconv_triton": 0.2, "deltaconv_cpu": 0.2,
                       "linear_attention": 0.3, "step": 0.3}


class _Estimator:
    """Expected seconds per call of a timing case, before running it.

    Before any measurement of an operator: FLOPs / (matmul rate × a conservative efficiency).
    After one: t₀ + (FLOPs − FLOPs₀) / max(FLOPs₀ / t₀, nominal rate) — the measured time carries the
    fixed per-call overhead (dominant for tiny models), the increment is charged at the better of
    the measured and the nominal rate.
    """

    def __init__(self, device, dtype):
        self.base = _matmul_rate(device, dtype)
        self.nominal = {op: self.base * eff for op, eff in _INITIAL_EFFICIENCY.items()}
        self.last: dict[str, tuple[float, float]] = {}  # op → (FLOPs, seconds) of the latest measurement

    def seconds(self, op: str, flops: float) -> float:
        if op not in self.last:
            return flops / self.nominal[op]
        f0, t0 = self.last[op]
        return t0 + max(flops - f0, 0.0) / max(f0 / t0, self.nominal[op])

    def update(self, op: str, flops: float, seconds: float) -> None:
        if seconds > 0 and flops > 0:
            self.last[op] = (flops, seconds)


def _available_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30

