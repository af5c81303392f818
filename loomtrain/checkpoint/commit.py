"""The file operations of a save: every rank's data files (fsync'ed while hashed), then rank 0's
atomic commit, the `latest` pointer, pruning and start-up clean-up.

Commit of a checkpoint that every rank has written into `step_N.tmp-<id>/` and agreed on:

1. `meta.json`, then `manifest.json` (size, sha256 and fast checksum of every other file) into the temporary
   directory, each fsync'ed, then the directory itself;
2. committed checkpoints with a step >= N (an abandoned future: the run resumed from an older
   checkpoint, or a damaged one it fell back from) are renamed to `.deleting-<id>`;
3. `rename(step_N.tmp-<id>, step_N)` -- the commit point -- and fsync of the parent;
4. `latest` is replaced (`latest.tmp-<id>` + `os.replace`);
5. all but the newest `keep` committed checkpoints are renamed to `.deleting-<id>` and removed.

A crash anywhere leaves either the previous committed checkpoints (plus leftovers that the next
start removes) or the new one complete: a directory named `step_N` always has its manifest.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
import sys
import threading

from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint.format import CheckpointError


def _fault(fault, phase: str) -> None:
    if fault is not None:
        fault(phase)


LOCK_FILE = ".lock"


def lock_root(root: str):
    """Take `root/.lock` (flock) for as long as the returned file stays open: one job per
    checkpoint directory (a second one would prune or clean up under the first).

    The directory may have been copied, untarred or shared, so the lock file is never trusted: it
    is opened without following a symlink (a planted `.lock -> victim` is refused, the victim
    untouched) and only written to when it is a regular file with no other hard link."""
    path = os.path.join(root, LOCK_FILE)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        why = "a symbolic link" if os.path.islink(path) else f"not openable ({exc.strerror})"
        raise CheckpointError(f"checkpoint.dir {root}: {LOCK_FILE} is {why}; refusing to use it (remove it if "
                              "no job is running there)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"hard-linked {st.st_nlink} times"
        raise CheckpointError(f"checkpoint.dir {root}: {LOCK_FILE} is {why}; refusing to write to it (remove it "
                              "if no job is running there)")
    fh = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            fh.close()  # a file system without locks: go on unguarded
            return None
        fh.seek(0)
        holder = fh.read(200).strip().splitlines()[:1] or ["another process"]
        fh.close()
        raise CheckpointError(f"checkpoint.dir {root} is in use by another job ({holder[0]}); one job per "
                              "checkpoint directory") from None
    except Exception:
        fh.close()
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    fh.flush()
    return fh


def cleanup_leftovers(root: str) -> list[str]:
    """Remove what interrupted saves and prunes left in `root`; returns the removed names."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in names:
        if fmt.is_leftover(name):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass
            removed.append(name)
    return removed


def write_latest(root: str, name: str, run_id: str) -> None:
    tmp = os.path.join(root, f"{fmt.LATEST_FILE}.tmp-{run_id}")
    with os.fdopen(fmt.create_new(tmp), "w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, fmt.LATEST_FILE))
    fmt.fsync_path(root)


def _set_aside(path: str, run_id: str) -> str:
    aside = f"{path}.deleting-{run_id}"
    if os.path.exists(aside):
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    return aside


def write_manifest(tmp: str, step: int, meta: dict, files: dict[str, dict]) -> None:
    """Step 1: `meta.json`, then `manifest.json` over it, DCP's `.metadata` and the data files
    whose entries (`files`: name -> size, checksums) the writers computed; each fsync'ed, then the
    directory. Also how an offline writer (an import) finishes its checkpoint."""
    files = dict(files)
    fmt.write_json(os.path.join(tmp, fmt.META_FILE), meta)
    for name in (fmt.DCP_METADATA_FILE, fmt.META_FILE):
        path = os.path.join(tmp, name)
        fmt.fsync_path(path)
        files[name] = fmt.file_entry(path)
    manifest = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "step": int(step),
                "files": dict(sorted(files.items()))}
    fmt.write_json(os.path.join(tmp, fmt.MANIFEST_FILE), manifest)
    fmt.fsync_path(tmp)


def commit(root: str, tmp: str, step: int, meta: dict, files: dict[str, dict], *, keep: int, run_id: str,
           fault=None) -> str:
    """Steps 1-5 above; `files` holds the manifest entries of the data files the ranks wrote.
    Returns the committed directory."""
    write_manifest(tmp, step, meta, files)
    _fault(fault, "manifest")

    final = os.path.join(root, fmt.step_dir_name(step))
    stale = [(s, p) for s, p in fmt.list_committed(root) if s >= step]
    if any(s > step for s, _ in stale):
        print(f"loomtrain: checkpoint: removing {', '.join(os.path.basename(p) for s, p in stale if s > step)} "
              f"(newer than step {step}: left by a run this one did not continue)", file=sys.stderr, flush=True)
    asides = [_set_aside(p, run_id) for _, p in stale]
    if os.path.exists(final):  # a leftover without manifest under the final name
        asides.append(_set_aside(final, run_id))
    os.rename(tmp, final)
    fmt.fsync_path(root)
    _fault(fault, "renamed")

    write_latest(root, os.path.basename(final), run_id)
    _fault(fault, "pointer")

    for _, path in fmt.list_committed(root)[keep:]:
        asides.append(_set_aside(path, run_id))
        _fault(fault, "pruning")
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def fsync_and_hash(root: str, names: list[str], seconds: dict | None = None) -> dict:
    """fsync this rank's data files (a second thread: mostly waiting on the disk) while computing
    their manifest entries, sha256 and the fast checksum in one read (this thread: CPU), so that
    durability and the checksums cost about the longer of the two. `seconds` receives the time
    each checksum took."""
    errors: list = []

    def sync():
        try:
            for name in names:
                fmt.fsync_path(os.path.join(root, name), strict=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    syncer = threading.Thread(target=sync, name="loomtrain-checkpoint-fsync", daemon=True)
    syncer.start()
    try:
        entries = {name: fmt.file_entry(os.path.join(root, name), seconds) for name in names}
    finally:
        syncer.join()
    if errors:
        raise errors[0]
    return entries
