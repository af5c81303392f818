"""Export a loomtrain checkpoint to a Hugging Face model directory (`loomtrain ckpt export-hf`).

    export_hf("runs/x/checkpoints", "out/hf")       # the newest committed checkpoint
    AutoModelForCausalLM.from_pretrained("out/hf")  # loads with no missing/unexpected keys

The checkpoint stores the model's own HF parameter names under `model.` (see `format`), so the
export is a renaming plus a config: the HF config is rebuilt from the run config in meta.json the
same way the Trainer built it (`loomtrain.models.build.build_hf_config`), with the vocabulary taken from the
stored embedding (the tokenizer directory the run used may be gone). Tied weights (GPT-2's lm_head
and wte) are written once, under the first name, as `save_pretrained` does: `from_pretrained` ties
them again. Weights are read one shard at a time, so an export never holds the whole model; files
over `max_shard_bytes` are split with a `model.safetensors.index.json`, HF's own layout.

The export is written into a staging directory next to OUT_DIR and swapped in only when complete,
so a failed read (a damaged checkpoint, a full disk) leaves an existing export as it was; with
`--overwrite` the old model files are replaced and the directory's other files kept. The
checkpoint's files are checked against its manifest (sizes and fast checksums) before anything
is read, and its tensors are read through `safeload`.

Import needs nothing here: `model.path=DIR` loads an HF safetensors directory (models/build.py).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid

import torch
from safetensors.torch import save_file

from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import offline, safeload
from loomtrain.checkpoint.format import CheckpointError, CorruptCheckpointError
from loomtrain.checkpoint.state import mismatch
from loomtrain.config import from_dict
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import ConfigError, LoomError
from loomtrain.models.build import build_hf_config, build_meta_model

DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
INDEX_FILE = "model.safetensors.index.json"
# Files of a local HF tokenizer directory that belong next to the weights.
_TOKENIZER_FILE = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                             r".*\.model|chat_template\..*|generation_config\.json)$")


def parse_size(text: str) -> int:
    """'5GB', '200MB', '100KB', '1234' -> bytes (decimal units, as HF's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise LoomError(f"--max-shard-size={text!r}: expected a size such as 5GB, 500MB or 100KB")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise LoomError(f"--max-shard-size={text!r}: must be positive")
    return size


def run_config(ckpt: str, meta: dict):
    """The loomtrain `Config` that wrote the checkpoint (meta.json's `config`)."""
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {fmt.META_FILE} has no run config")
    try:
        return from_dict(_detached(raw))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: its run config is not valid for this loomtrain ({exc})") from None


def _detached(raw: dict) -> dict:
    """The run config with what only training needed, and may be gone by now (data files, a
    tokenizer directory, the path it resumed from), replaced by defaults: `from_dict` checks that
    those exist, and the model is rebuilt without them (the vocabulary then comes from the stored
    embedding). Only `model.path` is needed: it holds the model's config."""
    raw = copy.deepcopy(raw)
    data, ckpt, model = raw.get("data") or {}, raw.get("checkpoint") or {}, raw.get("model") or {}
    source = data.get("source")
    if isinstance(source, str) and source not in ("embedded", "synthetic") and not os.path.exists(source):
        data["source"] = "synthetic"
    lengths = data.get("lengths")
    if isinstance(lengths, str) and lengths.startswith("file:") and not os.path.isfile(lengths[5:]):
        data["lengths"] = "fixed"
    if isinstance(data.get("tokenizer"), str) and not os.path.isdir(data["tokenizer"]):
        data["tokenizer"] = None
    if ckpt.get("resume") not in (None, "none", "auto") and not os.path.exists(str(ckpt["resume"])):
        ckpt["resume"] = "none"
    path = model.get("path")
    if isinstance(path, str) and not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"the run was configured with model.path={path}, which no longer holds an HF "
                              "config.json; restore that directory to rebuild the model's config")
    return raw


def tokenizer_info(cfg) -> tuple[int | None, int | None]:
    """(vocab_size, eos_id) of the run's tokenizer, as the Trainer sees it; (None, None) when its
    directory is no longer there (the checkpoint's embedding then gives the vocabulary)."""
    try:
        tok = build_tokenizer(cfg.data.tokenizer)
    except (LoomError, OSError, ValueError):
        return None, None
    return int(tok.vocab_size), int(tok.eos_id) if tok.eos_id is not None else None


def build_skeleton(cfg, stored_vocab=None):
    """(HF config, model with parameters on the meta device) as the Trainer builds them for `cfg`.

    `stored_vocab(input_embedding_name) -> rows or None` lets a caller holding tensors override
    the vocabulary (the embedding's row count is what the weights were trained with)."""
    vocab, eos = tokenizer_info(cfg)
    hf = build_hf_config(cfg.model, vocab_size=vocab or 1, seq_len=cfg.data.seq_len, eos_id=eos)
    model = build_meta_model(hf)
    if stored_vocab is not None:
        emb = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is emb)
        rows = stored_vocab(name)
        if rows is not None and rows != hf.vocab_size:
            hf = build_hf_config(cfg.model, vocab_size=rows, seq_len=cfg.data.seq_len, eos_id=eos)
            model = build_meta_model(hf)
    return hf, model


def tied_duplicates(model) -> dict[str, str]:
    """{later name: first name} for state-dict entries that are the same tensor (tied weights)."""
    first: dict[int, str] = {}
    dup = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            dup[name] = first[id(t)]
        else:
            first[id(t)] = name
    return dup


