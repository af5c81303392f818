"""The peers of `loomtrain bench --vs`: the training loops a user would write instead of loomtrain.

Every peer trains the same model on the same data as loomtrain does in the benchmark:

* the same weights: the HF model loomtrain would build (`model.path`, or `model.architecture` +
  `model.config`), initialised by loomtrain's own layout-independent `init_random` with the same
  seed, or loaded from the same safetensors;
* the same batches: loomtrain's `DataLoader` (its global sample order), each rank its own slice,
  the same micro-batches per step;
* the same math: sum of token cross-entropies over the global count of valid tokens, AdamW over
  decay / no-decay groups with the config's lr, betas, eps, weight decay and lr schedule, and the
  same gradient clipping.

What differs is only the training loop and its parallelism, which is what is being compared. The
peer loops use HF's stock attention (sdpa, eager where the model needs it), as a user's would.

A step's time runs from fetching its batch to the end of the optimizer step, as loomtrain's own
`train_step` measures it, and its record is built by loomtrain's `step_record` with the same FLOP
model and peak, so every figure has one definition.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from loomtrain.config import Config
from loomtrain.data.loader import DataLoader
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.launch.bench_collectives import Counter
from loomtrain.mesh import DistEnv
from loomtrain.models import build as model_lib
from loomtrain.models.flops import flop_model
from loomtrain.optim.schedule import lr_lambda
from loomtrain.runtime.metrics import peak_memory_gb, step_record


class PeerSkipped(Exception):
    """Raised by a peer's loop when it finds, once started, that it cannot run the layout as asked
    (the message is the reason reported)."""


@dataclass
class PeerRun:
    """What one peer needs to run one layout: the config (with the layout applied), the process
    group, the HF config, the FLOP model and the per-device peak."""

    cfg: Config
    env: DistEnv
    zero: int
    steps: int
    peak_flops: float
    counter: Counter

    def __post_init__(self) -> None:
        self.tokenizer = build_tokenizer(self.cfg.data.tokenizer)
        self.hf_config = model_lib.build_hf_config(self.cfg.model, vocab_size=self.tokenizer.vocab_size,
                                                   seq_len=self.cfg.data.seq_len, eos_id=self.tokenizer.eos_id)
        self.flops = flop_model(self.hf_config)
        self.world = self.env.world_size
        self.loader = DataLoader(self.cfg.data, self.tokenizer, dp_rank=self.env.rank, dp_size=self.world,
                                 seed=self.cfg.train.seed)
        self.micro_batches = self.cfg.data.global_batch_size // (self.world * self.cfg.data.micro_batch_size)

    def build_model(self) -> nn.Module:
        """The full model with loomtrain's weights for this config and seed, on this rank's device."""
        model = model_lib.build_meta_model(self.hf_config)
        if self.cfg.model.path is not None:
            fill = lambda m: model_lib.load_safetensors(m, self.cfg.model.path)
        else:
            fill = lambda m: model_lib.init_random(m, self.cfg.train.seed)
        model_lib.materialize(model, self.env.device, fill)
        model.train()
        return model

    def compiled_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, each compiled in place when the layout asks (`parallel.compile`),
        before any sharding, as torchtitan and loomtrain do."""
        blocks = model_lib.find_blocks(model)
        if self.cfg.parallel.compile:
            for block in blocks:
                block.compile()
        return blocks

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> tuple[torch.optim.Optimizer, object]:
        """AdamW (decay for matrices, none for vectors) and the config's lr schedule."""
        opt = self.adamw(params)
        return opt, self.schedule(opt)

    def adamw(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        """Fused AdamW with the config's settings: weight decay for matrices, none for vectors."""
        o = self.cfg.optim
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)

    def schedule(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The config's lr schedule over the run's steps."""
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.optim, self.steps))

    def batch(self) -> tuple[list, float, float]:
        """This rank's micro-batches of the next step, and the step's global valid tokens and exact
        FLOPs (one small all-reduce, as loomtrain's step does)."""
        mbs = self.loader.next_step()
        local = [float(sum(mb.num_tokens for mb in mbs)),
                 self.flops.exact_step_flops([n for mb in mbs for row in mb.doc_lengths for n in row])]
        t = torch.tensor(local, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return [mb.to(self.env.device) for mb in mbs], float(t[0]), float(t[1])

    def loss_sum(self, model, mb) -> torch.Tensor:
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), mb.labels.flatten(), ignore_index=-100,
                               reduction="sum")

    def autocast(self):
        if self.cfg.model.dtype == "bfloat16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def record(self, step: int, start: float, loss_sum: torch.Tensor, global_tokens: float,
               exact_flops: float, grad_norm: float, lr: float) -> dict:
        """Finish a step: the global loss (an all-reduce, as in loomtrain), the time, the record."""
        dist.all_reduce(loss_sum)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        rec = step_record(step=step, loss=loss_sum.item() / global_tokens, grad_norm=grad_norm, lr=lr,
                          tokens=tokens, step_time_s=elapsed,
                          flops_palm=self.flops.palm_step_flops(tokens, self.cfg.data.seq_len) if self.flops.known else None,
                          flops_exact=exact_flops if self.flops.known else None, world_size=self.world,
                          peak_flops_per_device=self.peak_flops, peak_mem_gb=peak_memory_gb(self.env.device))
        rec["collectives"] = self.counter.read()  # outside the timed region
        return rec


