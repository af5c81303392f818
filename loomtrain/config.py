"""Frozen run configuration: YAML file + dotted `key=value` overrides, validated up front.

Every key has a default, so an empty YAML file runs the embedded demo. Values are checked here,
before any process starts, so a typo or an impossible layout ends in one line that names the key
and the fix instead of a hang inside a collective. Checks that need the model's own HF config
(heads divisible by tp, ...) live in `runtime.preflight.validate_model_layout`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from loomtrain.errors import ConfigError
from loomtrain.yamlio import parse_yaml, read_yaml_file


@dataclass(frozen=True)
class ModelConfig:
    """Which HF causal LM to train: `path` (a local HF directory) wins over `architecture`."""

    architecture: str = "llama"
    path: str | None = None
    # Fields of the HF config class of `architecture` (or overrides of the one found in `path`).
    config: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # float32 | bfloat16 (compute dtype; master weights stay float32)
    # auto: loomtrain's memory-linear packed kernel (`loomtrain_packed`) unless the model needs what
    # it lacks (attention dropout, soft-capping, a window shorter than data.seq_len), then sdpa;
    # any other HF implementation name is passed to transformers as is.
    attn_implementation: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are cut into fixed-length training sequences."""

    source: str = "embedded"  # embedded | synthetic | a file or directory (.txt/.md/.py, .jsonl, .parquet)
    tokenizer: str | None = None  # local HF tokenizer directory; None = byte-level fallback
    seq_len: int = 256
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per rank per micro-step
    lengths: str = "fixed"  # synthetic document lengths: fixed | longtail | file:PATH
    text_field: str = "text"  # JSONL key / Parquet column holding the document text
    shuffle: bool = True
    max_corpus_mb: float = 64.0  # cap on text read from the embedded corpus or a directory
    # token shards (`data.source` = a `loomtrain data prepare` directory or a Megatron .bin/.idx
    # dataset): take whole documents in a seeded order before packing (tokens never reorder)
    shuffle_documents: bool = False
    # several token sources with weights, {path: weight}; when set it replaces data.source
    mix: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees. Their product must equal the world size (dp_shard=-1 fills the rest)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded over the sequence
    pp: int = 1
    cp: int = 1
    zero: int = 3  # 0 = DDP, 1 = sharded optimizer state, 2/3 = FSDP2 without/with reshard after forward
    pp_schedule: str = "1F1B"
    pp_virtual_stages: int = 1
    cp_impl: str = "ulysses"
    sequence_scheduler: str = "static"  # static (packed rows) | hetero (per-step SP groups)
    # hetero: tokens one rank holds in a micro-step (longer sequences get a multi-rank group);
    # 0 = from the device's memory on CUDA (parallel/hetero/memory.py), data.seq_len on CPU
    hetero_tokens_per_rank: int = 0
    # hetero: cost-model coefficients: a mapping of CostModel fields, or a JSON file / JSON text
    # (as `loomtrain plan --coeffs`)
    hetero_cost_model: str | Mapping[str, Any] | None = None
    # hetero: fit the planner's cost model to this hardware at start-up (a few timed passes)
    hetero_calibrate: bool = False
    activation_checkpointing: str = "none"  # none | full | every:N (checkpoint every N-th block)
    compile: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + decay; `grad_clip=0` disables clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200
    seed: int = 1234
    output_dir: str = "runs/demo"
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    # Peak dense TFLOP/s of one device at the compute dtype, for MFU. None = look it up (GPU) or
    # measure a matrix product at start-up (CPU).
    peak_tflops: float | None = None
    # Write the global sample ids of each step to `samples.jsonl` (tests, data audits).
    log_samples: bool = False
    # Record the pipeline schedule of the last step (pp > 1): pipeline_timeline.json (+ .png).
    trace_pipeline: bool = False
    # A step whose loss, grad norm or lr is NaN/inf: stop (one line, nothing committed) | skip
    # (no optimizer step; counted as `skipped_steps` in the metrics record).
    nonfinite: str = "stop"


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # default: {train.output_dir}/checkpoints
    every: int = 0  # save every N steps (0 = only at the end if dir is set)
    resume: str = "none"  # none | auto | PATH (a step_N directory, or a directory of them)
    keep: int = 3  # committed checkpoints kept (the newest ones)
    verify: str = "fast"  # on load: fast (sizes + the manifest's fast checksum) | size | checksum (sha256)
    # After SIGTERM/Ctrl-C, further stop signals within this many seconds are the same request
    # (the agent and the scheduler both deliver it) and are ignored; a later one aborts unsaved.
    signal_grace_s: float = 30.0



