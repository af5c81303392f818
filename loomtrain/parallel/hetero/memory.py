"""How many tokens one rank can hold in a micro-step: a linear memory model.

With a memory-linear attention kernel (blockwise online softmax, flash/varlen on CUDA) no S x S
object exists, so a rank's peak memory in a micro-step is

    fixed + tokens_per_rank x bytes_per_token

* fixed: model and optimizer state held by the rank (parameters, gradients, Adam moments, each
  sharded over `state_shards` ranks: ZeRO-3/FSDP shards all of it over the data ranks, ZeRO-1/2
  the optimizer state (and, for 2, gradients), DDP none), the unsharded layers FSDP gathers around
  the running one, and a fixed reserve (CUDA context, communication buffers, fragmentation);
* bytes_per_token: activations saved for backward, per Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models"): ~34 x hidden per layer at 2-byte
  activations without the 5 x heads x S attention-score term (the kernel never stores scores), or
  with full recomputation only each block's input plus one block's working set; plus the logits
  and their fp32 copy in the loss. A Ulysses group of degree d holds ceil(L / d) tokens of a
  length-L sequence per rank, which is what the planner bounds by this capacity.

`tokens_per_rank` inverts it for a device's memory; `HeteroScheduler` uses it when
`parallel.hetero_tokens_per_rank` is 0 on CUDA (on CPU, host memory is not the limit the planner
models, so the default stays `data.seq_len`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loomtrain.errors import ConfigError
from loomtrain.parallel.hetero.costmodel import CostModel

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of one rank in a micro-step: `fixed_bytes + tokens x bytes_per_token`."""

    params: int  # model parameters
    state_shards: int = 1  # ranks sharing the sharded state (see `for_run`)
    zero: int = 3  # 0 = DDP, 1 = optimizer state sharded, 2 = + gradients, 3 = + parameters
    act_bytes: int = 4  # bytes per activation element (the compute dtype)
    master_bytes: int = 4  # per parameter: fp32 master weights
    grad_bytes: int = 4  # per parameter: fp32 gradients
    optim_bytes: int = 8  # per parameter: Adam's two fp32 moments
    gathered_layers: int = 2  # unsharded layers FSDP holds (the running one, the prefetched one)
    reserve_bytes: float = 0.0  # CUDA context, communication buffers, fragmentation
    cost: CostModel = CostModel()

    def __post_init__(self):
        if self.params < 0 or self.state_shards < 1 or self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"memory model: params={self.params}, state_shards={self.state_shards}, "
                              f"zero={self.zero}: need params >= 0, shards >= 1, zero in 0..3")

    # -------------------------------------------------------------------- construction
    @classmethod
    def for_run(cls, cfg: Any, cost: CostModel, params: int, data_ranks: int,
                reserve_bytes: float = 0.0) -> "MemoryModel":
        """The model of a training run: `params` parameters, state sharded over `data_ranks`
        (the ranks ZeRO/FSDP shards over) at `parallel.zero`, activations in `model.dtype`."""
        dtype = getattr(cfg.model, "dtype", "float32")
        if dtype not in _DTYPE_BYTES:
            raise ConfigError(f"memory model: model.dtype={dtype!r} must be one of {sorted(_DTYPE_BYTES)}")
        return cls(params=int(params), state_shards=max(1, int(data_ranks)), zero=int(cfg.parallel.zero),
                   act_bytes=_DTYPE_BYTES[dtype], reserve_bytes=float(reserve_bytes), cost=cost)

    # -------------------------------------------------------------------- the model
    @property
    def bytes_per_token(self) -> float:
        """Activation bytes per token per rank: linear, no attention-score term."""
        c = self.cost
        scale = self.act_bytes / 2.0  # Korthikanti's 34 x hidden counts 2-byte activations
        per_layer = c.act_bytes_per_hidden * c.hidden * scale
        if c.recompute:  # stored block inputs + one block live during its recomputation
            acts = c.layers * self.act_bytes * c.hidden + per_layer
        else:
            acts = c.layers * per_layer
        logits = (self.act_bytes + 4) * c.vocab  # logits in the compute dtype + fp32 copy in the loss
        return acts + logits

    @property
    def state_bytes(self) -> float:
        """Parameters, gradients and optimizer state this rank holds, plus gathered layers."""
        n, s = float(self.params), float(self.state_shards)
        master = self.master_bytes * n / (s if self.zero >= 3 else 1)
        grads = self.grad_bytes * n / (s if self.zero >= 2 else 1)
        optim = self.optim_bytes * n / (s if self.zero >= 1 else 1)
        gathered = 0.0
        if self.zero >= 3 and self.cost.layers:  # FSDP all-gathers whole layers in the compute dtype
            gathered = min(self.gathered_layers, self.cost.layers) * self.act_bytes * n / self.cost.layers
        return master + grads + optim + gathered

    @property
    def fixed_bytes(self) -> float:
        return self.state_bytes + self.reserve_bytes

    def bytes_for(self, tokens: int) -> float:
        """Peak bytes of a rank holding `tokens` tokens in a micro-step."""
        return self.fixed_bytes + tokens * self.bytes_per_token

    def tokens_per_rank(self, device_bytes: float) -> int:
        """The most tokens whose `bytes_for` fits in `device_bytes` (0: not even the state fits)."""
        free = float(device_bytes) - self.fixed_bytes
        return max(0, int(free // self.bytes_per_token)) if free > 0 else 0

    def with_cost(self, cost: CostModel) -> "MemoryModel":
        return dataclasses.replace(self, cost=cost)


def resolve_capacity(configured: int, seq_len: int, device_type: str, memory: MemoryModel | None,
                     device_bytes: float | None) -> int:
    """Tokens per rank the planner may give one rank: the configured value when set; else, on
    CUDA, what the memory model fits in the device's memory; else `seq_len`."""
    if configured:
        return int(configured)
    if device_type != "cuda" or memory is None or not device_bytes:
        return int(seq_len)
    tokens = memory.tokens_per_rank(device_bytes)
    if tokens < 1:
        raise ConfigError(f"parallel.hetero_tokens_per_rank=0: model and optimizer state "
                          f"({memory.fixed_bytes / 2**30:.1f} GiB per rank) leave no room for activations in "
                          f"{device_bytes / 2**30:.1f} GiB; shard the state over more ranks or set "
                          "hetero_tokens_per_rank")
    return tokens
