"""Resilience: name the slow rank, never hang.

Components on the training loop's hook points (`loomtrain.hooks`), built by the trainer:

  detect.py     pure statistics over one window's per-rank figures (median/MAD outliers, the
                3-of-5 persistence rule, rank vs link attribution); no torch

The layer sits between runtime (which registers the components) and checkpoint; it imports only
the layers below it.
"""
