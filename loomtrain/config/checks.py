"""Checks that need nothing but the config itself (choices, ranges, divisibility, paths), run
before any process starts so a typo or an impossible layout ends in one line that names the key
and the fix instead of a hang inside a collective. Checks that need the model's own HF config
(heads divisible by tp, ...) live in `runtime.preflight.validate_model_layout`."""
from __future__ import annotations

import math
import os
import re

from loomtrain.config.schema import Config, OffloadConfig, ParallelConfig
from loomtrain.errors import ConfigError

_INT64 = 2**63
_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "parallel.zero": (0, 1, 2, 3),
    "parallel.pp_schedule": ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"),
    "parallel.cp_impl": ("ulysses", "ring"),
    "parallel.sequence_scheduler": ("static", "hetero"),
    "parallel.grad_sync": ("step", "micro_batch"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "checkpoint.verify": ("fast", "size", "checksum", "sha256"),
    "train.nonfinite": ("stop", "skip"),
    "resilience.straggler": ("off", "report", "rebalance", "restart"),
}


# Ranges of numeric keys: (key, lowest, lowest allowed?, highest, highest allowed?, what it means).
# Every float must also be finite: a NaN passes every comparison, so it would slip through them.
_RANGES = (
    ("optim.lr", 0.0, False, math.inf, False, "finite and positive"),
    ("optim.eps", 0.0, False, math.inf, False, "finite and positive"),
    ("optim.beta1", 0.0, True, 1.0, False, "within [0, 1)"),
    ("optim.beta2", 0.0, True, 1.0, False, "within [0, 1)"),
    ("optim.weight_decay", 0.0, True, math.inf, False, "finite and not negative"),
    ("optim.grad_clip", 0.0, True, math.inf, False, "finite and not negative (0 disables clipping)"),
    ("optim.min_lr_ratio", 0.0, True, 1.0, True, "within [0, 1]"),
    ("data.max_corpus_mb", 0.0, False, 2.0**40, True, "a positive size in MiB (at most 2**40)"),
    ("train.peak_tflops", 0.0, False, math.inf, False, "finite and positive (or null to measure it)"),
    ("optim.warmup_steps", 0, True, _INT64, False, "not negative"),
    ("checkpoint.every", 0, True, _INT64, False, "not negative (0 saves only at the end)"),
    ("parallel.hetero_tokens_per_rank", 0, True, _INT64, False, "not negative (0 = from device memory on CUDA, data.seq_len on CPU)"),
    ("train.seed", -_INT64, True, _INT64, False, "within the 64-bit integer range"),
    ("kernels.loss_chunk_tokens", 0, True, _INT64, False, "not negative (0 = chosen from the vocabulary size)"),
)


