"""`python -m loomtrain.launch ...` is the `loomtrain` command (also what each worker runs)."""
import sys

from loomtrain.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
