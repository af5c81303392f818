"""`Watchdog`: a job never hangs silently. Deadlines for start-up, each step and checkpoint
steps; when one passes, every rank dumps its stacks and its last collectives, the dumps are lined
up to name the rank that never entered the collective the others wait in, and the job exits 3.

How, and why this way:

* A thread per rank watches a deadline that the loop's hook points move (start-up until
  `after_setup`, then from `begin_fit` one per step; `checkpoint_timeout_s` for a step that saves and for the end,
  which commits). It runs outside the training thread, which is exactly the one that is stuck.
* The rank whose deadline passes first sets a request key in the job's store (torchrun's, hosted
  by the agent, so it outlives any rank); every rank's watchdog polls that key and dumps too, so
  ranks whose own deadline is further away (a different step phase) still write their dumps.
* A dump is the Python stacks of every thread (`faulthandler`) and torch's flight recorder
  (`TORCH_FR_BUFFER_SIZE`, set by the launcher): per process group, the sequence number and
  operation of the last collective this rank entered. Each rank publishes a summary in the store.
* Rank 0's watchdog lines them up (`line_up`, pure): the ranks stuck in collective #n of a group
  are waiting for the members whose last entry in that group is below n; those are named in one
  line, written to `{output_dir}/hang/verdict.txt`, `events.jsonl` and torchelastic's error file
  (so `loomtrain run` prints exactly that line), e.g.
  `hang: rank 1 never entered gloo:all_reduce #23 on group 3 (ranks 0-3) ...`.
* Then every rank exits with code 3 (`HANG_EXIT_CODE`), well before gloo's own 30-minute timeout.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import pickle
import sys
import threading
import time

import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from loomtrain.config import ResilienceConfig
from loomtrain.hooks import Hook, LoopState
from loomtrain.mesh import attempt_store

HANG_EXIT_CODE = 3
_POLL_S = 0.5
_GATHER_S = 20.0  # how long rank 0 waits for the other ranks' dumps


# ------------------------------------------------------------------------- dumps (per rank)
def flight_record() -> list[dict]:
    """torch's flight recorder entries of this process (empty when it is off)."""
    try:
        data = pickle.loads(c10d._dump_fr_trace(True, False, False))
    except (RuntimeError, AttributeError, pickle.UnpicklingError, TypeError):
        return []
    return [{k: e.get(k) for k in ("pg_id", "process_group", "collective_seq_id", "profiling_name",
                                    "time_created_ns", "state", "is_p2p")} for e in data.get("entries", [])]


def group_table() -> dict[str, list[int]]:
    """Process group name -> global ranks, for the groups this process is in."""
    out = {}
    try:
        world = dist.distributed_c10d._world
        for pg, ranks in world.pg_group_ranks.items():
            name = world.pg_names.get(pg)
            if name is not None:
                out[str(name)] = sorted(int(r) for r in ranks)
    except (AttributeError, RuntimeError):
        pass
    return out


def summarize(entries: list[dict], groups: dict[str, list[int]]) -> dict:
    """Per group: the highest collective sequence number entered and its operation; and the
    latest collective overall (the one a waiting rank is inside)."""
    per: dict[str, dict] = {}
    latest = None
    for e in entries:
        if e.get("is_p2p"):
            continue
        name = str((e.get("process_group") or [e.get("pg_id")])[0])
        seq = int(e.get("collective_seq_id") or 0)
        if seq >= per.get(name, {}).get("seq", -1):
            per[name] = {"seq": seq, "op": e.get("profiling_name"), "desc": (e.get("process_group") or [None, ""])[1],
                         "ranks": groups.get(name)}
        if latest is None or (e.get("time_created_ns") or 0) >= latest["t"]:
            latest = {"group": name, "seq": seq, "op": e.get("profiling_name"), "t": e.get("time_created_ns") or 0}
    return {"groups": per, "latest": latest, "recorded": bool(entries)}


