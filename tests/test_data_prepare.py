"""`data prepare` (the text path's samples, deterministic and resumable; HF datasets and
pre-tokenised ids; the CLI's prepare and verify), Megatron-format corpora read token for token,
and the mix of prepared sources. The shard format itself is tested in test_data_shards.py."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import ROOT
from loomtrain.config import load_config
from loomtrain.data.loader import DataLoader
from loomtrain.data.mix import PERIOD, schedule, slot_counts
from loomtrain.data.prepare import PrepareOptions, prepare
from loomtrain.data.prepared import PreparedCorpus, open_dataset
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import ConfigError, DataError
from test_data import hf_tokenizer_dir
from test_data_shards import BYTE, assert_same_samples, corpus_dir, loader, one_line, shards_from_docs


# ------------------------------------------------------------------------------ data prepare
def mixed_corpus(root):
    """Text files, a JSONL file and a Parquet file (with row groups) interleaved by name."""
    src, docs = corpus_dir(root, n=24)
    lines = [json.dumps({"text": f"json line {i} " + "beta " * (i % 7)}) for i in range(40)]
    (root / "corpus" / "d05b.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n", encoding="utf-8")
    table = pa.table({"text": [f"parquet row {i} " + "gamma " * (i % 5) for i in range(30)] + [None, "  "]})
    pq.write_table(table, str(root / "corpus" / "d11b.parquet"), row_group_size=8)
    return src


def tree_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_prepare_is_the_text_path_deterministic_and_resumable(tmp_path):
    src = mixed_corpus(tmp_path)
    one = prepare(PrepareOptions((src,), str(tmp_path / "w1"), workers=1, progress=False, task_bytes=300))
    two = prepare(PrepareOptions((src,), str(tmp_path / "w2"), workers=2, progress=False, task_bytes=300))
    assert len(one.manifest["shards"]) > 8  # JSONL split by byte ranges, Parquet by row groups
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")  # same bytes, any worker count
    text, prepared = loader(src), loader(str(tmp_path / "w1"))
    assert text.num_samples_per_epoch == prepared.num_samples_per_epoch
    assert_same_samples(text, prepared, list(range(2 * text.num_samples_per_epoch)))
    # interrupted: the manifest and two shards never got written; the rerun does only those
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "w1", cut)
    os.remove(cut / "manifest.json")
    os.remove(cut / "shard_00002.bin")
    os.remove(cut / "shard_00005.done.json")
    again = prepare(PrepareOptions((src,), str(cut), workers=2, progress=False, task_bytes=300))
    assert (again.shards_written, again.shards_skipped) == (2, len(one.manifest["shards"]) - 2 + (
        len(json.load(open(cut / "plan.json"))["tasks"]) - len(one.manifest["shards"])))
    assert tree_bytes(cut) == tree_bytes(tmp_path / "w1")
    # the same directory for other inputs, or another tokenizer: refused
    with pytest.raises(DataError, match="holds a preparation of other inputs"):
        prepare(PrepareOptions((src, src), str(cut), progress=False, task_bytes=300))


def test_prepare_hf_datasets_and_pretokenised_ids(tmp_path):
    datasets = pytest.importorskip("datasets", reason="HF datasets is in the test extras")
    tok_dir = hf_tokenizer_dir(tmp_path)
    tok = build_tokenizer(tok_dir)
    texts = [f"hello world {i} " + "the quick brown fox " * (i % 4) for i in range(25)]
    ids = [tok.encode(t).tolist() for t in texts]
    ids[3] = ids[3] + [tok.eos_id]  # already closed: kept as it is, not closed twice
    ds = datasets.Dataset.from_dict({"text": texts, "input_ids": ids})
    datasets.DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 25))}).save_to_disk(
        str(tmp_path / "hf"))
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"input_ids": x}) for x in ids), encoding="utf-8")
    outs = {}
    for name, src, field in (("arrow_text", "hf", "text"), ("arrow_ids", "hf", "input_ids"),
                             ("jsonl_ids", "ids.jsonl", "input_ids")):
        outs[name] = prepare(PrepareOptions((str(tmp_path / src),), str(tmp_path / name), tokenizer=tok_dir,
                                            field=field, progress=False)).manifest
    expected = [x if x[-1] == tok.eos_id else x + [tok.eos_id] for x in ids]
    for name in outs:
        ds_ = open_dataset(str(tmp_path / name), tok)
        corpus = PreparedCorpus(ds_, 8, tok.vocab_size)
        tokens, starts = corpus.read(0, corpus.num_tokens)
        assert [p.tolist() for p in np.split(tokens, starts)] == expected, name
    assert [len(outs[n]["shards"]) for n in outs] == [2, 2, 1]  # a DatasetDict: one shard per split file
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [1, 2, 10**6]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: token id 1000000 is outside the tokenizer's vocabulary") as info:
        prepare(PrepareOptions((str(tmp_path / "bad.jsonl"),), str(tmp_path / "bad"), tokenizer=tok_dir,
                               field="input_ids", progress=False))
    one_line(info)


def test_cli_prepare_and_verify(tmp_path):
    """`loomtrain data prepare` + `data verify` as a user runs them; a corrupted byte is found."""
    src, _ = corpus_dir(tmp_path, n=40)
    out = str(tmp_path / "shards")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lt = [sys.executable, "-m", "loomtrain.launch"]
    proc = subprocess.run(lt + ["data", "prepare", src, "--out", out, "--workers", "2", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Train with data.source=" in proc.stdout, proc.stderr
    proc = subprocess.run(lt + ["data", "verify", out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "checksums match" in proc.stdout, proc.stderr
    with open(os.path.join(out, "shard_00000.bin"), "r+b") as fh:
        fh.write(b"\xff\xff")  # same size, other bytes: only a checksum sees it
    proc = subprocess.run(lt + ["data", "verify", out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("prepare it again"), proc.stderr
    assert "checksum differs" in proc.stderr


# -------------------------------------------------------------------------- Megatron datasets
def _megatron_docs(rng, n=25):
    """Documents as lists of sequences (Megatron's sentence split), ids < 258, each doc ends in EOS."""
    docs = []
    for _ in range(n):
        seqs = [rng.integers(0, 256, size=int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 4)))]
        seqs[-1].append(BYTE.eos_id)
        docs.append(seqs)
    return docs


