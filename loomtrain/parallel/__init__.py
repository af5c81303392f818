"""One module per parallelism, each an `apply_*` that takes a module and a mesh and returns it
changed; `compose.parallelize` fixes their order (TP -> CP -> activation checkpointing ->
compile -> FSDP) and says why.

* `data_parallel`  DDP (ZeRO-0/1), FSDP2 (ZeRO-2/3, HSDP)
* `tensor`, `tensor_styles`  tensor + sequence parallelism from the model's `base_model_tp_plan`
* `pipeline`       stages carved from the HF model; torch.distributed.pipelining schedules
* `context`        Ulysses and ring attention through HF's `AttentionInterface`
* `hetero`         heterogeneous sequence parallelism: cost model, planner, executor, scheduler
* `activation`     activation checkpointing
* `expert`         expert parallelism: experts sharded over `ep`, tokens sent by all-to-all

May import: `loomtrain.kernels`, `loomtrain.models`, `loomtrain.mesh`, `loomtrain.config`,
`loomtrain.errors`. Never data, optimizer, checkpoint or runtime.
"""