def _check_ranges(flat: dict) -> None:
    for key, value in flat.items():
        if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
            raise ConfigError(f"{key}={value}: beyond the 64-bit integer range")
    for key, low, low_ok, high, high_ok, meaning in _RANGES:
        value = flat[key]
        if value is None:
            continue
        inside = (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
        if not (math.isfinite(value) and inside):
            raise ConfigError(f"{key}={value}: must be {meaning}")


def check(cfg: Config) -> None:
    """Checks that need nothing but the config itself (choices, ranges, divisibility, paths)."""
    flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}
    _check_resilience(cfg)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r}: must be one of {', '.join(map(str, allowed))}")
    for key in ("data.seq_len", "data.global_batch_size", "data.micro_batch_size", "train.max_steps",
                "parallel.dp_replicate", "parallel.tp", "parallel.pp", "parallel.cp",
                "parallel.pp_virtual_stages", "train.log_every", "checkpoint.keep", "parallel.ep"):
        if flat[key] < 1:
            raise ConfigError(f"{key}={flat[key]}: must be at least 1")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard={cfg.parallel.dp_shard}: must be -1 (fill) or at least 1")
    _check_ranges(flat)
    for key in ("train.output_dir", "checkpoint.dir"):
        if flat[key] is not None and (not flat[key].strip() or "\0" in flat[key]):
            raise ConfigError(f"{key}={flat[key]!r}: must be a directory path")
    bad_keys = [k for k in cfg.model.config if not isinstance(k, str) or not k.isidentifier()]
    if bad_keys:
        raise ConfigError(f"model.config: {bad_keys[0]!r} is not a field name")
    if not 0 <= cfg.checkpoint.signal_grace_s < float("inf"):
        raise ConfigError(f"checkpoint.signal_grace_s={cfg.checkpoint.signal_grace_s}: must be finite and >= 0")
    if cfg.data.global_batch_size % cfg.data.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of "
            f"data.micro_batch_size={cfg.data.micro_batch_size}")
    ac = cfg.parallel.activation_checkpointing
    if ac not in ("none", "full") and not (ac.startswith("every:") and ac[6:].isdigit() and int(ac[6:]) > 0):
        raise ConfigError(f"parallel.activation_checkpointing={ac!r}: must be none, full or every:N (N >= 1)")
    lengths = cfg.data.lengths
    if lengths not in ("fixed", "longtail") and not lengths.startswith("file:"):
        raise ConfigError(f"data.lengths={lengths!r}: must be fixed, longtail or file:PATH")
    if lengths.startswith("file:") and not os.path.isfile(lengths[5:]):
        raise ConfigError(f"data.lengths: length file not found: {lengths[5:]}")
    if cfg.data.source not in ("embedded", "synthetic") and not os.path.exists(cfg.data.source) \
            and not os.path.isfile(cfg.data.source + ".idx"):  # a Megatron dataset is named by its prefix
        raise ConfigError(f"data.source: no such file or directory: {cfg.data.source}")
    for path, weight in cfg.data.mix.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ConfigError(f"data.mix: the weight of {path} is {weight!r}; must be a finite positive number")
        if not os.path.exists(str(path)) and not os.path.isfile(f"{path}.idx"):
            raise ConfigError(f"data.mix: no such file or directory: {path}")
    if cfg.data.tokenizer is not None and not os.path.isdir(cfg.data.tokenizer):
        raise ConfigError(f"data.tokenizer: not a directory: {cfg.data.tokenizer}")
    if cfg.model.path is not None and not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path: no HF model directory (config.json) at {cfg.model.path}")
    if cfg.checkpoint.resume not in ("none", "auto") and not os.path.exists(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume: no checkpoint at {cfg.checkpoint.resume}")
    _check_offload(cfg.offload)
    if cfg.offload.params and cfg.parallel.zero != 3:
        raise ConfigError(f"offload.params=true needs parallel.zero=3 (FSDP2 CPUOffloadPolicy offloads sharded "
                          f"parameters); it is parallel.zero={cfg.parallel.zero}")
    if cfg.kernels.fused_loss not in ("auto", "on", "off", True, False):
        raise ConfigError(f"kernels.fused_loss={cfg.kernels.fused_loss!r}: must be auto, on or off")
    for key in ("rmsnorm", "swiglu"):
        if getattr(cfg.kernels, key) not in ("auto", "on", "off", True, False):
            raise ConfigError(f"kernels.{key}={getattr(cfg.kernels, key)!r}: must be auto, on or off")


def _check_offload(o: OffloadConfig) -> None:
    if o.optimizer not in ("none", "cpu", "interleaved"):
        raise ConfigError(f"offload.optimizer={o.optimizer!r}: must be one of none, cpu, interleaved")
    frac = o.gpu_fraction
    if isinstance(frac, str) and frac != "auto":
        raise ConfigError(f"offload.gpu_fraction={frac!r}: must be auto or a number within [0, 1]")
    if not isinstance(frac, str) and not (math.isfinite(frac) and 0 <= frac <= 1):
        raise ConfigError(f"offload.gpu_fraction={frac}: must be auto or a number within [0, 1]")
    if o.optimizer != "interleaved" and frac != "auto":
        raise ConfigError(f"offload.gpu_fraction={frac}: applies only to offload.optimizer=interleaved "
                          f"(it is {o.optimizer})")
    if o.group_size < 0:
        raise ConfigError(f"offload.group_size={o.group_size}: must be 0 (planned) or a positive count of parameters")
    if not (math.isfinite(o.replan_drift) and o.replan_drift > 0):
        raise ConfigError(f"offload.replan_drift={o.replan_drift}: must be finite and positive (0.15 = 15%)")
    if not (math.isfinite(o.max_host_gb) and o.max_host_gb >= 0):
        raise ConfigError(f"offload.max_host_gb={o.max_host_gb}: must be finite and not negative (0 = no cap)")


def _check_resilience(cfg: Config) -> None:
    """`resilience.*` and `fault.*`: the policies not built yet, deadlines, fault parameters."""
    r, f = cfg.resilience, cfg.fault
    if r.straggler == "restart" and cfg.checkpoint.every <= 0 and cfg.checkpoint.dir is None:
        raise ConfigError("resilience.straggler=restart resumes from the checkpoint it commits before stopping; "
                          "set checkpoint.every (e.g. 100) or checkpoint.dir")
    if r.restart_cost_s < 0:
        raise ConfigError(f"resilience.restart_cost_s={r.restart_cost_s}: must not be negative (0 = measure it)")
    if r.straggler == "rebalance" and cfg.parallel.sequence_scheduler != "hetero":
        raise ConfigError("resilience.straggler=rebalance moves work between ranks through the heterogeneous "
                          "scheduler only; set parallel.sequence_scheduler=hetero, or use report")
    for key in ("window_steps", "probe_reps"):
        if getattr(r, key) < 1:
            raise ConfigError(f"resilience.{key}={getattr(r, key)}: must be at least 1")
    if r.warmup_steps < 0:
        raise ConfigError(f"resilience.warmup_steps={r.warmup_steps}: must not be negative")
    if not 0 <= r.min_slowdown < 100:
        raise ConfigError(f"resilience.min_slowdown={r.min_slowdown}: must be within [0, 100), e.g. 0.1 for 10%")
    for key in ("startup_timeout_s", "hang_timeout_s", "checkpoint_timeout_s", "orphan_check_s", "link_floor_s"):
        if not 0 <= getattr(r, key) < float("inf"):
            raise ConfigError(f"resilience.{key}={getattr(r, key)}: must be finite and >= 0 (0 disables it)")
    if f.slow_until_step < 0:
        raise ConfigError(f"fault.slow_until_step={f.slow_until_step}: must not be negative (0 = the whole run)")
    if not 1.0 <= f.slow_factor < 1000 or not 0 <= f.slow_link_s < 3600:
        raise ConfigError(f"fault.slow_factor={f.slow_factor} / fault.slow_link_s={f.slow_link_s}: "
                          "the factor must be within [1, 1000), the delay within [0, 3600) s")
    if f.slow_group and not re.fullmatch(r"\d+(,\d+)+", f.slow_group.replace(" ", "")):
        raise ConfigError(f"fault.slow_group={f.slow_group!r}: must be two or more ranks, e.g. 2,3")
    if f.hang_rank >= 0 and f.hang_step < 1:
        raise ConfigError(f"fault.hang_step={f.hang_step}: must be at least 1 with fault.hang_rank")
    if f.kill_rank >= 0 and f.kill_step < 1:
        raise ConfigError(f"fault.kill_step={f.kill_step}: must be at least 1 with fault.kill_rank")


def resolve_degrees(p: ParallelConfig, world_size: int) -> dict[str, int]:
    """Fill `dp_shard=-1` and check that the degrees multiply to the world size."""
    fixed = p.dp_replicate * p.tp * p.pp * p.cp
    shard = p.dp_shard
    if shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} is not divisible by dp_replicate*tp*pp*cp = "
                f"{p.dp_replicate}*{p.tp}*{p.pp}*{p.cp} = {fixed}; change the degrees or the process count")
        shard = world_size // fixed
    if fixed * shard != world_size:
        raise ConfigError(
            f"parallel degrees dp_replicate*dp_shard*tp*pp*cp = {p.dp_replicate}*{shard}*{p.tp}*{p.pp}*{p.cp}"
            f" = {fixed * shard} but the world size is {world_size}; make them multiply to {world_size}")
    if shard % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide parallel.dp_shard={shard}: expert parallelism is "
                          "carved from the sharded data-parallel ranks; make dp_shard a multiple of ep")
    degrees = {"dp_replicate": p.dp_replicate, "dp_shard": shard, "cp": p.cp, "tp": p.tp, "pp": p.pp}
    return {**degrees, "ep": p.ep} if p.ep > 1 else degrees
