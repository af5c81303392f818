"""Packing documents into fixed-length samples, and a loader whose position is global.

The central idea: the training data is ONE infinite, deterministic sequence of samples, numbered
g = 0, 1, 2, ... and fixed by (seed, data config) alone. Step k consumes samples
[k*B, (k+1)*B) (B = data.global_batch_size) no matter how many data-parallel ranks share them;
each rank simply takes its contiguous slice. The loader's whole state is therefore one integer
(`samples_consumed`), which makes resume exact across a change of dp size: a run checkpointed at
dp=2 and resumed at dp=4 sees exactly the samples an uninterrupted dp=1 run would have seen.

Text sources are tokenized once at start (every rank does it; cheap at demo scale), each document
closed with EOS, concatenated into one stream, and cut into rows of S+1 tokens overlapping by one
(input = first S, labels = last S). Inside a row, position ids restart at every document start and
the label that would ask a document's EOS to predict the next document's first token is masked,
so packing never teaches cross-document prediction; `doc_lengths` records the document segments
of each row so attention FLOPs (sum of L^2, not S^2) can be counted exactly.

Synthetic samples are generated from `np.random.default_rng([seed, g])`, so any sample can be
produced on any rank in O(S) without generating its predecessors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loomtrain.config import DataConfig
from loomtrain.errors import ConfigError, DataError
from loomtrain.data.mix import MixCorpus
from loomtrain.data.permute import WindowedPermutation
from loomtrain.data.prepared import PreparedCorpus, is_token_source, open_dataset
from loomtrain.data.sources import is_text_source, load_lengths_file, read_documents
from loomtrain.data.tokenizer import Tokenizer, build_tokenizer

IGNORE_INDEX = -100
# Log-normal fitted to real pre-training documents (Wikipedia token lengths: median 347, mean 1014):
# median = exp(mu), mean = exp(mu + sigma^2 / 2).
LONGTAIL_MEDIAN = 347.0
LONGTAIL_MEAN = 1014.0
_LT_MU = math.log(LONGTAIL_MEDIAN)
_LT_SIGMA = math.sqrt(2.0 * math.log(LONGTAIL_MEAN / LONGTAIL_MEDIAN))
# Synthetic bigram model: every token has a few successors with these probabilities (entropy
# ~1.0 nat, so a model can go from ln(V) to about 1.0: a visibly falling loss curve).
_BIGRAM_PROBS = np.array([0.6, 0.25, 0.1, 0.05])
_BIGRAM_TAG = (0x6C6F6F6D, 0x62696772, 0x616D)  # keeps the table's RNG stream apart from samples'
_ENCODE_CHUNK = 512  # documents per encode_batch call


@dataclass
class MicroBatch:
    """Rows of one micro-step on one rank. `sample_ids` are global sample numbers."""

    input_ids: torch.Tensor  # [mb, S] int64
    labels: torch.Tensor  # [mb, S] int64, IGNORE_INDEX where no loss is taken
    position_ids: torch.Tensor  # [mb, S] int64, restarting at 0 at every document start
    doc_lengths: list[list[int]]  # per row: document segment lengths, each list sums to S
    sample_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens that carry a loss (labels != -100): the right normaliser for the loss sum."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MicroBatch":
        return MicroBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.position_ids.to(device, non_blocking=non_blocking),
            self.doc_lengths, self.sample_ids)


def pack_row(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    """(input, labels, position_ids, doc_lengths) of one row of `seq_len + 1` tokens.

    `starts` are the row-relative indices (within [1, seq_len]) where a new document begins.
    Labels are masked at t = start - 1 (the previous document's last token must not predict the
    next document's first one); positions restart at 0 at each start and at the row start.
    """
    S = seq_len
    starts = np.asarray(starts, dtype=np.int64)
    x = tokens[:S].astype(np.int64)
    y = tokens[1:S + 1].astype(np.int64)  # astype copies, so masking never touches the corpus
    y[starts - 1] = IGNORE_INDEX
    bounds = np.concatenate(([0], starts[starts < S], [S]))
    lengths = np.diff(bounds)
    pos = np.arange(S, dtype=np.int64) - np.repeat(bounds[:-1], lengths)
    return x, y, pos, lengths.tolist()


class TextCorpus:
    """A text source tokenized into one stream; row i = stream[i*S : i*S + S + 1]."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        self.seq_len = cfg.seq_len
        docs = read_documents(cfg)
        eos = int(tokenizer.eos_id)
        pieces: list[np.ndarray] = []
        for i in range(0, len(docs), _ENCODE_CHUNK):
            pieces.extend(tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK]))
        del docs
        raw_lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        dtype = np.int32 if tokenizer.vocab_size < 2**31 else np.int64
        body = np.concatenate(pieces).astype(dtype, copy=False) if raw_lens.sum() else np.empty(0, dtype)
        del pieces
        # EOS after each document: insert at the cumulative end offsets of the raw documents.
        self.stream = np.insert(body, np.cumsum(raw_lens), eos)
        doc_lens = raw_lens + 1
        self.doc_starts = np.concatenate(([0], np.cumsum(doc_lens)[:-1])).astype(np.int64)
        self.num_documents = len(doc_lens)
        self.num_tokens = int(self.stream.size)
        self.num_samples = (self.num_tokens - 1) // self.seq_len
        if self.num_samples == 0:
            raise DataError(
                f"data.source {cfg.source} has {self.num_tokens} tokens, fewer than data.seq_len+1 = "
                f"{self.seq_len + 1}; add data or lower data.seq_len")

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (ending with its EOS), cut to S+1: one sequence, unpacked."""
        i %= self.num_documents
        start = int(self.doc_starts[i])
        end = int(self.doc_starts[i + 1]) if i + 1 < self.num_documents else self.num_tokens
        return self.stream[start:min(end, start + self.seq_len + 1)]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (S+1) of row i and the row-relative document starts within [1, S]."""
        S = self.seq_len
        a = i * S
        lo, hi = np.searchsorted(self.doc_starts, [a + 1, a + S + 1])
        return self.stream[a:a + S + 1], self.doc_starts[lo:hi] - a


