"""Token shards on disk: Megatron's indexed format (`.bin` + `.idx`) read on demand, plus our manifest.

Why Megatron's format for our own shards: it is the one pre-training data already comes in, so a
single reader serves both `loomtrain data prepare` output and data Megatron prepared, and our
shards stay readable by Megatron. A shard is

    NAME.bin   token ids, back to back (uint16 when every id fits, else int32 - Megatron has no
               uint32 code, and int32 holds any real vocabulary)
    NAME.idx   b"MMIDIDX\\0\\0", version u64 = 1, dtype code u8, sequence count n u64, document
               count d u64, then int32 lengths[n], int64 byte pointers[n], int64 document
               indices[d] (sequence numbers where documents begin; first 0, last n)

and `manifest.json` (ours) names the shards in order with their counts, sizes and XXH3-64
checksums, the tokenizer's name, vocabulary size and fingerprint, and the token dtype. Our
shards store one sequence per document, EOS included, so a reader never appends anything.

Opening a shard reads its 34-byte header and checks the file sizes it implies (a truncated or
padded file is one line, at start-up, at any corpus size). Tokens and index entries are then read
on demand with `pread` (see `IndexedShard`), so opening costs the same for 10^8 and 10^10 tokens,
only the bytes a row needs are read, and nothing of the corpus stays in the process.
Checksums read every byte, so they are checked by `loomtrain data verify`, not at every start.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from loomtrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
_TOKEN_CODES = (1, 3, 4, 5, 8)  # integer codes a token file may use (int8 holds no vocabulary)
MANIFEST = "manifest.json"
FORMAT = "loomtrain-token-shards"
VERSION = 1
_HASH_CHUNK = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the bytes), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def code_of(dtype: np.dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"no Megatron dtype code for {dtype}")


def file_xxh3(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ writing
def write_index(path: str, lengths: np.ndarray, dtype: np.dtype) -> None:
    """PATH (.idx) for documents of `lengths` tokens stored back to back, one sequence each."""
    dtype, lengths = np.dtype(dtype), np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() >= 1 << 31:
        raise DataError(f"{path}: a document of {int(lengths.max())} tokens exceeds the format's 2**31-1")
    pointers = np.zeros(lengths.size, dtype=np.int64)
    if lengths.size > 1:
        pointers[1:] = np.cumsum(lengths[:-1]) * dtype.itemsize
    with open(path, "wb") as fh:
        fh.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code_of(dtype)))
        fh.write(struct.pack("<Q", lengths.size) + struct.pack("<Q", lengths.size + 1))
        fh.write(lengths.astype(np.int32).tobytes())
        fh.write(pointers.tobytes())
        fh.write(np.arange(lengths.size + 1, dtype=np.int64).tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def shard_entry(prefix: str, documents: int, tokens: int) -> dict:
    """The manifest entry of a written shard (sizes and checksums read back from disk)."""
    return {"name": os.path.basename(prefix), "documents": int(documents), "tokens": int(tokens),
            "bin_bytes": os.path.getsize(prefix + ".bin"), "idx_bytes": os.path.getsize(prefix + ".idx"),
            "bin_xxh3": file_xxh3(prefix + ".bin"), "idx_xxh3": file_xxh3(prefix + ".idx")}


def write_shard(prefix: str, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write `docs` (token arrays, EOS already in) as PREFIX.bin/.idx; return the manifest entry.

    Both files go to temporary names first and are renamed into place, so a crash never leaves a
    complete-looking shard behind (`data prepare` resumes from what was renamed).
    """
    dtype = np.dtype(dtype)
    lengths = np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
    write_index(prefix + ".idx.tmp", lengths, dtype)
    with open(prefix + ".bin.tmp", "wb") as fh:
        for d in docs:
            fh.write(np.ascontiguousarray(d, dtype=dtype).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    return shard_entry(prefix, len(docs), int(lengths.sum()))


def write_manifest(out_dir: str, shards: list[dict], *, tokenizer: dict, dtype: np.dtype,
                   extra: dict | None = None) -> dict:
    """manifest.json listing the non-empty `shards` in order (written last, atomically)."""
    kept = [s for s in shards if s["documents"]]
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer,
                "dtype": np.dtype(dtype).name, "eos_appended": True,
                "documents": sum(s["documents"] for s in kept), "tokens": sum(s["tokens"] for s in kept),
                "shards": kept, **(extra or {})}
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest


