"""The `loomtrain` command line, the top layer: `run` (through torch's elastic agent, or inside a
worker), `report`, `plan`, `ckpt`. Entry point `loomtrain.launch.cli:main` (= `python -m
loomtrain.launch`). May import every layer.
"""
from loomtrain.launch.cli import main, parse_args

__all__ = ["main", "parse_args"]
