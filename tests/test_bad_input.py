"""Hostile and careless input (issue 9, defects 8 and 9): every mistake ends in one
`loomtrain: error:` line naming the file or key and the problem, before any worker starts.

The cases run `cli.main` in this process with the launcher replaced by a stub that fails the test
if it is reached, so a case either is refused up front or (for the accepted spellings) reaches the
launch. One case runs the real command line in a subprocess to show no traceback reaches stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from harness import BASE, ROOT, case
from loomtrain.config import load_config
from loomtrain.data.tokenizer import build_tokenizer
from loomtrain.errors import ConfigError, LoomError
from loomtrain.launch import cli, run_command
from loomtrain.models import build

LAUNCHED = "launch reached"


class _Launched(Exception):
    pass


@pytest.fixture
def main(monkeypatch, capsys):
    """cli.main with the launch stubbed: returns (exit code or LAUNCHED, stderr lines)."""
    def refuse(spec, args):
        raise _Launched()

    monkeypatch.setattr(run_command, "launch", refuse)
    monkeypatch.setattr(run_command, "set_omp_threads", lambda n: None)

    def call(*argv: str):
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except _Launched:
            code = LAUNCHED
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, [ln for ln in err.splitlines() if ln.strip()]
    return call


def assert_error(result, *needles: str) -> str:
    code, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loomtrain: error: "), (code, lines)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, needles", [
    ("optim.lr=.nan", ["optim.lr=nan", "finite and positive"]),
    ("optim.lr=.inf", ["optim.lr=inf", "finite and positive"]),
    ("optim.lr=-1e-3", ["optim.lr=-0.001"]),
    ("optim.beta1=1.5", ["optim.beta1=1.5", "[0, 1)"]),
    ("optim.beta2=1", ["optim.beta2=1.0", "[0, 1)"]),
    ("optim.eps=0", ["optim.eps=0.0", "positive"]),
    ("optim.grad_clip=.nan", ["optim.grad_clip=nan", "finite"]),
    ("optim.grad_clip=-1", ["optim.grad_clip=-1.0", "not negative"]),
    ("optim.weight_decay=.inf", ["optim.weight_decay=inf"]),
    ("data.max_corpus_mb=-1", ["data.max_corpus_mb=-1.0", "positive size"]),
    ("train.peak_tflops=.nan", ["train.peak_tflops=nan"]),
    ("train.max_steps=99999999999999999999999", ["train.max_steps", "64-bit"]),
    ("model.config.hidden_size=-64", ["model.config.hidden_size=-64", "positive integer"]),
    ("model.config.hidden_size=abc", ["model.config", "hidden_size", "'abc'"]),
    ("model.config.num_hidden_layers=0", ["model.config.num_hidden_layers=0", "positive integer"]),
    # found by tests/test_config_fuzz.py: Llama's config derives head_dim by dividing by it
    ("model.config.num_attention_heads=0", ["model.config.num_attention_heads=0", "positive integer"]),
    ("model.config.rms_norm_eps=.nan", ["model.config.rms_norm_eps=nan", "finite"]),
    ("train.max_steps=" + "9" * 5000, ["train.max_steps"]),
])
def test_bad_values_are_one_line(main, tmp_path, override, needles):
    assert_error(main("run", *case("llama"), f"train.output_dir={tmp_path}/out", override), *needles)


@pytest.mark.parametrize("value, expected", [("3e-4", 3e-4), ("1e-8", 1e-8), ("1E3", 1000.0), ("+.5e1", 5.0)])
def test_floats_as_people_write_them(value, expected):
    cfg = load_config(None, [f"optim.lr={value}", f"optim.eps={value}"])
    assert cfg.optim.lr == expected and cfg.optim.eps == expected


def test_learning_rates_written_with_an_exponent_reach_the_launch(main, tmp_path):
    code, lines = main("run", *case("llama"), f"train.output_dir={tmp_path}/out", "optim.lr=3e-4", "optim.eps=1e-8")
    assert code == LAUNCHED and not lines, lines


# ----------------------------------------------------------------------------- config files
@pytest.mark.parametrize("content, needles", [
    (b"train:\n  max_steps: 5\n# caf\xe9\n", ["not UTF-8", "0xe9", "offset 27"]),
    (b"train:\n  max_steps: 5\n  max_steps: 6\n", ["duplicate key 'max_steps'", "line 3", "line 2"]),
    (b"train: {}\ntrain: {}\n", ["duplicate key 'train'"]),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(
        b"%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]\n" % ((bytes([c]),) * 2 + (bytes([c - 1]),) * 10)
        for c in range(ord("b"), ord("j"))), ["more than 100000 values"]),
    (b"[" * 5000 + b"]" * 5000, ["nested too deeply"]),
    (b"train: !!python/object/apply:os.system ['true']\n", ["not valid YAML", "python/object"]),
])
def test_bad_config_files(main, tmp_path, content, needles):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    line = assert_error(main("run", str(path)), *needles)
    assert str(path) in line


def test_duplicate_key_in_an_override_value():
    with pytest.raises(ConfigError, match="duplicate key 'hidden_size'"):
        load_config(None, ["model.config={hidden_size: 64, hidden_size: 32}"])


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  <<: {max_steps: 3, seed: 1}\n  max_steps: 7\n")
    assert load_config(path).train.max_steps == 7


# ----------------------------------------------------------------------------- output paths
def test_output_paths_that_are_not_directories(main, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run = ("run", *case("llama"), f"train.output_dir={tmp_path}/out")
    assert_error(main("run", *case("llama"), f"train.output_dir={afile}"), "train.output_dir", "not a directory")
    assert_error(main(*run, f"checkpoint.dir={afile}/sub"), "checkpoint.dir", f"under {afile}", "not a directory")
    assert_error(main(*run, "checkpoint.every=5", f"train.output_dir={afile}"), "train.output_dir")
    assert_error(main(*run, "--log-dir", f"{afile}/logs"), "--log-dir", "not a directory")
    assert not (tmp_path / "out").exists()  # nothing was created for a run that was refused


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_dir_without_write_permission(main, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert_error(main("run", *case("llama"), f"train.output_dir={ro}/out"), "train.output_dir", "cannot write")


def test_unwritable_output_dir_is_named(main, tmp_path, monkeypatch):
    """As root the permission case above is skipped: a failing write stands in for it."""
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("loomtrain.runtime.preflight.tempfile.mkstemp", no_space)
    assert_error(main("run", *case("llama"), f"train.output_dir={tmp_path}/out"), "train.output_dir",
                 "cannot write", "No space left")


# ----------------------------------------------------------------------------- model.path
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama directory (config.json + model.safetensors) and its state dict."""
    root = tmp_path_factory.mktemp("hf")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=build_tokenizer(None).vocab_size,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    good = root / "good"
    config.save_pretrained(good)
    save_file(state, str(good / "model.safetensors"))
    return root, config, state


