"""The on-disk format of a loomtrain checkpoint (format version 1), and the code that reads it.

This docstring is the specification: tools (HF export, DeepSpeed import, `loomtrain ckpt`) build
on it, so change it only together with `FORMAT_VERSION`.

Directory layout
----------------
::

    {checkpoint.dir}/                     default {train.output_dir}/checkpoints
      step_00000300/                      one committed checkpoint: the state after 300 optimizer steps
        .metadata                         DCP's global index (which chunk of which tensor is where)
        __0_0.distcp  __1_0.distcp ...    DCP data files, one per writing rank (`__{rank}_{i}.distcp`)
        meta.json                         everything that is not a tensor (schema below)
        manifest.json                     written last: size and sha256 of every other file
      step_00000200/ ...                  older committed checkpoints (the newest `checkpoint.keep` stay)
      latest                              text file: the newest committed directory's name + "\\n"
      .lock                               flock'ed by rank 0 of the job writing here (one job per directory)
      step_00000400.tmp-<id>/             a save in progress, or the leftover of an interrupted one
      step_00000100.deleting-<id>/        a checkpoint being pruned
      latest.tmp-<id>                     the pointer being replaced

A directory `step_NNNNNNNN` (8 or more digits) that holds `manifest.json` is *committed*: the
rename from `.tmp-<id>` happens only after every rank wrote its data, all ranks agreed that they
did, and rank 0 wrote `meta.json` and then `manifest.json`. Nothing else is ever loaded; `*.tmp-*`
and `*.deleting-*` are removed when a run that saves to the directory starts. `latest` is moved
with `os.replace` after the rename; readers do not depend on it (they take the newest committed
directory whose files verify), it is there for people and tools.

Tensors (DCP, `torch.distributed.checkpoint` with `FileSystemWriter`)
--------------------------------------------------------------------
One flat DCP state dict with string keys; every value is a tensor (no pickled objects):

* ``model.<name>`` for every entry of the model's state dict (`get_model_state_dict`): the HF
  parameter names the model itself uses (`model.layers.0.self_attn.q_proj.weight`, so the key is
  `model.model.layers.0...`), persistent buffers, tied weights under each of their names;
  float32 master values. Shapes are the *global* (unsharded, unpadded, unfused) shapes: a rank
  holding a DTensor shard writes its chunk with its global offset (FSDP2 padding is never
  written), so any layout can read any slice and DCP reshards on load.
* ``optim.state.<name>.<field>`` for every optimizer state tensor, keyed by the parameter's first
  name in `model.named_parameters()`: for AdamW `step` (0-d float32), `exp_avg`, `exp_avg_sq`,
  with the parameter's global shape. ZeRO-1 writes, from the rank that owns each parameter, the
  same keys with the full tensors; ZeRO-2/3 and tensor parallelism write DTensor shards; ZeRO-0
  one replica; each pipeline stage writes the names it owns (stages keep the HF names). So every
  ZeRO stage, data-parallel size, tp and pp degree loads every other one.

Not stored: gradients, non-persistent buffers (rotary `inv_freq`: rebuilt from the config),
FSDP padding, the parameter-group split of the optimizer (it depends on the layout; every group
follows one LR schedule).

A tensor that several ranks hold identically (a replicated parameter, AdamW's `step`) is written
once, by the rank chosen to balance bytes. Data files hold tensors in `torch.save` format and
are read with `torch.load(weights_only=True)` (the manifest's sha256 is the integrity check; the
zip records' CRC32s are not relied on); `.metadata` is DCP's own pickled index, which loomtrain
reads with an allow-list unpickler (`SafeFileSystemReader`: DCP's metadata classes, `torch.Size`,
dtypes, layouts, paths): nothing in a checkpoint can make the loader run code.

meta.json (UTF-8 JSON object)
----------------------------
* ``format`` = "loomtrain-checkpoint", ``format_version`` = 1, ``step`` (int),
  ``created_unix`` (float).
* ``data``: the data loader's state (`loomtrain.data.loader.DataLoader.state_dict`): ``samples_consumed``
  (global: samples of the global sequence already trained on), ``tokens_consumed``, ``epoch``,
  ``seq_len``, ``seed``, ``shuffle``, ``source``, ``num_samples_per_epoch``.
* ``scheduler``: the LR scheduler's `state_dict()` without its lambdas (``last_epoch``,
  ``base_lrs``, ``_last_lr``, ...; per-group lists have the writing layout's group count).
* ``optim``: ``class`` (the torch optimizer that holds the state, e.g. "AdamW"), ``zero`` (stage),
  ``param_groups``: a list of the groups' hyper-parameters (``lr``, ``betas``, ``eps``,
  ``weight_decay``, ...) with ``params``: the names of their parameters.
* ``rng``: ``per_rank``: one entry per rank of the writing job, in rank order:
  ``{"rank", "dp_rank", "torch": [bytes of torch.get_rng_state()], "cuda": [...] | null,
  "numpy": ["MT19937", [624 ints], pos, has_gauss, cached_gaussian], "python": [version,
  [625 ints], gauss]}``.
* ``config``: the full run config (`Config.to_dict()`) that wrote it.
* ``layout``: ``world_size``, ``degrees`` (dp_replicate, dp_shard, cp, tp, pp), ``dp_size``,
  ``zero``, ``device`` (cpu | cuda).
* ``versions``: loomtrain, torch, transformers, numpy, python.
* ``tensors``: ``{key: {"shape": [...], "dtype": "float32"}}`` for every DCP key (global shapes),
  so tools can list a checkpoint without reading `.metadata`.

manifest.json
-------------
``{"format": "loomtrain-checkpoint", "format_version": 1, "step": N, "files": {relative name:
{"size": bytes, "sha256": hex}}}`` covering every other file of the directory (`.metadata`, data
files, `meta.json`). On load the sizes are always checked (`checkpoint.verify=size`) and the
checksums too with `checkpoint.verify=checksum`; a checkpoint that fails is reported (file and
check) and the previous committed one is used instead.

Reading one (no process group needed)
-------------------------------------
``list_committed(root)`` -> [(step, path)] newest first; ``read_manifest(path)``,
``read_meta(path)`` (JSON); ``verify_files(path, manifest, names, checksum)``;
``load_dcp_metadata(path)`` (DCP's index, through the allow-list unpickler);
``dcp_tensor_index(path)`` (that index as meta.json's ``tensors``);
``read_tensors(path, prefix="model.")`` -> full CPU tensors by key (an HF export takes the
``model.`` keys, strips the prefix and drops tied duplicates); ``safe_reader(path)`` is the
`FileSystemReader` to give `dcp.load` for sharded loads. Resuming a training job is
`loomtrain.checkpoint.manager` (it restores RNG per rank only when the layout is unchanged).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from loomtrain.errors import LoomError

FORMAT_NAME = "loomtrain-checkpoint"
FORMAT_VERSION = 1
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
DCP_METADATA_FILE = ".metadata"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim.state."
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LEFTOVER = re.compile(r"^(step_\d{8,}\.(tmp|deleting)-.+|latest\.tmp-.+)$")


class CheckpointError(LoomError):
    """A checkpoint cannot be written or used (names the checkpoint and what is wrong)."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint whose files do not match its manifest (or cannot be read)."""


