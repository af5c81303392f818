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
are read with `torch.load(weights_only=True)` (the manifest's checksums are the integrity check;
the zip records' CRC32s are not relied on). `.metadata` is DCP's own pickled index; every entry
is a `TensorStorageMetadata` (never DCP's pickled-bytes entries). Readers go through
`loomtrain.checkpoint.safeload`: an allow-list unpickler, a field-by-field check of the index,
and a load planner without DCP's byte path, so nothing in a checkpoint can make the loader run
code; a checkpoint holding a bytes entry is refused.

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
{"size": bytes, "sha256": hex, FAST: hex}}}`` covering every other file of the directory
(`.metadata`, data files, `meta.json`), where FAST is ``"xxh3_64"`` (the writer had the `xxhash`
package) or ``"crc32"``; manifests without it (older writers) stay readable, and are checked
with sha256 instead (`loomtrain.checkpoint.integrity`). On load (`checkpoint.verify`) the sizes
and the fast checksum are checked by default (``fast``); ``size`` checks sizes only,
``checksum`` sha256. A checkpoint that fails any check, or that cannot be read afterwards, is
reported in one line (file and check) and the previous committed one is used instead; a
checkpoint named explicitly (`checkpoint.resume=PATH`) is an error instead.

Reading one (no process group needed)
-------------------------------------
``list_committed(root)`` -> [(step, path)] newest first; ``read_manifest(path)``,
``read_meta(path)`` (JSON, top-level sections type-checked); ``verify_files(path, manifest,
names, check)``; in `safeload`: ``load_dcp_metadata(path)`` (DCP's index, checked),
``dcp_tensor_index(path)`` (that index as meta.json's ``tensors``),
``read_tensors(path, prefix="model.")`` -> full CPU tensors by key (an HF export takes the
``model.`` keys, strips the prefix and drops tied duplicates), ``load(state_dict, path,
process_group=...)`` for sharded loads. Resuming a training job is
`loomtrain.checkpoint.manager` (it restores RNG per rank only when the layout is unchanged).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from loomtrain.checkpoint.integrity import FAST_ALGOS, open_regular
from loomtrain.checkpoint.integrity import file_entry, verify_files  # noqa: F401 -- the manifest's checks
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


def describe(exc: BaseException, limit: int = 200) -> str:
    """'Type: first line' of an exception; for DCP's CheckpointException (which only says which
    ranks failed) that of the first rank's own exception, 'rank R: Type: first line'."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        if isinstance(inner, BaseException):
            return f"rank {rank}: {type(inner).__name__}: {first_line(inner, limit)}"
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


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


def create_new(path: str, mode: int = 0o644) -> int:
    """A write descriptor of a file that did not exist: never follows a symlink planted under the
    name, never opens someone else's file (O_CREAT | O_EXCL | O_NOFOLLOW)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def write_json(path: str, obj: Any) -> None:
    """Write strict JSON and fsync it (the caller renames/commits after)."""
    data = json.dumps(obj, indent=1, allow_nan=False, sort_keys=False)
    with os.fdopen(create_new(path), "w", encoding="utf-8") as fh:
        fh.write(data + "\n")
        fh.flush()
        os.fsync(fh.fileno())


_MAX_JSON_BYTES = 1 << 30
# Sections of meta.json and the JSON types they must have when present (tools read them blindly).
_META_SECTIONS = {"data": dict, "scheduler": dict, "optim": dict, "rng": dict, "config": dict, "layout": dict,
                  "versions": dict, "tensors": dict, "imported_from": (dict, type(None)),
                  "created_unix": (int, float, type(None))}


def _read_json(ckpt: str, name: str) -> dict:
    path = os.path.join(ckpt, name)
    try:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise ValueError(f"larger than {_MAX_JSON_BYTES} bytes")
        obj = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is not valid JSON "
                                     f"({str(exc)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {name} is not a {FORMAT_NAME} file")
    version = obj.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: {name} has format_version {str(version)[:40]!r}; this loomtrain "
                              f"reads up to {FORMAT_VERSION} (upgrade loomtrain)")
    return obj


def _valid_entry(v) -> bool:
    return (isinstance(v, dict) and type(v.get("size")) is int and v["size"] >= 0
            and isinstance(v.get("sha256"), str)
            and all(isinstance(v[a], str) for a in FAST_ALGOS if a in v))


def read_manifest(ckpt: str) -> dict:
    man = _read_json(ckpt, MANIFEST_FILE)
    files = man.get("files")
    if not isinstance(files, dict) or not files or not all(_valid_entry(v) for v in files.values()):
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {MANIFEST_FILE} has no valid file list")
    for name in files:
        if os.path.isabs(name) or ".." in name.split("/") or name == MANIFEST_FILE or "\0" in name:
            raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {MANIFEST_FILE} names a bad file {name[:80]!r}")
    return man


def read_meta(ckpt: str) -> dict:
    meta = _read_json(ckpt, META_FILE)
    if type(meta.get("step")) is not int or not 0 <= meta["step"] < 1 << 63:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {META_FILE} has no valid step")
    for key, kind in _META_SECTIONS.items():
        if key in meta and not isinstance(meta[key], kind) or isinstance(meta.get(key), bool):
            raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {META_FILE}'s {key} is a "
                                         f"{type(meta[key]).__name__}, not a "
                                         f"{getattr(kind, '__name__', 'number')}")
    return meta