def match_model(ckpt: str, model, index: dict) -> list[str]:
    """State-dict names of `model`, checked against the checkpoint's `model.*` tensors (same names,
    same shapes, nothing extra); raises one line naming what differs."""
    want = {n: list(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    have = {k: list(v["shape"]) for k, v in index.items() if k.startswith(fmt.MODEL_PREFIX)}
    problem = mismatch(have, {fmt.MODEL_PREFIX + n: shape for n, shape in want.items()})
    if problem:
        raise CheckpointError(f"checkpoint {ckpt}: its tensors do not match the {type(model).__name__} its config "
                              f"builds: {problem}")
    return list(want)


def plan_shards(names: list[str], nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of at most `max_bytes` (a tensor larger than that gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return [s for s in shards if s]


def _model_files(out_dir: str) -> list[str]:
    """The files of an HF model that an export writes (and an overwrite replaces)."""
    return sorted(n for n in os.listdir(out_dir) if n == "config.json" or (
        n.startswith("model") and (n.endswith(".safetensors") or n == INDEX_FILE)))


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Before any work: refuse to overwrite a model without --overwrite."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise LoomError(f"{out_dir} exists and is not a directory")
    old = _model_files(out_dir) if os.path.isdir(out_dir) else []
    if old and not overwrite:
        raise LoomError(f"{out_dir} already holds an HF model ({', '.join(old[:3])}); pass --overwrite "
                        "or choose an empty directory")


def _staging_dir(out_dir: str) -> str:
    """A fresh directory next to `out_dir` (same file system, so the swap is a rename)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        path = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(path)  # never an existing directory; the umask's permissions, as the final one gets
        return path
    except OSError as exc:
        raise LoomError(f"cannot write the export next to {out_dir}: {exc.strerror or exc}") from None


def _swap_in(staging: str, out_dir: str) -> None:
    """Put the complete export `staging` in the place of `out_dir`. Files of an existing `out_dir`
    that are not part of a model (notes, other tools' files) carry over; its old model files go."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(staging, out_dir)
        return
    aside = f"{staging}-old"
    try:
        os.rename(out_dir, aside)
    except OSError as exc:
        raise LoomError(f"cannot replace {out_dir}: {exc.strerror or exc}") from None
    try:
        old_model = set(_model_files(aside))
        for name in os.listdir(aside):
            if name not in old_model and not os.path.lexists(os.path.join(staging, name)):
                os.rename(os.path.join(aside, name), os.path.join(staging, name))
        os.rename(staging, out_dir)
    except BaseException:
        if not os.path.lexists(out_dir):
            os.rename(aside, out_dir)  # the old export stays where it was
        raise
    shutil.rmtree(aside, ignore_errors=True)


def copy_tokenizer(cfg, out_dir: str) -> list[str]:
    """Copy the run's local HF tokenizer files next to the weights (nothing for the byte tokenizer)."""
    src = cfg.data.tokenizer
    if not src or not os.path.isdir(src):
        return []
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and _TOKENIZER_FILE.match(name):
            shutil.copyfile(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _write_model(ckpt: str, out_dir: str, shards: list[list[str]], nbytes: dict, torch_dtype) -> tuple[list, int]:
    """The safetensors files (and index) of `shards`, each read from the checkpoint in turn."""
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        loaded = offline.load_tensors(ckpt, [fmt.MODEL_PREFIX + n for n in shard])
        tensors = {n: loaded[fmt.MODEL_PREFIX + n].to(torch_dtype).contiguous() for n in shard}
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del loaded, tensors
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(nbytes.values())
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        files.append(INDEX_FILE)
    return files, total


def export_hf(path: str, out_dir: str, dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False) -> dict:
    """Write the model of checkpoint `path` (a step directory, or a root: its newest) to `out_dir`
    as config.json + safetensors; returns a summary (files, tensors, bytes, tied, tokenizer)."""
    if dtype not in DTYPES:
        raise LoomError(f"--dtype={dtype}: must be one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    ckpt = offline.resolve(path)
    manifest = fmt.read_manifest(ckpt)
    meta = fmt.read_meta(ckpt)
    _check_out_dir(out_dir, overwrite)
    problem = fmt.verify_files(ckpt, manifest, sorted(manifest["files"]), check="fast")
    if problem:
        raise CorruptCheckpointError(f"corrupt checkpoint {ckpt}: {problem}")
    cfg = run_config(ckpt, meta)
    index = safeload.dcp_tensor_index(ckpt)  # the index the tensors are read by, not meta.json's copy

    def stored_rows(name: str):
        entry = index.get(fmt.MODEL_PREFIX + name)
        return int(entry["shape"][0]) if entry and entry["shape"] else None

    hf, model = build_skeleton(cfg, stored_rows)
    names = match_model(ckpt, model, index)
    tied = tied_duplicates(model)
    names = [n for n in names if n not in tied]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    nbytes = {n: itemsize * int(torch.Size(index[fmt.MODEL_PREFIX + n]["shape"]).numel()) for n in names}
    shards = plan_shards(names, nbytes, max_shard_bytes)

    staging = _staging_dir(out_dir)
    try:
        files, total = _write_model(ckpt, staging, shards, nbytes, torch_dtype)
        hf.architectures = [type(model).__name__]
        hf.dtype = dtype
        hf.save_pretrained(staging)
        files.append("config.json")
        tokenizer = copy_tokenizer(cfg, staging)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"checkpoint": ckpt, "step": meta["step"], "out_dir": os.path.abspath(out_dir), "dtype": dtype,
            "model": type(model).__name__, "tensors": len(names), "bytes": total, "files": files + tokenizer,
            "tied": sorted(tied), "tokenizer": tokenizer}
