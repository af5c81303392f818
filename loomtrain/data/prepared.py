"""Training from token shards: a prepared directory or a Megatron dataset, packed like text.

`TokenDataset` is the shards of one source in order, documents numbered globally across them
(global document g lives in the shard found by binary search over cumulative counts).
`PreparedCorpus` packs them exactly as `TextCorpus` packs tokenised text: one stream of
documents (each ending in EOS, which our shards store), row i = stream[i*S : i*S + S + 1], the
document starts inside each row returned for per-document positions. With the same documents
it yields the same rows token for token, which tests check.

With `data.shuffle_documents` the stream takes the documents in a seeded order
(`WindowedPermutation` over documents: whole windows of 4,096 documents, and documents inside
each window), so a row mixes text from anywhere in the corpus while every document stays whole;
tokens are never reordered. The stream is walked window by window. Start-up reads one index entry
per window (~2,500 for 10^10 tokens of 1,000-token documents); locating row i is one binary search
over windows and one inside a window, whose table (4,096 documents) is built on demand in
~0.2 ms and cached, so random rows (row shuffling) stay cheap and memory stays small.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from loomtrain.data.permute import WindowedPermutation
from loomtrain.data.shards import (IndexedShard, is_prepared_dir, megatron_prefixes, open_shard,
                                   read_manifest)
from loomtrain.data.tokenizer import Tokenizer
from loomtrain.errors import DataError

DOC_WINDOW = 1 << 12
_DOC_TAG = 0x444F43  # keeps the document order's stream apart from the row shuffle's
_CACHED_WINDOWS = 32  # ~100 KB each


def is_token_source(path: str) -> bool:
    """A prepared directory (manifest.json) or a Megatron `.bin`/`.idx` dataset."""
    return path not in ("embedded", "synthetic") and (is_prepared_dir(path) or megatron_prefixes(path) is not None)


class TokenDataset:
    """The shards of one source in order; `doc_spans` finds any documents' token ranges."""

    def __init__(self, name: str, shards: list[IndexedShard]):
        self.name, self.shards = name, shards
        self.doc_base = np.concatenate(([0], np.cumsum([s.num_documents for s in shards]))).astype(np.int64)
        self.num_documents = int(self.doc_base[-1])
        self.token_base = np.concatenate(([0], np.cumsum([s.num_tokens for s in shards]))).astype(np.int64)
        self.num_tokens = int(self.token_base[-1])

    def token_offset(self, g: int) -> int:
        """Where global document g begins in the concatenated shards (g = num_documents: the end)."""
        if g >= self.num_documents:
            return self.num_tokens
        s = int(np.searchsorted(self.doc_base, g, side="right")) - 1
        lo = g - int(self.doc_base[s])
        return int(self.token_base[s]) + int(self.shards[s].starts_of(np.array([lo]))[0])

    def token_offsets(self, docs: np.ndarray) -> np.ndarray:
        """`token_offset` of many documents at once (start-up: read without mapping the index)."""
        docs = np.asarray(docs, dtype=np.int64)
        out = np.full(docs.shape, self.num_tokens, dtype=np.int64)
        inside = docs < self.num_documents
        shard_of = np.searchsorted(self.doc_base, docs, side="right") - 1
        for s in np.unique(shard_of[inside]):
            sel = inside & (shard_of == s)
            out[sel] = self.token_base[s] + self.shards[int(s)].starts_of(docs[sel] - self.doc_base[s])
        return out

    def doc_spans(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard index, start offset in that shard, length) of global documents [g0, g1)."""
        sids, starts, lens = [], [], []
        s = int(np.searchsorted(self.doc_base, g0, side="right")) - 1
        while g0 < g1:
            base = int(self.doc_base[s])
            lo, hi = g0 - base, min(g1, int(self.doc_base[s + 1])) - base
            bounds = self.shards[s].doc_starts(lo, hi)
            starts.append(bounds[:-1])
            lens.append(np.diff(bounds))
            sids.append(np.full(hi - lo, s, dtype=np.int64))
            g0, s = base + hi, s + 1
        return np.concatenate(sids), np.concatenate(starts), np.concatenate(lens)


def _check_tokenizer(path: str, recorded: dict, tokenizer: Tokenizer) -> None:
    mine = tokenizer.fingerprint()
    if recorded.get("hash") != mine["hash"] or recorded.get("vocab_size") != mine["vocab_size"]:
        raise DataError(
            f"data.source {path} was prepared with tokenizer '{recorded.get('name')}' (vocab "
            f"{recorded.get('vocab_size')}, hash {recorded.get('hash')}) but data.tokenizer is '{mine['name']}' "
            f"(vocab {mine['vocab_size']}, hash {mine['hash']}); set data.tokenizer to the one used by "
            "`loomtrain data prepare`, or prepare the data again")


def open_dataset(path: str, tokenizer: Tokenizer) -> TokenDataset:
    """Open a prepared directory (checked against its manifest and the tokenizer) or a Megatron
    dataset (checked for consistent sizes; it records no tokenizer)."""
    if is_prepared_dir(path):
        manifest = read_manifest(path)
        _check_tokenizer(path, manifest["tokenizer"], tokenizer)
        shards = []
        for entry in manifest["shards"]:
            shard = open_shard(os.path.join(path, entry["name"]))
            seen = {"documents": shard.num_documents, "tokens": shard.num_tokens, "dtype": shard.dtype.name,
                    "bin_bytes": os.path.getsize(shard.prefix + ".bin"),
                    "idx_bytes": os.path.getsize(shard.prefix + ".idx")}
            wanted = {**{k: entry.get(k) for k in seen}, "dtype": manifest["dtype"]}
            for key, value in seen.items():
                if value != wanted[key]:
                    raise DataError(f"data.source: shard {shard.prefix} has {key}={value} but manifest.json says "
                                    f"{wanted[key]}: the directory does not match its manifest (prepare it again)")
            shards.append(shard)
        if not shards:
            raise DataError(f"data.source: {path} holds no documents (its manifest lists no shards)")
        return TokenDataset(path, shards)
    prefixes = megatron_prefixes(path)
    if not prefixes:
        raise DataError(f"data.source: {path} is neither a prepared directory (manifest.json) nor a Megatron "
                        ".bin/.idx dataset")
    return TokenDataset(path, [open_shard(p) for p in prefixes])


class _InOrder:
    """Documents in storage order, in the same windows a shuffled order uses."""

    def __init__(self, n: int, window: int):
        self.n, self.window = n, window
        self.num_windows = -(-n // window)

    def window_at(self, j: int) -> int:
        return j

    def window_order(self) -> np.ndarray:
        return np.arange(self.num_windows, dtype=np.int64)

    def window_size(self, w: int) -> int:
        return min(self.window, self.n - w * self.window)

    def inner(self, w: int) -> None:
        return None


class PreparedCorpus:
    """Rows of S+1 tokens over the document stream of one `TokenDataset` (see the module doc)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, vocab_size: int, *, seed: int = 0,
                 shuffle_documents: bool = False, window: int = DOC_WINDOW):
        self.dataset, self.seq_len, self.vocab_size = dataset, seq_len, int(vocab_size)
        D = dataset.num_documents
        self.window = window
        self.order = (WindowedPermutation(D, (seed, _DOC_TAG), window) if shuffle_documents
                      else _InOrder(D, window))
        self.num_documents, self.num_tokens = D, dataset.num_tokens
        # Token totals of the windows (physical order: window w = documents [w*window, ...)), then
        # cumulated in stream order.
        bounds = np.minimum(np.arange(self.order.num_windows + 1, dtype=np.int64) * window, D)
        totals = np.diff(dataset.token_offsets(bounds))[self.order.window_order()]
        self._vcum = np.concatenate(([0], np.cumsum(totals))).astype(np.int64)
        self._tables: OrderedDict[int, tuple] = OrderedDict()
        self.num_samples = (self.num_tokens - 1) // seq_len
        if self.num_samples <= 0:
            raise DataError(f"data.source {dataset.name} has {self.num_tokens} tokens, fewer than data.seq_len+1 = "
                            f"{seq_len + 1}; add data or lower data.seq_len")

    def _table(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(shard ids, starts, lengths, cumulative lengths) of physical window w in stream order."""
        table = self._tables.get(w)
        if table is None:
            first = w * self.window
            sids, starts, lens = self.dataset.doc_spans(first, first + self.order.window_size(w))
            perm = self.order.inner(w)
            if perm is not None:
                sids, starts, lens = sids[perm], starts[perm], lens[perm]
            table = (sids, starts, lens, np.concatenate(([0], np.cumsum(lens))))
            self._tables[w] = table
            while len(self._tables) > _CACHED_WINDOWS:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(w)
        return table

    def _checked(self, tokens: np.ndarray, what: str) -> np.ndarray:
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(
                f"data.source {self.dataset.name}: {what} holds token id {int(tokens.max())}, beyond the vocabulary "
                f"({self.vocab_size}) of data.tokenizer; set data.tokenizer to the tokenizer the data was made with")
        return tokens

    def read(self, a: int, n: int) -> tuple[np.ndarray, list[int]]:
        """Stream tokens [a, a + n) and the offsets (within them, > 0) where documents begin."""
        pieces, starts, pos = [], [], 0
        j = int(np.searchsorted(self._vcum, a, side="right")) - 1
        off = a - int(self._vcum[j])
        while pos < n:
            sids, dstarts, lens, cum = self._table(self.order.window_at(j))
            k = int(np.searchsorted(cum, off, side="right")) - 1
            inside = off - int(cum[k])
            while k < lens.size and pos < n:
                if inside == 0 and pos > 0:
                    starts.append(pos)
                take = min(int(lens[k]) - inside, n - pos)
                begin = int(dstarts[k]) + inside
                pieces.append(self.dataset.shards[int(sids[k])].tokens(begin, take))
                pos, inside, k = pos + take, 0, k + 1
            j, off = j + 1, 0
        return np.concatenate(pieces), starts

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (S+1) of row i and the row-relative document starts within [1, S]."""
        tokens, starts = self.read(i * self.seq_len, self.seq_len + 1)
        return self._checked(tokens, f"row {i}"), np.asarray(starts, dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        """Document i of the stream (ending with its EOS), cut to S+1 tokens."""
        v = i % self.num_documents
        j, k = divmod(v, self.window)
        sids, starts, lens, _ = self._table(self.order.window_at(j))
        begin = int(starts[k])
        shard = self.dataset.shards[int(sids[k])]
        return self._checked(shard.tokens(begin, min(int(lens[k]), self.seq_len + 1)),
                             f"document {v}")
