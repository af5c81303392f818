"""Per-step metrics, model FLOPs utilisation (MFU) and where they are written.

Definitions of the `metrics.jsonl` fields built by `step_record` (one record per logged step):

* `tokens_per_s  = tokens / step_time_s` -- global throughput: `tokens` are all tokens trained in
  the step over every data-parallel rank, `step_time_s` the wall time of the whole optimizer step.
* `tflops        = flops_palm / step_time_s / world_size / 1e12` -- achieved TFLOP/s of ONE device.
* `mfu           = flops_palm / step_time_s / (world_size * peak_flops_per_device)` -- a fraction
  (0.4 means 40 %), normally in [0, 1]; above 1 means the peak is wrong, not that the run is fast.
* `tflops_exact`, `mfu_exact` -- the same with `flops_exact`.

`flops_palm` / `flops_exact` are the training FLOPs of the whole global step (see
`runtime.flops`: PaLM appendix B convention / exact packed causal count); `world_size` is every
device that shared the work, whatever the mix of data, tensor, pipeline and context parallelism.
MFU follows PaLM's definition (Chowdhery et al. 2022, appendix B): model FLOPs, i.e. without the
recomputation of activation checkpointing, over the dense peak of the hardware.

Only rank 0 builds a `MetricsWriter`; other ranks compute nothing here. Nothing is cached at module
level: `device_peak_flops` measures each time it is called, so call it once at start-up.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from typing import Any

import torch
from tqdm import tqdm

from loomtrain.errors import LoomError

# Dense (no 2:4 sparsity) peak FLOP/s per GPU, from the NVIDIA datasheets: "NVIDIA H100 Tensor Core
# GPU" (SXM / PCIe / NVL columns), "NVIDIA H200 Tensor Core GPU", "NVIDIA A100 Tensor Core GPU".
# The datasheets print tensor-core numbers "with sparsity"; the dense figure is half of that.
# fp32 = plain (non-tensor-core) FP32, what a float32 matmul runs at unless TF32 is allowed.
# Rows are matched in order as case-insensitive substrings of torch.cuda.get_device_name().
_GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100", {"bf16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),  # SXM5 ("H100 80GB HBM3")
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),  # SXM4 and PCIe alike
)


def _dtype_key(dtype: torch.dtype) -> str | None:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return None


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best-of-a-few FLOP/s of a dense square matmul: a practical peak where no datasheet applies.

    1024^3 on CPU (a ~2 GFLOP product, tens of ms), 8192^3 on an unknown GPU; stops after
    0.5 s of timed work so start-up stays under a second even on a slow CPU bf16 path.
    """
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)  # warm-up: kernel selection, thread pool start
    sync()
    best = math.inf
    spent = 0.0
    for _ in range(5):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        spent += elapsed
        if spent > 0.5:
            break
    return 2.0 * n ** 3 / max(best, 1e-9)


