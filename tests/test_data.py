"""Data layer: tokenizers, sources, packing, synthetic generation and the global-position loader."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loomtrain.config import DataConfig
from loomtrain.errors import ConfigError, DataError
from loomtrain.data.loader import (IGNORE_INDEX, DataLoader, SyntheticCorpus, TextCorpus,
                                    load_lengths_file, pack_row)
from loomtrain.data.sources import check_source, read_documents
from loomtrain.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

BYTE = ByteTokenizer()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def text_dir(tmp_path, n=12, seed=0):
    """n documents of varied lengths (some shorter than a row, some spanning several rows)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], size=int(rng.integers(1, 40)))
        docs.append(f"doc{i:02d} " + " ".join(words))
        write(tmp_path / "corpus" / f"sub{i % 3}" / f"d{i:02d}.txt", docs[-1])
    return tmp_path / "corpus", docs


def hf_tokenizer_dir(tmp_path, with_eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["the quick brown fox jumps over the lazy dog", "hello world, hello loom",
                 "training language models packs documents", "the end of a document is eos"] * 5
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"]))
    kwargs = {"eos_token": "<eos>"} if with_eos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)
    out = tmp_path / ("tok" if with_eos else "tok_noeos")
    fast.save_pretrained(str(out))
    return str(out)


# ---------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = build_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    texts = ["hello", "héllo wörld ✓ 日本", ""]
    ids = tok.encode_batch(texts)
    assert [a.dtype for a in ids] == [np.int32] * 3
    assert ids[0].tolist() == list(b"hello")
    assert [tok.decode(a) for a in ids] == texts
    assert tok.decode(np.concatenate([ids[0], [256, 257]])) == "hello"


def test_hf_tokenizer_loads_and_encodes(tmp_path):
    path = hf_tokenizer_dir(tmp_path)
    tok = build_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == ref.convert_tokens_to_ids("<eos>")
    ids = tok.encode_batch(["hello world", "the quick brown fox"])
    assert all(a.dtype == np.int32 and a.size > 0 for a in ids)
    assert tok.eos_id not in np.concatenate(ids)  # no special tokens added
    assert ids[0].tolist() == ref("hello world", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[1]).replace(" ", "") == "thequickbrownfox"

    # ... and drives the loader end to end.
    corpus, _ = text_dir(tmp_path)
    dl = DataLoader(DataConfig(source=str(corpus), tokenizer=path, seq_len=8, global_batch_size=2,
                               micro_batch_size=1), dp_rank=0, dp_size=1, seed=0)
    assert dl.vocab_size == tok.vocab_size
    mb = dl.next_step()[0]
    assert int(mb.input_ids.max()) < tok.vocab_size


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        build_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer from .*empty"):
        build_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="neither an eos_token nor a sep_token"):
        build_tokenizer(hf_tokenizer_dir(tmp_path, with_eos=False))


# ---------------------------------------------------------------------------- packing
def test_pack_row_masks_and_restarts_at_boundaries():
    tokens = np.arange(11)  # S = 10; documents start at 0, 3, 7 (row-relative), next one at 10
    x, y, pos, lens = pack_row(tokens, np.array([3, 7, 10]), 10)
    assert x.tolist() == list(range(10))
    assert y.tolist() == [1, 2, -100, 4, 5, 6, -100, 8, 9, -100]
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert lens == [3, 4, 3]
    x, y, pos, lens = pack_row(tokens, np.array([], dtype=np.int64), 10)
    assert (y != -100).all() and pos.tolist() == list(range(10)) and lens == [10]


