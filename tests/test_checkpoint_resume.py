"""Resume anywhere: real multi-process runs on gloo (2 and 4 ranks, several cases per launch).

Each writer trains 6 steps and saves every 3 (that run is the continuous curve); a fresh job with
another layout loads its step-3 checkpoint and trains steps 4-6. Steps 4-6 must equal the
continuous run: bitwise for the same layout, to relative 1e-5 across layouts; the resumed job reads
the same global samples, continues the step numbers, and the checkpointing runs themselves match
a single process that never checkpoints.

Pairs (writer -> reader): ZeRO-1 dp2 -> ZeRO-1 dp2 and ZeRO-3 dp4 -> ZeRO-3 dp4 (bitwise);
ZeRO-3 dp4 -> dp2; ZeRO-1 dp2 -> ZeRO-3 dp4; ZeRO-2 dp2 -> one process; tp2 x dp2 -> one process;
pp2 -> tp2; pp2 x tp2 -> dp4; HSDP 2x2 -> ZeRO-0 dp4 (the tensor/pipeline cases use a 4-layer model so that pp2 has
whole blocks per stage); ZeRO-3 dp4 -> ring cp2 and ZeRO-1 dp2 -> dp2 x Ulysses cp2 (context
parallelism); the heterogeneous scheduler on 4 ranks (ZeRO-3) -> on 2 ranks (ZeRO-2), on its own
whole-document stream.
"""
import json
import os

import pytest
import torch

from harness import LOSS_RTOL, case, load_result, reference, run_cases

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def run(*extra):
    return case("llama", "train.max_steps=6", "train.log_samples=true", *extra)


# The heterogeneous scheduler reads whole documents (not packed rows): its runs pair only with each other.
# Capacity changes only the grouping, not the math: 48 tokens per rank on 4 ranks, 64 on 2.
HETERO = ["parallel.sequence_scheduler=hetero", "data.seq_len=128", "data.global_batch_size=16"]


def run4(*extra):
    """The 4-layer model of the tensor/pipeline cases."""
    return run("model.config.num_hidden_layers=4", *extra)


def ckpt(base, name, step=3):
    return f"checkpoint.resume={os.path.join(base, name, 'checkpoints', f'step_{step:08d}')}"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt_resume"))


@pytest.fixture(scope="module")
def launches(out):
    """Three launches in dependency order: 2 ranks (writers), 4 ranks, 2 ranks."""
    two, four, two_b = (os.path.join(out, d) for d in ("two", "four", "two_b"))
    run_cases(2, {
        "z1dp2": run("parallel.zero=1", "checkpoint.every=3"),
        "z2dp2": run("parallel.zero=2", "checkpoint.every=3"),
        "z1dp2_to_z1dp2": run("parallel.zero=1", ckpt(two, "z1dp2")),
        "pp2": run4("parallel.pp=2", "checkpoint.every=3"),
    }, two)
    run_cases(4, {
        "z3dp4": run("parallel.zero=3", "checkpoint.every=3"),
        "z3dp4_to_z3dp4": run("parallel.zero=3", ckpt(four, "z3dp4")),
        "z1dp2_to_z3dp4": run("parallel.zero=3", ckpt(two, "z1dp2")),
        "tp2dp2": run4("parallel.tp=2", "parallel.zero=3", "checkpoint.every=3"),
        "pp2tp2": run4("parallel.pp=2", "parallel.tp=2", "checkpoint.every=3"),
        "pp2tp2_to_dp4": run4("parallel.zero=3", ckpt(four, "pp2tp2")),
        "hsdp2x2": run("parallel.zero=3", "parallel.dp_replicate=2", "parallel.dp_shard=2", "checkpoint.every=3"),
        "hsdp2x2_to_z0dp4": run("parallel.zero=0", ckpt(four, "hsdp2x2")),
        "z1dp2_to_dp2cp2": run("parallel.zero=3", "parallel.cp=2", "parallel.cp_impl=ulysses", ckpt(two, "z1dp2")),
        "hetero4": run(*HETERO, "parallel.hetero_tokens_per_rank=48", "parallel.zero=3", "checkpoint.every=3"),
    }, four)
    run_cases(2, {"z3dp4_to_z3dp2": run("parallel.zero=3", ckpt(four, "z3dp4")),
                  "pp2_to_tp2": run4("parallel.tp=2", ckpt(two, "pp2")),
                  "z3dp4_to_cp2": run("parallel.cp=2", "parallel.cp_impl=ring", ckpt(four, "z3dp4")),
                  "hetero4_to_hetero2": run(*HETERO, "parallel.hetero_tokens_per_rank=64", "parallel.zero=2",
                                            ckpt(four, "hetero4"))}, two_b)
    where = {}
    for path in (two, four, two_b):
        with open(os.path.join(path, "cases.json"), encoding="utf-8") as fh:
            where.update({name: path for name in json.load(fh)})
    return where


@pytest.fixture(scope="module")
def one_process(out, launches):
    """ZeRO-2 dp2 -> one process (no process group), and the never-checkpointing reference."""
    ref = reference(run(), os.path.join(out, "ref"))
    resumed = reference(run(ckpt(launches["z2dp2"], "z2dp2")), os.path.join(out, "z2dp2_to_one"))
    tp_resumed = reference(run4(ckpt(launches["tp2dp2"], "tp2dp2")), os.path.join(out, "tp2dp2_to_one"))
    return ref, resumed, tp_resumed


def _result(launches, name):
    return load_result(launches[name], name)


def _close(got, want, what):
    assert len(got) == len(want), f"{what}: {got} vs {want}"
    for step, (a, b) in enumerate(zip(got, want), start=4):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"{what}: step {step} loss {a!r} vs continuous {b!r}"


