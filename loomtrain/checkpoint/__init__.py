"""Layout-independent lazy asynchronous checkpoints (issue #5).

* `format`   the on-disk format (its docstring is the specification) and safe readers
* `engine`   the lazy async engine: host snapshot overlapped with forward/backward, DCP writer
             on its own gloo group, back-pressure
* `commit`   atomic commit, `latest` pointer, pruning, clean-up of interrupted saves
* `state`    what is saved: model/optimizer tensors by HF name (ZeRO-1 included), RNG, schedule
* `resume`   which checkpoint a run resumes from (preflight-cheap, no torch import)
* `manager`  `Checkpointer`, the Trainer's hooks (resume, save requests, wait, final commit)
"""
from loomtrain.checkpoint.format import (FORMAT_VERSION, CheckpointError, CorruptCheckpointError,
                                         list_committed, load_dcp_metadata, read_manifest, read_meta)

__all__ = ["FORMAT_VERSION", "CheckpointError", "CorruptCheckpointError", "list_committed",
           "load_dcp_metadata", "read_manifest", "read_meta"]
