"""The tensor-parallel plan read exactly (parallel/tp_plan.py): every style string of the matrix
families' plans has its own meaning, a near-miss string is never taken for a supported one, and a
plan loomtrain cannot apply is refused by preflight before launch, in one line naming the entry,
the style, what works and the families tested. (Whether each meaning computes what one process
computes is the family matrix's job: tests/test_family_matrix.py.)"""
import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from transformers import CONFIG_MAPPING

from families import FAMILIES
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.parallel.tensor import parallel_style
from loomtrain.parallel.tensor_styles import ReplicatedGradSum
from loomtrain.parallel.tp_plan import (EMBEDDING_STYLES, LAYER_STYLES, TESTED_FAMILIES, block_entries, check_plan,
                                        model_plan)
from loomtrain.runtime.preflight import preflight


def test_glm4_and_phi3_entries_keep_their_own_meaning():
    glm4 = {e.path: e.meaning for e in check_plan(CONFIG_MAPPING["glm4"]())}
    assert glm4["mlp.gate_up_proj"] == "colwise_gather_output"  # a plain colwise would split the gate
    assert glm4["mlp.down_proj"] == "rowwise_split_input" and glm4["self_attn.q_proj"] == "colwise"
    phi3 = {e.path: e.meaning for e in check_plan(CONFIG_MAPPING["phi3"]())}
    assert phi3 == {"self_attn.qkv_proj": "colwise_gather_output", "self_attn.o_proj": "rowwise_split_input",
                    "mlp.gate_up_proj": "colwise_gather_output", "mlp.down_proj": "rowwise_split_input"}
    qwen3 = {e.path: e.meaning for e in check_plan(CONFIG_MAPPING["qwen3"]())}
    assert qwen3["self_attn.q_norm"] == qwen3["self_attn.k_norm"] == "replicated_with_grad_allreduce"


def test_every_style_of_the_matrix_families_is_known_exactly():
    for family in FAMILIES:
        for style in model_plan(CONFIG_MAPPING[family]()).values():
            assert style in LAYER_STYLES or style in EMBEDDING_STYLES, (family, style)


@pytest.mark.parametrize("style", ["colwise_gather", "colwise_gather_output_x", "rowwise_split", "colwise_foo",
                                   "packed_colwise", "packed_rowwise", "mla_kv_a_proj", "local_params",
                                   "moe_tp_experts", "replicate", "all_reduce", "sequence_parallel"])
def test_near_misses_and_unsupported_styles_are_refused(style):
    with pytest.raises(ConfigError) as err:
        block_entries({"layers.*.mlp.gate_up_proj": style}, "toy")
    message = str(err.value)
    assert "\n" not in message and "'layers.*.mlp.gate_up_proj'" in message and repr(style) in message
    assert "colwise_gather_output" in message and ", ".join(TESTED_FAMILIES) in message


def test_entries_outside_blocks_and_wildcards_inside_them_are_refused():
    assert block_entries({"embed_in": "embedding_rowwise", "layers.*.attention.dense": "rowwise"}, "gpt_neox")
    for plan in ({"norm": "colwise"}, {"layers.*.mlp.experts.*.gate_proj": "colwise"}):
        with pytest.raises(ConfigError):
            block_entries(plan, "toy")


def test_every_transformers_plan_is_read_or_refused_in_one_line():
    for model_type, cls in CONFIG_MAPPING.items():
        try:
            config = cls()
        except Exception:  # noqa: BLE001 - some config classes need arguments; not ours to test
            continue
        try:
            check_plan(config)
        except ConfigError as exc:
            assert "\n" not in str(exc) and model_type in str(exc)


def test_each_meaning_is_the_parallel_style_it_names():
    gather = parallel_style("colwise_gather_output", conv1d=False, seq=Replicate(), tp=2)
    assert isinstance(gather, ColwiseParallel) and gather.output_layouts == (Replicate(),)
    split = parallel_style("rowwise_split_input", conv1d=False, seq=Shard(1), tp=2)
    assert isinstance(split, RowwiseParallel) and split.input_layouts == (Replicate(),)
    assert split.output_layouts == (Shard(1),)
    plain = parallel_style("colwise", conv1d=False, seq=Replicate(), tp=2)
    assert isinstance(plain, ColwiseParallel) and plain.output_layouts == (Shard(-1),)
    assert isinstance(parallel_style("replicated_with_grad_allreduce", conv1d=False, seq=Replicate(), tp=2),
                      ReplicatedGradSum)


def test_preflight_refuses_an_unsupported_plan_before_launch(tmp_path):
    plan = ("{layers.*.self_attn.q_proj: colwise, layers.*.self_attn.k_proj: colwise, layers.*.self_attn.v_proj: "
            "colwise, layers.*.self_attn.o_proj: rowwise, layers.*.mlp.gate_proj: packed_colwise, "
            "layers.*.mlp.up_proj: colwise, layers.*.mlp.down_proj: rowwise}")
    cfg = load_config(None, ["data.source=synthetic", "parallel.tp=2", f"train.output_dir={tmp_path}",
                             f"model.config.base_model_tp_plan={plan}"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 2)
    message = str(err.value)
    assert "\n" not in message and "layers.*.mlp.gate_proj" in message and "'packed_colwise'" in message
    assert "parallel.tp=1" in message


def test_preflight_refuses_a_plan_entry_naming_no_module(tmp_path):
    plan = "{layers.*.self_attn.q_proj: colwise, layers.*.self_attn.sinks: colwise}"
    cfg = load_config(None, ["data.source=synthetic", "parallel.tp=2", f"train.output_dir={tmp_path}",
                             f"model.config.base_model_tp_plan={plan}"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 2)
    assert "layers.*.self_attn.sinks" in str(err.value) and "names no module" in str(err.value)
