"""Exact parameter counts per tensor-parallel rank and pipeline stage, from the model configs."""
from __future__ import annotations


def llama_layer(h, nq, nkv, hd, ffn, tp):
    return (h * (nq + 2 * nkv) * hd + nq * hd * h + 3 * h * ffn) // tp + 2 * h


def esm_layer(h, ffn, tp):
    return (3 * h * h + 3 * h + h * h + 2 * h * ffn + ffn) // tp + h + h + 4 * h


def stage_params(esm, llama, proj, tp, pp, stage, esm_layers=None):
    """(esm cfg dict, llama cfg dict, projector dims) -> parameters held by one GPU of `stage`."""
    h, V = llama["hidden"], llama["vocab"]
    layers = llama["layers"] // pp
    n = layers * llama_layer(h, llama["heads"], llama["kv"], h // llama["heads"], llama["ffn"], tp)
    if stage == 0:
        eh, effn = esm["hidden"], esm["ffn"]
        n += V * h // tp
        n += 33 * eh + (esm_layers or esm["layers"]) * esm_layer(eh, effn, tp) + 2 * eh
        i = proj["intermediate"]
        n += (eh * i + i + i * h) // tp + h
    if stage == pp - 1:
        n += V * h // tp + h
    return n


ESM2_3B = {"layers": 36, "hidden": 2560, "ffn": 10240}
LLAMA31_8B = {"layers": 32, "hidden": 4096, "heads": 32, "kv": 8, "ffn": 14336, "vocab": 128256}
PROJ = {"intermediate": 2048}
