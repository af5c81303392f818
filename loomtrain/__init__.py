"""loomtrain: a distributed training runtime for Hugging Face causal language models.

One `Trainer` composes ZeRO data parallelism (and, as they land, tensor, pipeline and context
parallelism) on PyTorch's own distributed stack; see README.md and DESIGN.md.
"""
from loomtrain.config import Config, load_config
from loomtrain.errors import ConfigError, DataError, LoomError

__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer pulls in transformers (~5 s); import it only when asked for.
    if name == "Trainer":
        from loomtrain.runtime.trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "DataError", "LoomError", "Trainer", "load_config", "__version__"]
