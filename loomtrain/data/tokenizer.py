"""Tokenizers: a dependency-free byte-level fallback and a thin wrapper around a local HF tokenizer.

The data layer needs exactly three things from a tokenizer: the vocabulary size (to size the
embedding and the synthetic bigram model), the id that closes a document (EOS, appended to every
document when packing), and a fast way to turn many texts into id arrays. Both implementations
expose only that (plus `decode`, for humans), so the loader never touches
`transformers` directly and the demo runs with no tokenizer files at all.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from transformers import AutoTokenizer

from loomtrain.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer relies on. Ids are returned as int32 arrays (one per text)."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def fingerprint(self) -> dict: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = EOS, 257 = PAD (vocab 258).

    Why: the embedded demo must run offline with nothing but the standard library, and a byte
    vocabulary is tiny (a 258-row embedding), lossless and needs no training. Encoding is a
    single `np.frombuffer` per text, so tokenizing tens of MB takes well under a second.
    """

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def fingerprint(self) -> dict:
        """What prepared shards record to recognise the tokenizer that made them."""
        return {"name": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "hash": hashlib.sha256(b"loomtrain ByteTokenizer v1").hexdigest()[:16]}

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS/PAD (and anything else >= 256) are dropped, bad UTF-8 replaced."""
        arr = np.asarray(ids, dtype=np.int64).ravel()
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258, eos_id=256, pad_id=257)"


class HFTokenizer:
    """A local `transformers` tokenizer directory, used for encoding only.

    Why the backend call: `tokenizer(texts)` builds a BatchEncoding with attention masks and
    warns about sequences longer than `model_max_length` (irrelevant here: documents are packed,
    not truncated). The Rust `encode_batch_fast` of the fast tokenizer is parallel and skips
    offsets, which makes whole-corpus tokenization at start-up affordable on every rank.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise DataError(f"data.tokenizer: not a directory: {path}")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any load failure is a user-facing data problem
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"data.tokenizer: cannot load a tokenizer from {path} ({detail[:200]})") from None
        self._tok = tok
        self.vocab_size = int(len(tok))
        eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)
        if eos is None:
            raise DataError(
                f"data.tokenizer: {path} defines neither an eos_token nor a sep_token; add an "
                "eos_token to its tokenizer_config.json (documents are separated by it)")
        self.eos_id = int(eos)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        backend = getattr(tok, "backend_tokenizer", None)
        self._backend = None
        if backend is not None and hasattr(backend, "encode_batch"):
            # Truncation/padding configured in tokenizer.json would cut or pad documents; packing
            # needs every token, so switch both off on our own copy.
            if getattr(backend, "truncation", None) is not None:
                backend.no_truncation()
            if getattr(backend, "padding", None) is not None:
                backend.no_padding()
            self._backend = backend

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        texts = list(texts)
        if not texts:
            return []
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
            encs = encode(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int32) for e in encs]
        ids = self._tok(texts, add_special_tokens=False)["input_ids"]  # slow (Python) tokenizers
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def fingerprint(self) -> dict:
        """Name, sizes and a hash of the full tokenizer definition (vocabulary, merges,
        normalisation, pre-tokenisation, special tokens): two directories that encode alike
        hash alike wherever they are, and a changed merge or normaliser changes the hash."""
        if self._backend is not None and hasattr(self._backend, "to_str"):
            definition = self._backend.to_str()
        else:
            definition = json.dumps(sorted(self._tok.get_vocab().items()))
        digest = hashlib.sha256(f"{type(self._tok).__name__}\n{self.eos_id}\n{definition}".encode()).hexdigest()
        return {"name": os.path.basename(os.path.normpath(self.path)), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "hash": digest[:16]}

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(path: str | None) -> Tokenizer:
    """`None` -> ByteTokenizer; a local HF tokenizer directory -> HFTokenizer (never downloads)."""
    if path is None:
        return ByteTokenizer()
    return HFTokenizer(str(path))
