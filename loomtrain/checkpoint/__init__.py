"""Layout-independent lazy asynchronous checkpoints.

* `format`   the on-disk format (its docstring is the specification), manifest and meta.json
* `integrity`  sizes and checksums (fast: xxh3/crc32; sha256) of the files, and their check
* `safeload` reading DCP's index and tensors so that nothing in a checkpoint runs code
* `engine`   the lazy async engine: host snapshot overlapped with forward/backward, DCP writer
             on its own gloo group, back-pressure
* `commit`   atomic commit, `latest` pointer, pruning, clean-up of interrupted saves
* `hostcopy` which rank writes which chunk, and the reused host buffers
* `signals`, `faults`  stop-and-commit on SIGTERM / Ctrl-C; the crash tests' kill points
* `state`    what is saved: model/optimizer tensors by HF name (ZeRO-1 included), RNG, schedule
* `resume`   which checkpoint a run resumes from (preflight-cheap: reads no tensors)
* `manager`  `Checkpointer`, a training-loop hook over the `Stateful` parts it is given
             (resume, save requests, the wait before the optimizer step, final commit)
* `restore`  the resume itself: verify, load into the current layout, fall back to the previous
* `ranks`    how the checkpointer's ranks agree: broadcast, first problem, exit agreement via the store
* `offline`, `hf`, `deepspeed`, `ds_format`  tools without a training job: reading and writing a
             checkpoint in one process, HF export, DeepSpeed import

May import: `loomtrain.optim`, `loomtrain.data`, `loomtrain.models`, `loomtrain.hooks`,
`loomtrain.config`, `loomtrain.errors`. It knows nothing of the trainer.
"""
from loomtrain.checkpoint.format import (FORMAT_VERSION, CheckpointError, CorruptCheckpointError,
                                         list_committed, read_manifest, read_meta)
from loomtrain.checkpoint.safeload import load_dcp_metadata

__all__ = ["FORMAT_VERSION", "CheckpointError", "CorruptCheckpointError", "list_committed",
           "load_dcp_metadata", "read_manifest", "read_meta"]