# ------------------------------------------------------------------------------------ reading
def _pread(path: str, offset: int, nbytes: int) -> bytes:
    """`nbytes` at `offset` of `path`. Opened per call (a few microseconds) so that thousands
    of shards hold no file descriptors between reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, nbytes, offset)
    finally:
        os.close(fd)
    if len(data) != nbytes:
        raise DataError(f"data.source: {path} ended early (a read at byte {offset} got {len(data)} of {nbytes} "
                        "bytes): truncated while in use?")
    return data


@dataclass
class IndexedShard:
    """One `.bin`/`.idx` pair, read on demand. Documents d in [0, num_documents).

    Why `pread` and not `np.memmap`: on this kernel a memory map maps the page cache's large
    folios whole, so each random row of a training run added 0.4-2 MB to the process's resident
    memory (measured), and a run that shuffles rows would end up "holding" its whole index and
    corpus. Reads through the page cache keep the same caching, shared by every rank on the
    node, with nothing resident in the process; a row is one or two reads of a few KB.
    """

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int

    def _ints(self, array: str, first: int, count: int) -> np.ndarray:
        """`count` entries from `first` of the index's lengths (int32), pointers or doc_index (int64)."""
        n = self.num_sequences
        base, item, dt = {"lengths": (HEADER_BYTES, 4, np.int32), "pointers": (HEADER_BYTES + 4 * n, 8, np.int64),
                          "doc_index": (HEADER_BYTES + 12 * n, 8, np.int64)}[array]
        if count <= 0:
            return np.empty(0, dtype=dt)
        return np.frombuffer(_pread(self.prefix + ".idx", base + item * first, item * count), dtype=dt)

    def doc_starts(self, d0: int, d1: int) -> np.ndarray:
        """Token offsets where documents d0..d1 begin (d1 may be num_documents: the end)."""
        seq = self._ints("doc_index", d0, d1 - d0 + 1).astype(np.int64)
        out = np.full(seq.shape, self.num_tokens, dtype=np.int64)
        inside = seq < self.num_sequences
        if inside.any():
            lo, hi = int(seq[inside].min()), int(seq[inside].max())
            out[inside] = self._ints("pointers", lo, hi - lo + 1)[seq[inside] - lo] // self.dtype.itemsize
        return out

    def starts_of(self, docs: np.ndarray) -> np.ndarray:
        """`doc_starts` of scattered documents (start-up: one index entry per window)."""
        n, docs = self.num_sequences, np.asarray(docs, dtype=np.int64)
        out = np.full(docs.shape, self.num_tokens, dtype=np.int64)
        fd = os.open(self.prefix + ".idx", os.O_RDONLY)
        try:
            for i, d in enumerate(docs.tolist()):
                seq = int.from_bytes(os.pread(fd, 8, HEADER_BYTES + 12 * n + 8 * d), "little", signed=True)
                if seq < n:
                    ptr = int.from_bytes(os.pread(fd, 8, HEADER_BYTES + 4 * n + 8 * seq), "little", signed=True)
                    out[i] = ptr // self.dtype.itemsize
        finally:
            os.close(fd)
        return out

    def tokens(self, begin: int, count: int) -> np.ndarray:
        """Token ids [begin, begin + count) of this shard."""
        size = self.dtype.itemsize
        return np.frombuffer(_pread(self.prefix + ".bin", begin * size, count * size), dtype=self.dtype)


def _read_header(idx: str) -> tuple[int, int, int, int]:
    try:
        with open(idx, "rb") as fh:
            head = fh.read(HEADER_BYTES)
    except OSError as exc:
        raise DataError(f"data.source: cannot read {idx} ({exc.strerror})") from None
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise DataError(f"data.source: {idx} is not a Megatron indexed dataset index (no MMIDIDX header)")
    off = len(MAGIC)
    (version,) = struct.unpack_from("<Q", head, off)
    (code,) = struct.unpack_from("<B", head, off + 8)
    n, d = struct.unpack_from("<QQ", head, off + 9)
    if version != 1:
        raise DataError(f"data.source: {idx} has index version {version}; only version 1 is known")
    if code not in _TOKEN_CODES:
        raise DataError(f"data.source: {idx} stores dtype code {code}, not integer token ids")
    return code, n, d, os.path.getsize(idx)


