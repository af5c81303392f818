"""What the launcher says when workers fail: the root cause among the failed ranks
(`pick_failure`), the one line (and where the full traceback is) for a failed job
(`condense_failure`), and the cause of each failed attempt of a job that `--max-restarts`
recovered (`FailureLog`)."""
from __future__ import annotations

import glob
import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from loomtrain.launch.spec import one_line
from loomtrain.resilience.restart import RESTART_EXIT_CODE, straggler_attempts

_NOT_AVAILABLE = "<N/A>"


# Exceptions that are usually the echo of another rank's failure (its sockets closed under us).
_COMM_ERROR_TYPES = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
_COMM_ERROR_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                       "Broken pipe", "NCCL error", "ProcessGroupNCCL", "ProcessGroupGloo")


def _failure_rank_key(rank: int, f: ProcessFailure) -> tuple:
    if not isinstance(f.message, dict):
        # killed by a signal (the OOM killer, `fault.kill_rank`): a cause, not an echo; a bare
        # non-zero exit without a recorded exception: last
        return (0.5 if f.exitcode < 0 else 2, float(f.timestamp), rank)
    loom = (f.message.get("extraInfo") or {}).get("loomtrain") or {}
    text = str(f.message.get("message", ""))
    echo = loom.get("type") in _COMM_ERROR_TYPES or any(m in text for m in _COMM_ERROR_MARKERS)
    return (1 if echo else 0, float(loom.get("time", f.timestamp)), rank)