class SyntheticCorpus:
    """Infinite generated samples over a learnable random bigram model.

    The bigram model is implicit, so that generation is vectorised: a hidden state walks the
    vocabulary by one of K fixed offsets per token (state' = state + delta_k mod V, k drawn with
    probabilities `_BIGRAM_PROBS`), and the emitted token is perm[state] for a per-seed random
    permutation. Hence every token has exactly K successors (a sparse transition table that looks
    random), and a whole document is one cumulative sum instead of a per-token loop.
    """

    def __init__(self, cfg: DataConfig, vocab_size: int, seed: int):
        self.seq_len = cfg.seq_len
        self.seed = seed
        V = int(vocab_size)
        if V < 2:
            raise DataError(f"data.source=synthetic needs a vocabulary of at least 2 tokens, got {V}")
        self.vocab_size = V
        rng = np.random.default_rng([seed, *_BIGRAM_TAG])
        self.perm = rng.permutation(V).astype(np.int64)
        k = min(len(_BIGRAM_PROBS), V - 1)
        self.deltas = rng.choice(np.arange(1, V), size=k, replace=False).astype(np.int64)
        self.probs = _BIGRAM_PROBS[:k] / _BIGRAM_PROBS[:k].sum()
        self.lengths_mode = cfg.lengths
        self._file_lengths = load_lengths_file(cfg.lengths[5:]) if cfg.lengths.startswith("file:") else None

    def successors(self, token: int) -> np.ndarray:
        """The K tokens that may follow `token` (for tests and sanity checks)."""
        inv = np.empty_like(self.perm)
        inv[self.perm] = np.arange(self.vocab_size)
        return self.perm[(inv[token] + self.deltas) % self.vocab_size]

    def _doc_lengths(self, rng: np.random.Generator, total: int) -> np.ndarray:
        """Document lengths filling `total` = S+1 tokens greedily; the last one truncated."""
        if self.lengths_mode == "fixed":
            return np.array([total], dtype=np.int64)
        chunks, filled, batch = [], 0, 8 + total // 256
        while filled < total:
            if self._file_lengths is not None:
                draw = self._file_lengths[rng.integers(0, self._file_lengths.size, size=batch)]
            else:
                draw = np.ceil(rng.lognormal(_LT_MU, _LT_SIGMA, size=batch)).astype(np.int64)
            draw = np.clip(draw, 1, total)
            chunks.append(draw)
            filled += int(draw.sum())
        lens = np.concatenate(chunks)
        ends = np.cumsum(lens)
        n = int(np.searchsorted(ends, total)) + 1  # first document whose end reaches `total`
        lens = lens[:n].copy()
        lens[-1] -= int(ends[n - 1]) - total
        return lens

    def document(self, g: int) -> np.ndarray:
        """Sequence g on its own (heterogeneous scheduling): one document of a drawn length,
        at least 2 and at most S+1 tokens (S inputs with their next-token labels)."""
        rng = np.random.default_rng([self.seed, g, 1])
        total = int(self._doc_lengths(rng, self.seq_len + 1)[0]) if self.lengths_mode != "fixed" else self.seq_len + 1
        return self._walk(rng, np.array([max(2, total)], dtype=np.int64), max(2, total))

    def _walk(self, rng: np.random.Generator, lens: np.ndarray, total: int) -> np.ndarray:
        V = self.vocab_size
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        first = rng.integers(0, V, size=lens.size)
        step = self.deltas[rng.choice(self.deltas.size, size=total, p=self.probs)]
        step[starts] = 0
        walk = np.cumsum(step)
        state = np.repeat(first - walk[starts], lens) + walk
        return self.perm[state % V]

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        S = self.seq_len
        rng = np.random.default_rng([self.seed, g])
        lens = self._doc_lengths(rng, S + 1)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        return self._walk(rng, lens, S + 1), starts[1:]


