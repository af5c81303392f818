"""`loomtrain data prepare` and `loomtrain data verify` (options parsed in `cli.py`)."""
from __future__ import annotations

import argparse
import sys

from loomtrain.data.prepare import PrepareOptions, prepare
from loomtrain.data.shards import read_manifest, verify_checksums
from loomtrain.data.sources import TEXT_SUFFIXES
from loomtrain.errors import DataError


def cmd_prepare(ns: argparse.Namespace) -> int:
    extra = tuple(s if s.startswith(".") else "." + s for s in ns.ext.split(",") if s.strip())
    opts = PrepareOptions(tuple(ns.sources), ns.out, ns.tokenizer, ns.workers, ns.field,
                          TEXT_SUFFIXES + extra, progress=not ns.quiet)
    result = prepare(opts)
    m = result.manifest
    print(f"{ns.out}: {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}) in {len(m['shards'])} shards; "
          f"{result.shards_written} written, {result.shards_skipped} already done; "
          f"{result.tokens_per_s:.3g} tokens/s with {ns.workers} worker(s). Train with data.source={ns.out}")
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    manifest = read_manifest(ns.path)
    problems = verify_checksums(ns.path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        raise DataError(f"data verify: {len(problems)} problem(s) in {ns.path} (listed above); prepare it again")
    print(f"{ns.path}: {len(manifest['shards'])} shards, {manifest['tokens']} tokens: checksums match the manifest")
    return 0