def test_packed_rows_match_document_structure(tmp_path):
    corpus, docs = text_dir(tmp_path)
    S = 16
    cfg = DataConfig(source=str(corpus), seq_len=S, shuffle=False, global_batch_size=4, micro_batch_size=2)
    dl = DataLoader(cfg, BYTE, dp_rank=0, dp_size=1, seed=0)
    ordered = [docs[i] for i in sorted(range(len(docs)), key=lambda i: f"sub{i % 3}/d{i:02d}.txt")]
    stream = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8), 256) for d in ordered])
    doc_id = np.repeat(np.arange(len(ordered)), [len(d.encode()) + 1 for d in ordered])
    n = (len(stream) - 1) // S
    assert dl.num_samples_per_epoch == n
    mb = dl.samples(list(range(n)))
    for i in range(n):
        a = i * S
        ids = doc_id[a:a + S + 1]
        assert mb.input_ids[i].tolist() == stream[a:a + S].tolist()
        want_labels = np.where(ids[1:] == ids[:-1], stream[a + 1:a + S + 1], -100)
        assert mb.labels[i].tolist() == want_labels.tolist()
        start = np.concatenate(([True], ids[1:S] != ids[:S - 1]))  # row start or new document
        assert (mb.position_ids[i].numpy()[start] == 0).all()
        assert (np.diff(mb.position_ids[i].numpy())[~start[1:]] == 1).all()
        lens = mb.doc_lengths[i]
        assert sum(lens) == S and lens == np.diff(np.flatnonzero(np.append(start, True))).tolist()
    assert mb.num_tokens == int((mb.labels != -100).sum())
    # every document's EOS is an input token with a masked label (never predicts the next doc)
    eos_rows = mb.input_ids == 256
    assert (mb.labels[eos_rows] == IGNORE_INDEX).all()


def test_too_few_tokens(tmp_path):
    write(tmp_path / "d" / "a.txt", "tiny")
    with pytest.raises(DataError, match=r"has 5 tokens, fewer than data.seq_len\+1 = 65"):
        TextCorpus(DataConfig(source=str(tmp_path / "d"), seq_len=64), BYTE)


# ---------------------------------------------------------------------------- sources
def test_txt_directory_sorted_and_filtered(tmp_path):
    d = tmp_path / "data"
    write(d / "b.md", "second")
    write(d / "a" / "z.txt", "first")
    write(d / "c.rst", "   \n")  # whitespace-only: skipped
    write(d / "d.csv", "ignored,unsupported")
    write(d / ".hidden" / "x.txt", "hidden: skipped")
    write(d / "e.py", "print('third')")
    assert read_documents(DataConfig(source=str(d))) == ["first", "second", "print('third')"]
    assert read_documents(DataConfig(source=str(d / "b.md"))) == ["second"]
    # the cap cuts the directory at the same byte everywhere
    capped = DataConfig(source=str(d), max_corpus_mb=8 / 2**20)
    assert read_documents(capped) == ["first", "sec"]


def test_jsonl_and_parquet(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "two"}, {"text": ""}, {"text": "three"}]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_documents(DataConfig(source=str(jl))) == ["one", "two", "three"]
    pqf = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x1", None, "x2"], "n": [1, 2, 3]}), str(pqf))
    assert read_documents(DataConfig(source=str(pqf), text_field="body")) == ["x1", "x2"]
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text'"):
        read_documents(DataConfig(source=str(pqf)))
    with pytest.raises(DataError, match=r"column 'n' has type int64"):
        read_documents(DataConfig(source=str(pqf), text_field="n"))


def test_source_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing")
    for fn in (check_source, read_documents):
        with pytest.raises(DataError, match=f"no such file or directory: {missing}"):
            fn(DataConfig(source=missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} contains no supported files"):
        check_source(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} contains no documents"):
        read_documents(DataConfig(source=str(tmp_path / "empty")))
    empty = write(tmp_path / "e.jsonl", "")
    with pytest.raises(DataError, match=f"{empty} contains no documents"):
        check_source(DataConfig(source=str(empty)))
    blank = write(tmp_path / "blank.jsonl", '{"text": ""}\n')
    with pytest.raises(DataError, match=f"{blank} contains no documents"):
        check_source(DataConfig(source=str(blank)))
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        read_documents(DataConfig(source=str(bad)))
    nofield = write(tmp_path / "nf.jsonl", '{"content": "x"}\n')
    with pytest.raises(DataError, match=rf"{nofield}:1: no field 'text'"):
        check_source(DataConfig(source=str(nofield)))
    csv = write(tmp_path / "a.csv", "x")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        check_source(DataConfig(source=str(csv)))
    badutf = tmp_path / "u" / "x.txt"
    badutf.parent.mkdir()
    badutf.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=f"{badutf} is not valid UTF-8"):
        read_documents(DataConfig(source=str(badutf.parent)))


