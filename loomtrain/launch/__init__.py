"""The `loomtrain` command line: `run` (launch through torch's elastic agent, or train inside a
worker) and `report`. Entry point: `loomtrain.launch.cli:main` (= `python -m loomtrain.launch`)."""
from loomtrain.launch.cli import main, parse_args

__all__ = ["main", "parse_args"]