def _ranks_text(ranks) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def line_up(summaries: dict[int, dict], world_size: int) -> str:
    """One line naming who the others wait for (pure; `summaries[rank]` from `summarize`)."""
    missing_dumps = sorted(set(range(world_size)) - set(summaries))
    if not any(s.get("recorded") for s in summaries.values()):
        return ("no collective recorded on any rank (still starting up, or torch's flight recorder is off: "
                "TORCH_FR_BUFFER_SIZE); see the stacks"
                + (f"; no dump from ranks {_ranks_text(missing_dumps)}" if missing_dumps else ""))
    waits: dict[tuple[str, int], list[int]] = {}
    for rank, s in summaries.items():
        if s.get("latest"):
            waits.setdefault((s["latest"]["group"], s["latest"]["seq"]), []).append(rank)
    best = None
    for (group, seq), waiting in waits.items():
        members = next((s["groups"][group]["ranks"] for s in summaries.values()
                        if group in s["groups"] and s["groups"][group].get("ranks")), None)
        if members is None:
            members = sorted(r for r, s in summaries.items() if group in s["groups"])
        absent = [m for m in members if m in summaries and summaries[m]["groups"].get(group, {"seq": -1})["seq"] < seq]
        unknown = [m for m in members if m not in summaries]
        key = (len(absent) > 0, len(waiting))
        if best is None or key > best[0]:
            info = next(s["groups"][group] for s in summaries.values() if group in s["groups"])
            best = (key, group, seq, info, members, absent, unknown)
    _, group, seq, info, members, absent, unknown = best
    where = f"{info['op']} #{seq} on group {group}" + (f" {info['desc']}" if info.get("desc") not in (None, "", "undefined") else "") \
        + f" (ranks {_ranks_text(members)})"
    if absent:
        who = f"rank {absent[0]}" if len(absent) == 1 else f"ranks {_ranks_text(absent)}"
        return f"{who} never entered {where}"
    if unknown:
        return f"ranks {_ranks_text(unknown)} sent no dump; the others wait in {where}"
    return f"every rank entered {where}: stuck inside it, or outside collectives (see the stacks)"


