"""The package's structure: the layer contract (`.importlinter`) holds and catches an upward
import, no import hides inside a function, the command line parses without torch, and building a
model on the meta device changes nothing outside the call."""
from __future__ import annotations

import ast
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from loomtrain.launch import cli
from loomtrain.models.build import build_meta_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loomtrain"
CONTRACT = "loomtrain layers (top imports bottom, never the reverse)"
# Real optional dependencies: imported where they are used, so loomtrain runs without them.
OPTIONAL = ("matplotlib", "tensorboard", "torch.utils.tensorboard", "deepspeed")
_LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """`lint-imports` (import-linter) on the package under `root`, with its `.importlinter`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", _LINT, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- layer contract
def test_layer_contract_holds():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{CONTRACT} KEPT" in proc.stdout, proc.stdout


def test_layer_contract_fails_on_an_upward_import(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "loomtrain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "loomtrain" / "models" / "loss.py", "a", encoding="utf-8") as fh:
        fh.write("\nfrom loomtrain.runtime import trainer  # noqa: E402,F401 - upward, on purpose\n")
    proc = lint_imports(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"{CONTRACT} BROKEN" in out, out
    assert "loomtrain.models.loss -> loomtrain.runtime.trainer" in out, out


# ------------------------------------------------------------------ no imports in functions
def _function_imports(path: pathlib.Path) -> list[str]:
    """`line: module` of each import statement inside a function, method or lambda body."""
    found: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                         else ["." * child.level + (child.module or "")])
                found.extend(f"{child.lineno}: {n}" for n in names
                             if not any(n == o or n.startswith(o + ".") for o in OPTIONAL))
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_inside_a_function(path):
    """Imports sit at the top of the module (dependencies visible, no cycles dodged at run time),
    except real optional dependencies. The command line's deferred loading of a command's module
    is `importlib.import_module` through `cli.HANDLERS`, not an import statement."""
    found = _function_imports(path)
    assert not found, f"imports inside functions ({', '.join(found)})"


def test_function_import_scan(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n"
                      "def f():\n    import json\n    from . import x\n"
                      "class C:\n    def m(self):\n        def inner():\n            from torch import nn\n"
                      "        import matplotlib.pyplot\n        from torch.utils.tensorboard import SummaryWriter\n")
    assert _function_imports(sample) == ["3: json", "4: .", "8: torch"]


# -------------------------------------------------------------------------------- launch
def test_command_line_parses_without_torch():
    code = ("import sys; from loomtrain.launch import cli; cli.parse_args(['plan', '--lengths', 'x', "
            "'--gpus', '8', '--context-len', '64']); cli.parse_args(['ckpt', 'inspect', 'p']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_every_command_has_a_handler():
    names = {c for c in cli.COMMANDS if c not in ("ckpt", "data")} | {"_selfcheck"}
    names |= {f"ckpt {a}" for a in cli.CKPT_ACTIONS}
    names |= {f"data {a}" for a in cli.DATA_ACTIONS}
    assert set(cli.HANDLERS) == names
    for target in cli.HANDLERS.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


# ------------------------------------------------------------------------------- models
@pytest.mark.parametrize("hf_config", [
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
], ids=["llama_tied", "gpt2"])
def test_meta_build_is_scoped_and_matches_a_real_build(hf_config):
    register_parameter = nn.Module.register_parameter
    meta = build_meta_model(hf_config)
    assert nn.Module.register_parameter is register_parameter
    assert torch.empty(1).device.type == "cpu"  # the meta device does not outlive the call
    assert all(p.is_meta for p in meta.parameters())
    assert meta.lm_head.weight is meta.get_input_embeddings().weight
    real = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    real_buffers, meta_buffers = dict(real.named_buffers()), dict(meta.named_buffers())
    assert real_buffers.keys() == meta_buffers.keys()
    for name, buf in real_buffers.items():
        assert meta_buffers[name].device.type == "cpu" and torch.equal(meta_buffers[name], buf), name