def _variant(root, config, state, name, *, config_text=None, weights=None, truncate=False):
    path = root / name
    path.mkdir()
    if config_text is None:
        config.save_pretrained(path)
    else:
        (path / "config.json").write_bytes(config_text)
    file = path / "model.safetensors"
    save_file(weights if weights is not None else state, str(file))
    if truncate:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return path


def _hf_run(path, tmp_path, *extra):
    return ("run", *BASE, f"model.path={path}", f"train.output_dir={tmp_path}/out", *extra)


@pytest.mark.parametrize("name, kwargs, needles", [
    ("not_json", {"config_text": b"{not json"}, ["config.json is not valid JSON", "line 1"]),
    ("binary", {"config_text": b"\xff\xfe\x00\x01"}, ["config.json is not UTF-8"]),
    ("list", {"config_text": b"[1, 2]"}, ["must hold a JSON object"]),
    ("no_type", {"config_text": b'{"hidden_size": 8}'}, ["has no model_type"]),
    ("unknown_type", {"config_text": b'{"model_type": "llamma"}'}, ["model_type='llamma'", "llama"]),
    ("bad_field", {"config_text": b'{"model_type": "llama", "hidden_size": "wide"}'}, ["hidden_size", "'wide'"]),
    ("zero_heads", {"config_text": b'{"model_type": "llama", "num_attention_heads": 0}'},
     ["config.json", "division"]),
    ("truncated", {"truncate": True}, ["model.safetensors", "not a readable safetensors file", "truncated"]),
])
def test_broken_model_directories(main, hf_dir, tmp_path, name, kwargs, needles):
    root, config, state = hf_dir
    path = _variant(root, config, state, name, **kwargs)
    assert_error(main(*_hf_run(path, tmp_path)), *needles)


