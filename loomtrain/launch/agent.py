"""Both sides of a launch: the torchrun elastic agent in the launcher, and the worker entry.

Launcher side: `launch()` builds torchrun's own arguments with `torch.distributed.run.get_args_parser()`,
turns them into a `LaunchConfig` with `config_from_args` and runs the agent with `elastic_launch`
(exactly what `torch.distributed.run.run` does, minus its `--standalone` rewrite, which would bind
rendezvous to `localhost`). A worker failure comes back as `ChildFailedError`; `condense_failure`
turns it into one line (`loomtrain.launch.failures`).

Worker side: `worker_main()` runs under `@record` with an error handler that also marks a `LoomError`
in the error file (`extraInfo.loomtrain`), so the launcher can tell a user error (print its message)
from a crash (print the exception and where the traceback is).

Stop signals and the rendezvous id/endpoint: `loomtrain.launch.lifecycle`.

Also the launch flags' checks (`launch_spec`) and the hidden `loomtrain _selfcheck` command, a
gloo all_reduce through the same agent that tests use to exercise launching without a Trainer.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, record
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, determine_local_world_size, get_args_parser

from loomtrain.errors import LoomError
from loomtrain.launch.failures import FailureLog, condense_failure
from loomtrain.launch.lifecycle import AgentSignals, default_rdzv_id, hold_endpoint, without_stop_signals
from loomtrain.launch.spec import LaunchSpec, UsageError, in_worker, one_line, parse_nnodes
from loomtrain.resilience.restart import RESTART_NOTES_ENV
from loomtrain.resilience.watchdog import HANG_EXIT_CODE

# Set by the launcher for its workers: they leave the one-line error message to the launcher.
LAUNCHER_ENV = "LOOMTRAIN_LAUNCHER"


# --------------------------------------------------------------------------------------- worker
class LoomErrorHandler(ErrorHandler):
    """torchelastic's error file, plus `extraInfo.loomtrain` = {user_error, type, message}."""

    def record_exception(self, e: BaseException) -> None:
        path = self._get_error_file_path()
        if not path:
            return
        extra = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}
        # `time`: sub-second, so that the root cause wins over the comm errors it set off on the
        # other ranks within the same second (torch's own timestamp has whole seconds).
        extra["loomtrain"] = {"user_error": isinstance(e, LoomError), "type": type(e).__name__,
                              "message": str(e), "time": time.time()}
        data = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": extra}}
        with open(path, "w") as fp:
            json.dump(data, fp)


_record = functools.partial(record, error_handler=LoomErrorHandler())