# ------------------------------------------------------------------------------- the watchdog
class Watchdog(Hook):
    """See the module docstring. `start()` arms the start-up deadline (call it first thing)."""

    def __init__(self, cfg: ResilienceConfig, *, rank: int, world_size: int, output_dir: str,
                 checkpoint_every: int, max_steps: int, quiet: bool):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.dir = os.path.join(output_dir, "hang")
        self.output_dir, self.ckpt_every, self.max_steps = output_dir, checkpoint_every, max_steps
        self.quiet = quiet  # `loomtrain run` prints the verdict itself: don't print it twice
        self._deadline: float | None = None
        self._what = ""
        self._timeout = 0.0
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
        self._prefix = f"loomtrain/hang/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def start(self) -> "Watchdog":
        self._arm(self.cfg.startup_timeout_s, "start-up", "startup_timeout_s")
        self._thread = threading.Thread(target=self._watch, name="loomtrain-watchdog", daemon=True)
        self._thread.start()
        return self

    @property
    def armed(self) -> tuple[float, str] | None:
        """(timeout seconds, what it guards) of the current deadline, or None."""
        return None if self._deadline is None else (self._timeout, self._what)

    def _arm(self, seconds: float, what: str, key: str) -> None:
        self._what, self._timeout = f"{what} (resilience.{key}={seconds:g})", seconds
        self._deadline = time.monotonic() + seconds if seconds > 0 else None

    def _step_deadline(self, step: int) -> None:
        saves = step == self.max_steps or (self.ckpt_every and step % self.ckpt_every == 0)
        if saves:
            self._arm(self.cfg.checkpoint_timeout_s, f"step {step}, which saves a checkpoint", "checkpoint_timeout_s")
        else:
            self._arm(self.cfg.hang_timeout_s, f"step {step}", "hang_timeout_s")

    # ---------------------------------------------------------------- hook points
    def after_setup(self, loop: LoopState) -> None:
        self._deadline = None  # set up; between `setup` and `fit` the caller's own code runs

    def begin_fit(self, loop: LoopState) -> None:
        self._step_deadline(loop.step + 1)

    def before_step(self, loop: LoopState) -> None:
        self._step = loop.step + 1
        self._step_deadline(self._step)

    def after_step(self, loop: LoopState, record: dict) -> None:
        if loop.step >= self.max_steps:
            self._final()
        else:
            self._step_deadline(loop.step + 1)  # the hooks after a step and the next step's start

    def on_stop(self, loop: LoopState) -> None:
        self._final()

    def _final(self) -> None:
        """The end of the run commits the last checkpoint (in the checkpointer's `end_fit`, which
        runs before this component's)."""
        self._arm(self.cfg.checkpoint_timeout_s, "the end of the run (final checkpoint)", "checkpoint_timeout_s")

    def end_fit(self, loop: LoopState, exc: BaseException | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._deadline = None
        self._stop.set()

    # ---------------------------------------------------------------- the thread
    def _store(self):
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port or self.world == 1:
            return None
        try:
            return attempt_store(dist.TCPStore(host, int(port), is_master=False,
                                               timeout=datetime.timedelta(seconds=30)))
        except (RuntimeError, ValueError):
            return None

    def _watch(self) -> None:
        store = None
        last_poll = 0.0
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            if self._deadline is not None and now > self._deadline:
                store = store or self._store()
                reason = f"rank {self.rank} passed the deadline of {self._what}"
                if store is not None:
                    store.set(f"{self._prefix}request", reason)
                return self._dump_and_exit(store, reason)
            if self.world > 1 and now - last_poll > 2.0:
                last_poll = now
                store = store or self._store()
                try:
                    if store is not None and store.check([f"{self._prefix}request"]):
                        return self._dump_and_exit(store, store.get(f"{self._prefix}request").decode())
                except (RuntimeError, ValueError):
                    store = None

    def _dump_and_exit(self, store, reason: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, f"rank{self.rank}.stacks.txt"), "w", encoding="utf-8") as fh:
            fh.write(f"# rank {self.rank}, pid {os.getpid()}: {reason}\n")
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        entries = flight_record()
        with open(os.path.join(self.dir, f"rank{self.rank}.collectives.json"), "w", encoding="utf-8") as fh:
            json.dump(entries, fh)
        summary = summarize(entries, group_table())
        if store is not None:
            store.set(f"{self._prefix}dump/{self.rank}", json.dumps(summary))
        if self.rank == 0:
            summaries = {0: summary}
            deadline = time.monotonic() + _GATHER_S
            while store is not None and len(summaries) < self.world and time.monotonic() < deadline:
                for r in range(1, self.world):
                    key = f"{self._prefix}dump/{r}"
                    if r not in summaries and store.check([key]):
                        summaries[r] = json.loads(store.get(key))
                time.sleep(0.2)
            self._verdict(f"hang: {line_up(summaries, self.world)}, at step {self._step}; {reason}; "
                          f"every rank's stacks in {self.dir}")
            if store is not None:
                store.set(f"{self._prefix}done", "1")
        elif store is not None:
            deadline = time.monotonic() + _GATHER_S + 5
            while time.monotonic() < deadline and not store.check([f"{self._prefix}done"]):
                time.sleep(0.2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def _verdict(self, line: str) -> None:
        with open(os.path.join(self.dir, "verdict.txt"), "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
        with open(os.path.join(self.output_dir, "events.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": "hang", "step": self._step, "rank": None, "slowdown": None,
                                 "evidence": line}) + "\n")
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with open(error_file, "w", encoding="utf-8") as fh:
                json.dump({"message": {"message": f"HangDetected: {line}", "extraInfo": {
                    "py_callstack": "", "timestamp": str(int(time.time())),
                    "loomtrain": {"user_error": False, "type": "HangDetected", "message": line,
                                  "time": time.time()}}}}, fh)
        if not self.quiet:
            print(f"loomtrain: {line}", file=sys.stderr, flush=True)
