"""FLOP counts (config formula vs. meta-model walk vs. real model), MFU definitions, metric sinks."""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                          Qwen2Config)

from loomtrain.errors import LoomError
from loomtrain.models.flops import FlopModel, flop_model, flop_model_from_meta
from loomtrain.runtime.metrics import (MetricsWriter, device_peak_flops, peak_memory_gb,
                                       plot_metrics, step_record)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def _configs():
    return {
        "llama": LlamaConfig(**TINY),
        "llama_bias_tied": LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
        "llama_head_dim": LlamaConfig(**TINY, head_dim=32),  # head_dim != hidden / heads
        "mistral": MistralConfig(**TINY),
        "mistral_head_dim": MistralConfig(**TINY, head_dim=8),
        "qwen2": Qwen2Config(**TINY),
        "qwen2_tied": Qwen2Config(**TINY, tie_word_embeddings=True),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=32),
        "gpt2_inner_untied": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=32,
                                        n_inner=96, tie_word_embeddings=False),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_config_formula_matches_meta_walk_and_real_model(name):
    cfg = _configs()[name]
    formula = flop_model(cfg)
    walked = flop_model_from_meta(cfg)
    assert formula.source == "config" and walked.source == "meta"
    assert formula == FlopModel(**{**walked.__dict__, "source": "config"})
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg)
    assert formula.total_params == sum(p.numel() for p in real.parameters())


def test_hand_computed_llama():
    fm = flop_model(LlamaConfig(**TINY))
    # d=64, H=4, KV=2, Dh=64/4=16, I=128, V=256, L=2, untied.
    # q 64*64=4096, k 64*32=2048, v 2048, o 64*64=4096 -> attention 12288
    # MLP gate/up/down 3*64*128 = 24576 -> 36864 per layer, x2 layers = 73728
    # lm_head 256*64 = 16384 -> matmul_params = 73728 + 16384 = 90112
    # embed_tokens 256*64 = 16384; RMSNorms 2*64 per layer *2 + final 64 = 320
    # total = 73728 + 320 + 16384 (embed) + 16384 (lm_head) = 106816
    assert (fm.n_layers, fm.n_heads, fm.head_dim) == (2, 4, 16)
    assert fm.matmul_params == 90112
    assert fm.embedding_params == 16384
    assert fm.total_params == 106816
    # PaLM N = 106816 - 16384 = 90432; S = 32:
    # 6*90432 = 542592; 12*L*H*Dh*S = 12*2*4*16*32 = 49152 -> 591744 per token
    assert fm.palm_params == 90432
    assert fm.palm_flops_per_token(32) == 591744
    assert fm.palm_step_flops(num_tokens=64, seq_len=32) == 64 * 591744
    # exact, docs [3, 5]: 8 tokens; matmuls 3 * 2*90112*8 = 4325376
    # causal pairs 3*4/2 + 5*6/2 = 6 + 15 = 21; attention 3 * L(2) * 2 matmuls * 2 * H*Dh(64) * 21 = 32256
    assert fm.exact_step_flops([3, 5]) == 4325376 + 32256 == 4357632
    assert fm.exact_step_flops([]) == 0


def test_hand_computed_gpt2_small_and_tied_palm():
    fm = flop_model(GPT2Config())  # the published 124M GPT-2
    assert fm.total_params == 124_439_808
    # wte 50257*768 = 38597376 is tied to lm_head, so it stays in N; only wpe 1024*768 drops out.
    assert fm.embedding_params == 38_597_376 + 786_432
    assert fm.palm_params == 124_439_808 - 786_432


def test_exact_vs_palm_attention():
    fm = FlopModel(n_layers=3, n_heads=8, head_dim=16, matmul_params=1000, embedding_params=0, total_params=1000)
    seq = 4096
    # One document filling the row: causal exact attention = 6*L*H*Dh*(S+1) per token, about half
    # PaLM's full-square 12*L*H*Dh*S; with no embeddings the matmul terms agree exactly.
    palm = fm.palm_step_flops(seq, seq)
    exact = fm.exact_step_flops([seq])
    attn_palm = palm - 6 * 1000 * seq
    attn_exact = exact - 6 * 1000 * seq
    assert attn_exact == 6 * 3 * 8 * 16 * (seq + 1) * seq  # per token 6*L*H*Dh*(S+1), S tokens
    assert math.isclose(attn_exact / attn_palm, 0.5, rel_tol=1e-3)
    # Packing many short documents costs far less attention than one long one.
    assert fm.exact_step_flops([64] * 64) < exact
    with pytest.raises(ValueError):
        fm.exact_step_flops([-1])