def test_embedded_corpus(tmp_path):
    cfg = DataConfig(max_corpus_mb=0.25)
    check_source(cfg)
    docs = read_documents(cfg)
    assert docs and sum(len(d.encode()) for d in docs) == int(0.25 * 2**20)
    assert read_documents(cfg) == docs  # deterministic
    dl = DataLoader(cfg, BYTE, dp_rank=0, dp_size=1, seed=0)
    assert dl.num_samples_per_epoch == (int(0.25 * 2**20) + len(docs) - 1) // 256


def test_lengths_file(tmp_path):
    good = write(tmp_path / "l.txt", "5\n12\n 7\n")
    assert load_lengths_file(str(good)).tolist() == [5, 12, 7]
    bad = write(tmp_path / "bad.txt", "5\n12\nx\n")
    with pytest.raises(DataError, match=rf"{bad}:3: 'x' is not an integer"):
        load_lengths_file(str(bad))
    neg = write(tmp_path / "neg.txt", "5\n0\n")
    with pytest.raises(DataError, match=rf"{neg}:2: 0 is not a positive length"):
        load_lengths_file(str(neg))
    cfg = DataConfig(source="synthetic", lengths=f"file:{good}", seq_len=32, global_batch_size=8,
                     micro_batch_size=8)
    check_source(cfg)
    mb = DataLoader(cfg, BYTE, seed=0).next_step()[0]
    assert all(max(r) <= 12 and sum(r) == 32 for r in mb.doc_lengths)


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_fixed_is_one_learnable_document():
    cfg = DataConfig(source="synthetic", lengths="fixed", seq_len=64, global_batch_size=8, micro_batch_size=8)
    dl = DataLoader(cfg, BYTE, seed=3)
    assert dl.num_samples_per_epoch is None
    mb = dl.next_step()[0]
    assert mb.doc_lengths == [[64]] * 8 and mb.num_tokens == 8 * 64
    assert (mb.position_ids == torch.arange(64)).all()
    corpus = dl.corpus
    for row in range(8):  # every transition is one of the bigram model's few successors
        for a, b in zip(mb.input_ids[row].tolist(), mb.labels[row].tolist()):
            assert b in corpus.successors(a)


def test_synthetic_longtail_has_a_long_tail():
    S = 8192
    corpus = SyntheticCorpus(DataConfig(source="synthetic", lengths="longtail", seq_len=S), 258, seed=0)
    lens = np.concatenate([corpus._doc_lengths(np.random.default_rng(i), 10**7) for i in range(20)])[:-1]
    median, mean = np.median(lens), lens.mean()
    assert 300 < median < 400 and 850 < mean < 1200 and lens.max() > 20 * median
    for g in range(20):
        tokens, starts = corpus.row(g)
        assert tokens.shape == (S + 1,) and tokens.max() < 258
        assert pack_row(tokens, starts, S)[3] and sum(pack_row(tokens, starts, S)[3]) == S


# ---------------------------------------------------------------------------- loader
def batches(dl, steps):
    return [dl.next_step() for _ in range(steps)]


def test_determinism_and_seed(tmp_path):
    corpus, _ = text_dir(tmp_path)
    for source in (str(corpus), "synthetic"):
        cfg = DataConfig(source=source, seq_len=8, global_batch_size=4, micro_batch_size=2, lengths="longtail")
        a, b = (batches(DataLoader(cfg, BYTE, dp_rank=0, dp_size=1, seed=7), 5) for _ in range(2))
        c = batches(DataLoader(cfg, BYTE, dp_rank=0, dp_size=1, seed=8), 5)
        flat = lambda bs: torch.cat([m.input_ids for step in bs for m in step])  # noqa: E731
        assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))