def _expected_stream(docs):
    flat = [sum(seqs, []) for seqs in docs]
    return np.concatenate([np.asarray(d) for d in flat]), np.cumsum([len(d) for d in flat])[:-1].tolist()


def test_megatron_core_builder_files_read_token_for_token(tmp_path):
    try:
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    except ImportError as exc:  # pragma: no cover - megatron-core is in the test extras
        pytest.skip(f"megatron-core cannot be imported here: {exc}")
    docs = _megatron_docs(np.random.default_rng(0))
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for k, seqs in enumerate(docs):
        if k % 2:  # both ways Megatron's tools write: whole documents, and item by item
            builder.add_document(torch.tensor(sum(seqs, [])), [len(s) for s in seqs])
        else:
            for s in seqs:
                builder.add_item(torch.tensor(s))
            builder.end_document()
    builder.finalize(prefix + ".idx")
    theirs = IndexedDataset(prefix)
    ds = open_dataset(prefix, BYTE)
    assert ds.num_documents == len(docs) and ds.shards[0].num_sequences == len(theirs)
    corpus = PreparedCorpus(ds, 16, BYTE.vocab_size)
    tokens, starts = corpus.read(0, corpus.num_tokens)
    assert tokens.tolist() == np.concatenate([theirs[i] for i in range(len(theirs))]).tolist()
    want_tokens, want_starts = _expected_stream(docs)
    assert tokens.tolist() == want_tokens.tolist() and starts == want_starts
    # the loader takes the prefix, the .idx or the .bin, and trains on it like any prepared data
    for name in (prefix, prefix + ".idx", prefix + ".bin", str(tmp_path)):
        dl = loader(name, seq_len=16, shuffle=False)
        mb = dl.samples([0, 1, 2])
        assert mb.input_ids[1].tolist() == tokens[16:32].tolist()
        assert dl.num_samples_per_epoch == (len(want_tokens) - 1) // 16


