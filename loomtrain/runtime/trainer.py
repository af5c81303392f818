"""`Trainer`: one object that takes a config (and optionally a model) and trains it.

    from loomtrain import Trainer, load_config
    Trainer(load_config("examples/demo.yaml", ["train.max_steps=50"])).fit()

Under torchrun (or `loomtrain run`) every rank builds the same Trainer; alone it runs in one
process with no process group. Set-up order: process group -> mesh -> tokenizer/HF config ->
meta model -> parallelise -> materialise (init or load, shard by shard) -> DDP (ZeRO-0/1) ->
optimizer -> data -> step runner -> components. The model code itself is never changed for
parallelism.

The loop is `train_step` repeated; everything else is a component on the hook points of
`loomtrain.hooks` (checkpoints, metrics, the sample log, the pipeline timeline). Add your own with
`Trainer.add_hook` before `setup`/`fit`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from loomtrain.checkpoint.manager import Checkpointer
from loomtrain.config import Config
from loomtrain.data.loader import DataLoader
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.hooks import Hook, Hooks, LoopState
from loomtrain.kernels.loss_select import choose_loss
from loomtrain.kernels.modules import apply_module_kernels, choose_module_kernels
from loomtrain.mesh import DistEnv, ParallelDims, dp_coordinates, init_distributed
from loomtrain.models import build as model_lib
from loomtrain.models.flops import flop_model
from loomtrain.models.moe import MoeAux, MoeSpec
from loomtrain.offload.component import OffloadComponent
from loomtrain.optim.build import build_optimizer
from loomtrain.optim.clip import clip_grad_norm
from loomtrain.optim.schedule import lr_lambda
from loomtrain.parallel import pipeline
from loomtrain.parallel.compose import Parallelized, parallelize, wrap_after_materialize
from loomtrain.parallel.hetero.scheduler import HeteroScheduler
from loomtrain.resilience import build as resilience
from loomtrain.resilience.orphan import OrphanGuard
from loomtrain.resilience.straggler import TimedLoader
from loomtrain.resilience.watchdog import Watchdog
from loomtrain.parallel.tied import TiedEmbeddings, ties_embeddings
from loomtrain.runtime.components import MetricsLogger, PipelineTimeline, SampleLog
from loomtrain.runtime.nonfinite import NonFiniteGuard
from loomtrain.runtime.metrics import device_peak_flops, peak_memory_gb, step_record
from loomtrain.runtime.preflight import preflight
from loomtrain.runtime.step import HeteroStep, PackedStep


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
        self.loop = LoopState(max_steps=self.cfg.train.max_steps)
        self.hooks = Hooks()
        self._user_hooks: list[Hook] = []
        self.checkpointer: Checkpointer | None = None
        self.metrics: MetricsLogger | None = None
        self.hetero: HeteroScheduler | None = None  # the heterogeneous scheduler, when used
        self.watchdog: Watchdog | None = None
        self.orphan_guard: OrphanGuard | None = None

    @property
    def step(self) -> int:
        """Optimizer steps completed (restored on resume)."""
        return self.loop.step

    def add_hook(self, hook: Hook) -> Hook:
        """Register a component on the loop's hook points (before `setup`; called after the
        built-in components, and ended before them)."""
        if self.env is not None:
            raise RuntimeError("add_hook must be called before setup()")
        self._user_hooks.append(hook)
        return hook

    # ------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        cfg = self.cfg
        guards = resilience.start_guards(cfg)  # before anything can hang
        self.watchdog, self.orphan_guard = guards.watchdog, guards.orphan
        self.env = env = init_distributed(cfg.train.device, host_collectives=cfg.offload.params)
        self.nonfinite = NonFiniteGuard(cfg.train.nonfinite, env.is_main)
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
        self.ties_embeddings = False  # set by _build_part: the model ties its input and output embeddings
        self.parts = self._build_parts()
        self.par = self.parts[0]
        self.model_parts = [part.module for part in self.parts]
        self.model = self.model_parts[0]  # the whole model unless pipeline-parallel
        for module in self.model_parts:
            module.train()
        # offload.optimizer: its component supplies the optimizer class (and joins the hooks first)
        self.offload = (OffloadComponent(cfg.offload, env.device, is_main=env.is_main)
                        if cfg.offload.optimizer != "none" else None)
        self.optimizer = build_optimizer(
            self.model if len(self.model_parts) == 1 else nn.ModuleList(self.model_parts),
            zero=cfg.parallel.zero, mesh=self.mesh, lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
            **(self.offload.optimizer_args() if self.offload else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
        self.loader = DataLoader(cfg.data, self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                 seed=cfg.train.seed)
        self.data_timer = TimedLoader(self.loader)  # the runner reads through it: data wait is timed
        self.loss_choice = choose_loss(cfg.kernels.fused_loss, cfg.kernels.loss_chunk_tokens, self.hf_config,
                                       device_type=env.device.type, vocab_parallel=self.dims.tp > 1,
                                       hetero=cfg.parallel.sequence_scheduler == "hetero")
        self.pipeline = self._build_pipeline() if self.pp_group is not None else None
        # Tied embeddings under PP: the first and last stage's copies get their summed gradient.
        self.tied = (TiedEmbeddings.build(self.model_parts, self.stage_ids, self.n_stages, self.mesh.root,
                                          self.dims.pp) if self.pp_group is not None and self.ties_embeddings else None)
        self.runner = self._build_runner()
        compute_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.peak_flops, self.peak_source = device_peak_flops(env.device, compute_dtype, cfg.train.peak_tflops)
        # Dropout (if the model has any) differs per data-parallel rank, as it would in one big batch.
        torch.manual_seed(cfg.train.seed + 7919 * self.dp_rank)
        self._register_components()
        self.hooks.call("after_setup", self.loop)
        return self

    def _build_runner(self) -> PackedStep | HeteroStep:
        """The per-step forward/backward: packed rows, or the heterogeneous scheduler's plan."""
        cfg, env = self.cfg, self.env
        if cfg.parallel.sequence_scheduler != "hetero":
            return PackedStep(self.data_timer, self.par, self.flops, cp=self.dims.cp, token_group=self.token_group,
                              token_ranks=self.token_ranks, device=env.device, pipeline=self.pipeline,
                              pp_group=self.pp_group, moe=self._moe_aux() if self.pipeline is None else None,
                              loss_choice=self.loss_choice)
        self.hetero = HeteroScheduler(cfg, self.hf_config, self.model, self.mesh, env.device)
        runner = HeteroStep(self.data_timer, self.hetero, self.par, self.flops, token_group=self.token_group,
                            is_main=env.is_main)
        if cfg.parallel.hetero_calibrate:
            self.hetero.calibrate(runner.call, vocab=self.tokenizer.vocab_size)
        if env.is_main:
            print(self.hetero.describe(), flush=True)
        return runner

    def _register_components(self) -> None:
        """Built-in components in the order they run (`end_fit` in reverse): metrics first, so
        its summary is printed last and can name the checkpoint the checkpointer committed."""
        cfg, env = self.cfg, self.env
        if self.offload is not None:  # first: lays out the state before a resume loads into it
            self.hooks.add(self.offload.attach(self.optimizer))
        self.metrics = self.hooks.add(MetricsLogger(
            cfg.train.output_dir, is_main=env.is_main, log_every=cfg.train.log_every,
            tensorboard=cfg.train.tensorboard, progress=cfg.train.progress))
        if self.watchdog is not None:  # early: it ends after the checkpointer's final commit
            self.hooks.add(self.watchdog)
        if cfg.train.log_samples:
            self.hooks.add(SampleLog(cfg.train.output_dir, is_main=env.is_main, dp_group=self.dp_group,
                                     dp_size=self.dp_size))
        if self.pipeline is not None and cfg.train.trace_pipeline:
            self.hooks.add(PipelineTimeline(self.pipeline, pp_group=self.pp_group, pp=self.dims.pp,
                                            output_dir=cfg.train.output_dir, n_micro=self._n_micro(),
                                            schedule=cfg.parallel.pp_schedule, is_main=env.is_main))
        self.checkpointer = self.hooks.add(Checkpointer(
            cfg, env, self.dims, model_parts=self.model_parts, optimizer=self.optimizer,
            lr_scheduler=self.scheduler, data=self.loader, dp_rank=self.dp_rank, dp_size=self.dp_size))
        checkpointer = self.checkpointer
        for hook in resilience.components(
                cfg, rank=env.rank, world_size=env.world_size, is_main=env.is_main, device_type=env.device.type,
                mesh_root=self.mesh.root if self.mesh is not None else None,
                resumed_from=lambda: checkpointer.resumed_from, hetero=self.hetero, loader=self.data_timer):
            self.hooks.add(hook)
        for hook in self._user_hooks:
            self.hooks.add(hook)

    def _moe_aux(self) -> MoeAux | None:
        """A mixture-of-experts model's load-balancing loss and expert-load metrics (`models.moe`)."""
        spec = MoeSpec.of(self.hf_config)
        if spec is None:  # under pp the stages pass the router statistics on (`parallel.pipeline_moe`)
            return None
        share = self.mesh["cp"].get_group() if self.dims.cp > 1 else None
        return MoeAux(spec, self.cfg.data.global_batch_size // self.cfg.data.micro_batch_size, share_group=share)

    def _n_micro(self) -> int:
        return self.cfg.data.global_batch_size // (self.dp_size * self.cfg.data.micro_batch_size)

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
        return [self._build_part((*bounds[sid], sid == 0, sid == self.n_stages - 1)) for sid in self.stage_ids]

    def _build_pipeline(self) -> pipeline.Pipeline:
        return pipeline.Pipeline.build(self.model_parts, self.stage_ids, self.n_stages, self.pp_group,
                                       self.env.device, self.cfg.parallel.pp_schedule, self._n_micro(),
                                       syncs=[part.micro_batch for part in self.parts],
                                       loss_choice=self.loss_choice, autocast_dtype=self.parts[0].autocast_dtype,
                                       moe=self._moe_aux())

    def _build_part(self, carve: tuple | None) -> Parallelized:
        cfg, env = self.cfg, self.env
        meta = model_lib.build_meta_model(self.hf_config)
        self.ties_embeddings = ties_embeddings(meta)
        if carve is not None:
            start, end, first, last = carve
            pipeline.carve_stage(meta, start, end, first=first, last=last)
        # kernels.rmsnorm / kernels.swiglu: Liger's module instances in place of HF's, on meta
        self.module_kernels = choose_module_kernels(cfg.kernels.rmsnorm, cfg.kernels.swiglu, self.hf_config,
                                                    device_type=env.device.type, tensor_parallel=self.dims.tp > 1)
        apply_module_kernels(meta, self.module_kernels, self.hf_config)
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
        # offload.params: FSDP2's CPUOffloadPolicy wants the sharded parameters materialised on the host
        model_lib.materialize(par.module, torch.device("cpu") if cfg.offload.params else env.device, fill)
        return wrap_after_materialize(par, cfg, self.mesh)

    # ------------------------------------------------------------------ training
    def train_step(self) -> dict:
        """One optimizer step over the next global batch; returns its metrics record."""
        cfg, env, loop, hooks = self.cfg, self.env, self.loop, self.hooks
        start = time.perf_counter()
        hooks.call("before_step", loop)
        result = loop.last_result = self.runner.run()
        if self.tied is not None:
            self.tied.sum_grads()
        hooks.call("after_backward", loop)
        params = [p for module in self.model_parts for p in module.parameters()]
        if self.tied is not None:  # the shared weight counts once in the norm
            params = self.tied.counted_once(params)
        grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, pp_group=self.pp_group)
        if self.tied is not None:
            self.tied.clip_left_out(cfg.optim.grad_clip, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        skip = self.nonfinite.skip(loop.step + 1, result.loss, float(grad_norm), lr)
        hooks.call("before_optimizer_step", loop)
        if not skip:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        hooks.call("after_optimizer_step", loop)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = result.tokens if result.tokens is not None else cfg.data.global_batch_size * cfg.data.seq_len
        return step_record(
            step=loop.step, loss=result.loss, grad_norm=float(grad_norm), lr=lr, tokens=tokens,
            step_time_s=elapsed,
            # An uncountable model trains with MFU unknown (None), never a refusal.
            flops_palm=self.flops.palm_step_flops(tokens, cfg.data.seq_len) if self.flops.known else None,
            flops_exact=result.exact_flops if self.flops.known else None, world_size=env.world_size,
            peak_flops_per_device=self.peak_flops, peak_mem_gb=peak_memory_gb(env.device),
            valid_tokens=result.valid_tokens, samples_consumed=self.loader.samples_consumed,
            skipped_steps=self.nonfinite.skipped, **self.runner.metrics())

    def fit(self) -> FitResult:
        """Train to `train.max_steps`, log every step, print a summary; returns the curve."""
        if self.env is None:
            self.setup()
        cfg, loop, hooks = self.cfg, self.loop, self.hooks
        if self.env.is_main:
            self._print_banner()  # before the progress bar appears
            if loop.step >= cfg.train.max_steps:
                print(f"loomtrain: resumed at step {loop.step}, which is already train.max_steps="
                      f"{cfg.train.max_steps}: nothing to train (raise train.max_steps to continue)", flush=True)
        try:
            hooks.call("begin_fit", loop)
            while loop.step < cfg.train.max_steps:
                record = self.train_step()
                if hooks.after_step(loop, record):
                    hooks.call("on_stop", loop)
                    break
        except BaseException as exc:
            hooks.end_fit(loop, exc)
            raise
        hooks.end_fit(loop, None)
        return FitResult(losses=list(self.metrics.losses), grad_norms=list(self.metrics.grad_norms),
                         steps=loop.step, output_dir=cfg.train.output_dir, summary=self.metrics.summary)

    def _print_banner(self) -> None:
        d, cfg = self.dims, self.cfg
        n_params = self.flops.total_params or sum(p.numel() for m in self.model_parts for p in m.parameters())
        if not self.flops.known:
            print(f"loomtrain: warning: MFU unknown, the model's FLOPs cannot be counted ({self.flops.reason})",
                  flush=True)
        print(f"loomtrain: {self.hf_config.model_type} {n_params / 1e6:.2f}M params | world {self.env.world_size} "
              f"(dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} x cp {d.cp} x tp {d.tp} x pp {d.pp}), "
              f"zero {cfg.parallel.zero} | {self.env.device.type} {cfg.model.dtype} | "
              f"batch {cfg.data.global_batch_size} x {cfg.data.seq_len} tokens | "
              f"peak {self.peak_flops / 1e12:.2f} TFLOP/s/device ({self.peak_source}) | "
              f"attention {self.parts[0].attention} | loss {self.loss_choice.path} ({self.loss_choice.reason}) | "
              f"{self.module_kernels.reason}",
              flush=True)

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded parameters by HF name (tied ones under each name) on every rank's CPU;
        a collective under FSDP."""
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
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.env is not None and self.env.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
