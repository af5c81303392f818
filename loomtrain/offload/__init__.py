"""Optimizer-state offloading to host memory, written as components on the training-loop hooks
(`loomtrain.hooks`).

* `model`      the performance model and planner (pure arithmetic, no torch; `loomtrain
               plan-offload` uses it): the device share and sub-group size that minimise the
               update phase, with the closed form derived in its docstring
* `arena`      one bounded host arena (pinned on CUDA) for all the state; a one-line error when
               the host lacks the memory
* `paths`      the CPU update path and the device update path (CUDA streams and double buffering;
               without a GPU, host buffers and a thread stand in for the device)
* `optimizer`  `OffloadAdamW`: the state in the arena under AdamW's usual names, the two paths at once
* `measure`    link bandwidth, CPU and device AdamW rates, free device memory
* `component`  `OffloadComponent`: measure, plan, re-plan on drift, metrics

May import: `loomtrain.optim`, `loomtrain.mesh`, `loomtrain.hooks`, `loomtrain.config`, `loomtrain.errors`.
"""