def problem(exc: CheckpointError) -> str:
    """What is wrong, without the 'corrupt checkpoint PATH: ' prefix (for messages that name the
    checkpoint themselves)."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("corrupt checkpoint") and ": " in text else text


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception from deep inside (DCP, torch), for a one-line message."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""


# ----------------------------------------------------------------------------------- naming
def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a committed directory name `step_NNNNNNNN`, else None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def is_leftover(name: str) -> bool:
    """A name an interrupted save or prune leaves behind (removed at start-up)."""
    return bool(_LEFTOVER.match(name))


def list_committed(root: str) -> list[tuple[int, str]]:
    """Committed checkpoints under `root` as (step, path), newest first."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        step = parse_step_dir(name)
        path = os.path.join(root, name)
        if step is not None and os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            out.append((step, path))
    return sorted(out, reverse=True)


def read_latest(root: str) -> str | None:
    """The directory name the `latest` pointer names (None if there is none or it is unreadable)."""
    try:
        with open(os.path.join(root, LATEST_FILE), encoding="utf-8") as fh:
            name = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if parse_step_dir(name) is not None else None


# ----------------------------------------------------------------------------------- files
def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def fsync_path(path: str, strict: bool = False) -> None:
    """fsync a file or directory (directories: so that a rename in it is durable). Errors are
    ignored unless `strict` (a data file that may not reach the disk must fail its save)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Write strict JSON and fsync it (the caller renames/commits after)."""
    data = json.dumps(obj, indent=1, allow_nan=False, sort_keys=False)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(data + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_json(ckpt: str, name: str) -> dict:
    path = os.path.join(ckpt, name)
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is not a {FORMAT_NAME} file")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: {name} has format_version {version!r}; this loomtrain "
                              f"reads up to {FORMAT_VERSION} (upgrade loomtrain)")
    return obj