def _norm(value) -> float:
    value = value.full_tensor() if isinstance(value, DTensor) else value
    return float(value)


# ------------------------------------------------------------------------------------- fsdp2
def fsdp2_reason(zero: int) -> str | None:
    if zero not in (2, 3):
        return f"ZeRO-{zero} has no FSDP2 form (FSDP2 is ZeRO-2 or ZeRO-3)"
    return None


def run_fsdp2(run: PeerRun) -> list[dict]:
    """A plain FSDP2 loop: `fully_shard` per decoder block and the root, fused AdamW, every
    micro-batch forward and backward, clip, step. ZeRO-2 keeps parameters gathered after forward
    (`reshard_after_forward=False`), ZeRO-3 reshards them (all but the last block, whose backward
    comes next)."""
    model = run.build_model()
    mesh = init_device_mesh(run.env.device.type, (run.world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if run.cfg.model.dtype == "bfloat16" else MixedPrecisionPolicy())
    blocks = run.compiled_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=run.zero == 3 and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=run.zero == 3)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt, sched = run.optimizer(params)
    clip = run.cfg.optim.grad_clip
    records = []
    run.counter.read()
    for step in range(1, run.steps + 1):
        start = time.perf_counter()
        mbs, tokens, exact = run.batch()
        total = torch.zeros((), dtype=torch.float64, device=run.env.device)
        for mb in mbs:
            with run.autocast():
                loss = run.loss_sum(model, mb)
            (loss * run.world / tokens).backward()  # FSDP averages over ranks: the sum / global tokens
            total += loss.detach().double()
        grads = [p for _, p in params]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        records.append(run.record(step, start, total, tokens, exact, _norm(norm), lr))
    return records


# --------------------------------------------------------------------------------- deepspeed
def deepspeed_reason(zero: int) -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    return None


def run_deepspeed(run: PeerRun) -> list[dict]:
    """DeepSpeed as its documentation drives it: `deepspeed.initialize` with the client AdamW and
    lr schedule, ZeRO stage = the layout's, `gradient_accumulation_steps` = micro-batches per
    step, `engine.backward` + `engine.step` per micro-batch (DeepSpeed steps the optimizer at the
    accumulation boundary)."""
    import deepspeed  # optional: a peer, never a dependency

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins the existing process group
    model = run.build_model()
    run.compiled_blocks(model)
    opt, sched = run.optimizer(list(model.named_parameters()))
    mb_size = run.cfg.data.micro_batch_size
    clip = run.cfg.optim.grad_clip
    ds_config = {"train_batch_size": mb_size * run.micro_batches * run.world,
                 "train_micro_batch_size_per_gpu": mb_size, "gradient_accumulation_steps": run.micro_batches,
                 "zero_optimization": {"stage": run.zero}, "gradient_clipping": clip if clip > 0 else 0.0,
                 "bf16": {"enabled": run.cfg.model.dtype == "bfloat16"}, "steps_per_print": 10 ** 9,
                 "wall_clock_breakdown": False}
    engine, _, _, ds_sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    records = []
    run.counter.read()
    try:
        for step in range(1, run.steps + 1):
            start = time.perf_counter()
            mbs, tokens, exact = run.batch()
            lr = ds_sched.get_last_lr()[0]
            total = torch.zeros((), dtype=torch.float64, device=run.env.device)
            for mb in mbs:
                loss = run.loss_sum(engine, mb)
                # DeepSpeed divides by gradient_accumulation_steps and averages over ranks.
                engine.backward(loss * (run.world * run.micro_batches / tokens))
                engine.step()
                total += loss.detach().double()
            norm = engine.get_global_grad_norm()
            records.append(run.record(step, start, total, tokens, exact,
                                      float("nan") if norm is None else float(norm), lr))
    finally:
        engine.destroy()
    return records


# ------------------------------------------------------------------------------ hf, torchtitan
HF_NO_CPU_FSDP = ("accelerate runs FSDP on accelerators only: on CPU the HF Trainer would silently train with DDP "
                  "instead, so ZeRO-2/3 is not measured for it")


def hf_reason(zero: int) -> str | None:
    if importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (HF Trainer needs it: pip install accelerate)"
    if zero == 1:
        return "ZeRO-1 has no HF Trainer form without DeepSpeed (the Trainer runs DDP or FSDP)"
    if zero in (2, 3) and not torch.cuda.is_available():
        return HF_NO_CPU_FSDP
    return None


def run_hf(run: PeerRun) -> list[dict]:
    """HF Trainer on accelerate: DDP for ZeRO-0, FSDP2 for ZeRO-2/3 (see `bench_hf`)."""
    # Loaded here, not at the top: `bench_hf` imports the Trainer, which needs accelerate (optional).
    return importlib.import_module("loomtrain.launch.bench_hf").run_hf(run)


def torchtitan_reason(zero: int) -> str | None:
    if importlib.util.find_spec("torchtitan") is None:
        return "torchtitan is not installed (pip install torchtitan; it runs on CUDA only)"
    if not torch.cuda.is_available():
        return "torchtitan runs on CUDA only and there is no GPU here"
    return "the torchtitan peer is not built yet"


# peer -> (why it cannot run a ZeRO stage here, or None; the loop), for the worker and the launcher
PEER_RUNNERS = {"fsdp2": (fsdp2_reason, run_fsdp2), "deepspeed": (deepspeed_reason, run_deepspeed),
                "hf": (hf_reason, run_hf), "torchtitan": (torchtitan_reason, None)}
