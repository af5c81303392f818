"""The family matrix: tiny configs of many HF causal-LM families (tests/families.py), each trained
for 2 steps under ZeRO-3 dp2, tp2 and pp2 and compared with one process, or refused before launch.

Every (family, layout) either matches one process (loss within 1e-5 relative at every step,
parameters within 1e-4) or is refused by preflight with a one-line message; nothing trains with
a silent mismatch. All 2-rank cases run in ONE torchrun launch (process start-up dominates).
"""
import math
import os

import pytest
from transformers import CONFIG_MAPPING

from families import (EXPECTED, FAMILIES, LAYOUTS, PP_TP_FAMILIES, README_BEGIN, README_END, STEPS, TIED,
                      TIED_FAMILIES, TP_DP_FAMILIES, family_case, readme_table, run_matrix)
from harness import LOSS_RTOL, PARAM_ATOL, ROOT, load_result, reference
from loomtrain.config import load_config
from loomtrain.errors import ConfigError
from loomtrain.models.build import build_hf_config
from loomtrain.models.flops import FlopModel, flop_model
from loomtrain.parallel.pipeline import split_costs
from loomtrain.parallel.tp_plan import TESTED_FAMILIES
from loomtrain.runtime.metrics import step_record
from loomtrain.runtime.preflight import preflight


def _hf_config(family: str):
    cfg = load_config(None, FAMILIES[family])
    return build_hf_config(cfg.model, vocab_size=258, seq_len=32, eos_id=256)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flops_counted_for_every_family(family):
    hf = _hf_config(family)
    fm = flop_model(hf)
    assert fm.known, f"{family}: {fm.reason}"
    assert fm.palm_flops_per_token(32) > 6 * (fm.total_params - fm.embedding_params) > 0


def test_flops_counted_with_eager_attention_when_sdpa_is_refused():
    hf = _hf_config("gemma2")
    hf._attn_implementation = "sdpa"  # Gemma-2 refuses to be built with sdpa
    fm = flop_model(hf)
    assert fm.known and fm.source == "meta" and fm.total_params > 0
    assert hf._attn_implementation == "sdpa"  # the caller's config is left alone


def test_uncountable_config_gives_unknown_mfu_not_a_refusal():
    hf = CONFIG_MAPPING["vit"](hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    fm = flop_model(hf)  # AutoModelForCausalLM has no model for this config
    assert not fm.known and "vit" in fm.reason
    assert math.isnan(fm.palm_step_flops(64, 32)) and math.isnan(fm.exact_step_flops([3, 5]))
    assert split_costs(hf, fm) == (1.0, 0.0, 0.0)  # a pipeline is split by blocks alone
    rec = step_record(step=1, loss=1.0, grad_norm=1.0, lr=1.0, tokens=64, step_time_s=0.1, flops_palm=None,
                      flops_exact=None, world_size=1, peak_flops_per_device=1e12, peak_mem_gb=0.0)
    assert rec["mfu"] is None and rec["tflops"] is None
    assert FlopModel.unknown("x").known is False


# ----------------------------------------------------------------------------- the matrix

def _expected(layout: str, outcome: str) -> list[str]:
    return [f for f in sorted(FAMILIES) if EXPECTED[f][layout] == outcome]


def _assert_matches(got: tuple, ref: tuple, what: str) -> None:
    """harness.assert_parity without its "loss fell" guard: two steps of the post-norm families
    (Gemma, OLMo-2, GLM-4) need not lower the loss; test_one_process_trains checks it moved."""
    (losses, params), (ref_losses, ref_params) = got, ref
    assert len(losses) == len(ref_losses), f"{what}: {len(losses)} steps vs {len(ref_losses)}"
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{what}: step {step} loss {a!r} vs one process {b!r}"
    assert set(params) == set(ref_params), f"{what}: parameter names differ: {set(params) ^ set(ref_params)}"
    for name, ref_t in ref_params.items():
        diff = (params[name].float() - ref_t.float()).abs().max().item()
        assert diff <= PARAM_ATOL, f"{what}: parameter {name} differs by {diff:.3g} (> {PARAM_ATOL})"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("family_matrix"))


