"""Reading the DCP side of a checkpoint (`.metadata` and the `.distcp` data files) so that nothing
in it can make the reader run code. Checkpoints are copied between clusters, downloaded and
shared, so loading one must be as safe as loading safetensors.

Three rules, each enough on its own to stop the known attacks, together so that a mistake in one
is caught by the next:

1. `.metadata` is unpickled by an allow-list unpickler: DCP's metadata classes, `torch.Size`,
   dtypes, layouts, memory formats and paths, nothing else. Pickle's BUILD opcode (which sets
   attributes) is accepted only on instances of those dataclasses and only with their own field
   names, so a file cannot give an object attributes it does not have (a `size` on a bytes entry)
   nor change a class or a shared enum member.
2. The unpickled index is then checked field by field (`_check_metadata`): exact types; every
   entry is a `TensorStorageMetadata` (a `BytesStorageMetadata`, which DCP reads with
   `torch.load(weights_only=False)`, is refused: loomtrain never writes one); chunks tile their
   tensor exactly; every chunk's bytes lie in a `__R_I.distcp` file of this directory, within its
   size, with no decoding transforms; so no tensor can be larger than the files that hold it.
3. Every `dcp.load` goes through `SafeLoadPlanner`, whose byte path refuses instead of unpickling;
   tensors are read by DCP with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import pickle
import re
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from loomtrain.checkpoint.format import DCP_METADATA_FILE, CheckpointError, CorruptCheckpointError
from loomtrain.checkpoint.integrity import open_regular

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
# Dataclasses whose attributes pickle may set (BUILD), and the names it may set.
_BUILDABLE = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in (
    Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex, StorageMeta,
    _StorageInfo)}
_DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")


def _corrupt(ckpt: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {DCP_METADATA_FILE} {what}")


class _AllowListUnpickler(pickle._Unpickler):
    """Unpickles DCP's metadata dataclasses and nothing else (rule 1 of the module docstring).
    The pure-Python unpickler, because its opcode table can be restricted; `.metadata` is small."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh, where: str):
        super().__init__(fh)
        self._where = where

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if name in _DCP_META_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise _corrupt(self._where, f"refers to {module}.{name}, which is not part of DCP's metadata; refusing "
                                    "to unpickle it")

    def persistent_load(self, pid):
        raise _corrupt(self._where, "holds a persistent reference; refusing to unpickle it")

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if cls is TensorProperties and type(state) is tuple and len(state) == 5:
            inst.__setstate__(state)  # its own encoding: (dtype, layout, requires_grad, memory format, pin)
            return
        allowed = _BUILDABLE.get(cls)
        if allowed is None or type(state) is not dict or not all(type(k) is str and k in allowed for k in state):
            raise _corrupt(self._where, f"sets attributes on a {cls.__name__} that it does not have; refusing to "
                                        "unpickle it")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build


