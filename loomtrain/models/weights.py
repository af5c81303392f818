"""Safetensors weights of `model.path`: headers read and checked before any tensor is.

A model directory is downloaded, copied and edited by people, so every way it can disagree with
itself or with the model (a truncated file, an index naming a missing or outside file, tensors
missing, unused or of another shape) is one error naming the file and tensor, found from the
headers alone: preflight runs it before any process starts.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from loomtrain.errors import LoomError


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class SafetensorsSource:
    """Full tensors by name from an HF directory (`model.safetensors`, or sharded with an index).

    Opening reads every file's header (names, shapes; no tensor data), so a truncated or foreign
    file, or an index naming a missing one, is one error naming the file before anything is
    built. Tensors are then read one at a time.
    """

    def __init__(self, path: str, base_prefix: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            self.files = {k: os.path.join(path, f) for k, f in _read_index(index).items()}
        elif os.path.isfile(single):
            self.files = dict.fromkeys(_header_shapes(single), single)
        else:
            raise LoomError(f"model.path={path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors weights are loaded: they cannot run code when read)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            shapes = _header_shapes(file)
            for key, where in self.files.items():
                if where == file:
                    if key not in shapes:
                        raise LoomError(f"model.path={path}: the index puts {key} in {os.path.basename(file)}, "
                                        "which does not hold it")
                    self.shapes[key] = shapes[key]
        self.prefix = base_prefix + "." if base_prefix else ""

    def key_for(self, name: str) -> str | None:
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix):] in self.files:
            return name[len(self.prefix):]
        return None

    def get(self, key: str) -> torch.Tensor:
        try:
            with safe_open(self.files[key], "pt") as fh:
                return fh.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise LoomError(f"{self.files[key]}: cannot read tensor {key} ({one_line(exc)})") from None


def _read_index(index: str) -> dict[str, str]:
    """The index's weight map: tensor name -> a file name inside the model directory."""
    try:
        with open(index, "rb") as fh:
            weight_map = json.loads(fh.read().decode("utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise LoomError(f"{index}: not a safetensors index with a weight_map ({one_line(exc)})") from None
    if not isinstance(weight_map, dict):
        raise LoomError(f"{index}: weight_map must map tensor names to file names")
    for key, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise LoomError(f"{index}: {key} maps to {file!r}, which is not a file name in the model directory")
    return weight_map


def _header_shapes(file: str) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(file, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise LoomError(f"{file}: not a readable safetensors file ({one_line(exc)}); "
                        "is it truncated or still downloading?") from None


def listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(model: nn.Module, source: SafetensorsSource, path: str, *, deliberate: bool) -> list[str]:
    """Compare the checkpoint's tensors with the model's parameters by name and shape.

    A missing tensor or a shape mismatch is an error naming the tensor (and both shapes).
    Tensors the model does not use are an error too when the model comes from config.json
    alone: then config and weights disagree (a wrong directory, a different variant). When
    `model.config` changes the geometry (`deliberate`, e.g. keeping the first layers of a larger
    model) they are returned for the caller to print as a warning. Buffers (rotary `inv_freq`)
    and the second name of a tied weight are never counted as unused.
    """
    used, missing = set(), []
    primary = {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = source.key_for(name)
        if key is None:
            if name in primary:
                missing.append(name)
            continue
        used.add(key)
        if tuple(param.shape) != source.shapes[key]:
            raise LoomError(f"model.path={path}: tensor {key} has shape {list(source.shapes[key])} in the "
                            f"checkpoint but the model's {name} is {list(param.shape)}")
    if missing:
        raise LoomError(f"model.path={path}: {len(missing)} parameters have no tensor in the checkpoint: "
                        f"{listed(missing)}")
    buffers = {source.key_for(n) for n, _ in model.named_buffers()}
    unused = sorted(k for k in source.files if k not in used and k not in buffers and not k.endswith("inv_freq"))
    if unused and not deliberate:
        raise LoomError(f"model.path={path}: {len(unused)} tensors in the checkpoint are not used by the model "
                        f"its config.json describes: {listed(unused)}; the weights do not match the config")
    return unused