@pytest.fixture(scope="module")
def refs(out):
    return {f: reference(family_case(f), os.path.join(out, f"ref_{f}")) for f in sorted(FAMILIES)}


@pytest.fixture(scope="module")
def two_ranks(out):
    """Every (family, 2-rank layout) expected to match, in one torchrun launch."""
    cases = {f"{f}__{layout}": family_case(f, layout) for layout in LAYOUTS[1:] for f in _expected(layout, "match")}
    path = os.path.join(out, "two")
    run_matrix(2, cases, path)
    return path


@pytest.fixture(scope="module")
def four_ranks(out):
    """pp2 x tp2 of the families with more than colwise/rowwise in their plans, tied embeddings
    at pp2 x dp2, and per-head norms at tp2 x ZeRO-3 dp2, in one 4-rank launch."""
    cases = {f"{f}__pp2_tp2": family_case(f, "pp2_tp2") for f in PP_TP_FAMILIES}
    cases.update({f"{f}_tied__pp2_dp2": family_case(f, "pp2_dp2", *TIED) for f in TIED_FAMILIES})
    cases.update({f"{f}__tp2_dp2": family_case(f, "tp2_dp2") for f in TP_DP_FAMILIES})
    path = os.path.join(out, "four")
    run_matrix(4, cases, path)
    return path


def _failures(path: str, names: dict[str, tuple]) -> list[str]:
    """Run name -> reference; one line per run that raised or does not match."""
    failures = []
    for name, ref in names.items():
        error = os.path.join(path, f"{name}.error")
        if os.path.exists(error):
            with open(error, encoding="utf-8") as fh:
                failures.append(f"{name}: raised {fh.read().splitlines()[0]}")
            continue
        try:
            _assert_matches(load_result(path, name), ref, name)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    return failures


def test_pp2_tp2_matches_one_process(four_ranks, refs):
    failures = _failures(four_ranks, {f"{f}__pp2_tp2": refs[f] for f in PP_TP_FAMILIES})
    assert not failures, "\n".join(failures)


def test_per_head_norms_at_tp2_dp2_match_one_process(four_ranks, refs):
    failures = _failures(four_ranks, {f"{f}__tp2_dp2": refs[f] for f in TP_DP_FAMILIES})
    assert not failures, "\n".join(failures)


def test_tied_pp2_dp2_matches_one_process(four_ranks, out):
    refs = {f"{f}_tied__pp2_dp2": reference(family_case(f, "1proc", *TIED), os.path.join(out, f"ref_{f}_tied"))
            for f in TIED_FAMILIES}
    for name, (_, params) in refs.items():
        assert params["lm_head.weight"].equal(params["model.embed_tokens.weight"]), name
    failures = _failures(four_ranks, refs)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_process_trains(refs, family):
    losses, _ = refs[family]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    # The later steps' losses depend on the updates, so their parity checks the optimizer steps.
    assert all(abs(b - a) > 1e-4 * losses[0] for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_matrix_layout_matches_one_process(two_ranks, refs, layout):
    failures = _failures(two_ranks, {f"{f}__{layout}": refs[f] for f in _expected(layout, "match")})
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("family,layout", [(f, lay) for lay in LAYOUTS[1:] for f in _expected(lay, "refused")])
def test_matrix_refusals_happen_before_launch(tmp_path, family, layout):
    cfg = load_config(None, family_case(family, layout, f"train.output_dir={tmp_path}"))
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 2)
    message = str(err.value)
    assert "\n" not in message, message
    if layout == "tp2":  # names the module, the style, what works and the tested families
        assert "parallel.tp=1" in message and "tested at tp2" in message and "query_key_value" in message
    else:
        assert "parallel.pp" in message


def test_tested_families_list_is_the_matrix():
    assert set(TESTED_FAMILIES) == set(_expected("tp2", "match"))


def test_readme_family_table_is_the_matrix():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert README_BEGIN in text and README_END in text, "README.md lost its family table markers"
    table = text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)].strip().splitlines()
    assert table == readme_table(), "README.md's family table differs from tests/families.py; regenerate it " \
                                    "with: python -c 'import sys; sys.path.insert(0, \"tests\"); " \
                                    "import families; print(*families.readme_table(), sep=chr(10))'"
