"""`loomtrain ckpt inspect|verify`: look into and check checkpoints (no training job needed).

    loomtrain ckpt inspect PATH [--json] [--top N]
    loomtrain ckpt verify PATH [--checksum] [--all]     sizes + fast checksums; --checksum: sha256

PATH is a committed checkpoint (`step_NNNNNNNN`) or a checkpoint directory (its newest committed
one). Errors (a missing path, not a checkpoint, an unreadable one) are one `loomtrain: error:` line
with exit code 2; `verify` reports a damaged checkpoint as one line and exit code 1, so scripts can
tell "damaged" from "wrong command". Both read JSON only (plus DCP's index through `safeload`),
take nothing in meta.json on trust (a field of the wrong kind is shown as unknown), and never
import transformers; the conversions are in `ckpt_convert`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import integrity, offline, safeload
from loomtrain.checkpoint.format import CheckpointError


# ------------------------------------------------------------------------------------ helpers
def human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8}


def _nbytes(entry: dict) -> int:
    n = 1
    for d in entry.get("shape") or []:
        n *= int(d)
    return n * _ITEMSIZE.get(str(entry.get("dtype")), 4)


def _config_summary(cfg: dict) -> dict:
    model, data = _dict(cfg.get("model")), _dict(cfg.get("data"))
    par, optim, train = _dict(cfg.get("parallel")), _dict(cfg.get("optim")), _dict(cfg.get("train"))
    return {"model": _plain(model.get("path") or model.get("architecture")),
            "model_config": {str(k)[:80]: _plain(v) for k, v in _dict(model.get("config")).items()},
            "dtype": _plain(model.get("dtype")), "data_source": _plain(data.get("source")),
            "tokenizer": _plain(data.get("tokenizer")), "seq_len": _plain(data.get("seq_len")),
            "global_batch_size": _plain(data.get("global_batch_size")),
            "parallel": {k: _plain(par.get(k)) for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "zero")},
            "lr": _plain(optim.get("lr")), "max_steps": _plain(train.get("max_steps")),
            "seed": _plain(train.get("seed"))}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _plain(value, limit: int = 200):
    """A meta.json value as inspect shows it: numbers, strings, booleans and None as they are
    (strings cut to `limit`), anything else (lists, objects) as None."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if abs(value) < 1 << 63 else None
    return None


def inspect(path: str, top: int = 8) -> dict:
    """Everything `ckpt inspect` shows, as a JSON-able dict. meta.json is trusted for nothing:
    every field shown is taken only when it has the expected kind."""
    ckpt = offline.resolve(path)
    manifest, meta = fmt.read_manifest(ckpt), fmt.read_meta(ckpt)
    index = offline.tensor_index(ckpt, meta)
    sizes = {k: _nbytes(v) for k, v in index.items()}
    files = {name: entry["size"] for name, entry in sorted(manifest["files"].items())}
    model = [k for k in index if k.startswith(fmt.MODEL_PREFIX)]
    optim = [k for k in index if k.startswith(fmt.OPTIM_PREFIX)]
    largest = sorted(index, key=lambda k: (-sizes[k], k))[:max(0, top)]
    layout = _dict(meta.get("layout"))
    src = _dict(meta.get("imported_from"))
    created = meta.get("created_unix")
    return {
        "path": ckpt, "step": meta["step"], "format_version": meta.get("format_version"),
        "created_unix": created if isinstance(created, (int, float)) and 0 <= created < 1e11 else None,
        "layout": {**{k: _plain(layout[k]) for k in ("world_size", "zero", "device", "dp_size") if k in layout},
                   "degrees": {str(k)[:40]: _plain(v) for k, v in _dict(layout.get("degrees")).items()}},
        "data": {str(k)[:80]: _plain(v) for k, v in _dict(meta.get("data")).items()},
        "config": _config_summary(_dict(meta.get("config"))),
        "versions": {str(k)[:40]: _plain(v) for k, v in _dict(meta.get("versions")).items()},
        "imported_from": {str(k)[:80]: _plain(v) for k, v in src.items()} if src else None,
        "files": files, "files_bytes": sum(files.values()),
        "tensors": {"count": len(index), "bytes": sum(sizes.values()), "model_count": len(model),
                    "model_bytes": sum(sizes[k] for k in model), "optim_count": len(optim),
                    "optim_bytes": sum(sizes[k] for k in optim)},
        "largest": [{"key": k, "shape": index[k]["shape"], "dtype": index[k].get("dtype"), "bytes": sizes[k]}
                    for k in largest],
    }


def _layout_line(layout: dict) -> str:
    deg = layout.get("degrees") or {}
    shape = " x ".join(f"{k} {deg[k]}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp") if k in deg)
    n = layout.get("world_size", "?")
    return (f"{n} rank{'s' if n != 1 else ''}" + (f" ({shape})" if shape else "")
            + f", zero {layout.get('zero', '?')}" + (f", {layout['device']}" if layout.get("device") else ""))


