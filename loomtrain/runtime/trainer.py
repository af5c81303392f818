"""`Trainer`: one object that takes a config (and optionally a model) and trains it.

    from loomtrain import Trainer, load_config
    Trainer(load_config("examples/demo.yaml", ["train.max_steps=50"])).fit()

Under torchrun (or `loomtrain run`) every rank builds the same Trainer; alone it runs in one
process with no process group. Set-up order: process group -> mesh -> tokenizer/HF config ->
meta model -> parallelise -> materialise (init or load, shard by shard) -> DDP (ZeRO-0/1) ->
optimizer -> data -> metrics. The model code itself is never changed for parallelism.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from loomtrain.config import Config
from loomtrain.errors import LoomError
from loomtrain.parallel.compose import Parallelized, parallelize, wrap_after_materialize
from loomtrain.parallel import pipeline
from loomtrain.optim.build import build_optimizer
from loomtrain.models import build as model_lib
from loomtrain.data.loader import DataLoader
from loomtrain.models.flops import flop_model
from loomtrain.mesh import DistEnv, ParallelDims, dp_coordinates, init_distributed
from loomtrain.runtime.metrics import MetricsWriter, device_peak_flops, peak_memory_gb, step_record
from loomtrain.optim.clip import clip_grad_norm
from loomtrain.optim.schedule import lr_lambda
from loomtrain.runtime.preflight import preflight
from loomtrain.runtime.step import forward_backward, pipeline_forward_backward
from loomtrain.data.tokenizer import build_tokenizer


@dataclass
class FitResult:
    """What `fit` returns on every rank (metrics are the same numbers everywhere)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    steps: int = 0
    output_dir: str = ""
    summary: str = ""


