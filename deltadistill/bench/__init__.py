"""``deltadistill bench``: FLOPs and latency of self-attention vs its replacements (SPEC §5).

For a model (alias, local folder, tiny-* or demo) and a list of square resolutions the bench
reports, side by side in one run:

* **FLOPs** (:mod:`deltadistill.flops`, analytic, 1 multiply-add = 2 FLOPs) of softmax
  self-attention, the ΔConvBlock that replaces it (the model's kernel sizes: one ``--kernel-size``
  or per layer from ``--erf-report``), a K×K neighbourhood attention and a LinFusion-form linear
  attention — for the largest-grid layer and summed over all self-attention layers.
* **Latency** of one module at the model's largest-grid layer: diffusers ``Attention`` with SDPA
  (random weights, the layer's dims) vs the ΔConvBlock (PyTorch reference path, and the Triton path
  when available) vs :class:`GeneralizedLinearAttention`; and of one whole denoiser call of the
  teacher vs the converted student. Times are medians over ``--repeats`` calls after ``--warmup``
  calls, with the device synchronised around each call. Peak memory beside each time: CUDA
  ``max_memory_allocated`` above the pre-call level on GPU; on CPU the peak bytes of tensors
  allocated during the call (:class:`LiveTensorBytes`, a dispatch mode: tracemalloc cannot see
  PyTorch's allocator, and process RSS is blurred by the allocator's caching and other threads).

Timing cases that would take too long are skipped, not run: the expected seconds per call are
estimated as analytic FLOPs / a FLOP rate (first from a matmul calibration, then from the previous
resolution's measurement of the same operator), and cases above ``--max-seconds`` are listed with
"skipped" and the estimate. Whole-step timing uses the real denoiser where a builder or weights
exist (tiny-*, demo, local folders, Hub weights already in the cache); for the other config-only
aliases (pixart, sd15, ...) it builds the denoiser with random weights — costs are the same — but
only when teacher + student fit in memory and the estimated step time (FlopCounterMode on the meta
device / the measured rate) is within the limit. Joint-attention models (FLUX, SD3) have no
student. CPU timings of a machine shared with other jobs are noisy: the run records the load
average, and ``--threads`` pins PyTorch's thread count.
"""
from deltadistill.bench.cli import bench, register
from deltadistill.bench.linear_attention import GeneralizedLinearAttention
from deltadistill.bench.measure import LiveTensorBytes, Timing, peak_memory_bytes, time_callable
from deltadistill.bench.runner import BenchResult, run_bench
from deltadistill.bench.tables import flops_table_rows, latency_table_rows, print_result, write_outputs

__all__ = [
    "GeneralizedLinearAttention",
    "Timing",
    "time_callable",
    "LiveTensorBytes",
    "peak_memory_bytes",
    "BenchResult",
    "run_bench",
    "flops_table_rows",
    "latency_table_rows",
    "print_result",
    "write_outputs",
    "bench",
    "register",
]