def _print_inspect(info: dict) -> None:
    rows = [("checkpoint", info["path"]), ("step", str(info["step"])), ("written by", _layout_line(info["layout"]))]
    src = info.get("imported_from")
    if src:
        rows.append(("imported", f"from {src.get('format')} {src.get('kind')} ZeRO-{src.get('zero_stage')} "
                                 f"({src.get('dp_world_size')} ranks, version {src.get('ds_version')}): "
                                 f"{src.get('path')}"))
    data = info["data"]
    rows.append(("data", f"{data.get('samples_consumed', '?')} samples / {data.get('tokens_consumed', '?')} tokens "
                         f"consumed" + (f", epoch {data['epoch']}" if data.get("epoch") is not None else "")
                 + (f" ({data['source']})" if data.get("source") else "")))
    c = info["config"]
    geometry = ", ".join(f"{k}={v}" for k, v in sorted(c["model_config"].items()))
    rows.append(("model", f"{c['model']} {c['dtype']}" + (f" ({geometry})" if geometry else "")))
    rows.append(("training", f"seq_len {c['seq_len']}, global batch {c['global_batch_size']}, lr {c['lr']}, "
                             f"max_steps {c['max_steps']}, seed {c['seed']}, data {c['data_source']}"))
    if info.get("created_unix"):
        when = datetime.datetime.fromtimestamp(info["created_unix"], datetime.timezone.utc)
        rows.append(("created", when.strftime("%Y-%m-%d %H:%M:%S UTC")))
    if info["versions"]:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)))
    t = info["tensors"]
    rows.append(("tensors", f"{t['count']} tensors, {human(t['bytes'])} (model {t['model_count']}: "
                            f"{human(t['model_bytes'])}; optimizer {t['optim_count']}: {human(t['optim_bytes'])})"))
    rows.append(("files", f"{len(info['files'])} files, {human(info['files_bytes'])} (+ manifest.json)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    name_w = max((len(n) for n in info["files"]), default=0)
    for name, size in info["files"].items():
        print(f"  {name:<{name_w}}  {human(size):>10}")
    if info["largest"]:
        print("largest tensors")
        key_w = max(len(e["key"]) for e in info["largest"])
        for e in info["largest"]:
            print(f"  {e['key']:<{key_w}}  {str(e['shape']):<14} {e['dtype']:<9} {human(e['bytes']):>10}")


def verify(ckpt: str, check="fast") -> str | None:
    """The first problem of committed checkpoint `ckpt` as one line, or None: manifest, file sizes
    and checksums (`check`: size, fast or sha256), meta.json, DCP's index (checked as every loader
    checks it), and that every byte range the index names is inside a file the manifest covers."""
    try:
        manifest = fmt.read_manifest(ckpt)
    except CheckpointError as exc:
        return fmt.problem(exc)
    problem = fmt.verify_files(ckpt, manifest, sorted(manifest["files"]), check=check)
    if problem:
        return problem
    try:
        meta = fmt.read_meta(ckpt)
        md = safeload.load_dcp_metadata(ckpt)
    except CheckpointError as exc:
        return fmt.problem(exc)
    if meta["step"] != manifest.get("step"):
        return f"meta.json says step {meta['step']}, manifest.json step {str(manifest.get('step'))[:40]}"
    dir_step = fmt.parse_step_dir(os.path.basename(ckpt))
    if dir_step is not None and dir_step != meta["step"]:
        return f"the directory is named for step {dir_step} but holds step {meta['step']}"
    files = manifest["files"]
    for item in md.storage_data.values():
        name = item.relative_path
        if name not in files:
            return f"{fmt.DCP_METADATA_FILE} refers to {name}, which the manifest does not cover"
        end = item.offset + item.length
        if end > files[name]["size"]:
            return f"{fmt.DCP_METADATA_FILE} reads {name} up to byte {end}, past its {files[name]['size']} bytes"
    return None


# ----------------------------------------------------------------------------------- commands
def cmd_inspect(ns: argparse.Namespace) -> int:
    info = inspect(ns.path, top=ns.top)
    if ns.json:
        print(json.dumps(info, indent=1))
    else:
        _print_inspect(info)
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    newest = offline.resolve(ns.path)
    targets = [newest]
    if ns.all and not os.path.samefile(newest, os.path.abspath(ns.path)):
        targets = [p for _, p in fmt.list_committed(os.path.abspath(ns.path))]
    check = "sha256" if ns.checksum else "fast"
    failed = 0
    for ckpt in targets:
        problem = verify(ckpt, check=check)
        if problem is None:
            n = len(fmt.read_manifest(ckpt)["files"])
            print(f"ok {ckpt} ({n} files, {integrity.describe(check)} match the manifest)")
        else:
            failed += 1
            print(f"FAILED {ckpt}: {problem}", file=sys.stderr, flush=True)
    return 1 if failed else 0
