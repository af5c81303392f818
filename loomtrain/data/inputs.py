"""What `loomtrain data prepare` reads: inputs cut into tasks, and the documents of one task.

A task is a piece of input whose documents become exactly one shard: a group of text files, a
byte range of a JSONL file (the lines that start inside it), a group of Parquet row groups, or
one Arrow file of an HF `datasets.save_to_disk` directory. Tasks are planned from the inputs
alone (sorted paths, file sizes, row-group sizes), never from the worker count, which is what
makes the output the same bytes with 1 or 16 workers and lets an interrupted run resume task by
task.

A document is text (tokenised and closed with EOS, as the text path does) or, from JSONL /
Parquet / Arrow, a list of token ids already made (pre-tokenised input), taken as-is and closed
with EOS unless it already ends with it. Empty and whitespace-only documents are skipped, as on
the text path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loomtrain.data.sources import TEXT_SUFFIXES, embedded_root
from loomtrain.errors import DataError

TASK_BYTES = 64 << 20  # input bytes per task (= per shard) before tokenisation
TASK_FILES = 4096  # text files per task at most
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}  # for `embedded`


@dataclass(frozen=True)
class Task:
    """kind: text | jsonl | parquet | arrow. `paths`: the files; `lo`/`hi`: byte range (jsonl)
    or row groups (parquet); `strict`: undecodable text is an error (user data), not skipped."""

    kind: str
    paths: tuple[str, ...]
    lo: int = 0
    hi: int = 0
    strict: bool = True

    def to_json(self) -> list:
        return [self.kind, list(self.paths), self.lo, self.hi, self.strict]


def _walk(root: str, suffixes: tuple[str, ...], skip: set[str]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not name.startswith(".") and name.endswith(suffixes) and os.path.isfile(full):
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return [full for _, full in sorted(found)]


def _arrow_files(directory: str) -> list[str] | None:
    """Arrow files of an HF `save_to_disk` directory (a Dataset or a DatasetDict), in order."""
    splits = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(splits):
        with open(splits, encoding="utf-8") as fh:
            names = json.load(fh).get("splits", [])
        return [f for s in names for f in (_arrow_files(os.path.join(directory, s)) or [])]
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state, encoding="utf-8") as fh:
        files = [d["filename"] for d in json.load(fh).get("_data_files", [])]
    return [os.path.join(directory, f) for f in files]


def _text_tasks(files: list[str], strict: bool, task_bytes: int) -> Iterator[Task]:
    """Runs of consecutive text files grouped into tasks; any other file is its own task(s), in
    place, so documents keep the sorted-path order the text path reads them in."""
    group, size = [], 0
    for path in files:
        if path.endswith((".jsonl", ".parquet", ".arrow")):
            if group:
                yield Task("text", tuple(group), strict=strict)
            group, size = [], 0
            yield from _file_tasks(path, task_bytes)
            continue
        group.append(path)
        size += os.path.getsize(path)
        if size >= task_bytes or len(group) >= TASK_FILES:
            yield Task("text", tuple(group), strict=strict)
            group, size = [], 0
    if group:
        yield Task("text", tuple(group), strict=strict)


def _file_tasks(path: str, task_bytes: int) -> Iterator[Task]:
    if path.endswith(".jsonl"):
        size = os.path.getsize(path)
        for lo in range(0, size, task_bytes):
            yield Task("jsonl", (path,), lo, min(lo + task_bytes, size))
    elif path.endswith(".parquet"):
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # noqa: BLE001 - corrupt/unreadable file
            raise DataError(f"data prepare: {path}: cannot read as Parquet ({str(exc).splitlines()[0][:200]})") from None
        lo, size = 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= task_bytes or g == meta.num_row_groups - 1:
                yield Task("parquet", (path,), lo, g + 1)
                lo, size = g + 1, 0
    elif path.endswith(".arrow"):
        yield Task("arrow", (path,))
    else:
        yield from _text_tasks([path], True, task_bytes)


def plan_tasks(sources: list[str], text_suffixes: tuple[str, ...] = TEXT_SUFFIXES,
               task_bytes: int = TASK_BYTES) -> list[Task]:
    """Every task of `sources` (files, directories, HF dataset directories, or `embedded`), in order."""
    tasks: list[Task] = []
    suffixes = tuple(text_suffixes) + (".jsonl", ".parquet")
    for src in sources:
        if src == "embedded":
            tasks.extend(_text_tasks(_walk(embedded_root(), (".py",), _SKIP_DIRS), False, task_bytes))
            continue
        if not os.path.exists(src):
            raise DataError(f"data prepare: no such file or directory: {src}")
        if os.path.isdir(src):
            arrow = _arrow_files(src)
            if arrow is not None:
                tasks.extend(Task("arrow", (f,)) for f in arrow)
                continue
            tasks.extend(_text_tasks(_walk(src, suffixes, set()), True, task_bytes))
            continue
        if not src.endswith(suffixes + (".arrow",)):
            raise DataError(f"data prepare: {src}: unsupported file type (text {', '.join(text_suffixes)}, "
                            ".jsonl, .parquet, .arrow, or an HF save_to_disk directory)")
        tasks.extend(_file_tasks(src, task_bytes))
    if not tasks:
        raise DataError(f"data prepare: no input files under {', '.join(sources)}")
    return tasks


# ------------------------------------------------------------------------ reading one task
def _value(value, where: str, field: str):
    """A record's field -> text, token ids (np.int64 array) or None (skipped)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return np.asarray(value, dtype=np.int64)
    raise DataError(f"data prepare: {where}: field '{field}' is {type(value).__name__}, "
                    "expected a string or a list of token ids")


