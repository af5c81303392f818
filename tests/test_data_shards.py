"""Token shards: the same samples as the text path, document shuffling, resume across dp sizes,
and one clear line for every kind of bad shard."""
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

from harness import ROOT, case, reference, run_cases
from loomtrain.config import DataConfig, load_config
from loomtrain.data.loader import DataLoader
from loomtrain.data.mix import PERIOD, schedule, slot_counts
from loomtrain.data.permute import WindowedPermutation
from loomtrain.data.prepare import PrepareOptions, prepare
from loomtrain.data.prepared import PreparedCorpus, open_dataset
from loomtrain.data.shards import token_dtype, write_manifest, write_shard
from loomtrain.data.tokenizer import ByteTokenizer, build_tokenizer
from loomtrain.errors import ConfigError, DataError
from test_data import hf_tokenizer_dir

BYTE = ByteTokenizer()


def corpus_dir(root, n=30, seed=0):
    """n text documents of varied lengths, one file each, in sorted-name order."""
    rng = np.random.default_rng(seed)
    docs = [f"doc{i:02d} " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=int(rng.integers(1, 50))))
            for i in range(n)]
    os.makedirs(root / "corpus", exist_ok=True)
    for i, text in enumerate(docs):
        (root / "corpus" / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
    return str(root / "corpus"), docs


def shards_from_docs(out, docs, tokenizer=BYTE, per_shard=10):
    """Shards made directly with the writer (what `data prepare` produces, without the CLI)."""
    os.makedirs(out, exist_ok=True)
    ids = [np.append(a, tokenizer.eos_id) for a in tokenizer.encode_batch(docs)]
    dtype = token_dtype(tokenizer.vocab_size)
    entries = [write_shard(os.path.join(out, f"shard_{k:05d}"), ids[i:i + per_shard], dtype)
               for k, i in enumerate(range(0, len(ids), per_shard))]
    write_manifest(str(out), entries, tokenizer=tokenizer.fingerprint(), dtype=dtype)
    return str(out)


def loader(source, tokenizer=BYTE, seed=3, **kw):
    cfg = DataConfig(source=source, seq_len=kw.pop("seq_len", 16), global_batch_size=4, micro_batch_size=2,
                     tokenizer=kw.pop("tokenizer_dir", None), **kw)
    return DataLoader(cfg, tokenizer, seed=seed)


def assert_same_samples(a: DataLoader, b: DataLoader, ids):
    ma, mb = a.samples(ids), b.samples(ids)
    for key in ("input_ids", "labels", "position_ids"):
        assert (getattr(ma, key) == getattr(mb, key)).all(), key
    assert ma.doc_lengths == mb.doc_lengths


# ------------------------------------------------------------------ the same samples as text
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_give_the_text_paths_samples_token_for_token(tmp_path, shuffle):
    src, docs = corpus_dir(tmp_path)
    shards = shards_from_docs(tmp_path / "shards", docs)
    text, prepared = loader(src, shuffle=shuffle), loader(shards, shuffle=shuffle)
    n = text.num_samples_per_epoch
    assert n == prepared.num_samples_per_epoch and n > 50
    assert_same_samples(text, prepared, list(range(3 * n)))  # three epochs, across shard boundaries
    for i in range(2 * len(docs) + 3):
        assert (text.corpus.document(i) == prepared.corpus.document(i)).all()
    assert text.state_dict()["num_samples_per_epoch"] == prepared.state_dict()["num_samples_per_epoch"]


def test_hf_tokenizer_shards_match_text(tmp_path):
    src, docs = corpus_dir(tmp_path, n=12)
    tok_dir = hf_tokenizer_dir(tmp_path)
    tok = build_tokenizer(tok_dir)
    shards = shards_from_docs(tmp_path / "shards", docs, tok, per_shard=5)
    a, b = loader(src, tok, seq_len=8, tokenizer_dir=tok_dir), loader(shards, tok, seq_len=8, tokenizer_dir=tok_dir)
    assert_same_samples(a, b, list(range(2 * a.num_samples_per_epoch)))


def test_windowed_permutation():
    for n in (0, 1, 7, 100):  # one window: exactly numpy's permutation (today's row order)
        ref = np.random.default_rng([5, 2]).permutation(n)
        perm = WindowedPermutation(n, (5, 2), window=100)
        assert [perm[i] for i in range(n)] == ref.tolist()
    for n, w in ((100, 7), (98, 7), (1000, 64)):  # several windows: still a bijection, and mixed
        perm = WindowedPermutation(n, (1,), window=w)
        got = [perm[i] for i in range(n)]
        assert sorted(got) == list(range(n)) and got != list(range(n))
        assert got == [WindowedPermutation(n, (1,), window=w)[i] for i in range(n)]
        assert got != [WindowedPermutation(n, (2,), window=w)[i] for i in range(n)]


@pytest.mark.parametrize("window", [4, 1 << 16])
def test_document_shuffle_keeps_documents_whole(tmp_path, window):
    _, docs = corpus_dir(tmp_path, n=30)
    ds = open_dataset(shards_from_docs(tmp_path / "shards", docs), BYTE)
    streams = []
    for seed in (0, 0, 1):
        corpus = PreparedCorpus(ds, 16, BYTE.vocab_size, seed=seed, shuffle_documents=True, window=window)
        tokens, starts = corpus.read(0, corpus.num_tokens)
        pieces = np.split(tokens, starts)
        assert len(pieces) == len(docs) and all(p[-1] == BYTE.eos_id for p in pieces)
        texts = [BYTE.decode(p) for p in pieces]
        assert sorted(texts) == sorted(docs) and texts != docs  # a permutation of whole documents
        # rows are cut from that stream exactly as from the unshuffled one
        row, row_starts = corpus.row(3)
        assert (row == tokens[48:65]).all() and row_starts.tolist() == [s - 48 for s in starts if 48 < s <= 64]
        assert all((corpus.document(i) == pieces[i][:17]).all() for i in range(len(docs)))
        streams.append(texts)
    assert streams[0] == streams[1] and streams[0] != streams[2]


# -------------------------------------------------------------------------------- bad shards
def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_shards_get_one_clear_line(tmp_path):
    _, docs = corpus_dir(tmp_path, n=20)
    good = shards_from_docs(tmp_path / "good", docs)

    def broken(name, damage):
        d = shards_from_docs(tmp_path / name, docs)
        damage(d)
        return d

    def truncate(path, by=3):
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) - by)

    def edit_manifest(d, **changes):
        m = json.load(open(os.path.join(d, "manifest.json")))
        for k, v in changes.items():
            if k.startswith("shard0."):
                m["shards"][0][k[7:]] = v
            else:
                m[k] = v
        json.dump(m, open(os.path.join(d, "manifest.json"), "w"))

    cases = {
        "truncated .bin": (broken("tb", lambda d: truncate(os.path.join(d, "shard_00001.bin"))), "truncated"),
        "truncated .idx": (broken("ti", lambda d: truncate(os.path.join(d, "shard_00000.idx"), 8)), "truncated or corrupt"),
        "missing .bin": (broken("mb", lambda d: os.remove(os.path.join(d, "shard_00001.bin"))), "missing shard file"),
        "not an index": (broken("ni", lambda d: open(os.path.join(d, "shard_00000.idx"), "wb").write(b"x" * 64)),
                         "no MMIDIDX header"),
        "manifest count": (broken("mc", lambda d: edit_manifest(d, **{"shard0.tokens": 5})), "does not match its manifest"),
        "manifest json": (broken("mj", lambda d: open(os.path.join(d, "manifest.json"), "w").write("{oops")),
                          "not valid JSON"),
        "manifest version": (broken("mv", lambda d: edit_manifest(d, version=99)), "format version 99"),
    }
    for what, (path, pattern) in cases.items():
        with pytest.raises(DataError, match=pattern) as info:
            loader(path)
        assert path in _one_line(info) or "shard" in _one_line(info), what
    # the tokenizer the shards were made with is not the one configured
    tok_dir = hf_tokenizer_dir(tmp_path)
    with pytest.raises(DataError, match=r"prepared with tokenizer 'byte'.*data.tokenizer is 'tok'") as info:
        loader(good, build_tokenizer(tok_dir), tokenizer_dir=tok_dir)
    _one_line(info)
    # ids beyond the configured vocabulary (e.g. a Megatron dataset read with the wrong tokenizer)
    big = tmp_path / "big"
    os.makedirs(big)
    write_shard(str(big / "corpus_text_document"), [np.array([5, 300, 7], dtype=np.int32)] * 10, np.int32)
    dl = loader(str(big / "corpus_text_document"), seq_len=4)
    with pytest.raises(DataError, match="token id 300, beyond the vocabulary") as info:
        dl.next_step()
    _one_line(info)


