"""Everything that can be checked before a process starts, in one call.

The launcher runs `preflight` once before spawning workers and every worker runs it again (it
is cheap: no weights are read), so a user's own `torchrun -m loomtrain.launch` gets the same
one-line errors. Checks that need the model look at its HF config, its meta-device build and the
safetensors headers of `model.path` only. Every directory the run will write (output, checkpoints,
logs) is tried with a real file, so a read-only or mistyped path fails here rather than after
start-up or at the first save.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

from loomtrain.checkpoint.resume import check_config as check_checkpoint_config
from loomtrain.checkpoint.resume import checkpoint_root, saving_enabled
from loomtrain.config import Config, resolve_degrees
from loomtrain.data.sources import check_source
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import ConfigError
from loomtrain.kernels.loss_select import choose_loss
from loomtrain.kernels.modules import choose_module_kernels
from loomtrain.kernels.select import choose_attention, kernel_gaps
from loomtrain.models.build import build_hf_config, build_meta_model, find_blocks
from loomtrain.models.weights import SafetensorsSource, check_weights, listed
from loomtrain.parallel.hetero.costmodel import CostModel
from loomtrain.parallel.expert import check_moe_layout
from loomtrain.parallel.pipeline import stages_per_rank
from loomtrain.parallel.tensor import check_sequence_parallel, layer_plan
from loomtrain.parallel.tp_plan import check_plan


def validate_model_layout(hf_config, degrees: dict[str, int]) -> None:
    """Degrees that the model's geometry cannot be split by, named with both numbers."""
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    layers = getattr(hf_config, "num_hidden_layers", None)
    tp, pp, cp = degrees["tp"], degrees["pp"], degrees["cp"]
    if heads is not None and heads % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the model's num_attention_heads={heads}")
    if kv_heads is not None and kv_heads % tp and tp % kv_heads:
        raise ConfigError(f"parallel.tp={tp} and num_key_value_heads={kv_heads}: one must divide the other "
                          "(fewer KV heads than tp are replicated, which needs tp to be a multiple of them)")
    if heads is not None and cp > 1 and heads % (tp * cp):
        raise ConfigError(f"parallel.cp={cp} x tp={tp} does not divide num_attention_heads={heads}")
    if layers is not None and pp > layers:
        raise ConfigError(f"parallel.pp={pp} exceeds the model's num_hidden_layers={layers}")


# Set by loomtrain's launcher in its workers' environment (`launch.agent.LAUNCHER_ENV`): the
# launcher has run preflight and printed its warnings already.
_LAUNCHER_ENV = "LOOMTRAIN_LAUNCHER"


def _warn_once(message: str) -> None:
    """Print a warning in the process that talks to the user: the launcher, or rank 0 of a user's
    own torchrun (not again from every worker of ours)."""
    if not os.environ.get(_LAUNCHER_ENV) and os.environ.get("RANK", "0") == "0":
        print(f"loomtrain: warning: {message}", file=sys.stderr, flush=True)


