"""Fuzzing the config layer: random keys (real ones, near misses, garbage) and values (numbers as
strings, nan/inf, negative, huge, unicode, empty, lists) through `loomtrain run` in this process,
and random YAML documents and bytes through `load_config`.

The property: an input is either accepted (the run reaches the launch, which is stubbed) or
refused with a `LoomError`, which the command line prints as exactly one `loomtrain: error:` line
with no traceback. Any other exception escapes `cli.main` and fails the test. No model is built:
world size 1 refuses tp/pp/cp > 1 before the meta model, and the launch never runs.
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import case
from loomtrain.config import Config, load_config
from loomtrain.errors import LoomError
from loomtrain.launch import cli, run_command

REAL_KEYS = sorted(f"{section}.{key}" for section, values in Config().to_dict().items() for key in values)
MODEL_KEYS = ["model.config.hidden_size", "model.config.num_attention_heads", "model.config.num_hidden_layers",
              "model.config.vocab_size", "model.config.rms_norm_eps", "model.config.rope_theta",
              "model.config.tie_word_embeddings", "model.config.hidden_sise"]
VALUE_TEXT = ["3e-4", "1e-8", "1E400", "-1e-3", ".nan", ".inf", "-.inf", "nan", "0", "-1", "-64", "1.5", "0.999",
              "99999999999999999999999", "1e20", "9" * 30, "", "''", "abc", "[]", "[1, 2]", "{}", "{a: 1}",
              "null", "~", "true", "no", "ü", "日本", "\u202e", "file:", "every:0", "every:2", "-", "/", "::",
              "!!binary aGk=", "&a [*a]", "{a: 1, a: 2}", "0x10", "1_000", "0o7"]


def _near_miss(key: str, data) -> str:
    i = data.draw(st.integers(0, len(key) - 1))
    return data.draw(st.sampled_from([key.upper(), key[:i] + key[i + 1:], key + "s", key.replace(".", "_", 1),
                                      key[:i] + "x" + key[i:], key.replace("_", "-")]))


@st.composite
def overrides(draw):
    items = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(
            st.sampled_from(REAL_KEYS + MODEL_KEYS),
            st.sampled_from(REAL_KEYS).flatmap(lambda k: st.builds(lambda d: _near_miss(k, d), st.data())),
            st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){1,2}", fullmatch=True),
        ))
        value = draw(st.one_of(
            st.sampled_from(VALUE_TEXT),
            st.integers(-2**70, 2**70).map(str),
            st.floats(allow_nan=True, allow_infinity=True).map(repr),
            st.text(max_size=12).filter(lambda t: "\n" not in t and "\r" not in t),
        ))
        items.append(f"{key}={value}")
    return items


@pytest.fixture
def stubbed_launch(monkeypatch, tmp_path):
    """The launch replaced by a marker, and the working directory a temporary one (relative
    output paths are tried for writability there)."""
    class Launched(Exception):
        pass

    def launch(spec, args):
        raise Launched()

    monkeypatch.setattr(run_command, "launch", launch)
    monkeypatch.setattr(run_command, "set_omp_threads", lambda n: None)
    monkeypatch.chdir(tmp_path)
    return Launched


def _main(argv: list[str], launched: type) -> tuple[object, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except launched:
            code = "launched"
    return code, err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=overrides())
def test_random_overrides_end_in_one_error_line_or_a_launch(stubbed_launch, extra):
    argv = ["run", *case("llama"), "train.output_dir=out", *extra]
    code, err = _main(argv, stubbed_launch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    if code != "launched":
        assert code == 2 and len(lines) == 1 and lines[0].startswith("loomtrain: error: "), (extra, code, err)
    else:
        assert all(ln.startswith("loomtrain: warning: ") for ln in lines), (extra, err)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=10))
_DOCS = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(REAL_KEYS)),
                                                 inner, max_size=4)), max_leaves=12)
_SECTIONED = st.dictionaries(st.sampled_from(["model", "data", "parallel", "optim", "train", "checkpoint", "x"]),
                             st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in REAL_KEYS] + ["config"]),
                                             _SCALARS | st.lists(_SCALARS, max_size=2), max_size=4), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_SECTIONED.map(yaml.safe_dump), _DOCS.map(yaml.safe_dump),
                     st.binary(max_size=64), st.text(max_size=64)))
def test_random_config_files_load_or_raise_a_loom_error(tmp_path, doc):
    path = os.path.join(tmp_path, "c.yaml")
    with open(path, "wb") as fh:
        fh.write(doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else doc)
    try:
        load_config(path)
    except LoomError:
        pass  # anything else escapes and fails the test