def _jsonl(path, name):
    with open(os.path.join(path, name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("writer,reader", [("z1dp2", "z1dp2_to_z1dp2"), ("z3dp4", "z3dp4_to_z3dp4")])
def test_same_layout_resume_is_bitwise(launches, writer, reader):
    cont_losses, cont_params = _result(launches, writer)
    losses, params = _result(launches, reader)
    assert losses == cont_losses[3:], (losses, cont_losses)
    for name, value in cont_params.items():
        assert torch.equal(params[name], value), f"{reader}: final {name} differs from the continuous run"


@pytest.mark.parametrize("writer,reader", [("z3dp4", "z3dp4_to_z3dp2"),      # ZeRO-3 dp4 -> dp2
                                           ("z1dp2", "z1dp2_to_z3dp4"),      # ZeRO-1 dp2 -> ZeRO-3 dp4
                                           ("pp2", "pp2_to_tp2"),            # pp2 -> tp2
                                           ("pp2tp2", "pp2tp2_to_dp4"),      # pp2 x tp2 -> ZeRO-3 dp4
                                           ("hsdp2x2", "hsdp2x2_to_z0dp4"),  # HSDP 2x2 -> ZeRO-0 (DDP) dp4
                                           ("z3dp4", "z3dp4_to_cp2"),        # ZeRO-3 dp4 -> ring cp2
                                           ("z1dp2", "z1dp2_to_dp2cp2"),     # ZeRO-1 dp2 -> dp2 x Ulysses cp2
                                           ("hetero4", "hetero4_to_hetero2")])  # hetero, 4 ranks -> 2 ranks
def test_cross_layout_resume(launches, writer, reader):
    cont_losses, cont_params = _result(launches, writer)
    losses, params = _result(launches, reader)
    _close(losses, cont_losses[3:], f"{writer} -> {reader}")
    for name, value in cont_params.items():
        assert (params[name] - value).abs().max() <= 1e-4, name


@pytest.mark.parametrize("writer", ["z2dp2", "tp2dp2"])
def test_to_one_process(launches, one_process, writer):
    """ZeRO-2 dp2 -> one process; tp2 x dp2 (ZeRO-3) -> one process (no process group at all)."""
    resumed = one_process[1] if writer == "z2dp2" else one_process[2]
    cont_losses, cont_params = _result(launches, writer)
    _close(resumed[0], cont_losses[3:], f"{writer} -> one process")
    for name, value in cont_params.items():
        assert (resumed[1][name] - value).abs().max() <= 1e-4, name


def test_checkpointing_does_not_change_training(launches, one_process):
    """The checkpointing runs follow a single process that never saves."""
    ref = one_process[0]
    for writer in ("z1dp2", "z2dp2", "z3dp4"):
        losses, _ = _result(launches, writer)
        for step, (a, b) in enumerate(zip(losses, ref[0]), start=1):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"{writer}: step {step} {a!r} vs {b!r}"
    assert ref[0][-1] < ref[0][0]


@pytest.mark.parametrize("writer,reader,per_step", [("z3dp4", "z3dp4_to_z3dp2", 8), ("z1dp2", "z1dp2_to_z3dp4", 8),
                                                    ("pp2tp2", "pp2tp2_to_dp4", 8), ("z3dp4", "z3dp4_to_cp2", 8),
                                                    ("hetero4", "hetero4_to_hetero2", 16)])
def test_same_global_samples_and_step_numbers_after_dp_change(launches, writer, reader, per_step):
    cont = _jsonl(os.path.join(launches[writer], writer), "samples.jsonl")
    got = _jsonl(os.path.join(launches[reader], reader), "samples.jsonl")
    assert [r["step"] for r in got] == [4, 5, 6]
    assert got == cont[3:]
    metrics = _jsonl(os.path.join(launches[reader], reader), "metrics.jsonl")
    assert [r["step"] for r in metrics] == [4, 5, 6]
    assert metrics[-1]["samples_consumed"] == 6 * per_step


def test_checkpoints_written_by_every_layout_are_complete(launches):
    from loomtrain.checkpoint import format as fmt

    for writer, ranks in (("z1dp2", 2), ("z2dp2", 2), ("z3dp4", 4), ("hsdp2x2", 4), ("tp2dp2", 4), ("pp2", 2),
                          ("pp2tp2", 4)):
        root = os.path.join(launches[writer], writer, "checkpoints")
        assert [s for s, _ in fmt.list_committed(root)] == [6, 3]
        path = os.path.join(root, "step_00000006")
        man = fmt.read_manifest(path)
        assert fmt.verify_files(path, man, sorted(man["files"]), check="sha256") is None
        meta = fmt.read_meta(path)
        assert meta["layout"]["world_size"] == ranks and len(meta["rng"]["per_rank"]) == ranks
        # Replicated tensors are written once: no rank writes everything (bytes are balanced).
        sizes = [v["size"] for k, v in man["files"].items() if k.endswith(".distcp")]
        assert len(sizes) == ranks and max(sizes) < 0.75 * sum(sizes), (writer, sizes)
        # Every layout writes the same logical tensors: full HF names, global shapes.
        if writer.startswith(("z", "hsdp")):
            assert meta["tensors"] == fmt.read_meta(os.path.join(launches["z1dp2"], "z1dp2", "checkpoints",
                                                                 "step_00000006"))["tensors"], writer
        else:
            assert meta["tensors"] == fmt.read_meta(os.path.join(launches["pp2"], "pp2", "checkpoints",
                                                                 "step_00000006"))["tensors"], writer
