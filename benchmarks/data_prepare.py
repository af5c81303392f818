"""Data at scale: `data prepare` throughput, and start-up / peak RSS that do not grow with the corpus.

    python benchmarks/data_prepare.py [--small 1e8] [--large 1e10] [--workdir DIR] [--skip-train]

1. Throughput: the embedded corpus (the Python standard library's .py files, ~12 MB, --repeat
   times over) tokenised
   by a BPE tokenizer trained here (vocab 4096), with 1 and then 2 worker processes; tokens/s =
   tokens / wall time of `prepare` (worker start-up included), ratio 2 vs 1 printed, and tokens
   per CPU-second of the workers (what a worker does with a core of its own; wall-clock scaling
   needs idle cores, which a shared 2-core machine does not have). Both outputs must be
   byte-identical (checked).
2. Scale: two synthetic prepared corpora of ~1e8 and ~1e10 tokens (uint16, byte tokenizer,
   document lengths uniform in [1, 2000], 8 shards each). The .bin files are sparse (all ids 0);
   the indexes and manifests are real (1e10 tokens = ~10^7 documents, a 200 MB index). For each:
   (a) loader start in a fresh process: DataLoader construction + 3 steps, with row shuffling and
   document shuffling on (the worst case), time and peak RSS; (b) a real 3-step `loomtrain run`
   of a tiny Llama: wall time minus the steps' own time (= start-up + exit) and peak RSS of the
   largest process. Ratios large / small are printed; the goal is <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loomtrain.data.prepare import PrepareOptions, prepare  # noqa: E402
from loomtrain.data.shards import shard_entry, token_dtype, write_index, write_manifest  # noqa: E402
from loomtrain.data.tokenizer import ByteTokenizer  # noqa: E402

_LOADER_PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from loomtrain.config import DataConfig
from loomtrain.data.loader import DataLoader
from loomtrain.data.tokenizer import ByteTokenizer
t1 = time.perf_counter()
cfg = DataConfig(source=sys.argv[1], seq_len=256, global_batch_size=16, micro_batch_size=4, shuffle=True,
                 shuffle_documents=True)
dl = DataLoader(cfg, ByteTokenizer(), seed=1)
t2 = time.perf_counter()
for _ in range(3):
    dl.next_step()
t3 = time.perf_counter()
for _ in range(20):
    dl.next_step()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "open_s": t2 - t1, "first_3_steps_s": t3 - t2, "next_step_ms": (t4 - t3) / 20 * 1e3,
                  "loader_s": t3 - t1, "samples": dl.num_samples_per_epoch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# A fresh parent per run, so RUSAGE_CHILDREN's maximum is that run's largest process (the worker).
_PEAK_OF_CHILDREN = r"""
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)
"""


def bpe_tokenizer(out: str, sample: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([sample], trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(out)
    return out


def _children_cpu() -> float:
    """CPU seconds of reaped child processes (the pool's workers, once the pool is closed)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def throughput(work: str, repeat: int) -> dict:
    import sysconfig

    std = sysconfig.get_paths()["stdlib"]
    sample = "".join(open(os.path.join(std, f), encoding="utf-8").read() for f in sorted(os.listdir(std))
                     if f.endswith(".py"))[:2_000_000]
    tok = bpe_tokenizer(os.path.join(work, "bpe"), sample)
    out = {}
    for workers in (1, 2):
        shutil.rmtree(os.path.join(work, f"prep{workers}"), ignore_errors=True)  # a fresh run, not a resume
        cpu0 = _children_cpu()
        res = prepare(PrepareOptions(("embedded",) * repeat, os.path.join(work, f"prep{workers}"), tokenizer=tok,
                                     workers=workers, progress=False, task_bytes=1 << 20))
        cpu = _children_cpu() - cpu0
        out[workers] = {"tokens": res.manifest["tokens"], "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
                        "shards": len(res.manifest["shards"]), "worker_cpu_s": cpu}
        print(f"prepare, {workers} worker(s): {res.manifest['tokens']:,} tokens in {res.seconds:.1f} s = "
              f"{res.tokens_per_s:,.0f} tokens/s ({len(res.manifest['shards'])} shards); workers' CPU "
              f"{cpu:.1f} s = {res.manifest['tokens'] / cpu:,.0f} tokens per CPU-second "
              f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    same = all(open(os.path.join(work, "prep1", f), "rb").read() == open(os.path.join(work, "prep2", f), "rb").read()
               for f in sorted(os.listdir(os.path.join(work, "prep1"))))
    print(f"prepare: 2 workers / 1 worker throughput = {out[2]['tokens_per_s'] / out[1]['tokens_per_s']:.2f}x; "
          f"outputs byte-identical: {same}", flush=True)
    out["identical"] = same
    return out


def synthetic_corpus(path: str, tokens: int, shards: int = 8, seed: int = 0) -> dict:
    """A prepared directory of `tokens` sparse uint16 tokens (ids 0) with real indexes (kept and
    reused when `path` already holds one of that size: the 10^10 one takes minutes to write)."""
    manifest = os.path.join(path, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as fh:
            old = json.load(fh)
        if old.get("tokens") == tokens:
            return old
    os.makedirs(path, exist_ok=True)
    byte = ByteTokenizer()
    dtype = token_dtype(byte.vocab_size)
    rng = np.random.default_rng(seed)
    entries = []
    per = tokens // shards
    for k in range(shards):
        n = per if k < shards - 1 else tokens - per * (shards - 1)
        lengths = rng.integers(1, 2001, size=n // 1000 + 16)
        while lengths.sum() < n:
            lengths = np.concatenate([lengths, rng.integers(1, 2001, size=1024)])
        cut = int(np.searchsorted(np.cumsum(lengths), n))
        lengths = lengths[:cut + 1].copy()
        lengths[-1] -= int(lengths.sum()) - n
        prefix = os.path.join(path, f"shard_{k:05d}")
        write_index(prefix + ".idx", lengths, dtype)
        with open(prefix + ".bin", "wb") as fh:
            fh.truncate(n * dtype.itemsize)  # sparse: no blocks on disk
        entries.append(shard_entry(prefix, lengths.size, n))
    return write_manifest(path, entries, tokenizer=byte.fingerprint(), dtype=dtype)


def loader_probe(path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _LOADER_PROBE, path], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_probe(path: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "loomtrain.launch", "run", "-", f"data.source={path}", "data.shuffle_documents=true",
           "data.seq_len=256", "data.global_batch_size=8", "data.micro_batch_size=4", "train.max_steps=3",
           f"train.output_dir={out}", "train.progress=false", "train.tensorboard=false", "model.architecture=llama",
           "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
           "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "checkpoint.every=0"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILDREN, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"training run failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"wall_s": round(wall, 2), "startup_s": round(wall - sum(s["step_time_s"] for s in steps), 2),
            "peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=float, default=1e8)
    ap.add_argument("--large", type=float, default=1e10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="prepare the embedded corpus this many times over")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved small/large measurements (medians)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="lt-data-bench-")
    print(f"working in {work}", flush=True)
    if not args.skip_prepare:
        print(f"load average before: {os.getloadavg()[0]:.1f} (2-core machine shared with other jobs)", flush=True)
        throughput(work, args.repeat)
    results = {}
    for name, n in (("small", int(args.small)), ("large", int(args.large))):
        t0 = time.perf_counter()
        m = synthetic_corpus(os.path.join(work, name), n)
        print(f"{name}: {m['tokens']:,} tokens, {m['documents']:,} documents, index "
              f"{sum(s['idx_bytes'] for s in m['shards']) / 1e6:.0f} MB, ready in {time.perf_counter() - t0:.0f} s",
              flush=True)
        results[name] = {"loader": [], "train": []}
    # Alternate small and large, `--rounds` times: the machine's load drifts by more than the
    # difference being measured, so each ratio is of medians over interleaved runs.
    for r in range(args.rounds):
        for name in ("small", "large") if r % 2 == 0 else ("large", "small"):
            results[name]["loader"].append(loader_probe(os.path.join(work, name)))
            print(f"round {r}, {name}: loader {results[name]['loader'][-1]}", flush=True)
            if not args.skip_train:
                results[name]["train"].append(training_probe(os.path.join(work, name), os.path.join(work, f"run_{name}")))
                print(f"round {r}, {name}: training run {results[name]['train'][-1]}", flush=True)

    def med(name, part, key):
        return float(np.median([x[key] for x in results[name][part]]))

    for part, keys in (("loader", ("open_s", "first_3_steps_s", "next_step_ms", "peak_rss_mb")),
                       ("train", ("startup_s", "peak_rss_mb"))):
        if part == "train" and args.skip_train:
            continue
        for key in keys:
            lo, hi = med("small", part, key), med("large", part, key)
            print(f"{part} {key}: median 1e8-corpus {lo:.4g}, 1e10-corpus {hi:.4g}, ratio {hi / lo:.2f}x", flush=True)


if __name__ == "__main__":
    main()
