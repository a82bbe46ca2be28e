"""Read an HF checkpoint directory lazily: config.json + model.safetensors, or shards + an index file.
Tensors are opened with safetensors' `get_slice`, so a rank reads only the rows/columns it keeps."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

import torch


class CheckpointError(ValueError):
    pass


# LayerNorm parameters under the names some writers use (transformers' save of ESM among them): one spelling,
# weight/bias, for every reader; `HFDir.renamed()` keeps the source's spelling for writing it back
LEGACY_NAMES = ((".gamma", ".weight"), (".beta", ".bias"))


def canonical(name: str) -> str:
    for old, new in LEGACY_NAMES:
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


class HFDir:
    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.where: Dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json; "
                                  f"save the model with save_pretrained(safe_serialization=True)")
        self._open: Dict[str, object] = {}
        self._safe_open = safe_open
        self.stored = {canonical(k): k for k in self.where}

    def config(self) -> dict:
        with open(os.path.join(self.path, "config.json")) as f:
            return json.load(f)

    def keys(self):
        """The tensors' names, LayerNorm parameters as weight/bias whatever the files call them."""
        return self.stored.keys()

    def resolve(self, name: str) -> str:
        """The stored name of a tensor named either way."""
        return name if name in self.where else self.stored.get(name, name)

    def renamed(self) -> Dict[str, str]:
        """{name as keys() gives it: name in the files} where the two differ."""
        return {c: s for c, s in self.stored.items() if c != s}

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (BF16, F32, ...)."""
        name = self.resolve(name)
        return self._file(name).get_slice(name).get_dtype()

    def has(self, name: str) -> bool:
        return self.resolve(name) in self.where

    def _file(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing (found e.g. "
                                  f"{sorted(self.where)[:3]})")
        fn = self.where[name]
        if fn not in self._open:
            self._open[fn] = self._safe_open(os.path.join(self.path, fn), "pt")
        return self._open[fn]

    def shape(self, name: str) -> Sequence[int]:
        name = self.resolve(name)
        return self._file(name).get_slice(name).get_shape()

    def get(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or rows/columns [start, stop) along `dim` -- only those bytes are read."""
        name = self.resolve(name)
        sl = self._file(name).get_slice(name)
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise ValueError(dim)


class TensorSource:
    """The HFDir reading interface over tensors already in memory (a state dict, a model's gradients)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], path: str = "<memory>"):
        self.tensors, self.path = tensors, path

    def keys(self):
        return self.tensors.keys()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str):
        return tuple(self._t(name).shape)

    def _t(self, name):
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def get(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None):
        t = self._t(name)
        if dim is None:
            return t
        return t[start:stop] if dim == 0 else t[:, start:stop]
