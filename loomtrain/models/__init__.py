"""HF model building and the model-level math, free of any parallelism.

`build` makes an HF config from the run config, builds the model on the meta device, and
materialises it shard by shard (random init that is the same on every layout, safetensors, or a
model instance), keeping tied weights tied; `weights` reads and checks a model directory's
safetensors headers (names, shapes) before any tensor is read. `loss` is the global-token loss; `flops` counts a
step's FLOPs for MFU.

May import: `loomtrain.config`, `loomtrain.errors`, torch, transformers, safetensors.
"""
