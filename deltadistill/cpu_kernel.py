"""A compiled CPU kernel for the ΔConvBlock's depth-wise stage, the ``cpu`` backend of :mod:`deltadistill.ops`.

Why: on CPUs whose matrix units run the block's 1×1 projections near their peak (AVX-512 Xeons:
~360 GFLOP/s on two cores), oneDNN's channels-last depth-wise convolution runs at ~60 GFLOP/s
and the block sits at ~2× its matmul floor (``benchmarks/RESULTS.md``, "ΔConvBlock on CPU
against its floor"). ``cpu_kernel.c`` is a direct convolution vectorised over channels, with the
gate (x1·σ(x2) or x1·x2·s) fused into its epilogue, so that the stage writes C'/2 channels once
instead of C' channels and then C'/2.

How: ``cpu_kernel.c`` packs each block of 16 (AVX-512; else 8) channels into a zero-padded contiguous
plane, then accumulates a tile of output vectors in registers (1 row × 8 columns with AVX-512, else
2 × 4; see its header). The C file beside this module is compiled at first use with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``; ``-O3 -march=native -fopenmp``) into a cache folder
(``$DELTADISTILL_CACHE``, else ``~/.cache/deltadistill``), keyed by the source, the flags and the
CPU, and called through :mod:`ctypes` (which releases the GIL), the channel blocks (or, for few
blocks, the rows) split over ``torch.get_num_threads()`` threads. The threads are PyTorch's own
OpenMP team where the library shares PyTorch's OpenMP runtime (a GNU OpenMP build of PyTorch,
loaded first: the library's ``libgomp.so.1`` resolves to PyTorch's). That matters: right after
PyTorch's matmuls its OpenMP threads spin for a while, so threads of a pool of our own would wait
for the cores (the block at PixArt 32² took 11.5 ms with a pool, 9.6 ms on PyTorch's team).
Elsewhere (no OpenMP, or another runtime) a pool of Python threads runs the parts. No compiler or a failed build:
the PyTorch reference runs instead (a warning says why, once); ``ATTNPROBE_BACKEND=reference``
chooses it.

Where oneDNN's own kernel is faster (small K on some shapes), the ``cpu`` backend keeps it: each
shape is timed both ways once, on its first call (see ``kernel_is_faster``).

Scope: fp32 CPU tensors. Without a gradient recorded (sampling, evaluation, benchmarks) the stage runs
fused (convolution and gate); the coarse stage's upsample-add likewise; and the block's projection biases
ride in those passes (``in_bias`` of the stage, ``bias`` of the upsample-add) instead of passes of their own. With one (training) the
convolution has a backward (:mod:`deltadistill.ops`): its input gradient is the same kernel on the output
gradient with the flipped taps, and its weight gradient ``dw_weight_grad`` (oneDNN's took 5-11× the
forward's time at K ≥ 9 on the demo's shapes, and most of a regression step); the gate, pooling and
resizing stay PyTorch's. Each is tested against float64 PyTorch (``tests/test_cpu_kernel.py``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["SOURCE", "available", "kernel_is_faster", "library_path", "dwconv_nhwc_cpu", "dwconv_weight_grad_cpu",
           "autotuning", "stage_cpu", "trainable", "upsample_add_cpu", "usable"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")
# the first that builds: OpenMP and the host's vector units; the host's units; portable
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
_MODES = {None: 0, "scaled": 1, "sigmoid": 2}
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_forked = False  # in a forked child: GNU OpenMP's team is not usable there (PyTorch's own ops hang in it too)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("DELTADISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deltadistill")
    return Path(root) / "cpu_kernel"


def _build(cc: str, flag_sets=_FLAG_SETS) -> Path:
    """Compile ``SOURCE`` (cached); the path of the shared library. Raises RuntimeError with the reason.

    A flag set that failed once is remembered (``.failed`` beside the library it would have been), so
    that later processes go straight to the next one."""
    src = SOURCE.read_bytes()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), _cpu_id().encode()])).hexdigest()[:16]
        out = _cache_dir() / f"dwstage-{key}.so"
        failed = out.with_suffix(".failed")
        if out.exists():
            return out
        if failed.exists():
            errors.append(f"{' '.join(flags)}: failed before ({failed})")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)], capture_output=True,
                                 text=True, timeout=120)
            if run.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
                return out
            errors.append(f"{' '.join(flags)}: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
            failed.write_text(run.stderr)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded kernel, or None (with one warning saying why)."""
    cc = _compiler()
    if cc is None:
        warnings.warn("no C compiler found (set CC); the ΔConvBlock runs its PyTorch reference on the CPU")
        return None
    try:
        return _load(_build(cc))
    except (RuntimeError, OSError) as exc:
        warnings.warn(f"the CPU kernel did not build ({exc}); the ΔConvBlock runs its PyTorch reference on the CPU")
        return None


