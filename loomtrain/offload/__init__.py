"""Optimizer-state offloading to host memory, written as components on the training-loop hooks
(`loomtrain.hooks`).

May import: `loomtrain.optim`, `loomtrain.mesh`, `loomtrain.hooks`, `loomtrain.config`, `loomtrain.errors`.
"""