def open_shard(prefix: str) -> IndexedShard:
    """Check PREFIX.idx and PREFIX.bin against the header (a few small reads, at any size); any
    size or boundary that disagrees is one DataError."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_path):
        if not os.path.isfile(path):
            raise DataError(f"data.source: missing shard file {path}")
    code, n, d, idx_size = _read_header(idx)
    want = HEADER_BYTES + 12 * n + 8 * d
    if idx_size != want:
        what = "multimodal (sequence modes), which is not supported" if idx_size == want + n else \
            f"{idx_size} bytes where its header implies {want}: truncated or corrupt"
        raise DataError(f"data.source: {idx} is {what}")
    if n == 0 or d < 2:
        raise DataError(f"data.source: {idx} holds no documents")
    dtype = np.dtype(DTYPE_CODES[code])
    shard = IndexedShard(prefix, dtype, n, d - 1, 0)
    end = int(shard._ints("pointers", n - 1, 1)[0]) + int(shard._ints("lengths", n - 1, 1)[0]) * dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != end:
        raise DataError(f"data.source: {bin_path} is {bin_size} bytes where its index implies {end}: "
                        f"{'truncated' if bin_size < end else 'corrupt'} (prepare it again)")
    if int(shard._ints("doc_index", 0, 1)[0]) != 0 or int(shard._ints("doc_index", d - 1, 1)[0]) != n \
            or int(shard._ints("pointers", 0, 1)[0]) != 0:
        raise DataError(f"data.source: {idx} has an inconsistent document index (corrupt)")
    shard.num_tokens = end // dtype.itemsize
    return shard


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except OSError as exc:
        raise DataError(f"data.source: cannot read {path} ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"data.source: {path} is not valid JSON ({exc})") from None
    keys = ("format", "version", "tokenizer", "dtype", "shards", "documents", "tokens")
    if not isinstance(manifest, dict) or any(k not in manifest for k in keys) or manifest["format"] != FORMAT:
        raise DataError(f"data.source: {path} is not a loomtrain shard manifest")
    if manifest["version"] != VERSION:
        raise DataError(f"data.source: {path} has format version {manifest['version']}; this loomtrain reads {VERSION}")
    return manifest


def is_prepared_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def megatron_prefixes(path: str) -> list[str] | None:
    """Shard prefixes of a Megatron dataset named by `path`, or None if it is not one.

    `path` may be a prefix (`corpus_text_document`), its `.bin`/`.idx`, or a directory of
    `.idx`/`.bin` pairs without a manifest (all of them, in sorted order).
    """
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix) and os.path.isfile(path):
            return [path[:-len(suffix)]]
    if os.path.isfile(path + ".idx"):
        return [path]
    if os.path.isdir(path) and not is_prepared_dir(path):
        found = sorted(os.path.join(path, f[:-4]) for f in os.listdir(path) if f.endswith(".idx"))
        return found or None
    return None


def verify_checksums(directory: str) -> list[str]:
    """Problems found by re-hashing every shard of a prepared directory (empty list: all good)."""
    manifest = read_manifest(directory)
    problems = []
    for entry in manifest["shards"]:
        for suffix in ("bin", "idx"):
            path = os.path.join(directory, f"{entry['name']}.{suffix}")
            if not os.path.isfile(path):
                problems.append(f"{path}: missing")
            elif os.path.getsize(path) != entry[f"{suffix}_bytes"]:
                problems.append(f"{path}: {os.path.getsize(path)} bytes, manifest says {entry[f'{suffix}_bytes']}")
            elif file_xxh3(path) != entry[f"{suffix}_xxh3"]:
                problems.append(f"{path}: checksum differs from the manifest (corrupt)")
    return problems
