"""``run_bench``: the FLOPs and latency rows of one model over a list of resolutions."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves

from attnprobe.core.cli import omp_wait_setting
from deltadistill import cpu_kernel
from deltadistill import flops as cost_model
from deltadistill.bench.inputs import _load_model, default_resolutions, denoiser_inputs, meta_step_flops
from deltadistill.bench.linear_attention import GeneralizedLinearAttention
from deltadistill.bench.measure import _available_bytes, _Estimator, peak_memory_bytes, time_callable
from deltadistill.presets import TOOLKIT_BLOCK

GATE = TOOLKIT_BLOCK["gate"]  # the block is costed and timed as `deltadistill train` builds it
_OP_BACKEND = {"deltaconv_triton": "triton", "deltaconv_cpu": "cpu", "self_attention": "sdpa"}


@dataclass
class BenchResult:
    meta: dict
    flops: list[dict] = field(default_factory=list)  # one row per (resolution, operator)
    layers: list[dict] = field(default_factory=list)  # per (resolution, layer, operator)
    latency: list[dict] = field(default_factory=list)  # one row per (resolution, scope, operator)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "flops": self.flops, "flops_per_layer": self.layers,
                "latency": self.latency, "notes": self.notes}


def _kernel_spec(kernel_size: int | None, erf_report: str | os.PathLike | None, sites) -> tuple[object, str]:
    """``(int or {name: K}, description)``; a report must cover every site."""
    if kernel_size is not None and erf_report is not None:
        raise ValueError("pass either --kernel-size or --erf-report, not both")
    if erf_report is not None:
        from attnprobe.report import load_report

        sizes = load_report(erf_report).kernel_sizes()
        missing = [s.name for s in sites if s.name not in sizes]
        if missing:
            raise ValueError(f"{erf_report} has no kernel size for {len(missing)} layer(s) of this model "
                             f"(e.g. {missing[0]!r}); it was measured on another model")
        sizes = {s.name: int(sizes[s.name]) for s in sites}
        lo, hi = min(sizes.values()), max(sizes.values())
        return sizes, f"per layer from {Path(erf_report).name} (K {lo}–{hi})" if lo != hi else f"K={lo} from {Path(erf_report).name}"
    k = 13 if kernel_size is None else int(kernel_size)
    if k < 3 or k % 2 == 0:
        raise ValueError(f"--kernel-size must be odd and >= 3, got {k}")
    return k, f"K={k}"


def _representative(layers: list[cost_model.LayerShape]) -> cost_model.LayerShape:
    """The first layer on the largest token grid (UNet level 0; any layer of a DiT)."""
    return max(layers, key=lambda la: (la.tokens, -layers.index(la)))


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import os
        import platform

        return f"{platform.machine() or 'unknown'} CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return str(device)


def run_bench(
    model: str,
    resolutions: list[int] | None = None,
    *,
    flops: bool = True,
    latency: bool = True,
    step: bool = True,
    kernel_size: int | None = None,
    erf_report: str | os.PathLike | None = None,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    max_seconds: float = 2.0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the bench; see the module docstring. Raises ValueError for bad arguments."""
    from attnprobe.core import backends, registry
    from attnprobe.core.family import find_self_attention

    say = progress or (lambda msg: None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    tdtype = registry.auto_dtype(device) if dtype == "auto" else registry.torch_dtype(dtype)
    if backend not in ("auto", "reference", "triton", "cpu"):
        raise ValueError(f"unknown backend {backend!r}; choose reference, triton, cpu or auto")
    triton_ok = torch.device(device).type == "cuda" and backends.triton_importable()
    if backend == "triton" and not triton_ok:
        raise ValueError("--backend triton needs Triton and a CUDA device; use --backend reference (or auto)")
    if backend == "cpu" and not (torch.device(device).type == "cpu" and tdtype == torch.float32 and cpu_kernel.available()):
        raise ValueError("--backend cpu needs --device cpu, fp32 and a C compiler to build the kernel; "
                         "use --backend reference (or auto)")
    say(f"loading {model}")
    m = _load_model(model)
    sites = find_self_attention(m.meta)
    kspec, kdesc = _kernel_spec(kernel_size, erf_report, sites)
    resolutions = sorted(set(resolutions or default_resolutions(m)))

    for r in resolutions:
        try:
            m.family.base_grid(m.meta.config, m.info["vae_scale_factor"], r, r)
        except ValueError as exc:
            raise ValueError(f"{m.spec.alias}: {exc}") from None
    joint = not m.family.convertible
    res = BenchResult(meta={
        "model": m.spec.alias, "class": m.info["class"], "family": m.family.name, "resolutions": resolutions,
        "kernel_sizes": kdesc, "layers": len(sites), "device": _device_name(device), "dtype": str(tdtype).replace("torch.", ""),
        "backend": backend, "repeats": repeats, "warmup": warmup, "max_seconds": max_seconds,
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flops_convention": "1 multiply-add = 2 FLOPs; elementwise ops 1 FLOP each (deltadistill.flops)",
        "omp_wait": omp_wait_setting(),
    })
    if hasattr(os, "getloadavg"):  # a busy shared CPU explains noisy timings
        load = os.getloadavg()[0]
        res.meta["load_average_1min"] = round(load, 2)
        if latency and torch.device(device).type == "cpu" and load > (os.cpu_count() or 1):
            res.notes.append(f"the CPU is oversubscribed (load average {load:.1f} on {os.cpu_count()} cores): timings "
                             "are noisy, small ops worst (thread-pool stalls); --threads 1 steadies them.")
    if joint:
        res.notes.append(f"{m.family.name} uses joint attention: costs are for its image tokens only, and the ΔConvBlock "
                         "is shown for reference (deltadistill does not convert joint attention).")
    shapes = {r: cost_model.layer_shapes(m.meta, m.info["vae_scale_factor"], r, kspec) for r in resolutions}

    if flops:
        for r in resolutions:
            layers = shapes[r]
            rep = _representative(layers)
            totals = cost_model.model_flops(layers, gate=GATE)
            one = {op: cost_model.operator_flops(op, rep, gate=GATE) for op in cost_model.OPERATORS}
            for op in cost_model.OPERATORS:
                res.flops.append({
                    "model": m.spec.alias, "resolution": r, "grid": f"{rep.grid[0]}x{rep.grid[1]}", "tokens": rep.tokens,
                    "dim": rep.dim, "kernel_size": rep.kernel_size, "operator": op,
                    "layer_flops": one[op].total, "layer_matmul_flops": one[op].matmul,
                    "total_flops": totals[op].total, "n_layers": len(layers),
                    "sa_over_op": totals["self_attention"].total / totals[op].total,
                })
            res.flops.append({
                "model": m.spec.alias, "resolution": r, "grid": f"{rep.grid[0]}x{rep.grid[1]}", "tokens": rep.tokens,
                "dim": rep.dim, "kernel_size": rep.kernel_size, "operator": "self_attention_paper_formula",
                "layer_flops": cost_model.paper_attention_flops(rep.tokens, rep.dim), "layer_matmul_flops": None,
                "total_flops": sum(cost_model.paper_attention_flops(la.tokens, la.dim) for la in layers),
                "n_layers": len(layers), "sa_over_op": None,
            })
            for la in layers:
                for op in cost_model.OPERATORS:
                    res.layers.append({"resolution": r, "layer": la.name, "label": la.label,
                                       "grid": f"{la.grid[0]}x{la.grid[1]}", "dim": la.dim, "heads": la.heads,
                                       "kernel_size": la.kernel_size, "operator": op,
                                       "flops": cost_model.operator_flops(op, la, gate=GATE).total})
    if latency:
        _latency(m, res, shapes, kspec, resolutions, repeats, warmup, device, tdtype, backend, triton_ok,
                 max_seconds, step, say)
    return res


def _latency(m, res, shapes, kspec, resolutions, repeats, warmup, device, tdtype, backend, triton_ok,
             max_seconds, step, say):
    from diffusers.models.attention_processor import Attention

    from deltadistill.block import DeltaConvBlock

    say("calibrating")
    est = _Estimator(device, tdtype)
    res.meta["matmul_gflops_per_s"] = round(est.base / 1e9, 1)
    ops_to_time = ["self_attention", "deltaconv"]
    if triton_ok and backend in ("auto", "triton"):
        ops_to_time.append("deltaconv_triton")
    cpu_ok = torch.device(device).type == "cpu" and tdtype == torch.float32 and cpu_kernel.available()
    if cpu_ok and backend in ("auto", "cpu"):
        ops_to_time.append("deltaconv_cpu")
    if backend in ("triton", "cpu"):
        ops_to_time.remove("deltaconv")
    ops_to_time.append("linear_attention")
    if not triton_ok:
        res.notes.append("Triton ΔConvBlock not timed: needs a CUDA device with Triton (this run: "
                         f"{res.meta['device']}).")
    torch.manual_seed(0)
    for r in resolutions:
        rep = _representative(shapes[r])
        h, w = rep.grid
        base = {"model": m.spec.alias, "resolution": r, "tokens": rep.tokens, "grid": f"{h}x{w}", "dim": rep.dim,
                "kernel_size": rep.kernel_size, "scope": "module", "repeats": repeats}
        times = {}
        for op in ops_to_time:
            analytic = cost_model.operator_flops("deltaconv" if op.startswith("deltaconv") else op, rep, gate=GATE).total
            row = {**base, "operator": op, "backend": _OP_BACKEND.get(op, "reference"),
                   "ms_median": None, "ms_min": None, "peak_mb": None, "speedup_vs_sa": None, "floor_ms": None,
                   "note": ""}
            guess = est.seconds(op, analytic)
            if guess > max_seconds:
                row["note"] = f"skipped: est. {guess:.1f} s/call > --max-seconds {max_seconds:g}"
                res.latency.append(row)
                continue
            say(f"{r}px: {op}")
            try:
                if op == "self_attention":
                    mod = Attention(rep.dim, heads=rep.heads, dim_head=rep.head_dim, bias=rep.qkv_bias,
                                    out_bias=rep.out_bias)
                    x = torch.randn(1, rep.tokens, rep.dim)  # [B, N, C]
                elif op.startswith("deltaconv"):
                    mod = DeltaConvBlock(rep.dim, rep.kernel_size, **TOOLKIT_BLOCK,
                                         backend=_OP_BACKEND.get(op, "reference"))
                    with torch.no_grad():  # random weights everywhere (proj_out starts at zero)
                        for p in mod.parameters():
                            p.normal_(0, 0.02)
                    x = torch.randn(1, h, w, rep.dim)  # [B, H, W, C]
                else:
                    mod = GeneralizedLinearAttention(rep.dim, rep.heads, rep.inner, rep.qkv_bias, rep.out_bias)
                    x = torch.randn(1, rep.tokens, rep.dim)  # [B, N, C]
                mod = mod.to(device=device, dtype=tdtype).eval()
                x = x.to(device=device, dtype=tdtype)
                t = time_callable(lambda: mod(x), repeats=repeats, warmup=warmup, device=device)
                est.update(op, analytic, t.median / 1e3)
                mem = peak_memory_bytes(lambda: mod(x), device, known=[x, *mod.parameters(), *mod.buffers()])
                row.update(ms_median=t.median, ms_min=t.min, peak_mb=mem / 2**20)
                if op.startswith("deltaconv"):
                    row["floor_ms"] = _projection_floor(mod, x, repeats, warmup, device)
                times[op] = t.median
            except (RuntimeError, MemoryError) as exc:  # OOM or a kernel failure: record, go on
                row["note"] = f"failed: {str(exc).splitlines()[0][:120]}"
            res.latency.append(row)
        for row in res.latency:
            if row["resolution"] == r and row["scope"] == "module" and row["ms_median"] and "self_attention" in times:
                row["speedup_vs_sa"] = times["self_attention"] / row["ms_median"]
    if step:
        _step_latency(m, res, kspec, resolutions, repeats, warmup, device, tdtype, est, max_seconds, say, backend)



def _projection_floor(block, x, repeats, warmup, device) -> float:
    """Median ms of the block's 1×1 projections alone (proj_in, proj_out) at x's full shape: the matmul
    floor of the block as the paper writes it. The block projects its coarse stages at their own
    resolution (3/16 fewer projection FLOPs for scales (1, ½)), so it can come slightly under it;
    the depth-wise stages, gates and resizing are what it adds on top."""
    import torch.nn.functional as F

    tokens = x.reshape(-1, x.shape[-1])
    mid = torch.randn(tokens.shape[0], block.proj_out.in_features, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        t = time_callable(lambda: (F.linear(tokens, block.proj_in.weight, block.proj_in.bias),
                                   F.linear(mid, block.proj_out.weight, block.proj_out.bias)),
                          repeats=repeats, warmup=warmup, device=device)
    return t.median


def _build_step_models(m, res, kspec, device, tdtype):
    """(teacher, student or None): the loaded denoiser, or random weights built in ``tdtype`` directly."""
    from attnprobe.core.family import denoiser_of

    from deltadistill.conversion import convert

    from attnprobe.core import registry

    if m.pipe is None and registry.weights_available(m.spec):  # real weights in the HF cache
        m.pipe, _ = registry.load_pipeline(m.name, dtype=tdtype, device=device)
    if m.pipe is not None:
        teacher = denoiser_of(m.pipe)
    else:
        import diffusers

        res.notes.append(f"whole step of {m.spec.alias} uses random weights (no weights cached here): "
                         "costs are real, outputs meaningless.")
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(tdtype)  # allocate in the target dtype: no fp32 copy of a large model
        try:
            with torch.device(device):
                teacher = getattr(diffusers, m.info["class"]).from_config(m.info["config"])
        finally:
            torch.set_default_dtype(previous)
    if any(p.dtype != tdtype or p.device.type != torch.device(device).type for p in teacher.parameters()):
        teacher = teacher.to(device=device, dtype=tdtype)
    teacher = teacher.eval()
    student = None
    if m.family.convertible:
        student = convert(copy.deepcopy(teacher), kspec).eval()
        with torch.no_grad():  # trained-looking blocks: proj_out starts at zero
            for mod in student.modules():
                if hasattr(mod, "block"):
                    mod.block.proj_out.weight.normal_(0, 0.02)
    return teacher, student


def _step_latency(m, res, kspec, resolutions, repeats, warmup, device, tdtype, est, max_seconds, say, backend="auto"):
    from attnprobe.core import backends

    teacher = student = None
    n_params = sum(p.numel() for p in m.meta.parameters())
    weight_bytes = n_params * torch.tensor([], dtype=tdtype).element_size()
    convertible = m.family.convertible
    if m.pipe is None:  # real weights (if cached) or random ones: the same bytes
        need = weight_bytes * (2 if convertible else 1) * 1.25  # teacher (+ student) + activations headroom
        if need > _available_bytes(device):
            res.notes.append(f"whole step not timed: {m.spec.alias}'s "
                             f"teacher{' + student' if convertible else ''} ({need / 2**30:.1f} GiB) does not fit in "
                             f"{torch.device(device).type} memory.")
            return
    for r in resolutions:
        base = {"model": m.spec.alias, "resolution": r, "tokens": None, "grid": "", "dim": None, "kernel_size": None,
                "scope": "step", "repeats": repeats, "ms_min": None, "ms_median": None, "peak_mb": None,
                "speedup_vs_sa": None, "backend": "sdpa"}
        rows = [{**base, "operator": "teacher_step", "note": ""}]
        if convertible:  # the student's blocks run the --backend path (auto: what they take when sampling)
            with torch.no_grad():
                probe = torch.empty(1, 1, 1, 2, device=device, dtype=tdtype)
                chosen = backends.resolve("stage", probe, None if backend == "auto" else backend)
            rows.append({**base, "operator": "student_step", "note": "", "backend": chosen})
        try:
            step_flops = meta_step_flops(m, r)
            guess = est.seconds("step", step_flops)
            skip = f"skipped: est. {guess:.1f} s/call > --max-seconds {max_seconds:g}" if guess > max_seconds else ""
        except Exception as exc:  # the forward does not run on meta: only small, loaded models are timed blindly
            step_flops = 0
            skip = "" if m.pipe is not None else f"skipped: cannot estimate the step cost ({type(exc).__name__})"
        if skip:
            for row in rows:
                row["note"] = skip
            res.latency.extend(rows)
            continue
        if teacher is None:
            say("building teacher and student")
            try:
                teacher, student = _build_step_models(m, res, kspec, device, tdtype)
                for mod in (student.modules() if student is not None else ()):
                    if hasattr(mod, "backend") and hasattr(mod, "stages"):  # a ΔConvBlock
                        mod.backend = None if backend == "auto" else backend
            except (RuntimeError, MemoryError) as exc:
                for row in rows:
                    row["note"] = f"failed to build: {str(exc).splitlines()[0][:120]}"
                res.latency.extend(rows)
                return
        kw = denoiser_inputs(m, r, device, tdtype)
        known = [t for t in tree_leaves(kw) if isinstance(t, torch.Tensor)]
        t_teacher = None
        for row, net in zip(rows, (teacher, student)):
            say(f"{r}px: {row['operator']}")
            try:
                t = time_callable(lambda: net(**kw), repeats=repeats, warmup=warmup, device=device)
                mem = peak_memory_bytes(lambda: net(**kw), device, known=[*known, *net.parameters(), *net.buffers()])
                row.update(ms_median=t.median, ms_min=t.min, peak_mb=mem / 2**20)
                if row["operator"] == "teacher_step":
                    t_teacher = t.median
                    if step_flops:
                        est.update("step", step_flops, t.median / 1e3)
                elif t_teacher:
                    row["speedup_vs_sa"] = t_teacher / t.median
            except (RuntimeError, MemoryError) as exc:
                row["note"] = f"failed: {str(exc).splitlines()[0][:120]}"
        if len(rows) == 1:
            rows[0]["note"] = "joint attention: no student (not convertible)"
        res.latency.extend(rows)


