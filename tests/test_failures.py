"""What the launcher says about failed workers (`loomtrain.launch.failures`), without launching:
the restart line names the rank that died even when torch's process context logs another one.

torch logs one failure per failed attempt, the one with the earliest whole-second timestamp. A
peer's "connection closed" echo is recorded within milliseconds of a SIGKILL, while the agent
only timestamps the killed rank at its next poll, so the echo can look earlier. The cases below
build that attempt by hand and log it the way torch's `_poll` does."""
from __future__ import annotations

import json
import logging

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from loomtrain.launch.failures import FailureLog


def _echo_error_file(path, timestamp: int) -> str:
    """An error file like the one a rank writes when its peer's socket closes under it."""
    message = {"message": "DistBackendError: Connection closed by peer [gloo/transport]",
               "extraInfo": {"py_callstack": "...", "timestamp": str(timestamp),
                             "loomtrain": {"type": "DistBackendError", "time": float(timestamp)}}}
    path.write_text(json.dumps({"message": message}), encoding="utf-8")
    return str(path)


class _Result:
    def __init__(self, failures):
        self.failures = failures


def _poll(failures: dict[int, ProcessFailure]) -> None:
    """Logs like torch's SubprocessContext._poll: only the earliest failure."""
    result = _Result(failures)  # noqa: F841 (read from this frame by FailureLog)
    first = min(result.failures.values(), key=lambda f: f.timestamp)
    logging.getLogger(FailureLog.LOGGER).error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s",
                                               first.exitcode, first.local_rank, first.pid, "worker")


def test_restart_line_names_the_killed_rank_not_the_echo(tmp_path):
    log = FailureLog()
    logger = logging.getLogger(FailureLog.LOGGER)
    logger.addHandler(log)
    try:
        # attempt 1: rank 1 SIGKILLed (no error file, seen a second later); rank 0 recorded the
        # echo first and was then SIGTERMed by the agent
        killed = ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file=str(tmp_path / "none1.json"))
        killed.timestamp = 1_700_000_001
        echo = ProcessFailure(local_rank=0, pid=10, exitcode=-15,
                              error_file=_echo_error_file(tmp_path / "e0.json", 1_700_000_000))
        _poll({1: killed, 0: echo})
        # attempt 2: rank 0 raised an ordinary error (a cause), rank 1 echoed it
        crash = tmp_path / "e2.json"
        crash.write_text(json.dumps({"message": {"message": "ValueError: bad batch", "extraInfo": {
            "py_callstack": "...", "timestamp": "1700000100"}}}), encoding="utf-8")
        _poll({0: ProcessFailure(local_rank=0, pid=20, exitcode=1, error_file=str(crash)),
               1: ProcessFailure(local_rank=1, pid=21, exitcode=1,
                                 error_file=_echo_error_file(tmp_path / "e3.json", 1_700_000_099))})
        # logged from somewhere without the attempt's failures: the logged one is kept
        logger.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", -6, 1, 30, "worker")
    finally:
        logger.removeHandler(log)
    assert log.failures == [(-9, 1), (1, 0), (-6, 1)]
    assert log.summary(node_rank=1, nproc=2) == (
        "loomtrain: restarted 3 times after rank 3 died (killed by SIGKILL); rank 2 died (exit code 1); "
        "rank 3 died (killed by SIGABRT)")


def test_restart_line_says_when_the_cause_was_on_another_node(tmp_path):
    """Every local failure a communication error (another node died under an elastic rendezvous)."""
    log = FailureLog()
    logger = logging.getLogger(FailureLog.LOGGER)
    logger.addHandler(log)
    try:
        _poll({0: ProcessFailure(local_rank=0, pid=40, exitcode=-15,
                                 error_file=_echo_error_file(tmp_path / "e4.json", 1_700_000_200)),
               1: ProcessFailure(local_rank=1, pid=41, exitcode=1,
                                 error_file=_echo_error_file(tmp_path / "e5.json", 1_700_000_199))})
    finally:
        logger.removeHandler(log)
    assert log.summary(node_rank=0, nproc=2) == (
        "loomtrain: restarted 1 time after rank 1 lost its peers (exit code 1; what failed first was on another node)")


def test_restart_line_names_a_straggler_restart_the_workers_recorded(tmp_path):
    """The agent may see a rank it stopped (SIGTERM) before the one that exited with the restart
    code; the workers' record of the attempt decides the cause. Attempt 0 was a straggler restart,
    attempt 1 an ordinary death."""
    from loomtrain.resilience.restart import RESTART_NOTES_ENV, note_straggler_restart

    notes = tmp_path / "restarts"
    note_straggler_restart({RESTART_NOTES_ENV: str(notes), "TORCHELASTIC_RESTART_COUNT": "0"})
    note_straggler_restart({})  # no launcher file: nothing written, nothing raised
    log = FailureLog(str(notes))
    logger = logging.getLogger(FailureLog.LOGGER)
    logger.addHandler(log)
    try:
        stopped = ProcessFailure(local_rank=0, pid=50, exitcode=-15, error_file=str(tmp_path / "none.json"))
        stopped.timestamp = 1_700_000_300
        _poll({0: stopped})
        killed = ProcessFailure(local_rank=1, pid=51, exitcode=-9, error_file=str(tmp_path / "none2.json"))
        killed.timestamp = 1_700_000_400
        _poll({1: killed})
    finally:
        logger.removeHandler(log)
    assert log.summary(node_rank=0, nproc=2) == (
        "loomtrain: restarted 2 times after a straggler restart (resilience.straggler=restart); "
        "rank 1 died (killed by SIGKILL)")
