"""Bad input gets a clear error before any work starts: config and preflight errors in process
(degrees that do not divide heads, layers or the world size; batch sizes; unknown model fields;
empty or too small data; a model directory without config.json), three of them through the CLI
(one `loomtrain: error:` line, no worker spawned), and the tensor / pipeline / heterogeneous
layouts that must be refused up front with the numbers that conflict."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness import case, launch_env
from loomtrain.config import load_config
from loomtrain.errors import ConfigError, DataError
from loomtrain.runtime.preflight import preflight
from loomtrain.runtime.trainer import Trainer


# ------------------------------------------------------------------------ config/preflight errors
def _raises(exc_type, fn, *needles):
    with pytest.raises(exc_type) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_tp_not_dividing_heads():
    cfg = load_config(None, case("llama", "parallel.tp=3"))
    _raises(ConfigError, lambda: preflight(cfg, 3), "parallel.tp=3", "does not divide", "num_attention_heads=4")


def test_pp_larger_than_layers():
    cfg = load_config(None, case("llama", "parallel.pp=4"))
    _raises(ConfigError, lambda: preflight(cfg, 4), "parallel.pp=4", "num_hidden_layers=2")


def test_degrees_product_not_world_size():
    cfg = load_config(None, case("llama", "parallel.dp_shard=2", "parallel.tp=2"))
    _raises(ConfigError, lambda: preflight(cfg, 2), "1*2*2*1*1 = 4", "world size is 2")
    cfg = load_config(None, case("llama", "parallel.tp=2"))
    _raises(ConfigError, lambda: preflight(cfg, 3), "world size 3", "tp", "= 2")


def test_global_batch_not_divisible_by_dp_times_micro_batch():
    cfg = load_config(None, case("llama", "data.global_batch_size=8", "data.micro_batch_size=2"))
    assert preflight(cfg, 2)["dp_shard"] == 2  # 8 = 2 x 2 x 2 is fine
    _raises(ConfigError, lambda: preflight(cfg, 3), "data.global_batch_size=8", "data-parallel size 3",
            "data.micro_batch_size=2", "= 6")
    _raises(ConfigError, lambda: load_config(None, case("llama", "data.global_batch_size=7")),
            "data.global_batch_size=7", "data.micro_batch_size=2")


def test_unknown_model_config_field_and_architecture():
    cfg = load_config(None, case("llama", "model.config.hidden_sise=64"))
    _raises(ConfigError, lambda: preflight(cfg, 1), "model.config.hidden_sise", "'hidden_size'")
    cfg = load_config(None, case("llama", "model.architecture=lama"))
    _raises(ConfigError, lambda: preflight(cfg, 1), "model.architecture='lama'", "llama")


def test_empty_data_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(None, case("llama", f"data.source={empty}"))
    _raises(DataError, lambda: preflight(cfg, 1), "data.source", str(empty), "contains no")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    cfg = load_config(None, case("llama", f"data.source={blank}"))
    _raises(DataError, lambda: preflight(cfg, 1), "data.source", str(blank), "contains no documents")


def test_data_source_smaller_than_one_sample(tmp_path):
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "a.txt").write_text("hi")
    cfg = load_config(None, case("llama", f"data.source={src}", f"train.output_dir={tmp_path / 'run'}"))
    tokens = len("hi".encode()) + 1  # byte tokens + the EOS closing the document
    _raises(DataError, lambda: Trainer(cfg).setup(), str(src), f"{tokens} tokens",
            f"data.seq_len+1 = {cfg.data.seq_len + 1}")


def test_model_path_without_config_json(tmp_path):
    _raises(ConfigError, lambda: load_config(None, case("llama", f"model.path={tmp_path}")),
            "model.path", "config.json", str(tmp_path))


def test_seq_len_beyond_gpt2_positions():
    cfg = load_config(None, case("gpt2", "data.seq_len=128"))  # tiny GPT-2 has n_positions=64
    _raises(ConfigError, lambda: preflight(cfg, 1), "data.seq_len=128", "(64)", "n_positions")


# ------------------------------------------------------------ the same errors through the CLI


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
    """Start the three launches at once (each is mostly interpreter and import time)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "nomodel").mkdir()
    out = f"train.output_dir={tmp / 'run'}"
    runs = {
        "empty_data": ["run", "-", *case("llama", f"data.source={tmp / 'empty'}", out)],
        "tp3": ["run", "-", *case("llama", "parallel.tp=3", out), "--nproc-per-node", "3"],
        "model_path": ["run", "-", *case("llama", f"model.path={tmp / 'nomodel'}", out)],
    }
    env = launch_env()
    procs = {name: subprocess.Popen([sys.executable, "-m", "loomtrain.launch", *argv], cwd=str(tmp), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in runs.items()}
    results = {}
    try:
        for name, proc in procs.items():
            # Generous: three interpreters importing torch at once take minutes on a loaded 2-core
            # machine; the check is what they print, not how fast.
            stdout, stderr = proc.communicate(timeout=600)
            results[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return tmp, results


@pytest.mark.parametrize("name,needles", [
    ("empty_data", ["data.source", "empty", "contains no"]),
    ("tp3", ["parallel.tp=3", "does not divide", "num_attention_heads=4"]),
    ("model_path", ["model.path", "config.json", "nomodel"]),
])
def test_cli_errors_are_one_line(cli_errors, name, needles):
    tmp, results = cli_errors
    code, stdout, stderr = results[name]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("loomtrain: error:"), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if name != "tp3":
        assert str(tmp) in lines[0], lines[0]


# --- tensor / pipeline parallel configurations that must be refused up front ---------------------

@pytest.mark.parametrize("overrides, world, needles", [
    (["model.architecture=falcon", "model.config.hidden_size=64", "model.config.num_attention_heads=4",
      "model.config.num_hidden_layers=2", "parallel.tp=2"], 2, ["query_key_value", "fused QKV", "parallel.tp=1"]),
    (["model.architecture=gpt2", "model.config.n_embd=64", "model.config.n_head=4", "model.config.n_layer=2",
      "parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble"], 2, ["tie_word_embeddings=false", "ZBVZeroBubble"]),
    (["model.config.num_hidden_layers=2", "parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
      "parallel.pp_virtual_stages=2"], 2, ["4 stages", "num_hidden_layers=2"]),
    (["parallel.tp=2", "parallel.zero=1"], 4, ["parallel.zero=1", "zero=2 or 3"]),
    (["parallel.pp=2", "parallel.zero=0"], 4, ["parallel.zero=0", "zero=2 or 3"]),
    (["parallel.pp=2", "data.global_batch_size=4", "data.micro_batch_size=4"], 2, ["at least 2 micro-batches"]),
    (["parallel.tp=2", "model.config.hidden_size=192", "model.config.num_attention_heads=6",
      "model.config.num_key_value_heads=3"], 2, ["num_key_value_heads=3", "parallel.tp=2"]),
    (["parallel.tp=2", "data.seq_len=33"], 2, ["data.seq_len=33", "parallel.tp=2"]),
    (["parallel.sequence_scheduler=hetero", "data.seq_len=128", "parallel.hetero_tokens_per_rank=48"], 2,
     ["data.seq_len=128", "2 ranks x parallel.hetero_tokens_per_rank=48", "at least 64"]),
    (["parallel.sequence_scheduler=hetero", "data.global_batch_size=12"], 3, ["power-of-two", "got 3"]),
    (["parallel.sequence_scheduler=hetero", "parallel.cp=2"], 4, ["parallel.cp=1"]),
])
def test_parallel_layout_errors(overrides, world, needles):
    from loomtrain.config import load_config
    from loomtrain.errors import ConfigError
    from loomtrain.runtime.preflight import preflight

    cfg = load_config(None, ["data.source=synthetic"] + overrides)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