def read_manifest(ckpt: str) -> dict:
    man = _read_json(ckpt, MANIFEST_FILE)
    files = man.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {MANIFEST_FILE} has no valid file list")
    for name in files:
        if os.path.isabs(name) or ".." in name.split("/") or name == MANIFEST_FILE:
            raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {MANIFEST_FILE} names a bad file {name!r}")
    return man


def read_meta(ckpt: str) -> dict:
    meta = _read_json(ckpt, META_FILE)
    if not isinstance(meta.get("step"), int):
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {META_FILE} has no step")
    return meta


def verify_files(ckpt: str, manifest: dict, names: list[str], checksum: bool) -> str | None:
    """Check `names` (a subset of the manifest's files) against the manifest; returns the first
    problem as 'FILE: what' or None."""
    files = manifest["files"]
    for name in names:
        want = files[name]
        path = os.path.join(ckpt, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{name}: missing"
        if size != want["size"]:
            return f"{name}: size {size} bytes, manifest says {want['size']} (truncated or overwritten)"
        if checksum:
            digest = sha256_file(path)
            if digest != want["sha256"]:
                return f"{name}: sha256 {digest[:16]}... does not match the manifest ({want['sha256'][:16]}...)"
    return None


# ------------------------------------------------------------------ reading DCP metadata safely
_DCP_META_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "torch": {"Size"},
}


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata dataclasses and nothing else (no arbitrary callables)."""

    def __init__(self, fh, where: str):
        super().__init__(fh)
        self._where = where

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if name in _DCP_META_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise CorruptCheckpointError(
            f"corrupt checkpoint {self._where}: {DCP_METADATA_FILE} refers to {module}.{name}, which is "
            "not part of DCP's metadata; refusing to unpickle it")


def load_dcp_metadata(ckpt: str):
    """DCP's `Metadata` of a checkpoint, through the allow-list unpickler."""
    path = os.path.join(ckpt, DCP_METADATA_FILE)
    try:
        with open(path, "rb") as fh:
            return _AllowListUnpickler(fh, ckpt).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {DCP_METADATA_FILE} is missing") from None
    except Exception as exc:  # truncated or garbled pickle
        raise CorruptCheckpointError(
            f"corrupt checkpoint {ckpt}: {DCP_METADATA_FILE} cannot be read ({type(exc).__name__}: {exc})") from None


def dtype_name(dtype) -> str:
    """'float32' for torch.float32 (as meta.json's tensor index writes dtypes)."""
    return str(dtype).replace("torch.", "")


def dcp_tensor_index(ckpt: str) -> dict[str, dict]:
    """`{key: {"shape": [...], "dtype": "float32"}}` of every tensor in DCP's own index (what
    meta.json's `tensors` holds), read through the allow-list unpickler."""
    out = {}
    for key, item in sorted(load_dcp_metadata(ckpt).state_dict_metadata.items()):
        size, props = getattr(item, "size", None), getattr(item, "properties", None)
        if size is not None:
            out[key] = {"shape": list(size), "dtype": dtype_name(props.dtype) if props else None}
    return out


class SafeFileSystemReader(FileSystemReader):
    """DCP's `FileSystemReader` whose `.metadata` is read by the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = load_dcp_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def safe_reader(ckpt: str) -> SafeFileSystemReader:
    """The `FileSystemReader` to give `dcp.load` for `ckpt` (metadata through the allow-list)."""
    return SafeFileSystemReader(ckpt)


def read_tensors(ckpt: str, prefix: str | None = None) -> dict:
    """Full (unsharded) CPU tensors of a checkpoint, optionally only keys starting with `prefix`,
    in one process (no process group needed): for tools, exports and tests."""
    md = load_dcp_metadata(ckpt).state_dict_metadata
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.items()
           if hasattr(v, "size") and (prefix is None or k.startswith(prefix))}
    if out:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ..."
            dcp.load(out, storage_reader=safe_reader(ckpt), no_dist=True)
    return out
