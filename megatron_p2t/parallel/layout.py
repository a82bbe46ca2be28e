"""The parallel layout as values: what the config asks for (`ParallelConfig`) and what this process is in the
resulting tensor x pipeline x data grid (`Layout`, made by `state.initialize`). Building, loading, training,
export and the planner take a Layout as an argument; only `parallel/` asks megatron-core's globals.
No megatron import here, so configs load without the training stack."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    seed: int = 1234
    # a collective that waits longer than this fails the rank instead of hanging the job (a dead or stuck
    # peer under NCCL otherwise blocks the others until the launcher notices, or forever)
    timeout_minutes: float = 10.0


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes, this process's coordinates and its process groups (None in a world of one without groups)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0                      # global rank
    world: int = 1
    pp_last_rank: int = 0              # global rank of this pipeline's last stage
    tp_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)
    pp_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)
    dp_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)
    mp_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)  # tensor x pipeline
    tp_src_rank: int = 0               # global rank of this tensor group's first member
    mp_rank: int = 0                   # rank in the tensor x pipeline group (DeepSpeed names its files by it)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def transformer_sizes(self) -> dict:
        """The sizes megatron-core's TransformerConfig takes."""
        return {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp}


class LayoutError(ValueError):
    pass


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size, or a clear error when tp x pp does not divide the world."""
    if tp < 1 or pp < 1:
        raise LayoutError(f"tensor_parallel={tp} and pipeline_parallel={pp} must be >= 1")
    if world_size % (tp * pp):
        raise LayoutError(f"tensor_parallel x pipeline_parallel = {tp} x {pp} = {tp * pp} does not divide the "
                          f"world size {world_size}; launch a multiple of {tp * pp} processes or change the layout")
    return world_size // (tp * pp)
