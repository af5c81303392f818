"""The training loop: `Trainer` (set-up and the loop), the per-step forward/backward, the hook
components it runs (checkpoints, metrics, pipeline timeline, heterogeneous scheduler), metrics
sinks and pre-flight checks.

May import every layer below it; only `loomtrain.launch` imports it.
"""
