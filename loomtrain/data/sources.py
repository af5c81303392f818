"""Where documents come from: the embedded stdlib corpus, a user file or directory, or nothing.

A source is a deterministic sequence of text documents. Determinism matters more than anything
else here: every data-parallel rank reads the source independently and must see exactly the same
documents in exactly the same order, or the global sample numbering (and resume) falls apart.
So files are visited in sorted relative-path order, rows in file order, and the size cap cuts at
the same byte on every rank.

Formats: `.txt/.md/.py/.rst` are one document per file; `.jsonl` is one document per line (the
`data.text_field` key); `.parquet` is one document per row of the `data.text_field` column.
Empty or whitespace-only documents are skipped everywhere (an empty `__init__.py` teaches nothing).
`synthetic` has no text at all: its token documents are generated in `data.loader`, optionally
with document lengths drawn from a file (`load_lengths_file`).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sysconfig
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loomtrain.config import DataConfig
from loomtrain.data.prepared import PreparedCorpus, is_token_source, open_dataset
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
_EMBEDDED_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
_MB = 1 << 20  # data.max_corpus_mb counts MiB of UTF-8 text


def is_text_source(cfg: DataConfig) -> bool:
    """True for sources made of text (not `synthetic`, not token shards)."""
    return not cfg.mix and cfg.source != "synthetic" and not is_token_source(cfg.source)


def embedded_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk_sorted(root: str, suffixes: tuple[str, ...], skip_dirs: set[str]) -> list[str]:
    """Files under `root` with one of `suffixes`, sorted by relative path (posix separators).

    Hidden entries (dot-names) are skipped: a data directory under version control should not
    train on `.git` internals.
    """
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.endswith(suffixes):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()
    return [full for _, full in found]


def _source_files(cfg: DataConfig) -> tuple[list[str], bool]:
    """(files, strict) for a text source. `strict` = raise on undecodable files (user data)."""
    src = cfg.source
    if src == "embedded":
        root = embedded_root()
        if not os.path.isdir(root):
            raise DataError(f"data.source=embedded: the Python standard library directory {root} is missing")
        return _walk_sorted(root, (".py",), _EMBEDDED_SKIP_DIRS), False
    if not os.path.exists(src):
        raise DataError(f"data.source: no such file or directory: {src}")
    if os.path.isdir(src):
        return _walk_sorted(src, SUPPORTED_SUFFIXES, set()), True
    if not src.endswith(SUPPORTED_SUFFIXES):
        ext = os.path.splitext(src)[1] or "(none)"
        raise DataError(
            f"data.source: {src} has unsupported file type {ext} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return [src], True


def _decode(raw: bytes, path: str, strict: bool) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not strict:
            return None
        raise DataError(f"data.source: {path} is not valid UTF-8 (byte {exc.start})") from None


def _jsonl_documents(path: str, field: str) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                msg = getattr(exc, "msg", None) or str(exc)
                raise DataError(f"data.source: {path}:{lineno}: not valid JSON ({msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(
                    f"data.source: {path}:{lineno}: no field '{field}' (set data.text_field to the key holding the text)")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"data.source: {path}:{lineno}: field '{field}' is {type(text).__name__}, expected a string")
            yield text


def _parquet_documents(path: str, field: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - corrupt/unreadable file
        raise DataError(f"data.source: {path}: cannot read as Parquet ({str(exc).splitlines()[0][:200]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(
            f"data.source: {path}: no column '{field}' (columns: {', '.join(names)}; set data.text_field)")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"data.source: {path}: column '{field}' has type {col_type}, expected string")
    # Batches (not the whole table) so the size cap can stop reading a huge file early.
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _file_documents(path: str, cfg: DataConfig, strict: bool) -> Iterator[str]:
    if path.endswith(".jsonl"):
        yield from _jsonl_documents(path, cfg.text_field)
    elif path.endswith(".parquet"):
        yield from _parquet_documents(path, cfg.text_field)
    else:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise DataError(f"data.source: cannot read {path} ({exc.strerror})") from None
        text = _decode(raw, path, strict)
        if text is not None:
            yield text


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Non-empty documents of a text source, in their deterministic order, up to the size cap.

    The cap (`data.max_corpus_mb`, MiB of UTF-8) applies to the embedded corpus and to
    directories; a single file named explicitly is read whole. The document that crosses the cap
    is cut at the cap (on a character boundary), so every rank stops at the same byte.
    """
    if not is_text_source(cfg):
        raise DataError("data.source=synthetic has no text documents")
    files, strict = _source_files(cfg)
    capped = cfg.source == "embedded" or os.path.isdir(cfg.source)
    budget = int(cfg.max_corpus_mb * _MB) if capped else None
    for path in files:
        for text in _file_documents(path, cfg, strict):
            if not text.strip():
                continue
            if budget is not None:
                raw = text.encode("utf-8")
                if len(raw) >= budget:
                    text = raw[:budget].decode("utf-8", errors="ignore")
                    if text.strip():
                        yield text
                    return
                budget -= len(raw)
            yield text


