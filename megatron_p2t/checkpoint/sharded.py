"""Megatron-side checkpoints with megatron-core's dist_checkpointing: every rank writes its own shards, and a
checkpoint reloads into any TP/PP layout (the sharded state dict records each tensor's global shape and this
rank's slice). Loading checks shapes first and names the first tensor that does not fit."""
from __future__ import annotations

import os

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor, load_tensors_metadata

from megatron_p2t.checkpoint.hf_dir import CheckpointError
from megatron_p2t.models.p2t import legacy_name


def save(model, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)


def load(model, directory: str, strict: bool = True) -> None:
    if not os.path.isdir(directory) or not os.path.exists(os.path.join(directory, "metadata.json")):
        raise CheckpointError(f"{directory}: no megatron checkpoint here (metadata.json missing); "
                              f"pass the directory a training run or an import wrote")
    wanted = model.sharded_state_dict()
    stored = load_tensors_metadata(directory)
    if any(isinstance(st, ShardedTensor) and st.key not in stored and legacy_name(st.key) in stored
           for st in wanted.values()):   # written before the connector's rename: `projector.*`, extra states too
        for st in wanted.values():
            if hasattr(st, "key"):
                st.key = legacy_name(st.key)
    check_shapes(wanted, directory)
    model.load_state_dict(dist_checkpointing.load(wanted, directory), strict=strict)


def check_shapes(sharded_state_dict, directory: str) -> None:
    """Compare the model's global tensor shapes with the checkpoint's before any data is read."""
    stored = load_tensors_metadata(directory)  # key -> ShardedTensor describing the whole stored tensor
    for st in sharded_state_dict.values():
        if not isinstance(st, ShardedTensor):
            continue
        if st.key not in stored:
            raise CheckpointError(f"{directory}: has no tensor {st.key!r}; it holds another model "
                                  f"(e.g. {sorted(stored)[:3]})")
        have = tuple(stored[st.key].global_shape)
        if have != tuple(st.global_shape):
            raise CheckpointError(f"{directory}: {st.key} is {have} there, this model needs "
                                  f"{tuple(st.global_shape)} -- the checkpoint is from a different model shape")