def _jsonl(task: Task, field: str) -> Iterator:
    path = task.paths[0]
    with open(path, "rb") as fh:
        fh.seek(task.lo)
        if task.lo:
            fh.seek(task.lo - 1)
            fh.readline()  # the line that starts before lo belongs to the previous task
        while fh.tell() < task.hi:
            at = fh.tell()
            line = fh.readline()
            if not line:
                break
            if not line.strip():
                continue
            where = f"{path} (line at byte {at})"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"data prepare: {where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(f"data prepare: {where}: no field '{field}' (set --field)")
            yield _value(obj[field], where, field)


def _column(path: str, schema: pa.Schema, field: str) -> None:
    if field not in schema.names:
        raise DataError(f"data prepare: {path}: no column '{field}' (columns: {', '.join(schema.names)}; set --field)")
    t = schema.field(field).type
    ok = pa.types.is_string(t) or pa.types.is_large_string(t) or (
        (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type))
    if not ok:
        raise DataError(f"data prepare: {path}: column '{field}' has type {t}, expected text or a list of token ids")


def _batches(task: Task, field: str) -> Iterator[pa.Array]:
    path = task.paths[0]
    try:
        if task.kind == "parquet":
            pf = pq.ParquetFile(path)
            _column(path, pf.schema_arrow, field)
            for batch in pf.iter_batches(columns=[field], row_groups=range(task.lo, task.hi), batch_size=4096):
                yield batch.column(0)
        else:
            with pa.memory_map(path) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    reader = iter(reader)
                for batch in reader:
                    _column(path, batch.schema, field)
                    yield batch.column(batch.schema.get_field_index(field))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"data prepare: {path}: cannot read ({str(exc).splitlines()[0][:200]})") from None


def _columnar(task: Task, field: str) -> Iterator:
    for column in _batches(task, field):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            yield from column.to_pylist()
            continue
        offsets = np.asarray(column.offsets)
        values = np.asarray(column.values.fill_null(0)) if column.values.null_count else np.asarray(column.values)
        valid = np.asarray(column.is_valid())
        for i in range(len(column)):
            if valid[i]:
                yield values[offsets[i]:offsets[i + 1]].astype(np.int64)


def _text(task: Task) -> Iterator:
    for path in task.paths:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise DataError(f"data prepare: cannot read {path} ({exc.strerror})") from None
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if task.strict:
                raise DataError(f"data prepare: {path} is not valid UTF-8 (byte {exc.start})") from None


def task_documents(task: Task, field: str) -> Iterator:
    """Documents of one task in order: str (text) or np.int64 arrays (token ids); empties dropped."""
    reader = {"text": lambda: _text(task), "jsonl": lambda: _jsonl(task, field)}.get(
        task.kind, lambda: _columnar(task, field))
    for doc in reader():
        if doc is None or (isinstance(doc, str) and not doc.strip()) or (not isinstance(doc, str) and not doc.size):
            continue
        yield doc