class Trainer:
    """Trains an HF causal LM under the layout the config asks for.

    `model` may be a `transformers` model instance (its weights are used; they must be the same on
    every rank); otherwise `model.path` (HF directory, safetensors) or `model.architecture` +
    `model.config` (random init) from the config.
    """

    def __init__(self, config: Config | None = None, model: nn.Module | None = None):
        self.cfg = config or Config()
        self._user_model = model
        self.env: DistEnv | None = None
        self.mesh = None
        self.par: Parallelized | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.env = env = init_distributed(cfg.train.device)
        if self._user_model is None:
            preflight(cfg, env.world_size)
        self.dims = ParallelDims.from_config(cfg.parallel, env.world_size)
        self.mesh = self.dims.build_mesh(env.device.type)
        self.dp_rank, self.dp_size = dp_coordinates(self.mesh)
        self.dp_group = self.mesh["dp"].get_group() if self.mesh is not None else None
        # Ranks that see different tokens (data x context parallel): the loss and its gradient
        # are reduced over them.
        self.token_group = self.mesh["dp_cp"].get_group() if self.mesh is not None else None
        self.token_ranks = self.dp_size * self.dims.cp

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self._user_model is not None:
            self.hf_config = self._user_model.config
        else:
            self.hf_config = model_lib.build_hf_config(
                cfg.model, vocab_size=self.tokenizer.vocab_size, seq_len=cfg.data.seq_len,
                eos_id=self.tokenizer.eos_id)
        self.flops = flop_model(self.hf_config)
        self.pp_group = self.mesh["pp"].get_group() if self.mesh is not None and self.dims.pp > 1 else None
        self.parts = self._build_parts()
        self.par = self.parts[0]
        self.model_parts = [part.module for part in self.parts]
        self.model = self.model_parts[0]  # the whole model unless pipeline-parallel
        for module in self.model_parts:
            module.train()
        self.optimizer = build_optimizer(
            self.model if len(self.model_parts) == 1 else nn.ModuleList(self.model_parts),
            zero=cfg.parallel.zero, mesh=self.mesh, lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
        self.loader = DataLoader(cfg.data, self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                 seed=cfg.train.seed)
        self.pipeline = self._build_pipeline() if self.pp_group is not None else None
        self.hetero = None
        if cfg.parallel.sequence_scheduler == "hetero":
            from loomtrain.parallel.hetero.costmodel import CostModel
            from loomtrain.parallel.hetero.executor import HeteroExecutor

            self.hetero = HeteroExecutor(self.model, self.mesh, env.device)
            self.hetero_cost = CostModel.from_config(self.hf_config)
            coeffs = cfg.parallel.hetero_cost_model
            if isinstance(coeffs, str):
                self.hetero_cost = CostModel.from_json(coeffs, base=self.hetero_cost)
            elif coeffs:
                self.hetero_cost = CostModel.from_dict(coeffs, base=self.hetero_cost)
            if cfg.parallel.hetero_calibrate:
                from loomtrain.models.loss import token_loss_sum

                module = self.par.wrapper if self.par.wrapper is not None else self.model
                self.hetero_cost, samples = self.hetero.calibrate(
                    lambda ids, pos: module(input_ids=ids, position_ids=pos, use_cache=False).logits,
                    token_loss_sum, cfg.data.seq_len, self.hetero_cost, vocab=self.tokenizer.vocab_size)
            if env.is_main:
                print("loomtrain: heterogeneous scheduler cost model"
                      + (" (calibrated on this hardware)" if cfg.parallel.hetero_calibrate else "")
                      + ":\n" + self.hetero_cost.describe(
                          lengths=sorted({max(1, cfg.data.seq_len // k) for k in (16, 4, 1)}),
                          degrees=sorted({1, 2, self.hetero.n})), flush=True)
        compute_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.peak_flops, self.peak_source = device_peak_flops(env.device, compute_dtype, cfg.train.peak_tflops)
        self.step = 0
        # Dropout (if the model has any) differs per data-parallel rank, as it would in one big batch.
        torch.manual_seed(cfg.train.seed + 7919 * self.dp_rank)
        self.checkpointer = self._setup_checkpointing()
        return self

    def _build_parts(self) -> list[Parallelized]:
        """The whole model, or under pipeline parallelism this rank's stages (one per virtual stage)."""
        if self.pp_group is None:
            return [self._build_part(None)]
        pcfg = self.cfg.parallel
        per_rank = pipeline.stages_per_rank(pcfg.pp_schedule, pcfg.pp_virtual_stages)
        self.n_stages = self.dims.pp * per_rank
        block_cost, embed_cost, head_cost = pipeline.split_costs(self.hf_config, self.flops)
        bounds = pipeline.balanced_split(block_cost, self.hf_config.num_hidden_layers, embed_cost, head_cost,
                                         self.n_stages)
        self.stage_ids = pipeline.stage_ids(pcfg.pp_schedule, self.mesh["pp"].get_local_rank(), self.dims.pp,
                                            per_rank)
        self.stage_bounds = [bounds[sid] for sid in self.stage_ids]
        return [self._build_part((*bounds[sid], sid == 0, sid == self.n_stages - 1)) for sid in self.stage_ids]

    def _build_pipeline(self) -> pipeline.Pipeline:
        cfg = self.cfg
        n_micro = cfg.data.global_batch_size // (self.dp_size * cfg.data.micro_batch_size)
        return pipeline.Pipeline.build(self.model_parts, self.stage_ids, self.n_stages, self.pp_group,
                                       self.env.device, cfg.parallel.pp_schedule, n_micro)

    def _build_part(self, carve: tuple | None) -> Parallelized:
        cfg, env = self.cfg, self.env
        meta = model_lib.build_meta_model(self.hf_config)
        if carve is not None:
            start, end, first, last = carve
            pipeline.carve_stage(meta, start, end, first=first, last=last)
        par = parallelize(meta, cfg, self.mesh)
        if self._user_model is not None:
            state = {n: p.detach().to(env.device) for n, p in self._user_model.named_parameters()}
            if dist.is_initialized():  # the same weights everywhere, whatever each rank built
                for tensor in state.values():
                    dist.broadcast(tensor, src=0)
            fill = lambda m: model_lib.load_from_instance(m, state)  # noqa: E731
        elif cfg.model.path is not None:
            fill = lambda m: model_lib.load_safetensors(m, cfg.model.path)  # noqa: E731
        else:
            fill = lambda m: model_lib.init_random(m, cfg.train.seed)  # noqa: E731
        model_lib.materialize(par.module, env.device, fill)
        return wrap_after_materialize(par, cfg, self.mesh)

    # ------------------------------------------------------------------ training
    def train_step(self) -> dict:
        """One optimizer step over the next global batch; returns its metrics record."""
        cfg, env = self.cfg, self.env
        start = time.perf_counter()
        if self.pipeline is not None and cfg.train.trace_pipeline:
            self.pipeline.timeline.enabled = True
            self.pipeline.timeline.events.clear()  # keep only the latest step
        if self.hetero is not None:
            result = self._hetero_forward_backward()
        else:
            result = self._packed_forward_backward()
        params = [p for module in self.model_parts for p in module.parameters()]
        grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, pp_group=self.pp_group)
        lr = self.scheduler.get_last_lr()[0]
        self._checkpoint_before_optimizer_step()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = result.tokens if result.tokens is not None else cfg.data.global_batch_size * cfg.data.seq_len
        record = step_record(
            step=self.step, loss=result.loss, grad_norm=float(grad_norm), lr=lr, tokens=tokens,
            step_time_s=elapsed, flops_palm=self.flops.palm_step_flops(tokens, cfg.data.seq_len),
            flops_exact=result.exact_flops, world_size=env.world_size,
            peak_flops_per_device=self.peak_flops, peak_mem_gb=peak_memory_gb(env.device),
            valid_tokens=result.valid_tokens, samples_consumed=self.loader.samples_consumed,
            **(self._plan_summary() if self.hetero is not None else {}))
        if cfg.train.log_samples:
            self._log_samples(result.sample_ids)
        return record

    def _packed_forward_backward(self):
        """Fixed-length packed rows, split over data parallel (and pipeline stages)."""
        micro_batches = self.loader.next_step()
        local_flops = self.flops.exact_step_flops(
            [n for mb in micro_batches for row in mb.doc_lengths for n in row]) / self.dims.cp
        if self.pipeline is not None:
            return pipeline_forward_backward(self.pipeline, self.par, micro_batches, dp_group=self.token_group,
                                             dp_size=self.token_ranks, pp_group=self.pp_group,
                                             device=self.env.device, local_flops=local_flops)
        return forward_backward(self.par, micro_batches, dp_group=self.token_group,
                                dp_size=self.token_ranks, device=self.env.device, local_flops=local_flops)

    def _hetero_forward_backward(self):
        """Whole documents of varied length, planned into per-micro-step sequence-parallel groups."""
        from loomtrain.parallel.hetero.planner import plan_batch
        from loomtrain.models.loss import StepResult, token_loss_sum

        sample_ids, docs = self.loader.next_sequences()
        lengths = [int(doc.size) - 1 for doc in docs]
        capacity = self.cfg.parallel.hetero_tokens_per_rank or self.cfg.data.seq_len
        self.last_plan = plan_batch(lengths, self.hetero.n, capacity, self.hetero_cost)
        module = self.par.wrapper if self.par.wrapper is not None else self.model

        def call(input_ids, position_ids):
            return module(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

        loss_sum, global_tokens = self.hetero.run(self.last_plan, docs, call, token_loss_sum, ddp=self.par.wrapper)
        if self.token_group is not None:
            dist.all_reduce(loss_sum, group=self.token_group)
        ids = sample_ids if self.env.is_main else []  # every rank read the whole batch
        return StepResult(loss_sum.item() / global_tokens, global_tokens, self.flops.exact_step_flops(lengths),
                          ids, tokens=sum(lengths))

    def _plan_summary(self) -> dict:
        plan = self.last_plan
        degrees = sorted({g.degree for step in plan.steps for g in step.groups if g.seqs})
        return {"plan": plan.strategy, "plan_degrees": degrees, "plan_microsteps": len(plan.steps),
                "plan_predicted_s": plan.time}

    def _log_samples(self, sample_ids: list[int]) -> None:
        gathered = [sample_ids]
        if self.dp_group is not None:
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, sample_ids, group=self.dp_group)
        if self.env.is_main:
            path = os.path.join(self.cfg.train.output_dir, "samples.jsonl")
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": self.step, "samples": sorted(i for ids in gathered for i in ids)}) + "\n")

    def fit(self) -> FitResult:
        """Train to `train.max_steps`, log every step, print a summary; returns the curve."""
        if self.env is None:
            self.setup()
        cfg, env = self.cfg, self.env
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        writer = None
        if env.is_main:
            self._print_banner()  # before the progress bar appears
            if self.step >= cfg.train.max_steps:
                print(f"loomtrain: resumed at step {self.step}, which is already train.max_steps="
                      f"{cfg.train.max_steps}: nothing to train (raise train.max_steps to continue)", flush=True)
            writer = MetricsWriter(cfg.train.output_dir, tensorboard=cfg.train.tensorboard,
                                   progress=cfg.train.progress and self.step < cfg.train.max_steps,
                                   total_steps=cfg.train.max_steps,
                                   start_step=self.step)
        result = FitResult(output_dir=cfg.train.output_dir)
        try:
            self._checkpoint_begin_fit()
            while self.step < cfg.train.max_steps:
                record = self.train_step()
                result.losses.append(record["loss"])
                result.grad_norms.append(record["grad_norm"])
                if writer is not None and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps):
                    writer.log(record)
                if self._checkpoint_after_step():
                    break
        except BaseException as exc:
            self._checkpoint_end_fit(exc)
            raise
        else:
            self._checkpoint_end_fit(None)
        finally:
            if writer is not None:
                writer.close()
        result.steps = self.step
        if self.pipeline is not None and cfg.train.trace_pipeline:
            self._write_timeline()
        if writer is not None:
            result.summary = writer.summary(checkpoint=self._last_checkpoint())
            print(result.summary, flush=True)
        return result

    def _write_timeline(self) -> None:
        """Gather the last step's pipeline events from every stage; rank 0 writes and draws them."""
        from loomtrain.runtime import timeline

        rows = [None] * self.dims.pp
        dist.all_gather_object(rows, self.pipeline.timeline.events, group=self.pp_group)
        if self.env.is_main:
            cfg = self.cfg
            path = os.path.join(cfg.train.output_dir, "pipeline_timeline.json")
            n_micro = cfg.data.global_batch_size // (self.dp_size * cfg.data.micro_batch_size)
            record = timeline.write_timeline(path, rows, n_micro, cfg.parallel.pp_schedule)
            try:
                timeline.draw_timeline(path, path.replace(".json", ".png"))
            except LoomError as exc:
                print(f"loomtrain: {exc}", flush=True)
            print(f"loomtrain: pipeline bubble {100 * record['bubble_measured']:.1f}% measured, "
                  f"{100 * record['bubble_theory']:.1f}% theory; timeline in {path}", flush=True)

    def _print_banner(self) -> None:
        d, cfg = self.dims, self.cfg
        n_params = self.flops.total_params
        print(f"loomtrain: {self.hf_config.model_type} {n_params / 1e6:.2f}M params | world {self.env.world_size} "
              f"(dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x cp {d.cp} x tp {d.tp} x pp {d.pp}), "
              f"zero {cfg.parallel.zero} | {self.env.device.type} {cfg.model.dtype} | "
              f"batch {cfg.data.global_batch_size} x {cfg.data.seq_len} tokens | "
              f"peak {self.peak_flops / 1e12:.2f} TFLOP/s/device ({self.peak_source})", flush=True)

    # ------------------------------------------------------------------ checkpoints
    # The only places the training loop meets checkpointing (loomtrain.checkpoint.manager):
    # resume at the end of setup, a save request after each optimizer step, the wait for the
    # snapshot copy right before the next optimizer step, the last commit when fit ends.
    def _setup_checkpointing(self):
        from loomtrain.checkpoint.manager import Checkpointer

        return Checkpointer(self).setup()

    def _last_checkpoint(self) -> str | None:
        """The newest committed checkpoint of this run (or the one it resumed from), for the summary."""
        ckpt = getattr(self, "checkpointer", None)
        if ckpt is None:
            return None
        engine = ckpt.engine
        path = (engine.last_committed if engine is not None else None) or ckpt.resumed_from
        return os.path.abspath(path) if path else None

    def _checkpoint_before_optimizer_step(self) -> None:
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.before_optimizer_step()

    def _checkpoint_begin_fit(self) -> None:
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.begin_fit()

    def _checkpoint_after_step(self) -> bool:
        """Request a save when one is due; True when a stop (SIGTERM / Ctrl-C) was agreed."""
        if getattr(self, "checkpointer", None) is None:
            return False
        return self.checkpointer.after_step()

    def _checkpoint_end_fit(self, exc: BaseException | None) -> None:
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.end_fit(exc)

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded parameters by HF name (tied ones under each name) on every rank's CPU;
        a collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd: dict[str, torch.Tensor] = {}
        for part in self.parts:
            if not part.uses_fsdp:
                part_sd = dict(part.module.named_parameters(remove_duplicate=False))
            else:
                part_sd = get_model_state_dict(part.module, options=StateDictOptions(full_state_dict=True,
                                                                                     broadcast_from_rank0=False))
            sd.update({n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
                       for n, t in part_sd.items()})
        if self.pp_group is not None:  # every stage contributes the parameters it owns
            gathered = [None] * self.dims.pp
            dist.all_gather_object(gathered, sd, group=self.pp_group)
            sd = {k: v for part_sd in gathered for k, v in part_sd.items()}
        return sd

    def close(self) -> None:
        """Destroy the process group if this Trainer created it."""
        if self.env is not None and self.env.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
