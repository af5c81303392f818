"""Per-file integrity of a checkpoint: the size and checksums that manifest.json records for every
file, and the check every reader makes before trusting one.

Each file gets two checksums, computed in one pass over its bytes while the writer fsyncs it
(`commit.fsync_and_hash`):

* a fast one, checked on every load by default (`checkpoint.verify=fast`), so that same-size
  damage (a flipped byte, a block overwritten) is found and the previous checkpoint used: xxHash's
  XXH3-64 (manifest key ``xxh3_64``) when the `xxhash` package is installed, else zlib's CRC-32
  (``crc32``). The manifest names the one the writer used, so a reader computes the same one;
* sha256 (``sha256``, `checkpoint.verify=checksum`), a cryptographic digest for tools and
  provenance.

A reader that cannot compute the recorded fast checksum (the writer had `xxhash`, the reader does
not), or a manifest that has none (written before fast checksums existed), checks sha256
instead: integrity is never skipped silently, it only costs more.

Files are opened non-blocking and must be regular files: a FIFO or device planted under a
checkpoint's file name is refused instead of hanging the reader.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
import zlib

try:
    import xxhash
except ImportError:  # optional: CRC-32 stands in
    xxhash = None

SHA256 = "sha256"
XXH3 = "xxh3_64"
CRC32 = "crc32"
FAST = XXH3 if xxhash is not None else CRC32  # what this process records as the fast checksum
FAST_ALGOS = (XXH3, CRC32)
CHECKS = ("size", "fast", "sha256")  # what a reader can check, cheapest first
_CHUNK = 8 << 20


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, block: bytes) -> None:
        self.value = zlib.crc32(block, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def can_compute(algo: str) -> bool:
    return algo in (SHA256, CRC32) or (algo == XXH3 and xxhash is not None)


def _hasher(algo: str):
    if algo == SHA256:
        return hashlib.sha256()
    if algo == CRC32:
        return _Crc32()
    return xxhash.xxh3_64()


def open_regular(path: str) -> int:
    """A read-only descriptor of `path`, which must be a regular file (opened non-blocking, so a
    FIFO cannot hang the caller). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def digest_file(path: str, algos, seconds: dict | None = None) -> tuple[int, dict[str, str]]:
    """(size, {algo: hex digest}) of `path`, every algorithm fed from one read of the bytes;
    `seconds[algo]` accumulates the time each one took (the stall benchmark reports them)."""
    hashers = {a: _hasher(a) for a in algos}
    fd = open_regular(path)
    size = 0
    with os.fdopen(fd, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            size += len(block)
            for algo, h in hashers.items():
                start = time.perf_counter()
                h.update(block)
                if seconds is not None:
                    seconds[algo] = seconds.get(algo, 0.0) + time.perf_counter() - start
    return size, {a: h.hexdigest() for a, h in hashers.items()}


def file_entry(path: str, seconds: dict | None = None) -> dict:
    """The manifest entry of one file: size, sha256 and the fast checksum."""
    size, digests = digest_file(path, (SHA256, FAST), seconds)
    return {"size": size, **digests}


def check_algo(entry: dict, check: str) -> str | None:
    """Which checksum `check` compares for a manifest `entry` (None: sizes only)."""
    if check == "size":
        return None
    if check == "fast":
        for algo in FAST_ALGOS:
            if isinstance(entry.get(algo), str) and can_compute(algo):
                return algo
    return SHA256


def normalise_check(check) -> str:
    """`checkpoint.verify` / `--checksum` spellings -> one of CHECKS."""
    if check is True or check in ("checksum", SHA256):
        return SHA256
    if check is False or check is None or check == "size":
        return "size"
    if check == "fast":
        return "fast"
    raise ValueError(f"unknown integrity check {check!r} (expected one of {', '.join(CHECKS)})")


def verify_files(ckpt: str, manifest: dict, names: list[str], check="fast") -> str | None:
    """Check `names` (a subset of the manifest's files) against the manifest: existence, regular
    file, size, and the checksum `check` selects ("size", "fast" or "sha256"). Returns the first
    problem as 'FILE: what', or None."""
    check = normalise_check(check)
    files = manifest["files"]
    for name in names:
        want = files[name]
        path = os.path.join(ckpt, name)
        try:
            st = os.stat(path)
        except OSError:
            return f"{name}: missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{name}: not a regular file"
        if st.st_size != want["size"]:
            return f"{name}: size {st.st_size} bytes, manifest says {want['size']} (truncated or overwritten)"
        algo = check_algo(want, check)
        if algo is None:
            continue
        try:
            _, digests = digest_file(path, (algo,))
        except OSError as exc:
            return f"{name}: cannot be read ({exc})"
        if digests[algo] != want[algo]:
            return (f"{name}: {algo} {digests[algo][:16]} does not match the manifest ({want[algo][:16]}): "
                    "its bytes changed")
    return None


def describe(check: str) -> str:
    """What `check` compares, for messages ('sizes and xxh3_64')."""
    check = normalise_check(check)
    return {"size": "sizes", "fast": "sizes and fast checksums",
            SHA256: "sizes and sha256"}[check]
