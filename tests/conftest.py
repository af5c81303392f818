import os
import sys

# Tests import their shared helpers (harness.py) and the package from the checkout.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