def test_shuffle_epochs(tmp_path):
    corpus, _ = text_dir(tmp_path)
    cfg = DataConfig(source=str(corpus), seq_len=8, global_batch_size=2, micro_batch_size=1)
    dl = DataLoader(cfg, BYTE, seed=1)
    n = dl.num_samples_per_epoch
    rows = [dl.sample_location(g) for g in range(3 * n)]
    for e in range(3):
        epoch_rows = [r for ep, r in rows[e * n:(e + 1) * n]]
        assert {ep for ep, _ in rows[e * n:(e + 1) * n]} == {e} and sorted(epoch_rows) == list(range(n))
        assert epoch_rows == np.random.default_rng([1, e]).permutation(n).tolist()
    unshuffled = DataLoader(cfg.__class__(**{**cfg.__dict__, "shuffle": False}), BYTE, seed=1)
    assert [unshuffled.sample_location(g) for g in range(n + 1)] == [(0, i) for i in range(n)] + [(1, 0)]


def test_batch_divisibility_is_a_config_error():
    cfg = DataConfig(source="synthetic", global_batch_size=12, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by .* 4\*2 = 8"):
        DataLoader(cfg, BYTE, dp_rank=0, dp_size=4, seed=0)
    with pytest.raises(ConfigError, match="dp_rank=2"):
        DataLoader(cfg, BYTE, dp_rank=2, dp_size=2, seed=0)


@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_global_position_is_independent_of_dp(tmp_path, source):
    src = str(text_dir(tmp_path)[0]) if source == "text" else "synthetic"
    cfg = DataConfig(source=src, seq_len=8, global_batch_size=8, micro_batch_size=2, lengths="longtail")
    steps = 6

    def run(dp, n_steps, state=None):
        """Per step: {sample_id: (input row, label row)} gathered over all ranks."""
        loaders = [DataLoader(cfg, BYTE, dp_rank=r, dp_size=dp, seed=5) for r in range(dp)]
        if state is not None:
            for dl in loaders:
                dl.load_state_dict(json.loads(json.dumps(state)))
        out = []
        for _ in range(n_steps):
            step, order = {}, []
            for dl in loaders:
                mbs = dl.next_step()
                assert len(mbs) == 8 // dp // 2 and all(m.input_ids.shape == (2, 8) for m in mbs)
                for m in mbs:
                    for i, g in enumerate(m.sample_ids):
                        step[g] = (m.input_ids[i].tolist(), m.labels[i].tolist(), m.doc_lengths[i])
                        order.append(g)
            assert order == sorted(order)  # rank r holds the r-th contiguous block, in order
            out.append(step)
        states = [dl.state_dict() for dl in loaders]
        assert all(s == states[0] for s in states)  # the state is global, not per rank
        return out, states[0]

    ref, ref_state = run(1, steps)
    for dp in (2, 4):
        got, _ = run(dp, steps)
        assert [set(s) for s in got] == [set(range(k * 8, k * 8 + 8)) for k in range(steps)]
        assert got == ref
    first, state = run(2, 2)
    assert state["samples_consumed"] == 16 and state["tokens_consumed"] == 16 * 8
    rest, end_state = run(4, steps - 2, state)
    assert first + rest == ref and end_state["samples_consumed"] == ref_state["samples_consumed"]


def test_load_state_dict_validation():
    cfg = DataConfig(source="synthetic", seq_len=8, global_batch_size=4, micro_batch_size=2)
    dl = DataLoader(cfg, BYTE, seed=0)
    with pytest.raises(DataError, match="samples_consumed"):
        dl.load_state_dict({"samples_consumed": -1})
    with pytest.raises(DataError, match="seq_len=16 but this run has seq_len=8"):
        dl.load_state_dict({"samples_consumed": 4, "seq_len": 16})
    dl.load_state_dict({"samples_consumed": 12})
    assert dl.samples_consumed == 12 and dl.next_step()[0].sample_ids == [12, 13]
    assert dl.samples_consumed == 16 and dl.tokens_consumed == 128


def test_microbatch_to_keeps_metadata():
    dl = DataLoader(DataConfig(source="synthetic", seq_len=8, global_batch_size=2, micro_batch_size=2), BYTE)
    mb = dl.next_step()[0].to("cpu")
    assert mb.input_ids.dtype == torch.int64 and mb.sample_ids == [0, 1] and mb.doc_lengths == [[8], [8]]