# ------------------------------------------------------- real runs: text == shards, dp resume
def test_training_on_shards_matches_text_and_resumes_across_dp(tmp_path):
    """One 2-rank gloo launch (4 steps; 2 steps with a checkpoint; a shuffled mix) against one
    process: the text path and the shards train identically, a data.mix run on 2 ranks matches one
    process, and 2 ranks -> 1 rank resume continues exactly."""
    src, docs = corpus_dir(tmp_path, n=40)
    shards = shards_from_docs(tmp_path / "shards", docs, per_shard=7)
    base = case("llama", f"data.source={shards}", "data.lengths=fixed", "train.max_steps=4")
    other = shards_from_docs(tmp_path / "other", [d[::-1] for d in docs], per_shard=9)
    mix = base + [f"data.mix={{{shards}: 2, {other}: 1}}", "data.shuffle_documents=true"]
    ckpt = str(tmp_path / "ckpt")
    run_cases(2, {"dp2": base, "dp2_half": base + ["train.max_steps=2", "checkpoint.every=2",
                                                    f"checkpoint.dir={ckpt}"], "dp2_mix": mix}, str(tmp_path / "mp"))
    ref_losses, _ = reference(base, str(tmp_path / "ref"))
    text_losses, _ = reference(base + [f"data.source={src}"], str(tmp_path / "text"))
    assert text_losses == ref_losses  # same samples, same process: bit-identical
    dp2 = json.load(open(tmp_path / "mp" / "dp2.json"))["losses"]
    for a, b in zip(dp2, ref_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    mix_ref, _ = reference(mix, str(tmp_path / "mix"))
    mix_dp2 = json.load(open(tmp_path / "mp" / "dp2_mix.json"))["losses"]
    assert mix_ref != ref_losses
    for a, b in zip(mix_dp2, mix_ref, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    resumed, _ = reference(base + [f"checkpoint.dir={ckpt}", "checkpoint.resume=auto"], str(tmp_path / "resumed"))
    metrics = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [3, 4]
    for a, b in zip(resumed[-2:], ref_losses[2:], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)


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
    _one_line(info)


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