def test_handwritten_megatron_index_of_the_documented_format(tmp_path):
    """MMIDIDX written byte by byte from the format description (int32 ids, multi-sequence docs)."""
    docs = _megatron_docs(np.random.default_rng(1), n=12)
    seqs = [s for d in docs for s in d]
    lengths = [len(s) for s in seqs]
    pointers = np.concatenate(([0], np.cumsum(lengths)[:-1])) * 4
    doc_index = np.concatenate(([0], np.cumsum([len(d) for d in docs])))
    prefix = tmp_path / "hand"
    (tmp_path / "hand.bin").write_bytes(np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs]).tobytes())
    (tmp_path / "hand.idx").write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<Q", len(seqs))
        + struct.pack("<Q", len(doc_index)) + np.asarray(lengths, dtype=np.int32).tobytes()
        + np.asarray(pointers, dtype=np.int64).tobytes() + np.asarray(doc_index, dtype=np.int64).tobytes())
    corpus = PreparedCorpus(open_dataset(str(prefix), BYTE), 8, BYTE.vocab_size)
    tokens, starts = corpus.read(0, corpus.num_tokens)
    want_tokens, want_starts = _expected_stream(docs)
    assert tokens.tolist() == want_tokens.tolist() and starts == want_starts
    assert all(corpus.document(i).tolist() == sum(docs[i], [])[:9] for i in range(len(docs)))


# ------------------------------------------------------------------------------------ data.mix
def test_mix_schedule_is_proportional_and_exact():
    counts = slot_counts([3, 1, 0.25])
    assert counts.sum() == PERIOD and np.allclose(counts / PERIOD, [3 / 4.25, 1 / 4.25, 0.25 / 4.25], atol=2 / PERIOD)
    src, rank = schedule(counts)
    for c in range(3):  # each source's slots ranked 0, 1, 2, ... in order
        assert rank[src == c].tolist() == list(range(counts[c]))
    prefix = np.stack([np.cumsum(src == c) for c in range(3)], 1)
    share = np.arange(1, PERIOD + 1)[:, None] * counts[None] / PERIOD
    assert np.abs(prefix - share).max() <= 1.0  # every prefix holds the sources in proportion
    with pytest.raises(DataError, match="finite and positive"):
        slot_counts([1, 0])


def test_mix_of_prepared_sources(tmp_path):
    a = shards_from_docs(tmp_path / "a", ["a" * int(n) for n in np.random.default_rng(0).integers(5, 40, 30)])
    b = shards_from_docs(tmp_path / "b", ["b" * int(n) for n in np.random.default_rng(1).integers(5, 40, 30)])
    cfg = load_config(None, [f"data.mix={{{a}: 3, {b}: 1}}", "data.seq_len=8", "data.global_batch_size=4",
                             "data.micro_batch_size=2"]).data
    assert dict(cfg.mix) == {a: 3, b: 1}
    dl = DataLoader(cfg, BYTE, seed=7)
    n = {c: dl.corpus.sources[c].num_samples for c in (0, 1)}
    ids = list(range(3 * PERIOD))
    mb = dl.samples(ids)
    letters = [set(BYTE.decode(row.tolist())) for row in mb.input_ids]
    which = [0 if s <= {"a"} else 1 if s <= {"b"} else -1 for s in letters]
    assert -1 not in which and abs(which.count(0) / len(ids) - 0.75) < 2e-3
    # each source walks through its own rows: every row once per epoch, epochs in new orders
    per_source = {c: [dl.corpus.locate(g)[1] for g in ids if dl.corpus.locate(g)[0] == c] for c in (0, 1)}
    for c in (0, 1):
        assert per_source[c] == list(range(len(per_source[c])))
        rows = [dl.corpus._row_of(c, j) for j in range(2 * n[c])]
        assert sorted(rows[:n[c]]) == list(range(n[c])) and rows[:n[c]] != rows[n[c]:]
    again = DataLoader(cfg, BYTE, seed=7).samples(ids[:50])
    assert (again.input_ids == mb.input_ids[:50]).all()
    with pytest.raises(ConfigError, match="data.mix: the weight of"):
        load_config(None, [f"data.mix={{{a}: 0}}"])
    with pytest.raises(ConfigError, match="data.mix: no such file"):
        load_config(None, [f"data.mix={{{tmp_path / 'nope'}: 1}}"])