def check_writable_dir(key: str, path: str) -> None:
    """`path` is, or can be created as, a directory this process can write files in.

    The nearest existing ancestor must be a directory, and a temporary file is created and
    removed in it: permission bits do not tell (root, ACLs, read-only mounts, root-squashed NFS).
    """
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is" if probe == os.path.abspath(path) else f"would be created under {probe}, which is"
        raise ConfigError(f"{key}={path}: {what} not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".loomtrain-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{key}={path}: cannot write in {probe} ({reason})") from None


def _check_output_paths(cfg: Config, log_dir: str | None) -> None:
    check_writable_dir("train.output_dir", cfg.train.output_dir)
    if saving_enabled(cfg):
        check_writable_dir("checkpoint.dir", checkpoint_root(cfg))
    if log_dir:
        check_writable_dir("--log-dir", log_dir)


def _check_weights(cfg: Config, hf_config) -> None:
    """Names and shapes of `model.path`'s tensors against the model, from the headers alone."""
    meta = build_meta_model(hf_config)
    source = SafetensorsSource(cfg.model.path, getattr(meta, "base_model_prefix", ""))
    unused = check_weights(meta, source, cfg.model.path, deliberate=bool(cfg.model.config))
    if unused:
        _warn_once(f"model.path={cfg.model.path}: {len(unused)} tensors are not used by the model as model.config "
                   f"changes it, and are ignored: {listed(unused)}")


def _check_attention(cfg: Config, hf_config, degrees: dict[str, int]) -> None:
    """An explicit `loomtrain_packed` the model cannot run is refused (`kernels.select`), and so is
    context parallelism / the hetero scheduler, which always attend through the packed kernel."""
    choose_attention(cfg.model.attn_implementation, hf_config, cfg.data.seq_len)
    gaps = kernel_gaps(hf_config, cfg.data.seq_len)
    cp_paths = degrees["cp"] > 1 or cfg.parallel.sequence_scheduler == "hetero"
    if cp_paths and gaps:
        raise ConfigError(f"context parallelism and the hetero scheduler attend through loomtrain's packed kernel, "
                          f"which lacks {', '.join(gaps)}; set them off in model.config")


def _check_pipeline(cfg: Config, hf_config, pp: int, dp: int) -> None:
    pcfg = cfg.parallel
    if pcfg.zero < 2 and dp > 1:
        raise ConfigError(f"parallel.zero={pcfg.zero} with parallel.pp={pp}: pipeline stages are sharded with "
                          "FSDP2 across data parallel; use parallel.zero=2 or 3")
    if getattr(hf_config, "tie_word_embeddings", False) and pcfg.pp_schedule == "ZBVZeroBubble":
        raise ConfigError(f"parallel.pp={pp}: {hf_config.model_type} ties its input and output embeddings, which "
                          "parallel.pp_schedule=ZBVZeroBubble puts on one rank in two stages; use GPipe, 1F1B or "
                          "Interleaved1F1B, or set model.config.tie_word_embeddings=false")
    if pcfg.pp_schedule == "Interleaved1F1B" and pcfg.pp_virtual_stages < 2:
        raise ConfigError("parallel.pp_schedule=Interleaved1F1B needs parallel.pp_virtual_stages >= 2")
    stages = pp * stages_per_rank(pcfg.pp_schedule, pcfg.pp_virtual_stages)
    layers = hf_config.num_hidden_layers
    if stages > layers:
        raise ConfigError(f"parallel.pp={pp} with schedule {pcfg.pp_schedule} makes {stages} stages but the model "
                          f"has num_hidden_layers={layers}; lower parallel.pp or parallel.pp_virtual_stages")
    n_micro = cfg.data.global_batch_size // (dp * cfg.data.micro_batch_size)
    if n_micro < pp:
        raise ConfigError(f"parallel.pp={pp} needs at least {pp} micro-batches per step, but "
                          f"data.global_batch_size / (dp x data.micro_batch_size) = {n_micro}; "
                          "lower data.micro_batch_size or raise data.global_batch_size")


def preflight(cfg: Config, world_size: int, log_dir: str | None = None) -> dict[str, int]:
    """Raise a ConfigError/DataError naming the problem, or return the resolved degrees.
    `log_dir`: the launcher's per-rank log directory, checked for writability with the others."""
    degrees = resolve_degrees(cfg.parallel, world_size)
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    per_step = dp * cfg.data.micro_batch_size
    if cfg.data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of data-parallel size {dp}"
            f" x data.micro_batch_size={cfg.data.micro_batch_size} = {per_step}")
    _check_output_paths(cfg, log_dir)
    check_source(cfg.data)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    hf_config = build_hf_config(cfg.model, vocab_size=tokenizer.vocab_size, seq_len=cfg.data.seq_len,
                                eos_id=tokenizer.eos_id)
    validate_model_layout(hf_config, degrees)
    check_moe_layout(cfg, hf_config, degrees)
    _check_attention(cfg, hf_config, degrees)
    # kernels.fused_loss=on where the fused loss is not built is refused here, before launch (the
    # device only picks between liger and torch, never refuses).
    choose_loss(cfg.kernels.fused_loss, cfg.kernels.loss_chunk_tokens, hf_config, device_type="cpu",
                vocab_parallel=degrees["tp"] > 1, hetero=cfg.parallel.sequence_scheduler == "hetero")
    # kernels.rmsnorm / kernels.swiglu = on where Liger cannot run (no CUDA for this run, no
    # liger-kernel, an unknown family, tp) is refused before launch too.
    cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    choose_module_kernels(cfg.kernels.rmsnorm, cfg.kernels.swiglu, hf_config, device_type="cuda" if cuda else "cpu",
                          tensor_parallel=degrees["tp"] > 1)
    if cfg.model.path is not None:
        _check_weights(cfg, hf_config)
    tp = degrees["tp"]
    if tp > 1 and cfg.parallel.zero < 2 and dp > 1:
        raise ConfigError(f"parallel.zero={cfg.parallel.zero} with parallel.tp={tp}: DDP cannot reduce "
                          "tensor-parallel (DTensor) gradients; use parallel.zero=2 or 3")
    if tp > 1:
        # Every style of the model's plan, read from the config alone (no model is built); then
        # the plan must name modules of the block, or classify every linear layer when the model
        # has none (a meta model costs no memory).
        check_plan(hf_config)
        meta = build_meta_model(hf_config)
        entries = layer_plan(meta, find_blocks(meta))
        if cfg.parallel.sequence_parallel:
            check_sequence_parallel(find_blocks(meta), entries)
    cp = degrees["cp"]
    chunks = 2 * cp if cfg.parallel.cp_impl == "ring" else cp
    if cp > 1 and cfg.data.seq_len % (chunks * (tp if cfg.parallel.sequence_parallel else 1)):
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be divisible by {chunks} for "
                          f"parallel.cp={cp} with cp_impl={cfg.parallel.cp_impl}"
                          + (f" (times tp={tp} for sequence parallel)" if tp > 1 else ""))
    pp = degrees["pp"]
    if pp > 1:
        _check_pipeline(cfg, hf_config, pp, dp)
    if tp > 1 and cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.tp={tp}, which "
                          "sequence parallelism needs; change seq_len or set parallel.sequence_parallel=false")
    if cfg.parallel.sequence_scheduler == "hetero":
        pool = dp * cp
        if tp > 1 or pp > 1 or cp > 1:
            raise ConfigError("parallel.sequence_scheduler=hetero plans its own sequence-parallel groups over the "
                              "data-parallel ranks; set parallel.tp=1, parallel.pp=1 and parallel.cp=1")
        if pool & (pool - 1):
            raise ConfigError(f"parallel.sequence_scheduler=hetero needs a power-of-two number of data-parallel "
                              f"ranks, got {pool}")
        CostModel.for_run(cfg, hf_config)  # what the scheduler builds: a bad coefficient fails before launch
        capacity = cfg.parallel.hetero_tokens_per_rank or cfg.data.seq_len
        if cfg.data.seq_len > pool * capacity:  # a document of seq_len tokens would fit no group
            raise ConfigError(f"parallel.sequence_scheduler=hetero: a sequence of data.seq_len={cfg.data.seq_len} "
                              f"tokens does not fit {pool} ranks x parallel.hetero_tokens_per_rank={capacity}; "
                              f"raise hetero_tokens_per_rank to at least {-(-cfg.data.seq_len // pool)} or lower seq_len")
        heads = getattr(hf_config, "num_attention_heads", 1)
        if heads % pool:
            raise ConfigError(f"parallel.sequence_scheduler=hetero may form a group of all {pool} ranks, which "
                              f"must divide num_attention_heads={heads}")
    check_checkpoint_config(cfg)
    return degrees
