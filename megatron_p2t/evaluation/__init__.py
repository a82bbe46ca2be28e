"""Scores of what `generate` and `generate-protein` wrote: text metrics beside the MMseqs2 / BLAST
nearest-neighbour baselines (text.py), generated proteins against the training set (proteins.py)."""
