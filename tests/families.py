"""Tiny configs of many HF causal-LM families, and what each layout is expected to do with them.

One table drives the family matrix (`test_family_matrix.py`) and the README's family table (a
test checks the README against `EXPECTED`). Every config keeps the family's own quirks switched
on, because those are what a carved pipeline stage or a tensor-parallel plan can lose: Gemma's
embedding normaliser, soft-capping and sliding/full layer types, Granite's multipliers, Cohere's
logit scale, StarCoder2's biases, Falcon's tuple-returning blocks, OLMo-2's and Qwen3's q/k norms,
Phi-3's and GLM-4's fused projections. Four decoder layers each, so a pp2 stage owns two.

To add a family: put its tiny config in `FAMILIES` and its expected outcome per layout in
`EXPECTED` ("match", or "refused" for a refusal before launch, whose message the matrix checks).
"""
from __future__ import annotations

import os

import torch.distributed as dist

from harness import run_cases, run_worker, train_and_save

LAYOUTS = ("1proc", "zero3_dp2", "tp2", "pp2")

_GQA = ["model.config.hidden_size=64", "model.config.intermediate_size=96", "model.config.num_hidden_layers=4",
        "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]
_HD16 = ["model.config.head_dim=16"]

FAMILIES: dict[str, list[str]] = {
    "llama": ["model.architecture=llama", *_GQA],
    "mistral": ["model.architecture=mistral", *_GQA],
    "qwen2": ["model.architecture=qwen2", *_GQA],
    "qwen3": ["model.architecture=qwen3", *_GQA, *_HD16],
    # Gemma-2 soft-caps attention logits, which neither the packed kernel nor sdpa does: the default
    # attention (auto) must pick eager for it, which this entry checks by not naming one.
    "gemma2": ["model.architecture=gemma2", *_GQA, *_HD16,
               "model.config.sliding_window=8", "model.config.query_pre_attn_scalar=16"],
    "gemma3_text": ["model.architecture=gemma3_text", *_GQA, *_HD16, "model.config.sliding_window=8",
                    "model.config.query_pre_attn_scalar=16",
                    "model.config.layer_types=[sliding_attention,full_attention,sliding_attention,full_attention]"],
    "phi3": ["model.architecture=phi3", *_GQA],
    "olmo2": ["model.architecture=olmo2", *_GQA],
    "glm4": ["model.architecture=glm4", *_GQA, *_HD16],
    "gpt2": ["model.architecture=gpt2", "model.config.n_embd=64", "model.config.n_layer=4", "model.config.n_head=4",
             "model.config.n_positions=64", "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0",
             "model.config.attn_pdrop=0.0"],
    "gpt_neox": ["model.architecture=gpt_neox", "model.config.hidden_size=64", "model.config.intermediate_size=96",
                 "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4",
                 "model.config.hidden_dropout=0.0", "model.config.attention_dropout=0.0"],
    "granite": ["model.architecture=granite", *_GQA, "model.config.embedding_multiplier=3.0",
                "model.config.logits_scaling=4.0", "model.config.residual_multiplier=0.5",
                "model.config.attention_multiplier=0.2"],
    "starcoder2": ["model.architecture=starcoder2", *_GQA, "model.config.residual_dropout=0.0",
                   "model.config.embedding_dropout=0.0"],
    "cohere": ["model.architecture=cohere", *_GQA, "model.config.logit_scale=0.5"],
    "falcon": ["model.architecture=falcon", "model.config.hidden_size=64", "model.config.num_hidden_layers=4",
               "model.config.num_attention_heads=4", "model.config.hidden_dropout=0.0",
               "model.config.attention_dropout=0.0"],
    # StableLM and OPT reshape with the head counts their attention modules keep (`self.num_heads`),
    # which tensor parallelism must make local; neither has a tp plan (derived from names).
    "stablelm": ["model.architecture=stablelm", *_GQA],
    # OPT: learned positions with an offset and the final norm live in `model.decoder`, not the base
    # model; fc1/fc2 sit directly in the block, so tp runs without sequence parallelism.
    "opt": ["model.architecture=opt", "model.config.hidden_size=64", "model.config.ffn_dim=96",
            "model.config.num_hidden_layers=4", "model.config.num_attention_heads=4", "model.config.dropout=0.0",
            "model.config.word_embed_proj_dim=64", "model.config.max_position_embeddings=64",
            "parallel.sequence_parallel=false"],
    # HunYuan: per-head query/key norms beside column-parallel projections, with no tp plan for them.
    "hunyuan_v1_dense": ["model.architecture=hunyuan_v1_dense", *_GQA, *_HD16],
    # Bloom: ALiBi computed in its own attention code (auto must pick eager, its only path) and a
    # norm on the embeddings that stays on the first pipeline stage; its embeddings are tied. With
    # HF's initializer_range=0.02 the embedding norm keeps two steps' loss change under the
    # matrix's "the loss moved" bar (1e-4 relative), hence 0.1.
    "bloom": ["model.architecture=bloom", "model.config.hidden_size=64", "model.config.n_layer=4",
              "model.config.n_head=4", "model.config.hidden_dropout=0.0", "model.config.attention_dropout=0.0",
              "model.config.initializer_range=0.1"],
}

_ALL = {layout: "match" for layout in LAYOUTS}
EXPECTED: dict[str, dict[str, str]] = {family: dict(_ALL) for family in FAMILIES}
# Falcon's fused query_key_value has no tensor-parallel plan in transformers.
EXPECTED["falcon"]["tp2"] = "refused"
# Bloom's fused query_key_value likewise.
EXPECTED["bloom"]["tp2"] = "refused"

# pp2 x tp2 on 4 ranks: the families whose plans use more than colwise/rowwise.
PP_TP_FAMILIES = ("qwen3", "gemma3_text", "olmo2", "glm4", "phi3")

# Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8, an element whose gradient
# is rounding noise (~1e-9, its sign set by the order of a reduction) moves by a full +-lr, so the
# same run on another layout ends with parameters apart by 2*lr there. eps=1e-6 leaves real
# gradients' updates as they are and keeps such elements still.
# Two steps: the second step's loss is computed after the first update and the final parameters
# after the second (Adam with its moments), so parity covers forward, backward and the optimizer
# steps; a third step only repeated that, for half as much step time again.
STEPS = 2
BASE = ["data.source=synthetic", "data.lengths=longtail", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", f"train.max_steps={STEPS}", "train.progress=false", "train.tensorboard=false",
        "train.peak_tflops=1.0", "optim.lr=0.003", "optim.schedule=constant", "optim.eps=1e-6"]

LAYOUT_OVERRIDES = {
    "1proc": [],
    "zero3_dp2": ["parallel.zero=3"],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
    "pp2_dp2": ["parallel.pp=2", "parallel.zero=3"],
    "tp2_dp2": ["parallel.tp=2", "parallel.zero=3"],
}
# Per-head norms whose gradients are summed over tp, under FSDP as well (4-rank launch).
TP_DP_FAMILIES = ("qwen3", "gemma3_text")
# Tied-embedding variants trained at pp2 x dp2 in the 4-rank launch (pp2 alone: test_tied_pipeline).
TIED_FAMILIES = ("llama", "qwen3")
TIED = ["model.config.tie_word_embeddings=true"]


def family_case(family: str, layout: str = "1proc", *extra: str) -> list[str]:
    """The overrides of one (family, layout) run."""
    return FAMILIES[family] + BASE + LAYOUT_OVERRIDES[layout] + list(extra)


# ----------------------------------------------------------------------------- the README table

README_BEGIN = "<!-- family-matrix: generated from tests/families.py, checked by tests/test_family_matrix.py -->"
README_END = "<!-- family-matrix end -->"
_HEADERS = {"1proc": "1 process", "zero3_dp2": "ZeRO-3 dp2", "tp2": "tp2", "pp2": "pp2"}
_WORDS = {"match": "matches", "refused": "refused before launch"}


def readme_table() -> list[str]:
    """The README's family table: what the matrix checks, one row per family."""
    lines = ["| family | " + " | ".join(_HEADERS[layout] for layout in LAYOUTS) + " | pp2 x tp2 |",
             "|---" * (len(LAYOUTS) + 2) + "|"]
    for family in FAMILIES:
        cells = ["trains" if layout == "1proc" else _WORDS[EXPECTED[family][layout]] for layout in LAYOUTS]
        cells.append("matches" if family in PP_TP_FAMILIES else "")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- the launch

def run_matrix(nproc: int, cases: dict[str, list[str]], out_dir: str, timeout: int = 1200) -> None:
    """Run every case in one torchrun launch of `nproc` gloo ranks (this file is the worker).
    A case that raises is recorded in OUT_DIR/name.error and the launch goes on with the next."""
    run_cases(nproc, cases, out_dir, timeout=timeout, worker=os.path.basename(__file__))


def _run_case(name: str, overrides: list[str], out_dir: str) -> None:
    try:
        train_and_save(name, overrides, out_dir)
    except Exception as exc:  # noqa: BLE001 - recorded for the test to report, next case goes on
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"{name}.error"), "w", encoding="utf-8") as fh:
                fh.write(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    run_worker(_run_case)
