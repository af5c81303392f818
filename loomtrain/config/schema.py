"""The run configuration's sections: frozen dataclasses, one per YAML section, every key with a
default (an empty YAML file runs the embedded demo). Loading and coercion: `loomtrain.config.load`;
the checks that need nothing but the config: `loomtrain.config.checks`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


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
    # when data-parallel gradients are reduced with several micro-batches per step: "step" (once,
    # on the last micro-batch; ZeRO-2 keeps gathered parameters and full gradients in between) or
    # "micro_batch" (after every micro-batch: less memory under ZeRO-2/3, more collectives)
    grad_sync: str = "step"
    # expert parallelism (mixture-of-experts models): experts sharded over ep ranks carved from
    # dp_shard, tokens exchanged with all-to-all (parallel/expert.py); 1 = off
    ep: int = 1


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

    # off | report | rebalance (hetero scheduler: slow ranks get less work) | restart (commit, then stop
    # for an elastic restart without the straggler's node when that saves more than it costs);
    # active at 3+ ranks on CPU
    straggler: str = "report"
    window_steps: int = 10  # steps per detection window (one side-group all-gather each)
    warmup_steps: int = 2  # first steps of a run left out of the statistics
    probe_reps: int = 3  # timed small all-reduces per mesh group and window (the minimum counts)
    min_slowdown: float = 0.10  # a straggler computes at least this much slower than its peers' median
    link_floor_s: float = 0.0002  # a slow link's probe must exceed the other groups' median by this
    startup_timeout_s: float = 900.0  # deadlines of the hang watchdog (0 disables one)
    hang_timeout_s: float = 600.0  # one training step
    checkpoint_timeout_s: float = 1800.0  # a step that saves or commits a checkpoint
    orphan_check_s: float = 1.0  # how often a worker checks that its launcher is alive (0 = never)
    # straggler=restart: what one elastic restart costs; 0 = this attempt's measured start-up plus
    # torch's rendezvous timeouts (loomtrain.resilience.restart)
    restart_cost_s: float = 0.0


@dataclass(frozen=True)
class FaultConfig:
    """Injected faults for tests and demos (`loomtrain.resilience.faults`); -1 = none."""

    slow_rank: int = -1
    slow_factor: float = 1.0  # 1.3 = 30% more CPU time per unit of work on slow_rank
    slow_until_step: int = 0  # slow_rank recovers after this step (0 = slow for the whole run)
    slow_group: str = ""  # comma-separated ranks of one mesh group, e.g. "2,3": its probes are slow
    slow_link_s: float = 0.02  # added to each collective of slow_group's probes
    hang_rank: int = -1
    hang_step: int = 0  # hang_rank stops inside a collective in this step (1-based)
    kill_rank: int = -1
    kill_step: int = 0  # kill_rank SIGKILLs itself at the start of this step (1-based), first attempt only
    # kill_rank's whole node instead: it SIGKILLs its launcher (the elastic agent) first, as a crashed
    # machine would; the node's other workers then exit by themselves (resilience.orphan_check_s)
    kill_node: bool = False

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
    params: bool = False  # ZeRO-3: keep the sharded parameters and gradients on the host (FSDP2 CPUOffloadPolicy)


@dataclass(frozen=True)
class KernelsConfig:
    """Compute kernels (`loomtrain.kernels`). fused_loss: auto | on | off. auto: the fused linear +
    cross-entropy (chunked over tokens, never the whole [tokens, vocab] logits; liger-kernel on CUDA
    when installed, else loomtrain's torch kernel, which also spans tensor-parallel vocabulary
    shards, and on a pipeline's last stage) wherever it is built (not under the hetero scheduler, not for
    a family whose logit post-processing it does not know), on CUDA (see kernels.loss_select for
    CPU); on: the fused path wherever it is built, refused where not; off: lm_head + cross_entropy."""

    fused_loss: str | bool = "auto"  # YAML reads on/off as true/false: they mean the same here
    loss_chunk_tokens: int = 0  # tokens per chunk of the fused loss; 0 = about 128 MiB of fp32 logits
    # Liger's RMSNorm / SwiGLU MLP modules in place of HF's (kernels.modules; untested on a GPU):
    # auto = Liger on CUDA when installed for a known family, else HF's; on = Liger or refused; off = HF's.
    rmsnorm: str | bool = "auto"
    swiglu: str | bool = "auto"


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
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "config":
            out[key] = merge(out[key], value)
        elif key == "config" and isinstance(value, Mapping):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out
