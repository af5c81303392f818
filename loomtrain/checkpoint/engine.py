"""The lazy asynchronous checkpoint engine (DataStates-LLM's idea on DCP).

Timeline of one checkpoint requested after optimizer step N (main thread | background thread):

    main: step N ... optimizer.step() | request(N): wait if checkpoint N-k is still being written
          (back-pressure), capture the small state (step, data position, RNG, LR schedule: a few
          dicts), hand the live tensor references to the background thread, return
    main: step N+1 forward + backward  || bg: copy this rank's shards into reused host buffers
    main: wait_snapshot() right before step N+1's optimizer.step(): blocks only if the copy has
          not finished (the optimizer would change the tensors being copied)
    main: step N+1 optimizer.step() ...  || bg: DCP save of the host copy into step_N.tmp-<id>/
                                              on the checkpoint's own gloo group, sha256 and fast
                                              checksum of this rank's files, agree (gather to rank 0), rank 0
                                              commits (meta, manifest, rename, latest, prune),
                                              broadcast the outcome

Host buffers are allocated once, in the background right after the first optimizer step
(`prepare`: by then the optimizer state exists, and the first save's copy does not pay for fresh
memory), and reused by every save, so at most one checkpoint is in flight and memory never grows:
a request that arrives while the previous one is still writing waits.
Forward and backward never write parameters or optimizer state (FSDP2 all-gathers *from* the
shards; gradients are not saved), so the copy may overlap them; only the optimizer step may not.

Every collective of the background thread runs on a process group of its own
(`dist.new_group(backend="gloo")`, created once): gloo crashes when the training's group is used
from a second thread. A tensor held by several ranks (replicated parameters, AdamW's `step`) is
copied and written by one of them only, chosen once per run to balance bytes.

Which rank writes which chunk, and the host buffers: `hostcopy.py`. Writing the files durably
and the commit: `commit.py`. The crash tests' fault points (`_fault_at(phase, step)`): `faults.py`.
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from loomtrain.checkpoint import commit as commit_lib
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import integrity, safeload
from loomtrain.checkpoint.faults import fault_hook
from loomtrain.checkpoint.format import CheckpointError
from loomtrain.checkpoint.hostcopy import HostSlot, assign_owners, chunk_id, local_of, nbytes


@dataclass
class SaveRecord:
    """What one checkpoint cost; `*_block_s` / `optimizer_wait_s` are the training loop's stalls."""

    step: int
    request_block_s: float = 0.0  # request(): waiting for the previous checkpoint + capture
    optimizer_wait_s: float = 0.0  # wait_snapshot(): the copy was not done before the optimizer step
    copy_s: float = 0.0
    write_s: float = 0.0  # DCP save of the host copy + fsync/hash of this rank's files (hash_s)
    hash_s: float = 0.0  # fsync + checksums of this rank's files (overlapped; inside write_s)
    checksum_s: float = 0.0  # of which the fast checksum's share of the CPU (inside hash_s)
    commit_s: float = 0.0
    total_s: float = 0.0
    bytes: int = 0  # bytes this rank copied
    allocated_bytes: int = 0  # host memory this save had to allocate (0 once buffers are reused)
    path: str | None = None
    error: str | None = None

    @property
    def stall_s(self) -> float:
        return self.request_block_s + self.optimizer_wait_s


