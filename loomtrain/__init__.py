"""loomtrain: a distributed training runtime for Hugging Face causal language models.

One `Trainer` composes tensor, pipeline, context and ZeRO data parallelism on PyTorch's own
distributed stack; see README.md. The subpackages are layers whose imports point one way (from
`launch` at the top down to `errors`); `.importlinter` states the order and the test suite
enforces it.
"""
import importlib

from loomtrain.config import Config, load_config
from loomtrain.errors import ConfigError, DataError, LoomError

from loomtrain.version import __version__


def __getattr__(name):
    # `loomtrain.Trainer` is looked up on first use (PEP 562): every `loomtrain.*` import runs this
    # file, and the command line must parse without loading torch and transformers.
    if name == "Trainer":
        return importlib.import_module("loomtrain.runtime.trainer").Trainer
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "DataError", "LoomError", "Trainer", "load_config", "__version__"]
