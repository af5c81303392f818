"""Predicted time and memory of one sequence on a Ulysses sequence-parallel group of degree d.

The heterogeneous planner needs to compare "this 40K-token sequence on 4 GPUs" with "on 8 GPUs"
and with "ten 4K sequences packed on one GPU", thousands of times per training step, so the model
is a closed form with a handful of coefficients rather than a simulator:

    time(L, d) = attention_flops(L) / d / attn_rate        causal: ~L^2
               + matmul_flops(L) / d / matmul_rate          everything else: ~L
               + all_to_all_bytes(L, d) / bandwidth(d)      0 at d = 1
               + all_to_all_calls * latency(d)              per group and micro-step, not per sequence

FLOPs follow Megatron-LM's accounting (Narayanan et al. 2021, sec. 5.1; also `models/flops.py`):
forward = 2 * matmul_params per token, plus per layer 2 * hidden * L^2 for the two causal attention
matmuls; backward = 2x forward; full activation recomputation adds one more forward.
Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses") does four all-to-alls per layer in the forward
pass (q, k, v to head-sharded, the output back), each moving the rank's L/d tokens x (its share of)
hidden; the backward pass runs the same four in reverse, recomputation repeats the forward ones.
A rank sends (d-1)/d of its share to the others; for an aligned group that spans nodes
(d > gpus_per_node) the part bound for other nodes goes over the NIC, the rest over NVLink; the two
are added (conservative, and it keeps the model linear in its coefficients for `calibrate`).

Memory per token follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): ~34 * hidden bytes per token per layer in bf16 with a flash-attention kernel
(no L^2 score matrix); with full recomputation only each layer's 2 * hidden input stays, plus one
layer's working set during its recomputation. Add the logits (bf16 + their fp32 upcast in the loss).

Defaults: Llama-2-7B (hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000) on 8-GPU H100 SXM
nodes. Every hardware number is an assumption to be replaced by `calibrate` on the real machine:
400 TFLOP/s achieved bf16 (40% of the 989 TFLOP/s dense peak on NVIDIA's H100 datasheet, a typical
MFU for 7B training); 300 GB/s effective all-to-all bandwidth per GPU over NVLink 4 (450 GB/s per
direction line rate); 25 GB/s per GPU between nodes (one 400 Gb/s NIC per GPU is 50 GB/s line rate,
and an all-to-all across nodes gets about half of it); 80 GB of HBM of which 8 GB are lost to the
CUDA context, NCCL buffers and fragmentation, and 2.5 GB of ZeRO-3 model state (16 bytes per
parameter over 64 shards, plus two gathered bf16 layers). The micro-step overhead is the part of
FSDP's traffic no compute can hide (the first layer's all-gather, the last one's reduce-scatter:
two 400 MB bf16 layers at 25 GB/s, ~30 ms) plus launches. Recomputation is off by default (the
faster setting where memory allows); turning it on raises the capacity ~8x, which shrinks the
degree a static plan needs and with it what heterogeneous planning gains (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from loomtrain.errors import ConfigError

_HF_KEYS = {  # HF config field -> CostModel field (llama/qwen2/mistral names, then gpt2's)
    "hidden_size": "hidden", "n_embd": "hidden",
    "num_hidden_layers": "layers", "n_layer": "layers",
    "num_attention_heads": "heads", "n_head": "heads",
    "num_key_value_heads": "kv_heads",
    "intermediate_size": "ffn", "n_inner": "ffn",
    "vocab_size": "vocab",
}


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the cost model. Times are seconds, rates per second, sizes in bytes/GB."""

    # model geometry (Llama-2-7B)
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    ffn: int = 11008
    vocab: int = 32000
    gated_mlp: bool = True  # SwiGLU: three ffn x hidden matrices instead of two
    recompute: bool = False  # full activation checkpointing of every block
    # compute (achieved, not peak)
    matmul_flops_per_s: float = 400e12
    attn_flops_per_s: float = 400e12
    # all-to-all (Ulysses)
    gpus_per_node: int = 8
    intra_bw: float = 300e9  # bytes/s per GPU, effective all-to-all inside a node
    inter_bw: float = 25e9  # bytes/s per GPU, effective all-to-all across nodes
    intra_latency: float = 15e-6  # s per all-to-all call inside a node
    inter_latency: float = 40e-6  # s per all-to-all call across nodes
    a2a_per_layer: int = 4  # forward: q, k, v in, output back
    bytes_per_elem: int = 2  # bf16 activations
    # memory
    gpu_mem_gb: float = 80.0
    reserved_gb: float = 8.0
    state_gb: float = 2.5
    act_bytes_per_hidden: float = 34.0  # per token, per layer, per hidden unit (Korthikanti et al.)
    logit_bytes: float = 6.0  # per token per vocab entry: bf16 logits + fp32 copy in the loss
    # per micro-step, whatever the plan
    step_overhead_s: float = 0.03

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"cost model: {f.name}={v!r} must be a finite non-negative number")
        for name in ("hidden", "layers", "heads", "kv_heads", "vocab", "matmul_flops_per_s",
                     "attn_flops_per_s", "intra_bw", "inter_bw", "gpus_per_node", "bytes_per_elem",
                     "act_bytes_per_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"cost model: {name}={getattr(self, name)!r} must be positive")
        g = self.gpus_per_node
        if int(g) != g or int(g) & (int(g) - 1):
            raise ConfigError(f"cost model: gpus_per_node={g} must be a power of two "
                              "(aligned groups must not straddle a node boundary)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "CostModel | None" = None) -> "CostModel":
        """`base` (default: the H100 defaults) with the given fields replaced; unknown keys are errors."""
        base = base or cls()
        names = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for key, value in values.items():
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"cost model: unknown coefficient '{key}'{hint}")
            want = type(getattr(base, key))
            if want is bool:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and want is int and float(value) != int(value):
                    ok = False
            if not ok:
                raise ConfigError(f"cost model: {key}={value!r} must be {want.__name__}")
            out[key] = want(value)
        return dataclasses.replace(base, **out)

    @classmethod
    def from_json(cls, text_or_path: str, base: "CostModel | None" = None) -> "CostModel":
        """An inline JSON object (`'{"inter_bw": 50e9}'`) or the path of a JSON file holding one."""
        src = text_or_path.strip()
        if not src.startswith("{"):
            if not os.path.isfile(src):
                raise ConfigError(f"cost model: no such JSON file: {src}")
            with open(src, encoding="utf-8") as fh:
                src = fh.read()
        try:
            values = json.loads(src)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"cost model: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(values, dict):
            raise ConfigError("cost model: the JSON must be an object of coefficient: value")
        return cls.from_dict(values, base)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "CostModel":
        """Geometry from a run's `Config` (`model.config.*` HF keys) or an HF config/mapping.

        Fields the config does not set keep the 7B defaults; `overrides` win over both. Only plain
        fields are read, so no model (and no torch) is built.
        """
        model_cfg = getattr(getattr(cfg, "model", None), "config", None)
        source = model_cfg if model_cfg is not None else cfg
        if not isinstance(source, Mapping):
            source = getattr(source, "to_dict", lambda: vars(source))()
        values: dict = {}
        for hf_key, name in _HF_KEYS.items():
            if source.get(hf_key) is not None:
                values[name] = int(source[hf_key])
        if "heads" in values and "kv_heads" not in values:
            values["kv_heads"] = values["heads"]
        if "hidden" in values and "ffn" not in values:
            values["ffn"] = 4 * values["hidden"]
        arch = getattr(getattr(cfg, "model", None), "architecture", None) or source.get("model_type")
        if arch == "gpt2":
            values["gated_mlp"] = False
        if getattr(getattr(cfg, "parallel", None), "activation_checkpointing", "none") != "none":
            values["recompute"] = True
        peak = getattr(getattr(cfg, "train", None), "peak_tflops", None)
        if peak:  # a peak, not what training achieves: assume the same 40% as the H100 default
            values["matmul_flops_per_s"] = values["attn_flops_per_s"] = 0.4 * peak * 1e12
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def for_run(cls, cfg: Any, hf_config: Any) -> "CostModel":
        """The cost model of a training run: geometry from the model's HF config (all of it, not
        only the fields the run overrides), recomputation from `parallel.activation_checkpointing`,
        the compute rate from `train.peak_tflops` when set, then the user's coefficients from
        `parallel.hetero_cost_model` (a mapping, inline JSON or a JSON file) on top."""
        values: dict = {}
        if cfg.parallel.activation_checkpointing != "none":
            values["recompute"] = True
        if cfg.train.peak_tflops:  # a peak, not what training achieves: assume 40% as the default does
            values["matmul_flops_per_s"] = values["attn_flops_per_s"] = 0.4 * cfg.train.peak_tflops * 1e12
        model = cls.from_config(hf_config, **values)
        coeffs = cfg.parallel.hetero_cost_model
        if isinstance(coeffs, str):
            return cls.from_json(coeffs, base=model)
        if coeffs:
            return cls.from_dict(coeffs, base=model)
        return model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ the model
    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @property
    def matmul_params(self) -> int:
        """Weights multiplied once per token: attention projections, MLP, lm_head."""
        attn = self.hidden * (2 * self.hidden + 2 * self.kv_dim)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.ffn
        return self.layers * (attn + mlp) + self.hidden * self.vocab

    @property
    def passes(self) -> int:
        """Forward-equivalents per step: forward + backward (2x) [+ recomputed forward]."""
        return 3 + int(self.recompute)

    def attn_flops(self, length):
        """Causal attention FLOPs of one sequence, forward + backward (+ recompute)."""
        length = np.asarray(length, dtype=np.float64)
        return self.passes * 2.0 * self.hidden * self.layers * length * (length + 1)

    def matmul_flops(self, length):
        return self.passes * 2.0 * self.matmul_params * np.asarray(length, dtype=np.float64)

    @property
    def a2a_calls(self) -> int:
        """All-to-all calls per micro-step of a group: per layer, forward + backward (+ recompute)."""
        return self.layers * self.a2a_per_layer * (2 + int(self.recompute))

    def _a2a_bytes_per_token(self) -> float:
        """Bytes one token contributes to the four forward all-to-alls of one layer (q, k, v, o)."""
        return (2 * self.hidden + 2 * self.kv_dim) * self.bytes_per_elem

    def comm_split(self, degree: int) -> tuple[float, float]:
        """Seconds per sequence token on one rank of a degree-d group: (NVLink part, NIC part)."""
        if degree <= 1:
            return 0.0, 0.0
        local = min(degree, self.gpus_per_node)
        per_token = self._a2a_bytes_per_token() * self.layers * (2 + int(self.recompute)) / degree
        return (per_token * (local - 1) / degree / self.intra_bw,
                per_token * (degree - local) / degree / self.inter_bw)

    def group_overhead(self, degree: int) -> float:
        """Fixed time of a non-empty group per micro-step: all-to-all latency (0 for one rank)."""
        if degree <= 1:
            return 0.0
        lat = self.intra_latency if degree <= self.gpus_per_node else self.inter_latency
        return self.a2a_calls * lat

    def seq_times(self, lengths, degree: int) -> np.ndarray:
        """Variable time of each sequence on a degree-d group (without `group_overhead`)."""
        lengths = np.asarray(lengths, dtype=np.float64)
        compute = (self.attn_flops(lengths) / self.attn_flops_per_s
                   + self.matmul_flops(lengths) / self.matmul_flops_per_s) / degree
        intra, inter = self.comm_split(degree)
        return compute + lengths * (intra + inter)

    def seq_time(self, length: int, degree: int) -> float:
        """Predicted seconds (fwd+bwd) of one sequence alone on an aligned group of degree d."""
        return float(self.seq_times([length], degree)[0]) + self.group_overhead(degree)

    def group_time(self, lengths: Iterable[int], degree: int) -> float:
        """Predicted seconds of a group running these sequences packed in one micro-step."""
        lengths = list(lengths)
        if not lengths:
            return 0.0
        return float(self.seq_times(lengths, degree).sum()) + self.group_overhead(degree)

    @property
    def act_bytes_per_token(self) -> float:
        per_layer = self.act_bytes_per_hidden * self.hidden
        if self.recompute:  # stored block inputs + one block live during its recomputation
            acts = self.layers * self.bytes_per_elem * self.hidden + per_layer
        else:
            acts = self.layers * per_layer
        return acts + self.logit_bytes * self.vocab

    def max_tokens_per_gpu(self) -> int:
        """Per-GPU token capacity: memory left after reserve and model state, over bytes per token."""
        free = (self.gpu_mem_gb - self.reserved_gb - self.state_gb) * 1e9
        return max(0, int(free // self.act_bytes_per_token))

    # ------------------------------------------------------------------ printing
    def describe(self, lengths=(4096, 32768, 262144), degrees=(1, 8, 16, 64),
                 capacity: int | None = None) -> str:
        """Human-readable coefficients and predicted times ('oom': over `capacity` per GPU)."""
        cap = capacity or self.max_tokens_per_gpu()
        s = self
        lines = [
            "cost model (Ulysses SP; time of one sequence, forward + backward, on an aligned group):",
            f"  model       hidden {s.hidden}, layers {s.layers}, heads {s.heads}/{s.kv_heads} kv,"
            f" ffn {s.ffn}, vocab {s.vocab}: {s.matmul_params / 1e9:.2f}e9 matmul params;"
            f" recompute {'on' if s.recompute else 'off'}",
            f"  compute     {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s matmul,"
            f" {self.attn_flops_per_s / 1e12:.0f} TFLOP/s attention (achieved)",
            f"  all-to-all  {self.a2a_per_layer}/layer x {2 + int(self.recompute)} passes;"
            f" <= {s.gpus_per_node} GPUs: {s.intra_bw / 1e9:.0f} GB/s, {s.intra_latency * 1e6:.0f} us;"
            f" across nodes: {s.inter_bw / 1e9:.0f} GB/s, {s.inter_latency * 1e6:.0f} us",
            f"  memory      {s.gpu_mem_gb:g} GB - {s.reserved_gb:g} reserved - {s.state_gb:g} model state;"
            f" {s.act_bytes_per_token / 1e6:.2f} MB/token -> {s.max_tokens_per_gpu():,} tokens per GPU",
            f"  micro-step  {self.step_overhead_s * 1e3:.0f} ms fixed",
            "  predicted seconds  " + "".join(f"{'d=' + str(d):>10}" for d in degrees),
        ]
        for length in lengths:
            row = "".join(f"{'oom':>10}" if -(-length // d) > cap else f"{s.seq_time(length, d):>10.4g}"
                          for d in degrees)
            lines.append(f"  {'L=' + format(length, ','):>17}  {row}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


# ---------------------------------------------------------------------- calibration
_FIT = ("attn_flops_per_s", "matmul_flops_per_s", "intra_bw", "inter_bw", "intra_latency",
        "inter_latency")


def _features(model: CostModel, length: float, degree: int) -> np.ndarray:
    """Row x with time = x @ theta, theta = (1/attn rate, 1/matmul rate, 1/intra bw, 1/inter bw,
    intra latency, inter latency)."""
    base = dataclasses.replace(model, intra_bw=1.0, inter_bw=1.0)
    intra, inter = base.comm_split(degree)
    calls = model.a2a_calls if degree > 1 else 0
    cross = degree > model.gpus_per_node
    return np.array([float(model.attn_flops(length)) / degree,
                     float(model.matmul_flops(length)) / degree,
                     length * intra, length * inter,
                     0.0 if cross else calls, calls if cross else 0.0])


def calibrate(samples: Iterable[tuple[int, int, float]], base: CostModel | None = None) -> CostModel:
    """Fit the rates, bandwidths and latencies to measured `(length, degree, seconds)` samples.

    Relative least squares (each row divided by its measured time, so a 1K and a 1M sample weigh
    the same). Only coefficients the samples exercise are fitted: without a sample across nodes
    the inter-node bandwidth stays `base`'s. A fitted value that comes out non-positive (noise)
    keeps `base`'s too. The executor calls this after timing a few (L, d) pairs at start-up.
    """
    base = base or CostModel()
    rows, times = [], []
    for length, degree, seconds in samples:
        if length < 1 or degree < 1 or degree & (degree - 1) or not seconds > 0:
            raise ConfigError(f"calibration sample ({length}, {degree}, {seconds}): need length >= 1,"
                              " a power-of-two degree and a positive time")
        rows.append(_features(base, float(length), int(degree)))
        times.append(float(seconds))
    if not rows:
        raise ConfigError("calibration needs at least one (length, degree, seconds) sample")
    x = np.array(rows) / np.array(times)[:, None]
    used = [j for j in range(x.shape[1]) if np.any(x[:, j] > 0)]
    theta = np.full(x.shape[1], np.nan)
    if used:
        sol, *_ = np.linalg.lstsq(x[:, used], np.ones(len(times)), rcond=None)
        theta[used] = sol
    values = {}
    for j, name in enumerate(_FIT):
        t = theta[j]
        if not (np.isfinite(t) and t > 0):
            continue
        values[name] = float(t) if name.endswith("latency") else float(1.0 / t)
    return dataclasses.replace(base, **values)
