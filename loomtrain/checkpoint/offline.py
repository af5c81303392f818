"""Checkpoints read and written by one process with no training job: for tools (`loomtrain ckpt`,
HF export, DeepSpeed import) and tests.

`format` holds the specification and the readers the resume path uses; this module adds what a
tool needs on top: naming a checkpoint loosely (a step directory, or a checkpoint root meaning its
newest committed one), reading only some tensors (so an export holds one shard in memory, not the
model), and committing a checkpoint written offline (an import) with the same layout, meta.json
and manifest as the training engine's, so that any layout resumes from it.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from loomtrain.checkpoint import commit as commit_lib
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import safeload
from loomtrain.checkpoint.format import CheckpointError, CorruptCheckpointError


def resolve(path: str) -> str:
    """The committed checkpoint `path` names: itself (a directory with manifest.json) or, for a
    checkpoint root, its newest committed step directory. Raises a one-line CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint (expected a step_NNNNNNNN directory or a "
                              "checkpoint.dir holding them)")
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if fmt.is_leftover(name):
        raise CheckpointError(f"{path} is not a committed checkpoint (the leftover of an interrupted save or prune)")
    if os.path.isfile(os.path.join(path, fmt.MANIFEST_FILE)):
        return path
    committed = fmt.list_committed(path)
    if committed:
        return committed[0][1]
    if fmt.parse_step_dir(name) is not None:
        raise CheckpointError(f"{path} is not a committed checkpoint (no {fmt.MANIFEST_FILE}: its save never "
                              "finished)")
    raise CheckpointError(f"{path} is not a loomtrain checkpoint (expected a step_NNNNNNNN directory with "
                          f"{fmt.MANIFEST_FILE}, or a checkpoint.dir holding such directories)")


def _valid_index(index) -> bool:
    """meta.json's tensor index as tools may use it blindly: names -> shape (non-negative ints,
    at most 2**62 elements) and dtype (a string)."""
    if not isinstance(index, dict) or not index:
        return False
    for v in index.values():
        shape = v.get("shape") if isinstance(v, dict) else None
        if not isinstance(shape, list) or not isinstance(v.get("dtype"), str) or len(shape) > 64 or \
                not all(type(d) is int and 0 <= d < 1 << 62 for d in shape) or math.prod(shape) >= 1 << 62:
            return False
    return True


def tensor_index(ckpt: str, meta: dict | None = None) -> dict[str, dict]:
    """`{key: {"shape": [...], "dtype": "float32"}}` of every tensor: meta.json's index when it is
    well formed, else (an older, hand-made or damaged checkpoint) DCP's own, checked index."""
    index = (meta or {}).get("tensors")
    return index if _valid_index(index) else safeload.dcp_tensor_index(ckpt)


def load_tensors(ckpt: str, keys: list[str]) -> dict:
    """Full CPU tensors of `keys` only (DCP reads just the chunks they need), through the safe
    reader. A key the checkpoint lacks, or unreadable data, is a one-line CorruptCheckpointError."""
    md = safeload.tensor_entries(safeload.load_dcp_metadata(ckpt))
    missing = [k for k in keys if k not in md]
    if missing:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {fmt.DCP_METADATA_FILE} has no tensor {missing[0]}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    if not out:
        return out
    try:
        safeload.load(out, ckpt)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 -- a truncated or garbled data file
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: reading its tensors failed "
                                     f"({fmt.describe(exc)})") from None
    return out


def write_checkpoint(root: str, step: int, tensors: dict, meta: dict) -> str:
    """Commit `tensors` (flat `model.*` / `optim.state.*` dict of full CPU tensors) and `meta` as
    `root/step_NNNNNNNN`, exactly as the training engine lays a checkpoint out (DCP files,
    meta.json with the tensor index, manifest.json last, rename, `latest`). Refuses to replace a
    committed checkpoint of the same step. Returns the committed directory.

    Nothing appears under `root` before the checkpoint is complete: it is written into
    `step_N.tmp-<id>` and renamed; a `root` that does not exist yet is built next to itself
    (`.ROOT.tmp-<id>`) and renamed into place whole, so a failed write leaves nothing behind."""
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"{root} exists and is not a directory")
    final = os.path.join(root, fmt.step_dir_name(step))
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; choose another output directory (or remove it)")
    run_id = uuid.uuid4().hex[:12]
    new_root = None if os.path.isdir(root) else os.path.join(os.path.dirname(root),
                                                             f".{os.path.basename(root)}.tmp-{run_id}")
    base = new_root or root
    tmp = os.path.join(base, f"{fmt.step_dir_name(step)}.tmp-{run_id}")
    try:
        try:
            os.makedirs(tmp)
        except OSError as exc:
            raise CheckpointError(f"cannot write the checkpoint under {root}: {exc.strerror or exc}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
        meta = dict(meta, format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION, step=int(step))
        meta["tensors"] = {k: {"shape": list(t.shape), "dtype": safeload.dtype_name(t.dtype)}
                           for k, t in sorted(tensors.items())}
        data = {}
        for name in sorted(n for n in os.listdir(tmp) if n.endswith(".distcp")):
            path = os.path.join(tmp, name)
            fmt.fsync_path(path)
            data[name] = fmt.file_entry(path)
        commit_lib.write_manifest(tmp, step, meta, data)
        os.rename(tmp, os.path.join(base, fmt.step_dir_name(step)))
        fmt.fsync_path(base)
        if new_root is not None:
            commit_lib.write_latest(new_root, fmt.step_dir_name(step), run_id)
            os.rename(new_root, root)
            fmt.fsync_path(os.path.dirname(root))
    except BaseException:
        shutil.rmtree(new_root or tmp, ignore_errors=True)
        raise
    if new_root is None:
        commit_lib.write_latest(root, os.path.basename(fmt.list_committed(root)[0][1]), run_id)
    return final