def device_peak_flops(device: torch.device, dtype: torch.dtype,
                      override_tflops: float | None) -> tuple[float, str]:
    """Peak dense FLOP/s of ONE device at `dtype` and where the number came from.

    `override_tflops` (train.peak_tflops) wins -> "config". A known CUDA GPU -> its datasheet peak,
    labelled with the matched row. CPU or an unknown GPU -> a measured matmul -> "measured".
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise LoomError(f"train.peak_tflops={override_tflops}: must be positive (TFLOP/s of one device)")
        return float(override_tflops) * 1e12, "config"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        key = _dtype_key(dtype)
        for pattern, peaks in _GPU_PEAKS:
            if pattern.lower() in name.lower() and key in peaks:
                return peaks[key], f"datasheet: {pattern} {key}"
    return _measure_matmul_flops(device, dtype), "measured"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): CUDA max_memory_allocated, otherwise the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return rss * scale / 1e9


def step_record(*, step: int, loss: float, grad_norm: float | None, lr: float, tokens: int,
                step_time_s: float, flops_palm: float, flops_exact: float | None, world_size: int,
                peak_flops_per_device: float, peak_mem_gb: float, **extra: Any) -> dict:
    """One metrics.jsonl record; the definitions are in the module docstring."""
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be positive, got {step_time_s}")
    if world_size < 1 or peak_flops_per_device <= 0:
        raise ValueError(f"need world_size >= 1 and a positive peak, got {world_size}, {peak_flops_per_device}")

    def achieved(flops: float | None) -> tuple[float | None, float | None]:
        if flops is None:
            return None, None
        per_device = flops / step_time_s / world_size
        return per_device / 1e12, per_device / peak_flops_per_device

    tflops, mfu = achieved(flops_palm)
    tflops_exact, mfu_exact = achieved(flops_exact)
    record = {
        "step": int(step),
        "loss": float(loss),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "lr": float(lr),
        "tokens": int(tokens),
        "step_time_s": float(step_time_s),
        "tokens_per_s": tokens / step_time_s,
        "tflops": tflops,
        "tflops_exact": tflops_exact,
        "mfu": mfu,
        "mfu_exact": mfu_exact,
        "peak_mem_gb": float(peak_mem_gb),
    }
    record.update(extra)
    return record


def _plain(value: Any) -> Any:
    """JSON-safe value: tensors/numpy scalars -> Python numbers, NaN/inf -> null (strict JSON)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class MetricsWriter:
    """Rank 0's sink: metrics.jsonl (append, flushed per line), TensorBoard scalars, a tqdm bar.

    Append mode + a flush per line means a crash loses at most the step being written and a
    resumed run continues the same file. `step` is the number of the optimizer step just
    finished, counted from 1, so the bar (which starts at `start_step`) shows steps done.
    """

    def __init__(self, output_dir: str, *, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int = 0) -> None:
        self.output_dir = str(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._start = time.perf_counter()
        self._records: list[dict] = []
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is optional: warn (once, here) and go on
                warnings.warn(f"TensorBoard logging disabled ({exc}); `pip install tensorboard` to enable it",
                              stacklevel=2)
            else:
                self._tb = SummaryWriter(log_dir=os.path.join(self.output_dir, "tb"))
        self._bar = None
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        """Append one record as a JSON line, mirror its numbers to TensorBoard, advance the bar."""
        record = _plain(dict(record))
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self._records.append(record)
        step = int(record.get("step", len(self._records)))
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            postfix = {}
            if record.get("loss") is not None:
                postfix["loss"] = f"{record['loss']:.4f}"
            if record.get("tokens_per_s") is not None:
                postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if record.get("mfu") is not None:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self, *, checkpoint: str | None = None, total_time_s: float | None = None) -> str:
        """End-of-run block: losses, throughput and MFU (first logged step excluded as warm-up),
        peak memory, wall time and where the metrics and checkpoints are."""
        recs = self._records
        elapsed = time.perf_counter() - self._start if total_time_s is None else total_time_s
        lines = ["loomtrain run summary"]
        if not recs:
            lines.append("  no steps logged")
        else:
            steady = recs[1:] or recs  # the first step pays for compilation, allocation, warm caches

            def values(key: str) -> list[float]:
                return [r[key] for r in steady if isinstance(r.get(key), (int, float))]

            def fmt(value: Any, spec: str) -> str:
                return "n/a" if value is None else format(value, spec)

            lines.append(f"  steps        {recs[0].get('step')} .. {recs[-1].get('step')} ({len(recs)} logged)")
            lines.append(f"  loss         first {fmt(recs[0].get('loss'), '.4f')}  final {fmt(recs[-1].get('loss'), '.4f')}")
            lines.append(f"  tokens/s     {fmt(_mean(values('tokens_per_s')), ',.0f')} (mean, first step excluded)")
            mfu, mfu_exact = _mean(values("mfu")), _mean(values("mfu_exact"))
            lines.append(f"  MFU          {fmt(None if mfu is None else 100 * mfu, '.2f')}% PaLM, "
                         f"{fmt(None if mfu_exact is None else 100 * mfu_exact, '.2f')}% exact (mean)")
            mem = [r["peak_mem_gb"] for r in recs if isinstance(r.get("peak_mem_gb"), (int, float))]
            lines.append(f"  peak memory  {fmt(max(mem) if mem else None, '.2f')} GB")
        lines.append(f"  total time   {elapsed:.1f} s")
        lines.append(f"  metrics      {self.path}")
        if checkpoint:
            lines.append(f"  checkpoint   {checkpoint}")
        return "\n".join(lines)


def plot_metrics(metrics_jsonl: str, out_png: str) -> str:
    """Draw loss, tokens/s and MFU against step into `out_png` (matplotlib, Agg); returns the path.

    A resumed run may log a step twice; the later record wins.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LoomError("plotting metrics needs matplotlib: pip install matplotlib") from None
    if not os.path.isfile(metrics_jsonl):
        raise LoomError(f"no metrics file at {metrics_jsonl}")
    by_step: dict[int, dict] = {}
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise LoomError(f"{metrics_jsonl}:{lineno}: not a JSON line") from None
            by_step[int(rec["step"])] = rec
    if not by_step:
        raise LoomError(f"{metrics_jsonl} holds no records to plot")
    steps = sorted(by_step)
    fig = Figure(figsize=(7, 8))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend switch
    panels = (("loss", "loss", 1.0), ("tokens_per_s", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0))
    for i, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(3, 1, i + 1)
        pts = [(s, by_step[s][key] * scale) for s in steps if isinstance(by_step[s].get(key), (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png