# ------------------------------------------------------------------------- structure checks
def _is_int(x, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _is_size(x) -> bool:
    return type(x) is torch.Size and all(_is_int(d) for d in x)


def _fields(obj, cls) -> dict:
    """The dataclass fields of `obj` (exactly of type `cls`), each read once."""
    if type(obj) is not cls:
        raise TypeError(f"expected {cls.__name__}, found {type(obj).__name__}")
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


def _check_tensor(key: str, item, storage: dict) -> None:
    f = _fields(item, TensorStorageMetadata)
    props = _fields(f["properties"], TensorProperties)
    if not (isinstance(props["dtype"], torch.dtype) and props["layout"] == torch.strided
            and type(props["requires_grad"]) is bool and isinstance(props["memory_format"], torch.memory_format)
            and type(props["pin_memory"]) is bool):
        raise TypeError(f"{key} has invalid tensor properties")
    size = f["size"]
    if not _is_size(size) or type(f["chunks"]) is not list or not f["chunks"]:
        raise TypeError(f"{key} has an invalid size or chunk list")
    itemsize = torch.empty((), dtype=props["dtype"]).element_size()
    covered = 0
    for chunk in f["chunks"]:
        c = _fields(chunk, ChunkStorageMetadata)
        offsets, sizes = c["offsets"], c["sizes"]
        if not (_is_size(offsets) and _is_size(sizes) and len(offsets) == len(sizes) == len(size)
                and all(o + s <= d for o, s, d in zip(offsets, sizes, size))):
            raise TypeError(f"{key} has a chunk outside its tensor")
        info = storage.get(MetadataIndex(key, offsets))
        if info is None:
            raise TypeError(f"{key} has a chunk at {list(offsets)} that no data file holds")
        numel = math.prod(sizes)
        if numel * itemsize > info.length:
            raise TypeError(f"{key} has a chunk of {numel * itemsize} bytes stored in {info.length}")
        covered += numel
    if covered != math.prod(size):
        raise TypeError(f"{key}'s chunks do not tile its shape {list(size)}")


def _check_storage(ckpt: str, storage) -> None:
    if not isinstance(storage, dict):
        raise TypeError("storage_data is not a dict")
    file_sizes: dict[str, int] = {}
    for index, info in storage.items():
        idx = _fields(index, MetadataIndex)
        if type(idx["fqn"]) is not str or not (idx["offset"] is None or _is_size(idx["offset"])) or \
                not (idx["index"] is None or _is_int(idx["index"])):
            raise TypeError("a storage index is invalid")
        s = _fields(info, _StorageInfo)
        name = s["relative_path"]
        if type(name) is not str or not _DATA_FILE.match(name):
            raise TypeError(f"{idx['fqn']} is stored in {name!r}, not a data file of this directory (__R_I.distcp)")
        if not (_is_int(s["offset"]) and _is_int(s["length"])) or s["transform_descriptors"]:
            raise TypeError(f"{idx['fqn']} has an invalid byte range or decoding transforms")
        if name not in file_sizes:
            try:
                fd = open_regular(os.path.join(ckpt, name))
            except OSError:
                raise TypeError(f"{idx['fqn']} is stored in {name}, which is missing or not a regular file") from None
            file_sizes[name] = os.fstat(fd).st_size
            os.close(fd)
        if s["offset"] + s["length"] > file_sizes[name]:
            raise TypeError(f"{idx['fqn']} is stored past the end of {name}")


def _check_metadata(ckpt: str, md) -> None:
    """Rule 2 of the module docstring; raises one line naming what is wrong."""
    try:
        f = _fields(md, Metadata)
        sdm = f["state_dict_metadata"]
        if not isinstance(sdm, dict) or not all(type(k) is str for k in sdm):
            raise TypeError("state_dict_metadata is not a dict of names")
        for key, item in sdm.items():
            if type(item) is BytesStorageMetadata:
                raise _corrupt(ckpt, f"lists {key} as pickled bytes, not a tensor; loomtrain checkpoints hold "
                                     "tensors only, and reading it would unpickle arbitrary objects: refusing it")
        storage = f["storage_data"]
        _check_storage(ckpt, storage)
        for key, item in sdm.items():
            _check_tensor(key, item, storage)
        meta = f["storage_meta"]
        if meta is not None:
            m = _fields(meta, StorageMeta)
            if not (m["checkpoint_id"] is None or isinstance(m["checkpoint_id"], (str, pathlib.PurePath))) or \
                    not all(v is None or type(v) is str for v in (m["save_id"], m["load_id"])) or \
                    type(m["modules"]) is not list or not all(type(x) is str for x in m["modules"]):
                raise TypeError("storage_meta is invalid")
        if not (f["version"] is None or type(f["version"]) is str):
            raise TypeError("version is not a string")
        if not (f["planner_data"] is None or isinstance(f["planner_data"], dict)):
            raise TypeError("planner_data is not a dict")
    except CheckpointError:
        raise
    except (TypeError, AttributeError, ValueError, RuntimeError, OverflowError) as exc:
        raise _corrupt(ckpt, f"is not a valid DCP index ({exc})") from None


def load_dcp_metadata(ckpt: str):
    """DCP's `Metadata` of a checkpoint, through the allow-list unpickler, checked (see above)."""
    path = os.path.join(ckpt, DCP_METADATA_FILE)
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {DCP_METADATA_FILE} is missing") from None
    except OSError as exc:
        raise _corrupt(ckpt, f"cannot be opened ({exc})") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            md = _AllowListUnpickler(fh, ckpt).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a truncated or garbled pickle
        raise _corrupt(ckpt, f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_metadata(ckpt, md)
    return md


def tensor_entries(md) -> dict[str, TensorStorageMetadata]:
    """The entries of a checked index that are tensors (exactly `TensorStorageMetadata`): the only
    ones any loomtrain reader asks DCP for."""
    return {k: v for k, v in md.state_dict_metadata.items() if type(v) is TensorStorageMetadata}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32 (as meta.json's tensor index writes dtypes)."""
    return str(dtype).replace("torch.", "")


def dcp_tensor_index(ckpt: str) -> dict[str, dict]:
    """`{key: {"shape": [...], "dtype": "float32"}}` of every tensor in DCP's own index (what
    meta.json's `tensors` holds)."""
    return {k: {"shape": list(v.size), "dtype": dtype_name(v.properties.dtype)}
            for k, v in sorted(tensor_entries(load_dcp_metadata(ckpt)).items())}


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner without its byte path (`torch.load(weights_only=False)`), rule 3."""

    def load_bytes(self, read_item, value) -> None:
        raise CorruptCheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is pickled bytes, not a "
                                     "tensor; refusing to unpickle it")


class SafeFileSystemReader(FileSystemReader):
    """DCP's `FileSystemReader` whose `.metadata` is read by `load_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = load_dcp_metadata(str(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def safe_reader(ckpt: str) -> SafeFileSystemReader:
    """The `FileSystemReader` to give `dcp.load` for `ckpt` (metadata through the allow-list)."""
    return SafeFileSystemReader(ckpt)


def load(state_dict: dict, ckpt: str, *, process_group=None) -> None:
    """`dcp.load` of `state_dict` (tensors only) from `ckpt` through the safe reader and planner;
    without a process group it reads in this process alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ..."
        dcp.load(state_dict, storage_reader=safe_reader(ckpt), planner=SafeLoadPlanner(),
                 process_group=process_group, no_dist=process_group is None)


def read_tensors(ckpt: str, prefix: str | None = None) -> dict:
    """Full (unsharded) CPU tensors of a checkpoint, optionally only keys starting with `prefix`,
    in one process (no process group needed): for tools, exports and tests."""
    entries = tensor_entries(load_dcp_metadata(ckpt))
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()
           if prefix is None or k.startswith(prefix)}
    if out:
        load(out, ckpt)
    return out