class DataLoader:
    """This rank's micro-batches, step after step, from the global sample sequence.

    Step = global samples [pos, pos + B); rank r takes [pos + r*B/dp, pos + (r+1)*B/dp) and cuts
    it into micro-batches of `data.micro_batch_size`, in order. The state is `pos` only (not per
    rank), so `load_state_dict` works at any dp size.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data loader: dp_rank={dp_rank} must be within [0, dp_size={dp_size})")
        B, mb = cfg.global_batch_size, cfg.micro_batch_size
        if B % (dp_size * mb):
            raise ConfigError(
                f"data.global_batch_size={B} is not divisible by dp_size*data.micro_batch_size = "
                f"{dp_size}*{mb} = {dp_size * mb}; make it a multiple of {dp_size * mb}")
        if seed < 0:
            raise ConfigError(f"train.seed={seed}: must not be negative")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.seq_len = cfg.seq_len
        self._pos = 0
        self._perms: dict[int, WindowedPermutation] = {}
        if cfg.mix:
            self.corpus: TextCorpus | SyntheticCorpus | PreparedCorpus | MixCorpus = MixCorpus(
                [self._prepared(path) for path in cfg.mix], list(cfg.mix.values()), seed=seed, shuffle=cfg.shuffle)
        elif is_token_source(cfg.source):
            self.corpus = self._prepared(cfg.source)
        elif is_text_source(cfg):
            self.corpus = TextCorpus(cfg, self.tokenizer)
        else:
            self.corpus = SyntheticCorpus(cfg, self.tokenizer.vocab_size, seed)

    def _prepared(self, path: str) -> PreparedCorpus:
        return PreparedCorpus(open_dataset(str(path), self.tokenizer), self.cfg.seq_len, self.tokenizer.vocab_size,
                              seed=self.seed, shuffle_documents=self.cfg.shuffle_documents)

    # -- global sample sequence ------------------------------------------------------------
    @property
    def num_samples_per_epoch(self) -> int | None:
        return getattr(self.corpus, "num_samples", None)

    def sample_location(self, g: int) -> tuple[int, int]:
        """(epoch, row) of global sample g; synthetic samples are their own row in epoch 0."""
        n = self.num_samples_per_epoch
        if n is None:
            return 0, g
        epoch, i = divmod(g, n)
        if not self.cfg.shuffle:
            return epoch, i
        perm = self._perms.get(epoch)
        if perm is None:  # = rng([seed, epoch]).permutation(n) below 2**20 rows; constant memory above
            perm = WindowedPermutation(n, (self.seed, epoch))
            if len(self._perms) >= 2:  # a step spans at most two epochs at a time
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return epoch, perm[i]

    def samples(self, sample_ids: list[int]) -> MicroBatch:
        """The rows of any global samples (independent of the loader's position)."""
        rows = [pack_row(*self.corpus.row(self.sample_location(int(g))[1]), self.seq_len) for g in sample_ids]
        stack = lambda k: torch.from_numpy(np.stack([r[k] for r in rows]))  # noqa: E731
        return MicroBatch(stack(0), stack(1), stack(2), [r[3] for r in rows], [int(g) for g in sample_ids])

    # -- stepping ----------------------------------------------------------------------------
    def step_sample_ids(self, pos: int | None = None) -> list[int]:
        """Global sample numbers this rank takes in the step starting at `pos` (default: now)."""
        pos = self._pos if pos is None else pos
        local = self.cfg.global_batch_size // self.dp_size
        start = pos + self.dp_rank * local
        return list(range(start, start + local))

    def next_step(self) -> list[MicroBatch]:
        ids = self.step_sample_ids()
        mb = self.cfg.micro_batch_size
        out = [self.samples(ids[i:i + mb]) for i in range(0, len(ids), mb)]
        self._pos += self.cfg.global_batch_size
        return out

    def next_sequences(self) -> tuple[list[int], list[np.ndarray]]:
        """The whole global batch of the next step as separate documents (ids, token arrays):
        the heterogeneous scheduler plans over every sequence's length on every rank, so each
        rank reads them all (token ids only; cheap next to the step)."""
        ids = list(range(self._pos, self._pos + self.cfg.global_batch_size))
        docs = [self.corpus.document(g) for g in ids]
        self._pos += self.cfg.global_batch_size
        return ids, docs

    @property
    def samples_consumed(self) -> int:
        return self._pos

    @property
    def tokens_consumed(self) -> int:
        return self._pos * self.seq_len

    @property
    def epoch(self) -> int:
        n = self.num_samples_per_epoch
        return 0 if n is None else self._pos // n

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Global (not per-rank) and JSON-serialisable; the extra keys guard against resuming
        onto a different sample sequence."""
        return {"samples_consumed": self._pos, "tokens_consumed": self.tokens_consumed,
                "epoch": self.epoch, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": bool(self.cfg.shuffle), "source": self.cfg.source,
                **({"mix": {str(k): v for k, v in self.cfg.mix.items()}} if self.cfg.mix else {}),
                "num_samples_per_epoch": self.num_samples_per_epoch}

    def load_state_dict(self, sd: dict) -> None:
        pos = sd.get("samples_consumed") if isinstance(sd, dict) else None
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise DataError(f"data loader state: 'samples_consumed' must be a non-negative int, got {pos!r}")
        for key, mine in (("seq_len", self.seq_len), ("seed", self.seed), ("shuffle", bool(self.cfg.shuffle)),
                          ("num_samples_per_epoch", self.num_samples_per_epoch)):
            if key in sd and sd[key] != mine:
                raise DataError(
                    f"data loader state: the checkpoint was taken with {key}={sd[key]!r} but this run has "
                    f"{key}={mine!r}; the global sample sequence would differ (resume with the same data config)")
        self._pos = pos
