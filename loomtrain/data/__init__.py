"""Training data: sources (embedded corpus, text, JSONL, Parquet, synthetic lengths), the
tokenizer, and the loader that packs documents into rows with per-document positions. The
loader's position is one global sample count, so it survives any change of layout.

At scale, `prepare` (with `inputs`) tokenises once into token shards read on demand (`shards`:
Megatron's `.bin`/`.idx` plus a manifest), `prepared` packs them exactly as text is packed, `mix`
interleaves several by weight, and `permute` gives seeded orders whose memory does not grow with
the corpus.

May import: `loomtrain.config`, `loomtrain.errors`. Knows nothing of models or parallelism.
"""
