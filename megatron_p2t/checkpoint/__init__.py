"""Checkpoints: HF directories in and out (sliced per rank while reading), megatron-side sharded checkpoints."""
