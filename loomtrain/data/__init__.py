"""Training data: sources (embedded corpus, text, JSONL, Parquet, synthetic lengths), the
tokenizer, and the loader that packs documents into rows with per-document positions. The
loader's position is one global sample count, so it survives any change of layout.

May import: `loomtrain.config`, `loomtrain.errors`. Knows nothing of models or parallelism.
"""
