"""The exported model at inference: rebuilt with transformers + torch alone (model.py), descriptions and answers
for proteins (generate.py), proteins from a decoder-only model (generate_protein.py)."""
