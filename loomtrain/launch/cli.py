"""The `loomtrain` command line (console script `loomtrain.launch.cli:main`, or `python -m loomtrain.launch`).

    loomtrain run [CONFIG.yaml|-] [section.key=value ...] [--nproc-per-node N] [--nnodes N|MIN:MAX]
                  [--node-rank R] [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--max-restarts K]
    loomtrain report RUN_DIR [--plot]
    loomtrain bench [CONFIG.yaml|-] [section.key=value ...] [--layout zero2 ...] [--vs[=PEERS]] [--json]
    loomtrain plan --lengths FILE --gpus N --context-len L ...   (see plan_command.py)
    loomtrain ckpt inspect|verify|export-hf|import-deepspeed ...
    loomtrain data prepare SOURCE... --out DIR [--tokenizer DIR] [--workers N] | data verify DIR
    loomtrain plan-offload --params 7B --shards 8 --h2d 25 --cpu-adam 1 --gpu-adam 50 --gpu-free-gb 10

This module parses: it holds every command's options (`plan`'s come from `plan_command`, which
needs no torch) and nothing else. `HANDLERS` then names, for each command, the function that
carries it out as "module:function"; `main` imports that one module with `importlib.import_module`
when its command runs. This table is loomtrain's only deferred import, and it is there so that
`--help`, usage errors, `plan` and `ckpt inspect|verify` do not load torch and transformers, which
`run` and the checkpoint conversions need.

Errors the user can fix (`LoomError`) end in one line `loomtrain: error: <message>` and exit code 2
(1 when a worker raised it, with `rank R:` in front).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from loomtrain.errors import LoomError
from loomtrain.launch.bench_spec import add_arguments as add_bench_arguments
from loomtrain.launch.offload_command import add_arguments as add_offload_arguments
from loomtrain.launch.plan_command import add_arguments as add_plan_arguments
from loomtrain.launch.spec import Parser, UsageError

COMMANDS = {
    "run": "train: validate CONFIG.yaml, then start the workers (or train, inside a worker)",
    "report": ("summarize RUN_DIR/metrics.jsonl (steps, loss, tokens/s, MFU, memory) and its events "
               "(stragglers, slow links, rebalances); --plot draws the curves and a rank x step heat-map"),
    "plan": "predict step times of static, best single-degree and heterogeneous sequence parallelism",
    "ckpt": "checkpoint tools: inspect, verify, export-hf, import-deepspeed",
    "data": "data tools: prepare (tokenise once into token shards), verify",
    "plan-offload": "choose the interleaved optimizer-offload split and predict the update time for a machine",
    "bench": "measure step time, tokens/s, MFU, memory and collectives per layout; --vs: the same run through peers",
}
CKPT_ACTIONS = {
    "inspect": "step, layout, data position, config, files and largest tensors of a checkpoint",
    "verify": "check a checkpoint's files against its manifest (sizes and the fast checksum; --checksum: sha256)",
    "export-hf": "write a checkpoint's model as an HF directory (config.json + safetensors)",
    "import-deepspeed": "convert a DeepSpeed checkpoint (ZeRO-1/2/3, universal) into a loomtrain checkpoint",
}

# The command (for `ckpt`, with its action) -> "module:function" that carries it out, imported only
# when that command runs.
HANDLERS = {
    "run": "loomtrain.launch.run_command:cmd_run",
    "_selfcheck": "loomtrain.launch.agent:cmd_selfcheck",
    "report": "loomtrain.launch.report_command:cmd_report",
    "plan": "loomtrain.launch.plan_command:cmd_plan",
    "ckpt inspect": "loomtrain.launch.ckpt_command:cmd_inspect",
    "ckpt verify": "loomtrain.launch.ckpt_command:cmd_verify",
    "ckpt export-hf": "loomtrain.launch.ckpt_convert:cmd_export_hf",
    "ckpt import-deepspeed": "loomtrain.launch.ckpt_convert:cmd_import_deepspeed",
    "data prepare": "loomtrain.launch.data_command:cmd_prepare",
    "data verify": "loomtrain.launch.data_command:cmd_verify",
    "plan-offload": "loomtrain.launch.offload_command:cmd_plan_offload",
    "bench": "loomtrain.launch.bench_command:cmd_bench",
}
DATA_ACTIONS = {
    "prepare": "tokenise text, Markdown, code, JSONL, Parquet or HF save_to_disk datasets into token shards "
               "(train with data.source=OUT)",
    "verify": "re-hash every shard of a prepared directory against its manifest",
}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+=")


# ----------------------------------------------------------------------------------- parsing
def _top_parser() -> argparse.ArgumentParser:
    p = Parser(prog="loomtrain", description="loomtrain: distributed training of HF causal LMs.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Run 'loomtrain COMMAND --help' for the options of one command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (torchrun elastic agent)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", default="1", metavar="N",
                   help="worker processes per node: an int, or auto|cpu|gpu (default 1)")
    g.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="number of nodes (default 1)")
    g.add_argument("--node-rank", "--node_rank", type=int, default=None, metavar="R",
                   help="this node's rank (static rendezvous; needs a fixed --nnodes)")
    g.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None, metavar="HOST:PORT",
                   help="rendezvous endpoint (required for more than one node; "
                        "default for one node: 127.0.0.1:<free port>)")
    g.add_argument("--rdzv-id", "--rdzv_id", default=None, metavar="ID",
                   help="rendezvous/job id, the same on every node (default: a fresh id for one node; "
                        "for several nodes the scheduler's job id, e.g. SLURM_JOB_ID, else required)")
    g.add_argument("--max-restarts", "--max_restarts", type=int, default=0, metavar="K",
                   help="restart the worker group up to K times on failure (default 0)")
    g.add_argument("--log-dir", default=None, metavar="DIR",
                   help="per-rank logs (default: {train.output_dir}/logs)")
    g.add_argument("-v", "--verbose", action="store_true", help="show the elastic agent's own logs")


def _command_parser(command: str) -> argparse.ArgumentParser:
    if command == "run":
        p = Parser(prog="loomtrain run",
                   usage="loomtrain run [CONFIG.yaml|-] [section.key=value ...] [options]",
                   description=COMMANDS["run"] + ". CONFIG may be omitted or '-' (all defaults); "
                   "overrides are dotted keys, e.g. train.max_steps=5 model.config.hidden_size=64. "
                   "Options may come before or after the config and the overrides.",
                   epilog="other commands: " + ", ".join(c for c in COMMANDS if c != "run")
                   + " (loomtrain --help lists them)")
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml|- key=value",
                       help="config file, then overrides")
        _add_launch_flags(p)
    elif command == "report":
        p = Parser(prog="loomtrain report", description=COMMANDS["report"])
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (or its metrics.jsonl)")
        p.add_argument("--plot", action="store_true",
                       help="also draw the curves to a PNG, and the rank x step heat-map to "
                            "RUN_DIR/straggler_heatmap.png")
        p.add_argument("--png", default=None, metavar="PATH",
                       help="where --plot writes (default RUN_DIR/metrics.png)")
    elif command == "plan":
        p = Parser(prog="loomtrain plan", description=COMMANDS["plan"])
        add_plan_arguments(p)
    elif command == "plan-offload":
        p = Parser(prog="loomtrain plan-offload", description=COMMANDS["plan-offload"])
        add_offload_arguments(p)
    elif command == "bench":
        p = Parser(prog="loomtrain bench", usage="loomtrain bench [CONFIG.yaml|-] [section.key=value ...] [options]",
                   description=COMMANDS["bench"] + ". The model, data and overrides are those of 'loomtrain run'; "
                   "each --layout adds its overrides; each system runs as its own launch with the same "
                   "--nproc-per-node. Prints a Markdown table, or with --json one object whose 'results' lists "
                   "{system, layout, step_time_s, tokens_per_s, tflops, mfu, mfu_exact, peak_mem_gb, "
                   "step_time_spread, collectives_per_step}.")
        add_bench_arguments(p)
        _add_launch_flags(p)
    elif command == "_selfcheck":  # hidden: a 2-line torchrun smoke test, used by tests
        p = Parser(prog="loomtrain _selfcheck")
        p.add_argument("--fail-rank", type=int, default=None, help="this rank raises a LoomError")
        p.add_argument("--crash-rank", type=int, default=None, help="this rank raises RuntimeError")
        _add_launch_flags(p)
    else:
        raise UsageError(f"unknown command '{command}' (commands: {', '.join(COMMANDS)})")
    return p


def _ckpt_parser() -> argparse.ArgumentParser:
    return Parser(prog="loomtrain ckpt", formatter_class=argparse.RawDescriptionHelpFormatter,
                  usage="loomtrain ckpt ACTION [options]",
                  description="checkpoint tools:\n" + "\n".join(f"  {a:<17} {h}" for a, h in CKPT_ACTIONS.items()),
                  epilog="Run 'loomtrain ckpt ACTION --help' for the options of one action.")


def _ckpt_action_parser(action: str) -> argparse.ArgumentParser:
    p = Parser(prog=f"loomtrain ckpt {action}", description=CKPT_ACTIONS[action])
    if action == "inspect":
        p.add_argument("path", metavar="PATH", help="a step_NNNNNNNN directory, or a checkpoint directory")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--top", type=int, default=8, metavar="N", help="list the N largest tensors (default 8)")
    elif action == "verify":
        p.add_argument("path", metavar="PATH", help="a step_NNNNNNNN directory, or a checkpoint directory")
        p.add_argument("--checksum", action="store_true", help="also compare sha256 (reads every byte)")
        p.add_argument("--all", action="store_true", help="for a checkpoint directory: every committed "
                                                          "checkpoint, not only the newest")
    elif action == "export-hf":
        p.add_argument("path", metavar="PATH", help="a step_NNNNNNNN directory, or a checkpoint directory")
        p.add_argument("out_dir", metavar="OUT_DIR", help="the HF model directory to write")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                       help="dtype of the written weights (default float32, the master weights as stored)")
        p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                       help="split the weights into files of at most SIZE, with an index (default 5GB)")
        p.add_argument("--overwrite", action="store_true", help="replace an HF model already in OUT_DIR")
    elif action == "import-deepspeed":
        p.add_argument("ds_path", metavar="DS_DIR", help="a DeepSpeed save_checkpoint directory (its 'latest' "
                                                         "tag), a tag directory, or a universal checkpoint")
        p.add_argument("out_dir", metavar="OUT_DIR", help="the loomtrain checkpoint directory to write "
                                                          "(resume with checkpoint.resume=OUT_DIR)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        p.add_argument("--config", required=True, metavar="CONFIG.yaml",
                       help="the loomtrain config of the run that will resume (its model must match)")
        p.add_argument("--tag", default=None, help="the DeepSpeed tag to import (default: its 'latest')")
    return p


def _parse_ckpt(argv: list[str]) -> argparse.Namespace:
    """`ckpt ACTION [options]`: the action word picks a plain parser for that action's options
    (so options and overrides may come in any order)."""
    if not argv or argv[0] in ("-h", "--help"):
        _ckpt_parser().print_help(None if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in CKPT_ACTIONS:
        _ckpt_parser().error(f"unknown action '{argv[0]}' (actions: {', '.join(CKPT_ACTIONS)})")
    ns = _ckpt_action_parser(argv[0]).parse_intermixed_args(argv[1:])
    ns.action = argv[0]
    return ns


def _parse_data(argv: list[str]) -> argparse.Namespace:
    """`data ACTION [options]`, like `ckpt`."""
    top = Parser(prog="loomtrain data", usage="loomtrain data ACTION [options]",
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="data tools:\n" + "\n".join(f"  {a:<8} {h}" for a, h in DATA_ACTIONS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help(None if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in DATA_ACTIONS:
        top.error(f"unknown action '{argv[0]}' (actions: {', '.join(DATA_ACTIONS)})")
    p = Parser(prog=f"loomtrain data {argv[0]}", description=DATA_ACTIONS[argv[0]])
    if argv[0] == "prepare":
        p.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="files or directories (.txt .md .py .rst, .jsonl, .parquet, HF save_to_disk "
                            "directories), or 'embedded'")
        p.add_argument("--out", required=True, metavar="DIR", help="the shard directory to write (or resume)")
        p.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="a local HF tokenizer directory (default: the byte-level tokenizer)")
        p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenising processes (default 1)")
        p.add_argument("--field", default="text", metavar="NAME",
                       help="JSONL key / column with the text or a list of token ids (default text)")
        p.add_argument("--ext", default="", metavar=".c,.rs,...",
                       help="more file suffixes to read as text (default .txt .md .py .rst)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    else:
        p.add_argument("path", metavar="DIR", help="a directory written by 'loomtrain data prepare'")
    ns = p.parse_intermixed_args(argv[1:])
    ns.action = argv[0]
    return ns


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG|-] [overrides]` -> (config path or None, overrides)."""
    if args and (args[0] == "-" or not _OVERRIDE.match(args[0])):
        config, overrides = args[0], args[1:]
    else:
        config, overrides = None, list(args)
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise UsageError(f"'{item}' is not an override of the form section.key=value "
                             "(only one CONFIG file may be given, and it comes first)")
    return (None if config == "-" else config), overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a full command line (without the program name); `.command` names the subcommand
    (and `.action` the `ckpt` action)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help(None if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0].startswith("-") and argv[0] != "-":
        raise UsageError(f"expected a command first ({', '.join(COMMANDS)}), got '{argv[0]}'")
    command = argv[0]
    if command == "ckpt":
        ns = _parse_ckpt(argv[1:])
    elif command == "data":
        ns = _parse_data(argv[1:])
    else:
        ns = _command_parser(command).parse_intermixed_args(argv[1:])
    ns.command = command
    if command in ("run", "bench"):
        ns.config, ns.overrides = split_config_args(ns.args)
    return ns


def handler(ns: argparse.Namespace):
    """The function `HANDLERS` names for this parsed command line (its module imported now)."""
    name = f"{ns.command} {ns.action}" if ns.command in ("ckpt", "data") else ns.command
    module, _, function = HANDLERS[name].partition(":")
    return getattr(importlib.import_module(module), function)


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ns = parse_args(argv)
        return handler(ns)(ns)
    except LoomError as exc:
        msg = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"loomtrain: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("loomtrain: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