def pick_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The root cause among the failed ranks.

    A recorded ordinary exception beats a death by signal, which beats a communication error
    (the other ranks' echo of the dead one), which beats a bare exit. An ordinary exception beats a
    communication error (usually another rank's failure seen through a closed socket: the rank
    that failed first tears its process group down before its own exception gets recorded, so
    the time of recording alone would blame the wrong rank). Then the earliest, then the lowest rank.
    """
    return min(failures.items(), key=lambda item: _failure_rank_key(*item))


def _log_path(failure: ProcessFailure, root_log_dir: str | None, run_id: str | None) -> str | None:
    if failure.error_file and failure.error_file != _NOT_AVAILABLE:
        rank_dir = os.path.dirname(failure.error_file)
    elif root_log_dir and run_id:
        dirs = sorted(glob.glob(os.path.join(root_log_dir, f"{run_id}_*", "attempt_*",
                                             str(failure.local_rank))), key=os.path.getmtime)
        if not dirs:
            return None
        rank_dir = dirs[-1]
    else:
        return None
    for name in ("stderr.log", "error.json"):
        path = os.path.join(rank_dir, name)
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


def condense_failure(err: ChildFailedError, root_log_dir: str | None = None,
                     run_id: str | None = None) -> list[str]:
    """`ChildFailedError` -> the lines the launcher prints: one for a LoomError; for a crash the
    exception and where its full log is, after the traceback when that rank's output was not on
    the console (local ranks other than 0 write to files only)."""
    rank, failure = pick_failure(err.failures)
    msg = failure.message
    lines: list[str] = []
    if isinstance(msg, dict):
        info = msg.get("extraInfo") or {}
        loom = info.get("loomtrain") or {}
        if loom.get("type") == "HangDetected":  # the watchdog's one line naming the stuck rank
            return [f"loomtrain: {one_line(loom.get('message', ''), 1000)}"]
        if loom.get("user_error"):
            return [f"loomtrain: error: rank {rank}: {one_line(loom.get('message', ''))}"]
        what = one_line(msg.get("message") or "unknown error")
        stack = info.get("py_callstack")
        if failure.local_rank != 0 and isinstance(stack, str) and stack.strip():
            lines += [f"[rank{rank}]: {line}" for line in stack.rstrip().splitlines()]
    elif failure.exitcode < 0:
        what = f"killed by signal {failure.signal_name()}"
    else:
        what = f"exited with code {failure.exitcode} without recording an exception"
    lines.append(f"loomtrain: error: rank {rank} failed: {what}")
    path = _log_path(failure, root_log_dir, run_id)
    if path:
        kind = "traceback" if path.endswith(".json") else "log"
        lines.append(f"loomtrain: full {kind} of rank {rank}: {path}")
    return lines


class FailureLog(logging.Handler):
    """Collects the worker failure behind each failed attempt: after a run that `--max-restarts`
    recovered, the agent returns only the last attempt's result, and these are the record of why
    it restarted.

    torch's process context logs one line per failed attempt ("failed (exitcode: X) local_rank:
    R ..."), naming the failure with the earliest timestamp in whole seconds: a rank's recorded
    exception, or the moment the agent saw a rank die. When a rank is SIGKILLed, a peer records
    its "connection closed" echo within milliseconds, but the agent only sees the dead rank at its
    next poll; across a second boundary the echo is "earlier" and torch names the wrong rank. So
    every failure of the attempt is re-judged with `pick_failure`, the rule the launcher's final
    error line uses: the `RunProcsResult` the line is logged from is read from the caller's frame
    (read only; if torch ever logs from elsewhere, the logged failure is kept)."""

    LOGGER = "torch.distributed.elastic.multiprocessing.api"

    def __init__(self, notes: str | None = None) -> None:
        super().__init__(logging.ERROR)
        self.notes = notes  # the workers' record of straggler restarts (`RESTART_NOTES_ENV`)
        self.failures: list[tuple[int, int]] = []  # (exit code, local rank), one per failed attempt
        # attempts whose every local failure was a communication error: the cause was elsewhere
        # (another node's rank, or the whole node, died)
        self.echoes: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if not (str(record.msg).startswith("failed (exitcode") and isinstance(record.args, tuple)
                and len(record.args) >= 2):
            return
        every = _attempt_failures()
        if every:
            local_rank, failure = pick_failure(every)
            # a straggler restart: one rank's exit code says so, the others were stopped by the agent
            local_rank, failure = next(((r, f) for r, f in every.items() if f.exitcode == RESTART_EXIT_CODE),
                                       (local_rank, failure))
            if failure.exitcode != RESTART_EXIT_CODE and _failure_rank_key(local_rank, failure)[0] == 1:
                self.echoes.add(len(self.failures))
            self.failures.append((int(failure.exitcode), int(local_rank)))
            return
        try:
            self.failures.append((int(record.args[0]), int(record.args[1])))
        except (TypeError, ValueError):
            pass

    def summary(self, node_rank: int, nproc: int) -> str | None:
        """"loomtrain: restarted 1 time after rank 1 died (SIGKILL)", or None without a restart."""
        if not self.failures:
            return None
        causes = []
        # an attempt the workers recorded as a straggler restart was one, whichever rank the agent
        # saw first (it may stop a rank with SIGTERM before another exits with the restart code)
        stragglers = straggler_attempts(self.notes)
        for i, (code, local_rank) in enumerate(self.failures):
            if code == RESTART_EXIT_CODE or i in stragglers:
                causes.append("a straggler restart (resilience.straggler=restart)")
                continue
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            if i in self.echoes:
                causes.append(f"rank {node_rank * nproc + local_rank} lost its peers ({how}; what failed first "
                              "was on another node)")
                continue
            causes.append(f"rank {node_rank * nproc + local_rank} died ({how})")
        n = len(self.failures)
        return f"loomtrain: restarted {n} time{'s' if n > 1 else ''} after {'; '.join(causes)}"


def _attempt_failures() -> dict[int, ProcessFailure] | None:
    """Every failure of the attempt being logged: the `result` local of torch's `_poll`, found
    by walking up from the logging call (a handful of frames)."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        if frame.f_code.co_name == "_poll":
            failures = getattr(frame.f_locals.get("result"), "failures", None)
            if isinstance(failures, dict) and failures and \
                    all(isinstance(f, ProcessFailure) for f in failures.values()):
                return dict(failures)
            return None
        frame = frame.f_back
    return None


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
