"""Interleaved optimizer-state offloading (Deep Optimizer States). Not implemented yet."""