class _Lib(NamedTuple):
    """A loaded kernel: its entry points, and the lanes of a channel block (16 with AVX-512, else 8)."""

    stage: object  # dw_stage(..., h0, h1, k0, k1): one part
    lanes: int
    upsample_add: object  # upsample_add(..., r0, r1): one part
    stage_parts: object | None  # dw_stage_parts(..., n, parts): n parts on PyTorch's OpenMP team; None: use a pool
    upsample_add_parts: object | None
    weight_grad: object  # dw_weight_grad(..., n0, n1, k0, k1): one part
    weight_grad_parts: object | None  # dw_weight_grad_parts(..., n, parts, stride)


_STAGE_ARGS = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_float]
_UPSAMPLE_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
_GRAD_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5


def _load(path: Path) -> _Lib:
    lib = ctypes.CDLL(str(path))
    entries = {}
    for name, args in (("dw_stage", _STAGE_ARGS + [ctypes.c_int] * 4), ("upsample_add", _UPSAMPLE_ARGS + [ctypes.c_int] * 2),
                       ("dw_stage_parts", _STAGE_ARGS + [ctypes.c_int, ctypes.c_void_p]),
                       ("upsample_add_parts", _UPSAMPLE_ARGS + [ctypes.c_int, ctypes.c_void_p]),
                       ("dw_weight_grad", _GRAD_ARGS + [ctypes.c_int] * 4),
                       ("dw_weight_grad_parts", _GRAD_ARGS + [ctypes.c_int, ctypes.c_void_p, ctypes.c_long])):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, ctypes.c_int
        entries[name] = fn
    team = _shares_torch_openmp()
    return _Lib(entries["dw_stage"], int(lib.dw_lanes()), entries["upsample_add"],
                entries["dw_stage_parts"] if team else None, entries["upsample_add_parts"] if team else None,
                entries["dw_weight_grad"], entries["dw_weight_grad_parts"] if team else None)


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty where /proc is not readable)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {ln.split()[-1] for ln in maps.splitlines() if re.search(r"/lib(gomp|i?omp5?)[^/]*\.so", ln)}


def _shares_torch_openmp() -> bool:
    """PyTorch runs on OpenMP and exactly one OpenMP runtime is loaded: a library built with ``-fopenmp`` then
    runs its parallel regions on PyTorch's own threads. Anything else (two runtimes, another platform): no."""
    return "OpenMP" in torch.__config__.parallel_info() and len(_openmp_runtimes()) == 1


def library_path() -> Path | None:
    """Where the compiled kernel lies (building it if needed), or None where it cannot be built."""
    cc = _compiler()
    if cc is None or _library() is None:
        return None
    return _build(cc)


def available() -> bool:
    """The kernel is compiled and loaded (builds it on first call)."""
    return _library() is not None


def usable(x: torch.Tensor) -> bool:
    """Capability check of the ``cpu`` backend's inference-only ops: an fp32 CPU tensor, no gradient recorded,
    kernel built."""
    return trainable(x) and not torch.is_grad_enabled()


