"""Token shards: the same samples as the text path, document shuffling, resume across dp sizes,
and one clear line for every kind of bad shard."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from harness import case, reference, run_cases
from loomtrain.config import DataConfig
from loomtrain.data.loader import DataLoader
from loomtrain.data.permute import WindowedPermutation
from loomtrain.data.prepared import PreparedCorpus, open_dataset
from loomtrain.data.shards import token_dtype, write_manifest, write_shard
from loomtrain.data.tokenizer import ByteTokenizer, build_tokenizer
from loomtrain.errors import DataError
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
def one_line(exc_info) -> str:
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
        assert path in one_line(info) or "shard" in one_line(info), what
    # the tokenizer the shards were made with is not the one configured
    tok_dir = hf_tokenizer_dir(tmp_path)
    with pytest.raises(DataError, match=r"prepared with tokenizer 'byte'.*data.tokenizer is 'tok'") as info:
        loader(good, build_tokenizer(tok_dir), tokenizer_dir=tok_dir)
    one_line(info)
    # ids beyond the configured vocabulary (e.g. a Megatron dataset read with the wrong tokenizer)
    big = tmp_path / "big"
    os.makedirs(big)
    write_shard(str(big / "corpus_text_document"), [np.array([5, 300, 7], dtype=np.int32)] * 10, np.int32)
    dl = loader(str(big / "corpus_text_document"), seq_len=4)
    with pytest.raises(DataError, match="token id 300, beyond the vocabulary") as info:
        dl.next_step()
    one_line(info)


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
