"""Checkpoints: HF directories in and out (one name table per part, sliced per rank while reading), the
Prot2Text-V2 layout, megatron-side sharded checkpoints, and a run directory's layout (run_dir.py)."""