@dataclass(frozen=True)
class ResilienceConfig:
    """Straggler and hang detection (`loomtrain.resilience`)."""

    straggler: str = "report"  # off | report (rebalance | restart: not built yet); active at 3+ ranks on CPU
    window_steps: int = 10  # steps per detection window (one side-group all-gather each)
    warmup_steps: int = 2  # first steps of a run left out of the statistics
    probe_reps: int = 3  # timed small all-reduces per mesh group and window (the minimum counts)
    min_slowdown: float = 0.10  # a straggler computes at least this much slower than its peers' median
    link_floor_s: float = 0.0002  # a slow link's probe must exceed the other groups' median by this
    startup_timeout_s: float = 900.0  # deadlines of the hang watchdog (0 disables one)
    hang_timeout_s: float = 600.0  # one training step
    checkpoint_timeout_s: float = 1800.0  # a step that saves or commits a checkpoint
    orphan_check_s: float = 1.0  # how often a worker checks that its launcher is alive (0 = never)


@dataclass(frozen=True)
class FaultConfig:
    """Injected faults for tests and demos (`loomtrain.resilience.faults`); -1 = none."""

    slow_rank: int = -1
    slow_factor: float = 1.0  # 1.3 = 30% more CPU time per unit of work on slow_rank
    slow_group: str = ""  # comma-separated ranks of one mesh group, e.g. "2,3": its probes are slow
    slow_link_s: float = 0.02  # added to each collective of slow_group's probes
    hang_rank: int = -1
    hang_step: int = 0  # hang_rank stops inside a collective in this step (1-based)
    kill_rank: int = -1
    kill_step: int = 0  # kill_rank SIGKILLs itself at the start of this step (1-based), first attempt only

@dataclass(frozen=True)
class OffloadConfig:
    """Optimizer-state offload to host memory (`loomtrain.offload`): `optimizer` none | cpu
    (every update on the CPU) | interleaved (a planned share of sub-groups updated on the device
    while the CPU updates the rest)."""

    optimizer: str = "none"  # none | cpu | interleaved
    gpu_fraction: float | str = "auto"  # interleaved: share of sub-groups on the device path, or auto (planned)
    group_size: int = 0  # parameters per sub-group; 0 = planned
    replan_drift: float = 0.15  # re-plan when measured and predicted update time differ by more than this
    max_host_gb: float = 0.0  # refuse to start if the host arena would exceed this (0 = the host's free memory)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> "Config":
        """`cfg.replace(train={"max_steps": 5})`: a new Config with some keys of some sections changed."""
        return from_dict(_merge(self.to_dict(), sections))


_INT64 = 2**63
_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "parallel.zero": (0, 1, 2, 3),
    "parallel.pp_schedule": ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"),
    "parallel.cp_impl": ("ulysses", "ring"),
    "parallel.sequence_scheduler": ("static", "hetero"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "checkpoint.verify": ("fast", "size", "checksum", "sha256"),
    "train.nonfinite": ("stop", "skip"),
    "resilience.straggler": ("off", "report"),
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "config":
            out[key] = _merge(out[key], value)
        elif key == "config" and isinstance(value, Mapping):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def _section_class(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _unknown(kind: str, key: str, known: list[str]) -> ConfigError:
    key = str(key)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"unknown {kind} '{key}'{hint}")


# Decimal floats as people write them, with or without a dot or an exponent (`3e-4`, `1.5E3`).
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's annotation; accept ints for floats and YAML-ish strings."""
    ann = annotation
    origin = typing.get_origin(ann)
    options = typing.get_args(ann) if origin in (typing.Union, types.UnionType) else (ann,)
    if value is None and type(None) in options:
        return None
    for opt in options:
        if opt is type(None):
            continue
        base = typing.get_origin(opt) or opt
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # `3e-4`: YAML 1.1 reads a float without a dot as a string
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base in (Mapping, dict, collections.abc.Mapping) and isinstance(value, Mapping):
            return dict(value)
    wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and wrong types."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise _unknown("config section", name, list(_SECTIONS))
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        cls = _section_class(name)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise _unknown("config key", f"{name}.{key}", list(hints))
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    check(cfg)
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.max_steps=5", "model.config.hidden_size=64"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}': the key must be section.key (e.g. train.max_steps=5)")
        value = parse_yaml(text, f"override '{item}'") if text.strip() else None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (may be empty or absent) and apply dotted overrides on top."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        raw = read_yaml_file(path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


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
                "parallel.pp_virtual_stages", "train.log_every", "checkpoint.keep"):
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
    if r.straggler in ("rebalance", "restart"):
        raise ConfigError(f"resilience.straggler={r.straggler}: not built yet; use report or off")
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
    return {"dp_replicate": p.dp_replicate, "dp_shard": shard, "cp": p.cp, "tp": p.tp, "pp": p.pp}