def worker_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def worker_main(target, *args) -> int:
    """Run `target(*args)` in a worker under `@record`; returns the process exit code.

    A `LoomError` ends in exit code 1 without a traceback; rank 0 prints `loomtrain: error: <msg>`
    unless our own launcher started it (the launcher prints the line then). Other exceptions
    propagate (traceback on stderr, exit 1) after `@record` wrote them to the error file.
    """
    entry = _record(target)
    try:
        entry(*args)
    except LoomError as exc:
        if worker_rank() == 0 and not os.environ.get(LAUNCHER_ENV):
            print(f"loomtrain: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def selfcheck(fail_rank: int | None = None, crash_rank: int | None = None) -> None:
    """Worker body of `loomtrain _selfcheck`: gloo all_reduce of rank+1; rank 0 prints the sum."""
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == fail_rank:
            raise LoomError(f"selfcheck: injected user error on rank {rank}")
        if rank == crash_rank:
            raise RuntimeError(f"selfcheck: injected crash on rank {rank}")
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        total, expected = int(t.item()), world * (world + 1) // 2
        if total != expected:
            raise RuntimeError(f"selfcheck: all_reduce gave {total}, expected {expected}")
        if rank == 0:
            print(f"selfcheck ok: world_size={world} sum={total} "
                  f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                  f"omp_threads={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- launcher
def _local_world_size(nproc: str) -> int:
    try:
        n = int(nproc)
    except ValueError:
        if nproc not in ("auto", "cpu", "gpu"):
            raise UsageError(f"--nproc-per-node={nproc}: expected an int, auto, cpu or gpu") from None
        try:
            n = determine_local_world_size(nproc)
        except ValueError as exc:
            raise UsageError(f"--nproc-per-node={nproc}: {exc}") from None
    if n < 1:
        raise UsageError(f"--nproc-per-node={nproc}: must be at least 1")
    return n


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def launch_spec(ns: argparse.Namespace, default_log_dir: str | None) -> tuple[LaunchSpec, int]:
    """Check the launch flags -> (LaunchSpec, world size to plan for)."""
    nproc = _local_world_size(ns.nproc_per_node)
    min_nodes, max_nodes = parse_nnodes(ns.nnodes)
    if max_nodes > 1 and not ns.rdzv_endpoint:
        raise UsageError(f"--nnodes={ns.nnodes}: more than one node needs --rdzv-endpoint HOST:PORT")
    if ns.node_rank is not None and min_nodes != max_nodes:
        raise UsageError("--node-rank needs a fixed --nnodes N (elastic MIN:MAX ranks nodes itself)")
    if ns.max_restarts < 0:
        raise UsageError(f"--max-restarts={ns.max_restarts}: must not be negative")
    spec = LaunchSpec(nproc_per_node=nproc, nnodes=ns.nnodes, node_rank=ns.node_rank,
                      rdzv_endpoint=ns.rdzv_endpoint, rdzv_id=default_rdzv_id(ns.rdzv_id, max_nodes),
                      max_restarts=ns.max_restarts, log_dir=ns.log_dir or default_log_dir,
                      verbose=ns.verbose)
    return spec, nproc * min_nodes


def set_omp_threads(nproc: int) -> None:
    """Share the CPUs among the local workers unless the user chose OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nproc))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_argv(spec: LaunchSpec, worker_args: list[str]) -> list[str]:
    """The torchrun command line (without `torchrun`) that runs `python -m loomtrain.launch ARGS`."""
    min_nodes, max_nodes = parse_nnodes(spec.nnodes)
    argv = ["--nnodes", spec.nnodes, "--nproc-per-node", str(spec.nproc_per_node),
            "--max-restarts", str(spec.max_restarts)]
    if max_nodes == 1 and not spec.rdzv_endpoint:
        # Single node: c10d rendezvous and the workers' store on loopback only.
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                 "--rdzv-id", default_rdzv_id(spec.rdzv_id, 1), "--local-addr", "127.0.0.1"]
    elif spec.node_rank is not None and min_nodes == max_nodes:
        # Fixed node count with explicit node ranks: torchrun's static rendezvous.
        argv += ["--rdzv-backend", "static", "--rdzv-endpoint", spec.rdzv_endpoint,
                 "--node-rank", str(spec.node_rank), "--rdzv-id", default_rdzv_id(spec.rdzv_id, max_nodes)]
    else:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
                 "--rdzv-id", default_rdzv_id(spec.rdzv_id, max_nodes)]
    if spec.nproc_per_node > 1:
        # Local rank 0 talks to the console; the others write <log_dir>/<run>/attempt_K/<rank>/.
        argv += ["--redirects", ",".join(f"{r}:3" for r in range(1, spec.nproc_per_node))]
    if spec.log_dir:
        argv += ["--log-dir", spec.log_dir]
    return argv + ["--module", "loomtrain.launch", *worker_args]


@contextlib.contextmanager
def _quiet_torch_logs(quiet: bool) -> Iterator[None]:
    """While the agent runs, drop its own log lines (warnings, 'failed (exitcode ...)'), which
    would bury our one-line message; the loggers are restored afterwards."""
    saved = []
    if quiet:
        for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
            lg, handler = logging.getLogger(name), logging.NullHandler()
            saved.append((lg, handler, lg.propagate))
            lg.addHandler(handler)
            lg.propagate = False
    try:
        yield
    finally:
        for lg, handler, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate


def launch(spec: LaunchSpec, worker_args: list[str]) -> int:
    """Run the workers through torch's elastic agent; returns the exit code for the launcher."""
    # Workers must find this very package, even when it is not installed.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths and os.path.basename(root) not in ("site-packages", "dist-packages"):
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    os.environ[LAUNCHER_ENV] = "1"
    # resilience.straggler=restart excludes a node only if the rendezvous can go on without it
    os.environ["LOOMTRAIN_MIN_NODES"] = str(parse_nnodes(spec.nnodes)[0])
    # torch's flight recorder: the hang watchdog's record of each rank's last collectives
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")

    args = get_args_parser().parse_args(torchrun_argv(spec, worker_args))
    try:
        config, cmd, cmd_args = config_from_args(args)
    except ValueError as exc:
        raise LoomError(f"invalid launch options: {exc}") from None
    config.signals_to_handle = without_stop_signals(config.signals_to_handle)
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ and args.shutdown_timeout is None:
        config.shutdown_timeout = spec.shutdown_timeout_s  # time for the workers' final commit
    store = hold_endpoint(spec)
    stops = AgentSignals(spec.stop_grace_s)
    stops.install()
    notes = os.path.join(tempfile.mkdtemp(prefix="loomtrain-agent-"), "restarts")
    os.environ[RESTART_NOTES_ENV] = notes
    failures = FailureLog(notes)
    failure_logger = logging.getLogger(FailureLog.LOGGER)
    failure_logger.addHandler(failures)
    try:
        with _quiet_torch_logs(not spec.verbose and not os.environ.get("LOGLEVEL")):
            elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
        restarted = failures.summary(spec.node_rank or 0, spec.nproc_per_node)
        if restarted:
            print(restarted, file=sys.stderr, flush=True)
    except ChildFailedError as err:
        lines = condense_failure(err, config.logs_specs.root_log_dir, config.run_id)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return HANG_EXIT_CODE if lines and lines[0].startswith("loomtrain: hang: ") else 1
    except SignalException as exc:
        name = getattr(exc.sigval, "name", str(exc.sigval))
        print(f"loomtrain: {'interrupted' if name == 'SIGINT' else 'stopped by ' + name}",
              file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except RendezvousError as exc:
        print(f"loomtrain: error: rendezvous failed: {type(exc).__name__}: {one_line(str(exc))}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        failure_logger.removeHandler(failures)
        shutil.rmtree(os.path.dirname(notes), ignore_errors=True)
        stops.restore()
        del store
    return 0


# ------------------------------------------------------------------------------------ _selfcheck
def cmd_selfcheck(ns: argparse.Namespace) -> int:
    if in_worker():
        return worker_main(selfcheck, ns.fail_rank, ns.crash_rank)
    worker_args = ["_selfcheck"]
    if ns.fail_rank is not None:
        worker_args += ["--fail-rank", str(ns.fail_rank)]
    if ns.crash_rank is not None:
        worker_args += ["--crash-rank", str(ns.crash_rank)]
    spec, _ = launch_spec(ns, None)
    set_omp_threads(spec.nproc_per_node)
    return launch(spec, worker_args)