def test_unknown_family_falls_back_to_meta_walk():
    from transformers import GPTNeoXConfig
    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=256)
    fm = flop_model(cfg)
    assert fm.source == "meta"
    real = AutoModelForCausalLM.from_config(cfg)
    assert fm.total_params == sum(p.numel() for p in real.parameters())
    # query_key_value 64x192 + dense 64x64 + MLP 2*64*128 per layer, embed_out 64x256
    assert fm.matmul_params == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 128) + 64 * 256


def test_step_record_definitions():
    rec = step_record(step=7, loss=2.5, grad_norm=0.75, lr=3e-4, tokens=8192, step_time_s=0.5,
                      flops_palm=4.0e15, flops_exact=3.0e15, world_size=8,
                      peak_flops_per_device=1.0e15, peak_mem_gb=12.5, micro_steps=4)
    assert list(rec) == ["step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s",
                         "tflops", "tflops_exact", "mfu", "mfu_exact", "peak_mem_gb", "micro_steps"]
    assert rec["tokens_per_s"] == pytest.approx(8192 / 0.5)
    assert rec["tflops"] == pytest.approx(4.0e15 / 0.5 / 8 / 1e12)  # 1000 TFLOP/s per device
    assert rec["tflops_exact"] == pytest.approx(3.0e15 / 0.5 / 8 / 1e12)
    assert rec["mfu"] == pytest.approx(4.0e15 / 0.5 / (8 * 1.0e15))  # 1.0
    assert rec["mfu_exact"] == pytest.approx(0.75)
    assert rec["micro_steps"] == 4 and rec["peak_mem_gb"] == 12.5
    json.dumps(rec, allow_nan=False)
    with pytest.raises(ValueError):
        step_record(step=1, loss=1.0, grad_norm=None, lr=1.0, tokens=1, step_time_s=0.0, flops_palm=1.0,
                    flops_exact=None, world_size=1, peak_flops_per_device=1.0, peak_mem_gb=0.0)


def _rec(step, loss, tps):
    return step_record(step=step, loss=loss, grad_norm=1.0, lr=1e-3, tokens=int(tps), step_time_s=1.0,
                       flops_palm=2e12, flops_exact=1e12, world_size=2, peak_flops_per_device=1e13,
                       peak_mem_gb=0.5 * step)


def test_metrics_writer_appends_and_summarises(tmp_path):
    out = str(tmp_path / "run")
    w1 = MetricsWriter(out, tensorboard=True, progress=False, total_steps=4)
    w1.log(_rec(1, 5.0, 100))
    w1.log(_rec(2, 4.0, 300))
    w1.log({**_rec(3, float("nan"), 500), "grad_norm": torch.tensor(2.0)})
    text = w1.summary(checkpoint="/ckpt/step_00000003")
    w1.close()
    assert "loss" in text and "tokens/s" in text and "5.0000" in text
    assert "400" in text  # mean of 300 and 500: step 1 is warm-up
    assert "MFU" in text and "10.00%" in text  # 2e12 / 1 s / (2 * 1e13)
    assert "1.50 GB" in text and "/ckpt/step_00000003" in text and "metrics.jsonl" in text
    assert os.path.isdir(os.path.join(out, "tb"))
    # A resumed run appends to the same file.
    with MetricsWriter(out, tensorboard=False, progress=True, total_steps=4, start_step=3) as w2:
        w2.log(_rec(4, 3.0, 600))
    assert os.listdir(out).count("metrics.jsonl") == 1
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] is None and lines[2]["grad_norm"] == 2.0


def test_summary_without_records(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False, progress=False, total_steps=1) as w:
        assert "no steps logged" in w.summary()


def test_device_peak_flops():
    assert device_peak_flops(torch.device("cpu"), torch.float32, 123.0) == (123e12, "config")
    with pytest.raises(LoomError):
        device_peak_flops(torch.device("cpu"), torch.float32, 0.0)
    start = time.perf_counter()
    flops, label = device_peak_flops(torch.device("cpu"), torch.float32, None)
    assert label == "measured" and flops > 0
    assert time.perf_counter() - start < 5  # budget is < 1 s; slack for loaded CI machines
    assert peak_memory_gb(torch.device("cpu")) > 0.01  # this process holds torch: tens of MB at least


def test_plot_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(str(tmp_path), tensorboard=False, progress=False, total_steps=3) as w:
        for step in (1, 2, 3):
            w.log(_rec(step, 5.0 - step, 100 * step))
    pytest.importorskip("matplotlib")
    png = plot_metrics(str(path), str(tmp_path / "plots" / "metrics.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LoomError):
        plot_metrics(str(tmp_path / "missing.jsonl"), str(tmp_path / "x.png"))
