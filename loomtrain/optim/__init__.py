"""The optimizer and what surrounds its step: AdamW groups (ZeRO-1 sharded when asked), the LR
schedule, and gradient-norm clipping that is correct on DTensor shards and pipeline stages.

May import: `loomtrain.mesh`, `loomtrain.config`, `loomtrain.errors`.
"""
