"""Everything that can be checked before a process starts, in one call.

The launcher runs `preflight` once before spawning workers and every worker runs it again (it
is cheap: no weights are read), so a user's own `torchrun -m loomtrain.launch` gets the same
one-line errors. Checks that need the model look at its HF config only.
"""
from __future__ import annotations

from loomtrain.config import Config, resolve_degrees
from loomtrain.errors import ConfigError

# Parallelisms whose config keys exist (the CLI contract) but which this build does not run yet.
_NOT_YET = {
    "pp": "pipeline parallelism",
    "cp": "context parallelism",
}


def validate_model_layout(hf_config, degrees: dict[str, int]) -> None:
    """Degrees that the model's geometry cannot be split by, named with both numbers."""
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = getattr(hf_config, "num_hidden_layers", None)
    tp, pp, cp = degrees["tp"], degrees["pp"], degrees["cp"]
    if heads is not None and heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's num_attention_heads={heads}")
    if kv_heads is not None and kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"parallel.tp={tp} and num_key_value_heads={kv_heads}: one must divide the other")
    if heads is not None and cp > 1 and heads % (tp * cp):
        raise ConfigError(f"parallel.cp={cp} x tp={tp} does not divide num_attention_heads={heads}")
    if layers is not None and pp > layers:
        raise ConfigError(f"parallel.pp={pp} exceeds the model's num_hidden_layers={layers}")


def preflight(cfg: Config, world_size: int) -> dict[str, int]:
    """Raise a ConfigError/DataError naming the problem, or return the resolved degrees."""
    from loomtrain.runtime.sources import check_source
    from loomtrain.runtime.model import build_hf_config
    from loomtrain.runtime.tokenizer import build_tokenizer

    degrees = resolve_degrees(cfg.parallel, world_size)
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    per_step = dp * cfg.data.micro_batch_size
    if cfg.data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of data-parallel size {dp}"
            f" x data.micro_batch_size={cfg.data.micro_batch_size} = {per_step}")
    check_source(cfg.data)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    hf_config = build_hf_config(cfg.model, vocab_size=tokenizer.vocab_size, seq_len=cfg.data.seq_len,
                                eos_id=tokenizer.eos_id)
    validate_model_layout(hf_config, degrees)
    tp = degrees["tp"]
    if tp > 1 and cfg.parallel.zero < 2 and dp > 1:
        raise ConfigError(f"parallel.zero={cfg.parallel.zero} with parallel.tp={tp}: DDP cannot reduce "
                          "tensor-parallel (DTensor) gradients; use parallel.zero=2 or 3")
    if tp > 1 and cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.tp={tp}, which "
                          "sequence parallelism needs; change seq_len or set parallel.sequence_parallel=false")
    for key, what in _NOT_YET.items():
        if degrees[key] > 1:
            raise ConfigError(f"parallel.{key}={degrees[key]}: {what} is not available in this build yet; "
                              f"set parallel.{key}=1")
    if cfg.parallel.sequence_scheduler != "static":
        raise ConfigError("parallel.sequence_scheduler=hetero is not available in this build yet; use static")
    if cfg.checkpoint.every > 0 or cfg.checkpoint.resume != "none" or cfg.checkpoint.dir is not None:
        raise ConfigError("checkpointing (checkpoint.*) is not available in this build yet; "
                          "leave checkpoint.every=0, checkpoint.dir unset and checkpoint.resume=none")
    return degrees
