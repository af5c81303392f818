"""Hostile and careless checkpoints (issue 9): a crafted index that would run code, a planted
`.lock` symlink, an export that fails half-way, same-size damage, damage that only loading finds,
a crafted meta.json and a DeepSpeed `latest` that loops. Each must end in one clear line (or a
fallback with one warning line), never run code, never lose or overwrite data, never hang."""
import io
import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from harness import case
from loomtrain.checkpoint import format as fmt
from loomtrain.checkpoint import offline, safeload
from loomtrain.checkpoint.format import CheckpointError, CorruptCheckpointError
from loomtrain.config import load_config
from loomtrain.launch import cli
from loomtrain.runtime.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
KEY = "model.model.embed_tokens.weight"


def _cfg(out, *extra, steps=2):
    return load_config(None, case("llama", f"train.max_steps={steps}", f"train.output_dir={out}", *extra))


def ckpt(argv: list[str]) -> int:
    return cli.main(["ckpt", *argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 steps of a tiny Llama with a checkpoint after each; its HF export."""
    base = tmp_path_factory.mktemp("hostile")
    out = str(base / "run")
    trainer = Trainer(_cfg(out, "checkpoint.every=1"))
    trainer.fit()
    return out, os.path.join(out, "checkpoints"), trainer


def _copy(run, tmp_path) -> str:
    root = str(tmp_path / "ckpts")
    shutil.copytree(run[1], root)
    os.remove(os.path.join(root, ".lock"))
    return root


def _reseal(ckpt_dir: str) -> None:
    """What an attacker does after editing files: a manifest that matches them again."""
    path = os.path.join(ckpt_dir, fmt.MANIFEST_FILE)
    with open(path, encoding="utf-8") as fh:
        man = json.load(fh)
    names = sorted(n for n in os.listdir(ckpt_dir) if n != fmt.MANIFEST_FILE)
    man["files"] = {n: fmt.file_entry(os.path.join(ckpt_dir, n)) for n in names}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(man, fh)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant_bytes_entry(ckpt_dir: str, marker: str, smuggle: bool) -> None:
    """Defect 1: the tensor KEY becomes a BytesStorageMetadata entry (given the real entry's
    size/properties/chunks when `smuggle`) whose data is a pickle that creates `marker`."""
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as fh:
        md = pickle.load(fh)  # trusted here: the test's own file
    real = md.state_dict_metadata[KEY]
    entry = BytesStorageMetadata()
    if smuggle:
        entry.__dict__.update(size=real.size, properties=real.properties, chunks=real.chunks)
    md.state_dict_metadata[KEY] = entry
    for index in [i for i in md.storage_data if i.fqn == KEY]:
        del md.storage_data[index]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf, pickle_protocol=4)
    with open(os.path.join(ckpt_dir, "__9_0.distcp"), "wb") as fh:
        fh.write(buf.getvalue())
    md.storage_data[MetadataIndex(KEY)] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()), None)
    with open(os.path.join(ckpt_dir, ".metadata"), "wb") as fh:
        pickle.dump(md, fh)
    _reseal(ckpt_dir)


@pytest.mark.parametrize("smuggle", [True, False], ids=["smuggled-size", "plain"])
def test_crafted_bytes_entry_never_runs(run, tmp_path, capsys, smuggle):
    root = _copy(run, tmp_path)
    step2 = os.path.join(root, "step_00000002")
    marker = tmp_path / "pwned"
    _plant_bytes_entry(step2, str(marker), smuggle)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata .*refusing"):
        Trainer(_cfg(str(tmp_path / "r"), f"checkpoint.resume={step2}")).setup()
    assert not marker.exists()
    capsys.readouterr()
    for argv in (["export-hf", step2, str(tmp_path / "hf")], ["verify", step2]):
        assert ckpt(argv) in (1, 2), argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing" in err, (argv, err)
        assert not marker.exists(), argv
    assert not os.path.exists(tmp_path / "hf")


def test_metadata_build_cannot_add_attributes(run, tmp_path):
    """Pickle's BUILD may set only a dataclass's own fields: an extra attribute is refused."""
    root = _copy(run, tmp_path)
    step2 = os.path.join(root, "step_00000002")
    with open(os.path.join(step2, ".metadata"), "rb") as fh:
        md = pickle.load(fh)
    md.state_dict_metadata[KEY].__dict__["extra"] = 1
    with open(os.path.join(step2, ".metadata"), "wb") as fh:
        pickle.dump(md, fh)
    with pytest.raises(CorruptCheckpointError, match="sets attributes on a TensorStorageMetadata"):
        safeload.load_dcp_metadata(step2)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_lock_link_never_touches_its_target(tmp_path, kind):
    """Decision: a `.lock` that is a symlink (or a hard link) is refused with one line, never
    followed or replaced: the directory is someone else's copy, and its owner should look."""
    root = tmp_path / "ck"
    root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (os.symlink if kind == "symlink" else os.link)(victim, root / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock is (a symbolic link|hard-linked)") as info:
        Trainer(_cfg(str(tmp_path / "run"), f"checkpoint.dir={root}")).setup()
    assert "\n" not in str(info.value)
    assert victim.read_text() == "precious\n"


def _model_bytes(out_dir: str) -> dict:
    return {n: (pathlib.Path(out_dir) / n).read_bytes() for n in sorted(os.listdir(out_dir))}


def test_export_overwrite_keeps_the_old_model_until_the_new_one_is_complete(run, tmp_path, capsys):
    _, root, _ = run
    out = str(tmp_path / "hf")
    assert ckpt(["export-hf", os.path.join(root, "step_00000001"), out]) == 0
    (pathlib.Path(out) / "NOTES.txt").write_text("mine\n")
    before = _model_bytes(out)
    # A checkpoint whose files match its manifest but whose data cannot be read.
    bad = str(tmp_path / "bad" / "step_00000002")
    shutil.copytree(os.path.join(root, "step_00000002"), bad)
    with open(os.path.join(bad, "__0_0.distcp"), "r+b") as fh:
        fh.write(b"\0" * 64)
    _reseal(bad)
    capsys.readouterr()
    assert ckpt(["export-hf", bad, out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loomtrain: error: corrupt checkpoint") and err.count("\n") == 1, err
    assert _model_bytes(out) == before  # the old export, whole
    assert sorted(os.listdir(tmp_path)) == ["bad", "hf"]  # no staging directory left behind
    # A good overwrite replaces the model and keeps the user's other files.
    assert ckpt(["export-hf", os.path.join(root, "step_00000002"), out, "--overwrite"]) == 0
    after = _model_bytes(out)
    assert after["NOTES.txt"] == b"mine\n" and after["model.safetensors"] != before["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["bad", "hf"]


def test_offline_write_leaves_nothing_when_it_fails(run, tmp_path, monkeypatch):
    """An import writes into a staging directory: a failure leaves no half-made output root."""
    _, root, _ = run
    tensors = offline.load_tensors(os.path.join(root, "step_00000002"), [KEY])

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(offline.dcp, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        offline.write_checkpoint(str(tmp_path / "imported"), 2, tensors, {})
    assert os.listdir(tmp_path) == []


def _flip(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x40]))


def test_old_manifest_without_fast_checksum_is_checked_with_sha256(run, tmp_path):
    _, root, _ = run
    ckpt_dir = str(tmp_path / "step_00000002")
    shutil.copytree(os.path.join(root, "step_00000002"), ckpt_dir)
    path = os.path.join(ckpt_dir, fmt.MANIFEST_FILE)
    with open(path, encoding="utf-8") as fh:
        man = json.load(fh)
    man["files"] = {n: {"size": e["size"], "sha256": e["sha256"]} for n, e in man["files"].items()}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(man, fh)
    man = fmt.read_manifest(ckpt_dir)
    assert fmt.verify_files(ckpt_dir, man, sorted(man["files"]), check="fast") is None
    _flip(os.path.join(ckpt_dir, "__0_0.distcp"))
    assert "sha256" in fmt.verify_files(ckpt_dir, man, sorted(man["files"]), check="fast")


@pytest.mark.parametrize("damage", ["metadata", "data"])
def test_damage_only_loading_finds_falls_back_once(run, tmp_path, capfd, damage):
    """verify=size cannot see same-size damage: the load fails (a garbled index; DCP's
    CheckpointException, a BaseException, from unreadable data) and the previous checkpoint is
    used, with one warning line; the explicit path is one error."""
    root = _copy(run, tmp_path)
    step2 = os.path.join(root, "step_00000002")
    name = ".metadata" if damage == "metadata" else "__0_0.distcp"
    with open(os.path.join(step2, name), "r+b") as fh:
        fh.write(b"\0" * 64)
    capfd.readouterr()
    trainer = Trainer(_cfg(str(tmp_path / "r"), f"checkpoint.dir={root}", "checkpoint.resume=auto",
                           "checkpoint.verify=size", steps=2)).setup()
    assert trainer.checkpointer.resumed_from.endswith("step_00000001") and trainer.step == 1
    trainer.checkpointer.end_fit(trainer.loop, RuntimeError("test over"))
    warned = [line for line in capfd.readouterr().err.splitlines() if "damaged" in line]
    why = ".metadata" if damage == "metadata" else "reading its tensors failed (rank 0: UnpicklingError"
    assert len(warned) == 1 and warned[0].startswith("loomtrain: warning: checkpoint ") and why in warned[0], warned
    with pytest.raises(CorruptCheckpointError, match="corrupt checkpoint .*step_00000002"):
        Trainer(_cfg(str(tmp_path / "x"), f"checkpoint.resume={step2}", "checkpoint.verify=size")).setup()


CRAFTED_META = {
    "wrong-types": {"layout": [1], "data": "x", "config": {"model": [1], "optim": "x"}, "tensors": {"a": 5}},
    "huge-numbers": {"created_unix": 1e300, "tensors": {KEY: {"shape": [10 ** 30, 10 ** 30], "dtype": "float32"}},
                     "layout": {"world_size": 10 ** 400, "degrees": {"tp": 10 ** 30}}},
    "nan": {"created_unix": float("nan"), "data": {"samples_consumed": float("inf")}},
    "deep": {},  # plus a value nested 100000 deep (below)
}


@pytest.mark.parametrize("case_name", list(CRAFTED_META))
def test_inspect_crafted_meta_is_one_line_or_a_table(run, tmp_path, capsys, case_name):
    _, root, _ = run
    ckpt_dir = str(tmp_path / "step_00000002")
    shutil.copytree(os.path.join(root, "step_00000002"), ckpt_dir)
    meta_path = os.path.join(ckpt_dir, fmt.META_FILE)
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    meta.update(CRAFTED_META[case_name])
    text = json.dumps(meta)
    if case_name == "deep":
        text = text[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"
    with open(meta_path, "w", encoding="utf-8") as fh:
        fh.write(text)
    capsys.readouterr()
    for argv in (["inspect", ckpt_dir], ["inspect", ckpt_dir, "--json"]):
        rc = ckpt(argv)
        out, err = capsys.readouterr()
        assert rc in (0, 2) and "Traceback" not in err, (argv, err)
        if rc == 2:
            assert err.startswith("loomtrain: error: ") and err.count("\n") == 1, err


def test_deepspeed_latest_that_loops_is_one_line(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    cases = []
    for tag in (".", "..", "/etc", "global_step1"):
        (ds / "latest").write_text(tag + "\n")
        cases.append(tag)
        if tag == "global_step1":
            os.symlink(".", ds / "global_step1")  # a tag directory that is the root itself
        assert ckpt(["import-deepspeed", str(ds), str(tmp_path / "out"), "--config", "-"]) == 2, tag
        err = capsys.readouterr().err
        assert err.startswith("loomtrain: error: ") and err.count("\n") == 1, (tag, err)
    assert not os.path.exists(tmp_path / "out")
