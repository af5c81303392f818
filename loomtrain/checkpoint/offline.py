"""Checkpoints read and written by one process with no training job: for tools (`loomtrain ckpt`,
HF export, DeepSpeed import) and tests.

`format` holds the specification and the readers the resume path uses; this module adds what a
tool needs on top: naming a checkpoint loosely (a step directory, or a checkpoint root meaning its
newest committed one), reading only some tensors (so an export holds one shard in memory, not the
model), and committing a checkpoint written offline (an import) with the same layout, meta.json
and manifest as the training engine's, so that any layout resumes from it.
"""
from __future__ import annotations

import os
import shutil
import uuid
import warnings

import torch
import torch.distributed.checkpoint as dcp

from loomtrain.checkpoint import commit as commit_lib
from loomtrain.checkpoint import format as fmt
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


def tensor_index(ckpt: str, meta: dict | None = None) -> dict[str, dict]:
    """`{key: {"shape": [...], "dtype": "float32"}}` of every tensor: meta.json's index, else (an
    older or hand-made checkpoint) DCP's own metadata through the allow-list unpickler."""
    index = (meta or {}).get("tensors")
    if isinstance(index, dict) and index and all(isinstance(v, dict) and "shape" in v for v in index.values()):
        return index
    return fmt.dcp_tensor_index(ckpt)


def load_tensors(ckpt: str, keys: list[str]) -> dict:
    """Full CPU tensors of `keys` only (DCP reads just the chunks they need), through the safe
    reader. A key the checkpoint lacks, or unreadable data, is a one-line CorruptCheckpointError."""
    md = fmt.load_dcp_metadata(ckpt).state_dict_metadata
    missing = [k for k in keys if not hasattr(md.get(k), "size")]
    if missing:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {fmt.DCP_METADATA_FILE} has no tensor {missing[0]}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    if not out:
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ..."
            dcp.load(out, storage_reader=fmt.safe_reader(ckpt), no_dist=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a truncated or garbled data file
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: reading its tensors failed "
                                     f"({type(exc).__name__}: {fmt.first_line(exc, 200)})") from None
    return out


def write_checkpoint(root: str, step: int, tensors: dict, meta: dict) -> str:
    """Commit `tensors` (flat `model.*` / `optim.state.*` dict of full CPU tensors) and `meta` as
    `root/step_NNNNNNNN`, exactly as the training engine lays a checkpoint out (DCP files,
    meta.json with the tensor index, manifest.json last, rename, `latest`). Refuses to replace a
    committed checkpoint of the same step. Returns the committed directory."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, fmt.step_dir_name(step))
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; choose another output directory (or remove it)")
    run_id = uuid.uuid4().hex[:12]
    tmp = f"{final}.tmp-{run_id}"
    try:
        os.makedirs(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
        meta = dict(meta, format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION, step=int(step))
        meta["tensors"] = {k: {"shape": list(t.shape), "dtype": fmt.dtype_name(t.dtype)}
                           for k, t in sorted(tensors.items())}
        data = {}
        for name in sorted(n for n in os.listdir(tmp) if n.endswith(".distcp")):
            path = os.path.join(tmp, name)
            fmt.fsync_path(path)
            data[name] = fmt.file_entry(path)
        commit_lib.write_manifest(tmp, step, meta, data)
        os.rename(tmp, final)
        fmt.fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_lib.write_latest(root, os.path.basename(fmt.list_committed(root)[0][1]), run_id)
    return final
