"""Checkpoint tools: HF export (bit-identical `from_pretrained`, tied weights, bf16, shards,
tokenizer), HF import (`model.path` trains from an export), DeepSpeed import (real ZeRO-1/2/3 and
universal checkpoints made by DeepSpeed on 2 gloo ranks, checked against DeepSpeed's own readers,
then resumed by loomtrain), and `loomtrain ckpt inspect / verify / export-hf / import-deepspeed`
with their errors. Checkpoints come from the Trainer run in this process (`checkpoint.every=1`)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import BASE, ROOT, case, free_port
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import safeload
from loomtrain.config import load_config
from loomtrain.launch import cli
from loomtrain.runtime.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="deepspeed is not importable (pip install -e '.[test]'): no real DeepSpeed "
                               "checkpoints can be made, so the DeepSpeed import is NOT tested")


def ckpt(argv: list[str]) -> int:
    """`loomtrain ckpt ARGV...` in this process; its exit code."""
    return cli.main(["ckpt", *argv])


def _tiny_tokenizer(path: str) -> None:
    """A 100-token word-level HF tokenizer directory (made offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<eos>": 0, **{f"w{i}": i + 1 for i in range(99)}}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps of a tiny Llama (with a local HF tokenizer) and a tiny GPT-2 (tied embeddings),
    a checkpoint after each step; then each newest checkpoint exported to HF (float32)."""
    base = tmp_path_factory.mktemp("ckpt_io")
    tok = str(base / "tokenizer")
    _tiny_tokenizer(tok)
    out = {}
    for model, extra in (("llama", [f"data.tokenizer={tok}"]), ("gpt2", [])):
        run = str(base / model)
        trainer = Trainer(load_config(None, case(model, "train.max_steps=2", "checkpoint.every=1",
                                                 f"train.output_dir={run}", *extra)))
        trainer.fit()
        root = os.path.join(run, "checkpoints")
        hf_dir = str(base / f"{model}_hf")
        assert ckpt(["export-hf", root, hf_dir]) == 0
        out[model] = (trainer, root, hf_dir)
    return out


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_export_hf_from_pretrained_is_bit_identical(runs, model):
    from transformers import AutoModelForCausalLM

    trainer, root, hf_dir = runs[model]
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    params, loaded = trainer.full_state_dict(), hf.state_dict()
    assert set(params) == set(loaded)
    for name, value in params.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], value), name
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    # Same weights must give the same logits under the same attention: the trainer's may be
    # loomtrain's packed kernel (the default), which sums in another order than HF's sdpa.
    hf.set_attn_implementation(trainer.model.config._attn_implementation)
    hf.eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=0)
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    if model == "gpt2":  # tied: written once, under the input embedding's name; tied again on load
        assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    else:
        assert keys == set(params)


def test_export_copies_tokenizer_and_vocab(runs):
    from transformers import AutoTokenizer

    _, _, hf_dir = runs["llama"]
    config = json.load(open(os.path.join(hf_dir, "config.json"), encoding="utf-8"))
    assert config["vocab_size"] == 100 and config["eos_token_id"] == 0
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert len(tok) == 100 and tok.eos_token == "<eos>"


def test_export_bf16_sharded(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, root, _ = runs["llama"]
    step1 = os.path.join(root, "step_00000001")
    out = str(tmp_path / "hf16")
    assert ckpt(["export-hf", step1, out, "--dtype", "bfloat16", "--max-shard-size", "20KB"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = safeload.read_tensors(step1, "model.")
    for name, value in hf.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, stored["model." + name].to(torch.bfloat16)), name
    # An existing HF model is not overwritten silently.
    assert ckpt(["export-hf", step1, out]) == 2
    assert ckpt(["export-hf", step1, out, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def test_export_without_the_runs_data_or_tokenizer(runs, tmp_path):
    """The run's data and tokenizer directory are gone: the model is still rebuilt (vocabulary from
    the stored embedding) and exported bit-identically."""
    from transformers import AutoModelForCausalLM

    trainer, root, _ = runs["llama"]
    ckpt_dir = str(tmp_path / "step_00000002")
    shutil.copytree(os.path.join(root, "step_00000002"), ckpt_dir)
    meta = fmt.read_meta(ckpt_dir)
    meta["config"]["data"].update(source=str(tmp_path / "gone.jsonl"), tokenizer=str(tmp_path / "gone_tok"))
    os.remove(os.path.join(ckpt_dir, "meta.json"))  # write_json creates, never overwrites
    fmt.write_json(os.path.join(ckpt_dir, "meta.json"), meta)
    man = fmt.read_manifest(ckpt_dir)
    man["files"]["meta.json"] = fmt.file_entry(os.path.join(ckpt_dir, "meta.json"))
    os.remove(os.path.join(ckpt_dir, "manifest.json"))
    fmt.write_json(os.path.join(ckpt_dir, "manifest.json"), man)
    out = str(tmp_path / "hf")
    assert ckpt(["export-hf", ckpt_dir, out]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.vocab_size == 100 and not [n for n in os.listdir(out) if n.startswith("tokenizer")]
    for name, value in trainer.full_state_dict().items():
        assert torch.equal(hf.state_dict()[name], value), name


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_hf_export_trains_again_via_model_path(runs, model, tmp_path):
    trainer, _, hf_dir = runs[model]
    extra = [f"data.tokenizer={trainer.cfg.data.tokenizer}"] if trainer.cfg.data.tokenizer else []
    again = Trainer(load_config(None, BASE + [f"model.path={hf_dir}", "train.max_steps=1",
                                              f"train.output_dir={tmp_path}", *extra])).setup()
    start = again.full_state_dict()
    for name, value in trainer.full_state_dict().items():
        assert torch.equal(start[name], value), name
    losses = again.fit().losses
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))


def test_inspect_table_and_json(runs, capsys):
    _, root, _ = runs["gpt2"]
    assert ckpt(["inspect", root, "--json", "--top", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    ckpt_dir = os.path.join(root, "step_00000002")
    meta, man = fmt.read_meta(ckpt_dir), fmt.read_manifest(ckpt_dir)
    assert info["path"] == ckpt_dir and info["step"] == 2
    assert info["layout"]["world_size"] == 1 and info["layout"]["zero"] == 3
    assert info["data"]["samples_consumed"] == 16 and info["config"]["model"] == "gpt2"
    assert info["files"] == {n: e["size"] for n, e in man["files"].items()}
    sizes = {k: 4 * int(torch.Size(v["shape"]).numel()) for k, v in meta["tensors"].items()}
    assert info["tensors"]["count"] == len(sizes) and info["tensors"]["bytes"] == sum(sizes.values())
    assert [e["bytes"] for e in info["largest"]] == sorted(sizes.values(), reverse=True)[:3]
    assert ckpt(["inspect", os.path.join(root, "step_00000001")]) == 0
    text = capsys.readouterr().out
    for word in ("step        1", "written by", "8 samples", "largest tensors",
                 "__0_0.distcp", "gpt2 float32"):
        assert word in text, word


def test_verify_sizes_checksums_and_all(runs, tmp_path, capsys):
    _, root, _ = runs["llama"]
    copy = str(tmp_path / "ckpts")
    shutil.copytree(root, copy)
    newest, older = os.path.join(copy, "step_00000002"), os.path.join(copy, "step_00000001")
    assert ckpt(["verify", copy, "--checksum"]) == 0
    assert capsys.readouterr().out.startswith(f"ok {newest} ")
    data = os.path.join(newest, "__0_0.distcp")
    def flip():  # one bit: sizes still match, checksums do not
        with open(data, "r+b") as fh:
            fh.seek(os.path.getsize(data) // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 1]))

    flip()
    assert ckpt(["verify", newest, "--checksum"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "__0_0.distcp" in err and "sha256" in err, err
    assert ckpt(["verify", newest]) == 1  # the default fast checksum sees it too
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "__0_0.distcp" in err and ("xxh3_64" in err or "crc32" in err), err
    flip()
    with open(os.path.join(older, "__0_0.distcp"), "r+b") as fh:
        fh.truncate(100)
    assert ckpt(["verify", copy, "--all"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"ok {newest}") and "FAILED" in err and "step_00000001" in err and "truncated" in err
    # The real command line: exit 1 for a damaged checkpoint, 2 for a wrong path.
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = [sys.executable, "-m", "loomtrain.launch", "ckpt", "verify"]
    proc = subprocess.run(run + [older], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "size 100 bytes" in proc.stderr
    proc = subprocess.run(run + [str(tmp_path / "nope")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("loomtrain: error: no checkpoint at"), proc.stderr


class Sneaky:
    """Anything a weights-only load must refuse to construct."""


def test_export_names_tensors_that_do_not_match_the_model():
    from loomtrain.checkpoint.hf import match_model

    model = torch.nn.Linear(2, 3)
    index = {"model.weight": {"shape": [3, 2]}, "model.bias": {"shape": [4]}, "model.extra": {"shape": [1]}}
    with pytest.raises(fmt.CheckpointError) as info:
        match_model("/ckpt", model, index)
    assert str(info.value) == ("checkpoint /ckpt: its tensors do not match the Linear its config builds: parameters "
                               "the model does not have: extra; shapes differ: bias (checkpoint [4], model [3])")
    assert match_model("/ckpt", model, {"model.weight": {"shape": [3, 2]}, "model.bias": {"shape": [3]}}) == \
        ["weight", "bias"]


def test_errors_are_one_line(runs, tmp_path, capsys):
    _, root, _ = runs["gpt2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "step_00000009"
    partial.mkdir()
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(root, "step_00000002"), bad / "step_00000002")
    (bad / "step_00000002" / "meta.json").write_text("{not json")
    fake_ds = tmp_path / "fake_ds"
    fake_ds.mkdir()
    torch.save({"param_shapes": [{}], "x": Sneaky()}, fake_ds / "mp_rank_00_model_states.pt")
    cases = [
        (["inspect", str(tmp_path / "missing")], "no checkpoint at"),
        (["inspect", str(empty)], "is not a loomtrain checkpoint"),
        (["export-hf", str(partial), str(tmp_path / "o")], "is not a committed checkpoint"),
        (["inspect", str(bad)], "meta.json is not valid JSON"),
        (["export-hf", str(bad), str(tmp_path / "o2")], "meta.json is not valid JSON"),
        (["import-deepspeed", str(empty), str(tmp_path / "o3"), "--config", "-"], "is not a DeepSpeed checkpoint"),
        (["import-deepspeed", str(fake_ds), str(tmp_path / "o4"), "--config", "-"],
         "cannot be read with torch.load(weights_only=True): it pickles test_checkpoint_io.Sneaky"),
        (["export-hf", root, str(tmp_path / "o5"), "--max-shard-size", "lots"], "expected a size"),
        (["frobnicate", root], "unknown action 'frobnicate'"),
    ]
    for argv, message in cases:
        assert ckpt(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("loomtrain: error: ") and err.count("\n") == 1 and message in err, (argv, err)


# ------------------------------------------------------------------------------------ DeepSpeed
def test_deepspeed_names_wrapper_prefix_ties_and_fresh_state():
    """DeepSpeed names under an outer wrapper (`module.`), a tied head recorded in shared_params,
    and parameters without optimizer state (frozen there): mapped onto the model's own names, with
    a fresh AdamW state (zeros, step 0) where DeepSpeed had none."""
    from loomtrain.checkpoint.deepspeed import DeepSpeedState, _model_tensors, _optim_tensors, _prefix
    from loomtrain.checkpoint.hf import build_skeleton

    _, model = build_skeleton(load_config(None, case("gpt2")))
    named = dict(model.named_parameters())
    st = DeepSpeedState(path="ds", kind="zero", stage=2, dp_world_size=1, step=3, global_samples=None,
                        ds_version=None, params={"module." + n: torch.randn(p.shape) for n, p in named.items()},
                        shared={"module.lm_head.weight": "module.transformer.wte.weight"})
    with_state = list(named)[::2]
    st.optim = {"module." + n: {"step": torch.tensor(3.0), "exp_avg": torch.randn(named[n].shape),
                                "exp_avg_sq": torch.rand(named[n].shape)} for n in with_state}
    prefix = _prefix(st, list(named))
    assert prefix == "module."
    tensors = _model_tensors(st, model, prefix)
    assert set(tensors) == {f"model.{n}" for n in model.state_dict()}
    assert torch.equal(tensors["model.lm_head.weight"], st.params["module.transformer.wte.weight"])
    optim, fresh = _optim_tensors(st, model, prefix)
    assert sorted(fresh) == sorted(set(named) - set(with_state))
    for n in fresh:
        assert optim[f"optim.state.{n}.step"].item() == 0 and not optim[f"optim.state.{n}.exp_avg"].any()
    n = with_state[0]
    assert torch.equal(optim[f"optim.state.{n}.exp_avg"], st.optim["module." + n]["exp_avg"])


DS_RUNS = ["1", "2", "3", "1:bf16", "3:bf16"]  # ZeRO stage[:bf16] of each DeepSpeed run


@pytest.fixture(scope="module")
def ds_ckpts(tmp_path_factory):
    """Real DeepSpeed checkpoints (ZeRO-1, 2, 3 in fp32 and ZeRO-1, 3 in bf16, plus their universal
    conversions) and DeepSpeed's own readings of them (tests/ds_worker.py). Three gloo ranks, not
    two: the tiny model's sizes then do not divide evenly, so DeepSpeed pads its partitions (the
    ZeRO-1/2 group padding and ZeRO-3's per-parameter padding), which the import must undo."""
    out = str(tmp_path_factory.mktemp("deepspeed"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", os.path.join(ROOT, "tests", "ds_worker.py"), out, *DS_RUNS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(f"DeepSpeed worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return out


def _universal_state(ds: str, run: str, name: str, key: str, shape) -> torch.Tensor:
    """DeepSpeed's own per-parameter optimizer state (ds_to_universal), the reference."""
    obj = torch.load(os.path.join(ds, f"{run}_universal", "global_step2", "zero", name, f"{key}.pt"),
                     weights_only=True)
    return (obj["param"] if isinstance(obj, dict) else obj).reshape(shape)


def _import(ds: str, src: str, out: str) -> str:
    assert ckpt(["import-deepspeed", src, out, "--config", "-", *case("llama")]) == 0
    return os.path.join(out, "step_00000002")


@needs_deepspeed
@pytest.mark.parametrize("universal", [False, True], ids=["zero", "universal"])
@pytest.mark.parametrize("spec", DS_RUNS)
def test_import_deepspeed_matches_deepspeed(ds_ckpts, spec, universal, tmp_path, capsys):
    stage, bf16 = int(spec[0]), spec.endswith("bf16")
    run = f"zero{stage}" + ("_bf16" if bf16 else "")
    src = os.path.join(ds_ckpts, run + ("_universal" if universal else ""))
    ckpt_dir = _import(ds_ckpts, src, str(tmp_path / "imported"))
    assert f"ZeRO-{stage} checkpoint (3 ranks, step 2" in capsys.readouterr().out
    assert ckpt(["verify", ckpt_dir, "--checksum"]) == 0
    saved = safeload.read_tensors(ckpt_dir)
    live = load_file(os.path.join(ds_ckpts, f"{run}.live.safetensors"))
    offline = load_file(os.path.join(ds_ckpts, f"{run}.fp32.safetensors"))
    assert {k for k in saved if k.startswith("model.")} == {f"model.{n}" for n in live}
    for name, value in live.items():
        assert torch.equal(saved[f"model.{name}"], value), name
        assert torch.equal(saved[f"model.{name}"], offline[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            want = _universal_state(ds_ckpts, run, name, key, value.shape)
            assert torch.equal(saved[f"optim.state.{name}.{key}"], want), (name, key)
        assert saved[f"optim.state.{name}.step"].item() == 2.0
    meta = fmt.read_meta(ckpt_dir)
    assert meta["step"] == 2 and meta["data"]["samples_consumed"] == 12
    assert meta["imported_from"]["zero_stage"] == stage and meta["layout"]["world_size"] == 3
    assert meta["imported_from"]["fresh_optimizer_state"] == []
    assert meta["imported_from"]["kind"] == ("universal" if universal else "zero")
    assert ckpt(["inspect", ckpt_dir]) == 0
    line = f"imported    from deepspeed {meta['imported_from']['kind']} ZeRO-{stage} (3 ranks"
    assert line in capsys.readouterr().out


@needs_deepspeed
def test_resume_from_deepspeed_import(ds_ckpts, tmp_path):
    ckpt_dir = _import(ds_ckpts, os.path.join(ds_ckpts, "zero3"), str(tmp_path / "imported"))
    trainer = Trainer(load_config(None, case("llama", f"checkpoint.resume={ckpt_dir}", "train.max_steps=3",
                                             f"train.output_dir={tmp_path / 'run'}"))).setup()
    assert trainer.step == 2 and trainer.loader.samples_consumed == 12
    live = load_file(os.path.join(ds_ckpts, "zero3.live.safetensors"))
    params = trainer.full_state_dict()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for name, value in live.items():
        assert torch.equal(params[name], value), name
    for p, state in trainer.optimizer.state.items():
        want = _universal_state(ds_ckpts, "zero3", names[id(p)], "exp_avg_sq", p.shape)
        assert torch.equal(state["exp_avg_sq"], want) and state["step"].item() == 2.0, names[id(p)]
    losses = trainer.fit().losses
    assert trainer.step == 3 and len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as fh:
        assert [json.loads(line)["step"] for line in fh if line.strip()] == [3]


@needs_deepspeed
def test_import_deepspeed_errors(ds_ckpts, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(ds_ckpts, "zero2"), broken)
    os.remove(broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert ckpt(["import-deepspeed", str(broken), str(tmp_path / "o1"), "--config", "-", *case("llama")]) == 2
    assert "expected 3 *_optim_states.pt files" in capsys.readouterr().err
    assert ckpt(["import-deepspeed", os.path.join(ds_ckpts, "zero1"), str(tmp_path / "o2"), "--config", "-",
                 *case("llama", "model.config.num_hidden_layers=3")]) == 2
    err = capsys.readouterr().err
    assert "does not match the LlamaForCausalLM" in err and "missing model.layers.2" in err, err
    assert not os.path.exists(tmp_path / "o2" / "step_00000002")
