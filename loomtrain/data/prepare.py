"""`loomtrain data prepare`: tokenise inputs once, in parallel, into shards a run reads on demand.

The inputs are planned into tasks (`data.inputs`), one shard per task, numbered in input order.
Worker processes take tasks in any order; each writes its shard under temporary names, renames
it into place and then writes a completion marker (`shard_NNNNN.done.json`, its manifest entry).
So an interrupted run restarts where it stopped (tasks with a marker and files of the recorded
sizes are skipped), and the bytes written depend only on the inputs and the tokenizer, never on
the number of workers or the order they finished in. `manifest.json` is written last: a
directory without one is not a finished preparation and is not trained on.

`plan.json` records what the directory is a preparation of (sources, field, tokenizer, tasks); a
second run into the same directory with other inputs or another tokenizer is refused instead of
mixing two corpora.

Workers are spawned (not forked: the tokenizer's thread pool does not survive a fork) and run the
tokenizer single-threaded, so throughput scales with `--workers` and N workers use N cores.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from loomtrain.data.inputs import TASK_BYTES, Task, plan_tasks, task_documents
from loomtrain.data.shards import token_dtype, write_manifest, write_shard
from loomtrain.data.sources import TEXT_SUFFIXES
from loomtrain.data.tokenizer import Tokenizer, build_tokenizer
from loomtrain.errors import DataError

PLAN = "plan.json"
_ENCODE_BATCH = 512


@dataclass(frozen=True)
class PrepareOptions:
    sources: tuple[str, ...]
    out: str
    tokenizer: str | None = None  # a local HF tokenizer directory; None = the byte-level tokenizer
    workers: int = 1
    field: str = "text"  # JSONL key / Parquet or Arrow column: text, or a list of token ids
    text_suffixes: tuple[str, ...] = TEXT_SUFFIXES
    progress: bool = True
    task_bytes: int = TASK_BYTES  # input bytes per shard (tests make it small to get many shards)


@dataclass(frozen=True)
class PrepareResult:
    manifest: dict
    shards_written: int
    shards_skipped: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.manifest["tokens"] / self.seconds if self.seconds > 0 else float("inf")


def _shard_prefix(out: str, k: int) -> str:
    return os.path.join(out, f"shard_{k:05d}")


def _finished(out: str, k: int) -> dict | None:
    """Task k's manifest entry if its marker and both files (of the recorded sizes) are there."""
    marker = _shard_prefix(out, k) + ".done.json"
    try:
        with open(marker, encoding="utf-8") as fh:
            entry = json.load(fh)
        prefix = _shard_prefix(out, k)
        if os.path.getsize(prefix + ".bin") == entry["bin_bytes"] and os.path.getsize(prefix + ".idx") == entry["idx_bytes"]:
            return entry
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def encode_documents(docs, tokenizer: Tokenizer, where: str) -> list[np.ndarray]:
    """Documents (text or token ids, in order) -> id arrays each closed by one EOS."""
    out: list[np.ndarray] = []
    texts: list[str] = []
    eos, vocab = int(tokenizer.eos_id), int(tokenizer.vocab_size)

    def flush():
        for ids in tokenizer.encode_batch(texts):
            out.append(np.append(ids.astype(np.int64), eos))
        texts.clear()

    for doc in docs:
        if isinstance(doc, str):
            texts.append(doc)
            if len(texts) >= _ENCODE_BATCH:
                flush()
            continue
        flush()
        if doc.min() < 0 or doc.max() >= vocab:
            bad = int(doc[(doc < 0) | (doc >= vocab)][0])
            raise DataError(f"data prepare: {where}: token id {bad} is outside the tokenizer's vocabulary "
                            f"[0, {vocab}) (pre-tokenised with another tokenizer? pass it with --tokenizer)")
        out.append(doc if doc[-1] == eos else np.append(doc, eos))
    flush()
    return out


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str | None) -> Tokenizer:
    return build_tokenizer(path)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: scaling is by --workers


def _run_task(args: tuple) -> tuple[int, dict]:
    k, task_json, out, tokenizer_path, field_name, dtype = args
    task = Task(task_json[0], tuple(task_json[1]), task_json[2], task_json[3], task_json[4])
    tokenizer = _worker_tokenizer(tokenizer_path)
    docs = encode_documents(task_documents(task, field_name), tokenizer, ", ".join(task.paths[:3]))
    entry = write_shard(_shard_prefix(out, k), docs, np.dtype(dtype))
    marker = _shard_prefix(out, k) + ".done.json"
    with open(marker + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(entry, fh)
    os.replace(marker + ".tmp", marker)
    return k, entry


def _claim_directory(out: str, plan: dict) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, PLAN)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
        if old != plan:
            what = next((k for k in plan if not isinstance(old, dict) or old.get(k) != plan[k]), "plan")
            raise DataError(f"data prepare: {out} holds a preparation of other inputs ({what} differs); "
                            "use another --out directory or delete this one")
        return
    if any(not name.startswith(".") for name in os.listdir(out)):
        raise DataError(f"data prepare: {out} is not empty and holds no preparation; use an empty or new directory")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(plan, fh, indent=1)
    os.replace(path + ".tmp", path)


def prepare(opts: PrepareOptions) -> PrepareResult:
    """Tokenise `opts.sources` into shards under `opts.out` (resuming a run cut short)."""
    if opts.workers < 1:
        raise DataError(f"data prepare: --workers={opts.workers}: must be at least 1")
    start = time.perf_counter()
    tokenizer = build_tokenizer(opts.tokenizer)
    fingerprint, dtype = tokenizer.fingerprint(), token_dtype(tokenizer.vocab_size)
    tasks = plan_tasks(list(opts.sources), tuple(opts.text_suffixes), opts.task_bytes)
    plan = {"sources": list(opts.sources), "field": opts.field, "tokenizer": fingerprint, "dtype": dtype.name,
            "tasks": [t.to_json() for t in tasks]}
    _claim_directory(opts.out, plan)
    entries = {k: e for k in range(len(tasks)) if (e := _finished(opts.out, k)) is not None}
    pending = [(k, t.to_json(), opts.out, opts.tokenizer, opts.field, dtype.name)
               for k, t in enumerate(tasks) if k not in entries]
    bar = tqdm(total=len(tasks), initial=len(entries), unit="shard", desc="data prepare", disable=not opts.progress)
    tokens = 0
    if pending:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(opts.workers, len(pending)), initializer=_init_worker) as pool:
            for k, entry in pool.imap_unordered(_run_task, pending):
                entries[k] = entry
                tokens += entry["tokens"]
                bar.update(1)
                bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.3g}")
    bar.close()
    if not any(e["documents"] for e in entries.values()):
        raise DataError(f"data prepare: {', '.join(opts.sources)} holds no documents")
    manifest = write_manifest(opts.out, [entries[k] for k in range(len(tasks))], tokenizer=fingerprint, dtype=dtype,
                              extra={"sources": list(opts.sources), "field": opts.field})
    return PrepareResult(manifest, len(pending), len(tasks) - len(pending), time.perf_counter() - start)