@dataclass
class _Prepare:
    """Allocate (and touch) the host buffers before the first save needs them."""

    entries: list[tuple[str, torch.Tensor]]
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Job:
    step: int
    entries: list[tuple[str, torch.Tensor]]
    meta: dict
    record: SaveRecord
    cuda_event: object = None
    snapshot_done: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class CheckpointEngine:
    """Lazy asynchronous saves into `root` (see the module docstring). One per training job;
    every method is called by the main thread of every rank at the same points."""

    def __init__(self, root: str, *, group, run_id: str, keep: int, device: torch.device):
        self.root = root
        self.group = group  # None: a single process without a process group
        self.distributed = group is not None
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.run_id = run_id
        self.keep = keep
        self.device = device
        self.records: list[SaveRecord] = []
        self.last_committed: str | None = None
        self._fault = fault_hook(dist.get_rank() if dist.is_initialized() else 0)
        self._slots: dict[str, HostSlot] | None = None
        self._prepare: _Prepare | None = None
        self._owned: set[str] = set()
        self._keys: list[str] | None = None
        self._job: _Job | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._loop, name="loomtrain-checkpoint", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------- main thread
    @property
    def in_flight(self) -> bool:
        return self._job is not None and not self._job.done.is_set()

    @property
    def prepared(self) -> bool:
        return self._slots is not None

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Wait until the host buffers `prepare` started allocating exist; False on timeout."""
        return self._prepare is not None and self._prepare.done.wait(timeout)

    @property
    def host_bytes(self) -> int:
        """Host memory held for this rank's copies (allocated once, reused by every save)."""
        return sum(nbytes(slot.buf) for slot in (self._slots or {}).values())

    def prepare(self, entries: list[tuple[str, torch.Tensor]]) -> None:
        """Decide who writes what (a collective on the group) and allocate this rank's host buffers
        in the background, page by page, before the first save. Without it the first save's copy
        pays for the allocation (pinned memory on CUDA, page faults on CPU), which can outlast a
        forward/backward and so stall the optimizer step."""
        if self._slots is not None:
            return
        self._plan(entries)
        self._prepare = _Prepare(list(entries))
        self._queue.put(self._prepare)

    def request(self, step: int, entries: list[tuple[str, torch.Tensor]], meta: dict) -> float:
        """Start saving the state after optimizer step `step`. `entries` are references to the live
        tensors (copied in the background), `meta` the small state already captured. Returns the
        seconds the caller was blocked."""
        start = time.perf_counter()
        self.wait()  # back-pressure: the host buffers belong to the previous checkpoint until it is done
        if self._slots is None:
            self._plan(entries)
        self._check_plan(entries)
        record = SaveRecord(step=step)
        job = _Job(step, entries, meta, record)
        if self._stream is not None:
            job.cuda_event = torch.cuda.Event()
            job.cuda_event.record()
        self._job = job
        self._queue.put(job)
        record.request_block_s = time.perf_counter() - start
        self.records.append(record)
        return record.request_block_s

    def wait_snapshot(self) -> float:
        """Block until the in-flight checkpoint's host copy is complete (call right before the
        optimizer changes the tensors); returns the seconds blocked."""
        job = self._job
        if job is None or job.snapshot_done.is_set():
            return 0.0
        start = time.perf_counter()
        job.snapshot_done.wait()
        waited = time.perf_counter() - start
        job.record.optimizer_wait_s += waited
        return waited

    def wait(self, timeout: float | None = None) -> SaveRecord | None:
        """Block until the in-flight checkpoint is committed (or failed: CheckpointError on every
        rank). Returns its record, or None if nothing was in flight."""
        job = self._job
        if job is None:
            return None
        if not job.done.wait(timeout):
            raise CheckpointError(f"checkpoint of step {job.step} did not finish within {timeout:.0f} s")
        self._job = None
        if job.record.error is not None:
            raise CheckpointError(f"checkpoint of step {job.step} failed and was not committed: {job.record.error}")
        return job.record

    def close(self) -> None:
        """Stop the background thread. One still busy with a checkpoint (its peers died, or an
        abort) is left behind: it is a daemon, and an unfinished save is never committed."""
        if self._thread.is_alive() and not self.in_flight:
            self._queue.put(None)
            self._thread.join()

    def _plan(self, entries: list[tuple[str, torch.Tensor]]) -> None:
        """Decide once which chunks this rank copies and writes (a collective on the group)."""
        mine = [(chunk_id(k, t), nbytes(t)) for k, t in entries]
        if self.distributed:
            held: list = [None] * self.world
            dist.all_gather_object(held, mine, group=self.group)
            owner = assign_owners(held)
            self._owned = {cid[0] for cid, _ in mine if owner[cid] == self.rank}
        else:
            self._owned = {cid[0] for cid, _ in mine}
        self._slots = {}
        self._keys = [k for k, _ in entries]

    def _check_plan(self, entries) -> None:
        if [k for k, _ in entries] != self._keys:
            raise CheckpointError("the set of tensors to checkpoint changed during the run "
                                  "(the optimizer or the model was rebuilt); cannot save")

    # ----------------------------------------------------------------- background thread
    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if isinstance(job, _Prepare):
                self._allocate(job)
                continue
            try:
                self._run(job)
            except BaseException as exc:  # never leave the main thread waiting forever
                job.record.error = job.record.error or f"{type(exc).__name__}: {exc}"
            finally:
                job.snapshot_done.set()
                job.done.set()

    def _allocate(self, job: _Prepare) -> None:
        """Create this rank's host buffers and touch every page now, not in the first copy."""
        try:
            for key, src in job.entries:
                if key in self._owned:
                    self._slot(key, src).buf.zero_()
        except Exception:  # noqa: BLE001 -- the first save allocates whatever is missing
            pass
        finally:
            job.entries = []  # no references to live tensors beyond this
            job.done.set()

    def _fault_at(self, phase: str, step: int) -> None:
        if self._fault is not None:
            self._fault(phase, step)

    def _run(self, job: _Job) -> None:
        rec = job.record
        t0 = time.perf_counter()
        ok, error = True, None
        tmp = os.path.join(self.root, f"{fmt.step_dir_name(job.step)}.tmp-{self.run_id}")
        try:
            value_sd = self._stage(job)
        except Exception as exc:  # noqa: BLE001 -- reported through the agreement below
            ok, error, value_sd = False, f"copy to host failed: {type(exc).__name__}: {exc}", {}
        finally:
            job.snapshot_done.set()
        rec.copy_s = time.perf_counter() - t0
        self._fault_at("staged", job.step)
        if ok:
            try:
                os.makedirs(tmp, exist_ok=True)
            except OSError as exc:
                ok, error = False, f"cannot create {tmp}: {exc}"

        t1 = time.perf_counter()
        # Every rank enters DCP's collectives or none does (DCP itself propagates a rank's
        # failure inside a save to all ranks).
        if self._all_ok(ok):
            try:
                # Files are fsync'ed below, overlapped with hashing them (I/O wait vs CPU). Without a
                # process group DCP warns that it saves in one process (once per process, Python's
                # default); it is not filtered here: `warnings.catch_warnings()` swaps the process's
                # filter list, which this background thread must not do under the training thread.
                dcp.save(value_sd, storage_writer=dcp.FileSystemWriter(tmp, sync_files=False),
                         process_group=self.group, no_dist=not self.distributed)
            except Exception as exc:  # noqa: BLE001
                ok, error = False, f"writing {tmp} failed: {type(exc).__name__}: {exc}"
        elif ok:
            ok, error = False, "another rank could not copy its state"
        self._fault_at("written", job.step)
        files = {}
        th = time.perf_counter()
        if ok:
            try:
                prefix = f"__{self.rank}_"
                names = [n for n in sorted(os.listdir(tmp)) if n.startswith(prefix) and n.endswith(".distcp")]
                seconds: dict = {}
                files = commit_lib.fsync_and_hash(tmp, names, seconds)
                rec.checksum_s = seconds.get(integrity.FAST, 0.0)
            except Exception as exc:  # noqa: BLE001
                ok, error = False, f"syncing/hashing {tmp} failed: {type(exc).__name__}: {exc}"
        rec.hash_s = time.perf_counter() - th
        rec.write_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        info = {"rank": self.rank, "ok": ok, "error": error, "files": files, "rng": job.meta.get("rng")}
        gathered = self._gather(info)
        outcome = None
        if self.rank == 0:
            bad = [g for g in gathered if not g["ok"]]
            if bad:
                outcome = {"path": None, "error": f"rank {bad[0]['rank']}: {bad[0]['error']}"}
                shutil.rmtree(tmp, ignore_errors=True)  # every rank is past writing: nothing to keep
            else:
                try:
                    meta = dict(job.meta)
                    meta["rng"] = {"per_rank": [g["rng"] for g in gathered]}
                    meta["tensors"] = safeload.dcp_tensor_index(tmp)
                    all_files = {k: v for g in gathered for k, v in g["files"].items()}
                    path = commit_lib.commit(self.root, tmp, job.step, meta, all_files, keep=self.keep,
                                             run_id=self.run_id,
                                             fault=lambda phase: self._fault_at(phase, job.step))
                    outcome = {"path": path, "error": None}
                except Exception as exc:  # noqa: BLE001
                    outcome = {"path": None, "error": f"commit failed: {type(exc).__name__}: {exc}"}
        outcome = self._broadcast(outcome)
        rec.commit_s = time.perf_counter() - t2
        rec.total_s = time.perf_counter() - t0
        rec.path, rec.error = outcome["path"], outcome["error"]
        if rec.path is not None:
            self.last_committed = rec.path

    def _stage(self, job: _Job) -> dict:
        """Copy this rank's chunks into the host buffers; returns the DCP state dict over them."""
        owned = [(k, t) for k, t in job.entries if k in self._owned]
        half = len(owned) // 2
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            if self._stream is not None:
                self._stream.wait_event(job.cuda_event)
            for i, (key, src) in enumerate(owned):
                slot = self._slot(key, src, job.record)
                with torch.no_grad():
                    slot.buf.copy_(local_of(src).detach(), non_blocking=self._stream is not None)
                job.record.bytes += slot.buf.numel() * slot.buf.element_size()
                if i == half:
                    self._fault_at("copy", job.step)
        if self._stream is not None:
            self._stream.synchronize()
        return {k: self._slots[k].value for k, _ in owned}

    def _slot(self, key: str, src: torch.Tensor, record: SaveRecord | None = None) -> HostSlot:
        """The reused host buffer for `key` (background thread only); a save that has to allocate
        one counts the bytes in its record."""
        slot = self._slots.get(key)
        if slot is None or not slot.matches(src):
            slot = self._slots[key] = HostSlot(key, src, pin=self._stream is not None)
            if record is not None:
                record.allocated_bytes += nbytes(slot.buf)
        return slot

    def _all_ok(self, ok: bool) -> bool:
        if not self.distributed:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _gather(self, info: dict) -> list[dict] | None:
        if not self.distributed:
            return [info]
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(info, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def _broadcast(self, outcome):
        if not self.distributed:
            return outcome
        box = [outcome]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]
