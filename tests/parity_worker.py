"""Runs several training cases inside one torchrun launch (start-up dominates test time).

Usage (under torchrun): parity_worker.py CASES.json OUT_DIR
CASES.json: {"name": ["dotted.key=value", ...], ...}. For each case rank 0 writes
OUT_DIR/name.json (losses, grad norms) and OUT_DIR/name.safetensors (final full parameters).
"""
from harness import run_worker, train_and_save

if __name__ == "__main__":
    run_worker(train_and_save)
