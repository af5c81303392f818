"""`loomtrain run` end to end: the example config through the CLI and torch's elastic agent on
2 ranks, checked against a hand computation of the model's FLOPs."""
import json
import os
import subprocess
import sys

from harness import ROOT

PEAK_TFLOPS = 0.5


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "loomtrain.launch", "run", os.path.join(ROOT, "examples", "demo.yaml"),
           "train.max_steps=3", f"train.output_dir={out}", f"train.peak_tflops={PEAK_TFLOPS}",
           "train.progress=false", "--nproc-per-node", "2", *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh], proc.stdout


def test_demo_config_metrics_match_hand_computation(tmp_path):
    records, stdout = _run(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "mfu",
                "peak_mem_gb", "tflops", "tflops_exact", "mfu_exact"):
        assert all(key in r for r in records), key

    # examples/demo.yaml: Llama, d=256, f=688, 4 layers, 4 heads (head_dim 64), 4 KV heads,
    # byte tokenizer vocab V=258, untied head, S=256, 16 sequences per step.
    d, f, n_layers, heads, head_dim, vocab, seq, batch = 256, 688, 4, 4, 64, 258, 256, 16
    embedding = vocab * d                                      # 66,048 (looked up: no FLOPs)
    per_layer = 4 * d * d + 3 * d * f + 2 * d                  # q,k,v,o + gate,up,down + 2 norms = 791,040
    total = embedding + n_layers * per_layer + d + vocab * d   # + final norm + lm_head = 3,296,512
    n_palm = total - embedding                                 # 3,230,464
    per_token = 6 * n_palm + 12 * n_layers * heads * head_dim * seq  # 22,528,512
    tokens = batch * seq                                       # 4,096
    step_flops = per_token * tokens                            # 92,276,785,152
    assert (per_layer, total, per_token, step_flops) == (791_040, 3_296_512, 22_528_512, 92_276_785_152)

    world = 2
    for r in records:
        assert r["tokens"] == tokens
        assert abs(r["tokens_per_s"] - tokens / r["step_time_s"]) <= 1e-6 * r["tokens_per_s"]
        tflops = step_flops / r["step_time_s"] / world / 1e12
        mfu = step_flops / r["step_time_s"] / (world * PEAK_TFLOPS * 1e12)
        assert abs(r["tflops"] - tflops) <= 1e-6 * tflops, (r["tflops"], tflops)
        assert abs(r["mfu"] - mfu) <= 1e-6 * mfu, (r["mfu"], mfu)
        # Exact causal attention counts about half of PaLM's full S^2 attention term.
        assert 0 < r["tflops_exact"] < r["tflops"]
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["peak_mem_gb"] > 0
    assert "loss" in stdout and "tokens/s" in stdout  # the end-of-run summary reached the console