def trainable(x: torch.Tensor) -> bool:
    """Capability check of the ``cpu`` backend's ops with a backward (the depth-wise convolution and the stage): an
    fp32 CPU tensor, kernel built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="dwstage")
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads do not exist there, so start a new pool when needed, and
    leave the OpenMP team alone (a child of a parent that used it waits forever on its first parallel region)."""
    global _pool, _lock, _forked
    _pool, _lock, _forked = None, threading.Lock(), True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _check_cpu_fp32(*tensors) -> None:
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise TypeError(f"the CPU kernel takes fp32 CPU tensors, got a {t.device.type} {t.dtype} tensor; "
                            "use backend='reference'")


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str | None, scale: float,
         lib=None, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_cpu_fp32(x, weight, bias, in_bias)
    b, h, w, c = x.shape
    k = weight.shape[-1]
    if weight.shape != (c, k, k) or k % 2 == 0:
        raise ValueError(f"weight must be [C, K, K] with odd K for C = {c}, got {tuple(weight.shape)}")
    for name, v in (("bias", bias), ("in_bias", in_bias)):
        if v is not None and v.shape != (c,):
            raise ValueError(f"{name} must be [C] = [{c}], got {tuple(v.shape)}")
    if mode is not None and c % 2:
        raise ValueError(f"the gate splits channels in halves; C = {c} is odd")
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available (no C compiler, or the build failed); use backend='reference'")
    x = x.detach().contiguous()
    wt = weight.detach().contiguous()  # [C, K, K]; the kernel copies each block's taps tap-major
    bias = None if bias is None else bias.detach().contiguous()
    in_bias = None if in_bias is None else in_bias.detach().contiguous()
    out = x.new_empty(b, h, w, c // 2 if mode else c)
    if out.numel() == 0:
        return out
    args = (x.data_ptr(), wt.data_ptr(), None if bias is None else bias.data_ptr(),
            None if in_bias is None else in_bias.data_ptr(), out.data_ptr(),
            b, h, w, c, k, _MODES[mode], float(scale))
    blocks = -(-out.shape[-1] // lib.lanes)  # channel blocks of `lanes` output channels
    threads = torch.get_num_threads()
    if threads == 1:
        parts = [(0, h, 0, blocks)]
    elif blocks % threads == 0 or blocks >= 4 * threads:  # whole channel blocks per thread: no halo packed twice
        step = -(-blocks // threads)
        parts = [(0, h, j, min(blocks, j + step)) for j in range(0, blocks, step)]
    else:  # few blocks: split the rows instead
        step = -(-h // min(threads, h))
        parts = [(r, min(h, r + step), 0, blocks) for r in range(0, h, step)]
    if _parallel(lib.stage, lib.stage_parts, args, parts):
        raise MemoryError("the CPU kernel could not allocate its packing buffer")
    return out


def _parallel(fn, fn_parts, args, parts, out_stride: int | None = None) -> bool:
    """``fn(*args, *part)`` for each part: on PyTorch's OpenMP team through ``fn_parts`` where there is one, else on
    the pool's threads (ctypes releases the GIL). True if any part failed. ``out_stride`` (floats; the weight gradient
    only): part i writes to ``args[2] + i·out_stride`` (its own partial sum where > 0)."""
    if len(parts) == 1:
        return bool(fn(*args, *parts[0]))
    if fn_parts is not None and not _forked:
        flat = [v for part in parts for v in part]
        extra = () if out_stride is None else (out_stride,)
        return bool(fn_parts(*args, len(parts), (ctypes.c_int * len(flat))(*flat), *extra))
    calls = [(*args[:2], args[2] + 4 * out_stride * i, *args[3:], *part) if out_stride else (*args, *part)
             for i, part in enumerate(parts)]
    return any(f.result() for f in [_executor().submit(fn, *call) for call in calls])


def upsample_add_cpu(y: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out += up_{H×W}(y) (+ bias[b])`` in place (bilinear, align_corners=False), y [B, h, w, C], out [B, H, W, C],
    bias per image [B, C] or None; returns out."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available (no C compiler, or the build failed); use backend='reference'")
    _check_cpu_fp32(y, out, bias)
    if not out.is_contiguous():
        raise TypeError("upsample_add writes into a contiguous output")
    b, h, w, c = out.shape
    if y.ndim != 4 or y.shape[0] != b or y.shape[-1] != c:
        raise ValueError(f"cannot add a {tuple(y.shape)} grid into {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if y.shape[1] == 0 or y.shape[2] == 0:
        raise ValueError(f"cannot resize an empty {tuple(y.shape)} grid to {h}×{w}")
    if bias is not None and bias.shape != (b, c):
        raise ValueError(f"bias must be [B, C] = [{b}, {c}], got {tuple(bias.shape)}")
    y = y.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    rows = b * h
    step = -(-rows // max(1, min(torch.get_num_threads(), rows)))
    _parallel(lib.upsample_add, lib.upsample_add_parts,
              (y.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), b, y.shape[1], y.shape[2], h, w, c),
              [(r, min(rows, r + step)) for r in range(0, rows, step)])
    return out


def dwconv_weight_grad_cpu(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, lib=None) -> torch.Tensor:
    """The depth-wise convolution's weight gradient, [C, K, K]: Σ over images and pixels of the input under each tap
    times the output gradient (x and grad [B, H, W, C], fp32 CPU)."""
    _check_cpu_fp32(x, grad)
    if x.shape != grad.shape or x.ndim != 4 or kernel_size % 2 == 0:
        raise ValueError(f"input {tuple(x.shape)} and gradient {tuple(grad.shape)} must match, K odd (got {kernel_size})")
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available (no C compiler, or the build failed); use backend='reference'")
    b, h, w, c = x.shape
    k = kernel_size
    x, grad = x.detach().contiguous(), grad.detach().contiguous()
    blocks, threads = -(-c // lib.lanes), torch.get_num_threads()
    if threads == 1 or b == 1 or blocks >= 2 * threads or blocks % threads == 0:  # channel blocks per thread
        step = -(-blocks // min(threads, blocks))
        parts, stride = [(0, b, j, min(blocks, j + step)) for j in range(0, blocks, step)], 0
    else:  # few channel blocks: images per thread, each into its own partial sum
        step = -(-b // min(threads, b))
        parts, stride = [(n, min(b, n + step), 0, blocks) for n in range(0, b, step)], c * k * k
    out = x.new_zeros(len(parts) if stride else 1, c, k, k)
    if b * h * w == 0:
        return out[0]
    args = (x.data_ptr(), grad.data_ptr(), out.data_ptr(), b, h, w, c, k)
    if _parallel(lib.weight_grad, lib.weight_grad_parts, args, parts, stride):
        raise MemoryError("the CPU kernel could not allocate its packing buffer")
    return out.sum(0) if stride else out[0]


def dwconv_nhwc_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-wise K×K convolution, 'same' zero padding: [B, H, W, C] → [B, H, W, C] (always the kernel)."""
    return _run(x, weight, bias, None, 1.0)


def stage_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "scaled",
              scale: float = 1.0, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One pyramid stage after its pooling: depth-wise conv → gate (fused), [B, H, W, C] → [B, H, W, C/2]
    (always the kernel). ``in_bias`` [C]: the stage convolves ``x + in_bias`` (added while packing, no pass of its own)."""
    if mode not in ("scaled", "sigmoid"):
        raise ValueError(f"unknown gate {mode!r}; choose 'scaled' or 'sigmoid'")
    return _run(x, weight, bias, mode, scale, in_bias=in_bias)


# The kernel is not faster everywhere: oneDNN has specialised code for small kernels (on a 2-core AVX-512 Xeon the
# kernel wins 1.3–2.8× at K = 13 and loses up to 2× at K ≤ 9 on some shapes; benchmarks/RESULTS.md). So the ``cpu``
# backend times both paths on the first call of each shape (three interleaved calls each, median) and keeps the
# faster one for that shape and thread count, as cuDNN's benchmark mode does. DELTADISTILL_CPU_AUTOTUNE=0: always the kernel.
_CHOICE: dict[tuple, bool] = {}


def autotuning() -> bool:
    """False where ``DELTADISTILL_CPU_AUTOTUNE=0``: the kernel everywhere, untimed."""
    return os.environ.get("DELTADISTILL_CPU_AUTOTUNE", "1") != "0"


def kernel_is_faster(key: tuple, kernel, reference) -> bool:
    """For this shape ``key`` (and thread count): is ``kernel()`` faster than ``reference()``? Timed on first use."""
    if not autotuning():
        return True
    key = (*key, torch.get_num_threads())
    if key not in _CHOICE:
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for which, fn in ((True, kernel), (False, reference)):
                t0 = time.perf_counter()
                fn()
                seconds[which].append(time.perf_counter() - t0)
        _CHOICE[key] = statistics.median(seconds[True]) <= statistics.median(seconds[False])
    return _CHOICE[key]