def test_model_directory_loads(main, hf_dir, tmp_path):
    root, _, _ = hf_dir
    code, lines = main(*_hf_run(root / "good", tmp_path))
    assert code == LAUNCHED and not lines, lines


def test_unused_tensors_are_an_error_unless_the_config_changes_the_model(main, hf_dir, tmp_path):
    root, config, state = hf_dir
    extra = dict(state, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)})
    path = _variant(root, config, state, "extra", weights=extra)
    assert_error(main(*_hf_run(path, tmp_path)), "1 tensors", "model.layers.2.mlp.up_proj.weight",
                 "do not match the config")
    # Keeping the first layer of the model on purpose: one warning naming what is dropped.
    code, lines = main(*_hf_run(root / "good", tmp_path, "model.config.num_hidden_layers=1"))
    assert code == LAUNCHED and len(lines) == 1, lines
    assert lines[0].startswith("loomtrain: warning:") and "model.layers.1.mlp.up_proj.weight" in lines[0]


def test_shape_mismatch_names_the_tensor_and_both_shapes(main, hf_dir, tmp_path):
    root, config, state = hf_dir
    bad = dict(state, **{"model.layers.1.mlp.down_proj.weight": torch.zeros(32, 48)})
    path = _variant(root, config, state, "shape", weights=bad)
    assert_error(main(*_hf_run(path, tmp_path)), "model.layers.1.mlp.down_proj.weight", "[32, 48]", "[32, 64]")
    with pytest.raises(LoomError, match=r"tensor w: \[3, 2\] in the checkpoint, \[2, 3\] in the model"):
        build._copy_full_into(torch.zeros(2, 3), torch.zeros(3, 2), "w")


# ----------------------------------------------------------------------------- lengths, metrics
_BINARY = bytes(range(256)) * 4
_HUGE = b"12\n99999999999999999999999\n"


@pytest.mark.parametrize("content, needles", [
    (_BINARY, ["binary file"]),
    (b"12\n\xe9t\xe9\n", ["not UTF-8"]),
    (_HUGE, [":2:", "64-bit"]),
    (b"[12, 99999999999999999999999]", ["item 1", "64-bit"]),
    (b"12\n" + b"9" * 5000 + b"\n", [":2:", "64-bit"]),
])
def test_plan_lengths_files(main, tmp_path, content, needles):
    path = tmp_path / "lengths.txt"
    path.write_bytes(content)
    assert_error(main("plan", "--lengths", str(path), "--gpus", "8", "--context-len", "64"), str(path), *needles)


@pytest.mark.parametrize("content, needles", [
    (_BINARY, ["binary file"]), (_HUGE, [":2:", "64-bit"]), (b"12\n-3\n", [":2:", "not a positive"]),
])
def test_data_lengths_files(main, tmp_path, content, needles):
    path = tmp_path / "lengths.txt"
    path.write_bytes(content)
    assert_error(main("run", *case("llama"), f"train.output_dir={tmp_path}/out", f"data.lengths=file:{path}"),
                 "data.lengths", *needles)


def test_report_of_a_binary_or_damaged_metrics_file(main, tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\x00{}\n\x80")
    assert_error(main("report", str(tmp_path)), "metrics.jsonl", "no metrics records", "unreadable")
    rows = [{"step": [1], "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": {"a": 1}, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\xe9\n")
    code, lines = main("report", str(tmp_path))
    assert code == 0 and not lines, lines


# ----------------------------------------------------------------------------- a real process
def test_no_traceback_reaches_stderr_of_the_real_command(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"optim:\n  lr: 3e-4\n  beta1: 1.5\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "loomtrain.launch", "run", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.strip() == "loomtrain: error: optim.beta1=1.5: must be within [0, 1)", proc.stderr