def read_documents(cfg: DataConfig) -> list[str]:
    """All documents of a text source; DataError if there are none."""
    docs = list(iter_documents(cfg))
    if not docs:
        raise DataError(_no_documents(cfg))
    return docs


def _no_documents(cfg: DataConfig) -> str:
    if cfg.source == "embedded":
        return f"data.source=embedded: no readable .py files under {embedded_root()}"
    return f"data.source: {cfg.source} contains no documents (non-empty {', '.join(SUPPORTED_SUFFIXES)})"


def _file_lengths_key(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"data.lengths: length file not found: {path}") from None
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


_INT64_MAX = 2**63 - 1
_INT_LINE = re.compile(r"[+-]?[0-9]+")


def _lengths_text_error(raw: bytes, path: str) -> str | None:
    """Why `raw` is not a text file (NUL bytes or not UTF-8), or None."""
    if b"\0" in raw:
        return (f"data.lengths: {path} is a binary file (NUL byte at offset {raw.index(bytes(1))}); "
                "expected one positive integer per line")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"data.lengths: {path} is not UTF-8 text (offset {exc.start}); expected one positive integer per line"
    return None


@functools.lru_cache(maxsize=4)
def _read_lengths(path: str, mtime_ns: int, size: int) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"data.lengths: cannot read {path} ({exc.strerror})") from None
    problem = _lengths_text_error(raw, path)
    if problem:
        raise DataError(problem)
    lines = raw.splitlines()
    if not lines:
        raise DataError(f"data.lengths: {path} is empty (expected one positive integer per line)")
    try:
        arr = np.array(lines).astype(np.int64)  # numpy parses the byte strings in C
    except (ValueError, OverflowError):
        arr = None
    if arr is None:  # slow path only to name the bad line
        for lineno, line in enumerate(lines, 1):
            text = line.strip().decode()
            if not _INT_LINE.fullmatch(text):
                raise DataError(f"data.lengths: {path}:{lineno}: {text[:40]!r} is not an integer "
                                "(expected one positive integer per line)")
            if text.startswith("-") or not text.strip("+0"):
                raise DataError(f"data.lengths: {path}:{lineno}: {text[:40]} is not a positive length")
            if len(text.lstrip("+")) > 19 or int(text) > _INT64_MAX:  # (int() refuses 4,300 digits)
                raise DataError(f"data.lengths: {path}:{lineno}: {text[:40]} is beyond the 64-bit integer range")
        raise DataError(f"data.lengths: {path}: not one integer per line")
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise DataError(f"data.lengths: {path}:{bad[0] + 1}: {arr[bad[0]]} is not a positive length")
    arr.setflags(write=False)
    return arr


def load_lengths_file(path: str) -> np.ndarray:
    """Document lengths from a file, one positive int per line; cached per process (read-only)."""
    return _read_lengths(*_file_lengths_key(path))


def check_source(cfg: DataConfig) -> None:
    """Cheap pre-launch checks: the source exists, has supported non-empty files, and the first
    document can be read (which surfaces a bad first JSON line or a missing column/field early).

    Reading stops at the first non-empty document, so this costs one file read in the common
    case. For `synthetic`, the `file:` length distribution (if any) is parsed and validated.
    """
    if cfg.mix:  # every source of the mix, as below
        tokenizer = build_tokenizer(cfg.tokenizer)
        for path in cfg.mix:
            PreparedCorpus(open_dataset(str(path), tokenizer), cfg.seq_len, tokenizer.vocab_size)
        return
    if cfg.source == "synthetic":
        if cfg.lengths.startswith("file:"):
            load_lengths_file(cfg.lengths[5:])
        return
    if is_token_source(cfg.source):  # headers, sizes, manifest and tokenizer: O(shards), not O(tokens)
        tokenizer = build_tokenizer(cfg.tokenizer)
        PreparedCorpus(open_dataset(cfg.source, tokenizer), cfg.seq_len, tokenizer.vocab_size)
        return
    files, _ = _source_files(cfg)
    if cfg.source != "embedded" and not files:
        raise DataError(
            f"data.source: {cfg.source} contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
    if not any(os.path.getsize(f) > 0 for f in files):
        raise DataError(_no_documents(cfg))
    if next(iter_documents(cfg), None) is None:
        raise DataError(_no_documents(cfg))
