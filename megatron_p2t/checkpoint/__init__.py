"""Checkpoints: HF directories in and out (one name table per part, sliced per rank while reading), the
Prot2Text-V2 layout, megatron-side sharded checkpoints, and the model a run config names (load.py)."""
