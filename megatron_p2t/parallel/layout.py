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
    # expert parallelism (model.decoder=llama_moe): the experts of each MoE layer split over this many
    # data-parallel ranks; must divide the data-parallel size and the number of experts
    expert: int = 1
    seed: int = 1234
    # a collective that waits longer than this fails the rank instead of hanging the job (a dead or stuck
    # peer under NCCL otherwise blocks the others until the launcher notices, or forever)
    timeout_minutes: float = 10.0

    def without_experts(self) -> "ParallelConfig":
        """The layout of a stage that holds no experts (the warm-up, H-SCALE stage 1 and its text cache in a
        mixture-of-experts recipe, whose dense decoder becomes experts in stage 2): `expert` is stage 2's, and need
        not divide these stages' data-parallel size."""
        return dataclasses.replace(self, expert=1)


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
    ep: int = 1                        # expert-parallel size (over data-parallel ranks)
    ep_rank: int = 0
    ep_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)
    # the ranks holding the same experts (data-parallel size / ep): expert gradients are reduced over these
    expert_dp_group: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False)

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


def check_layout(world_size: int, tp: int, pp: int, ep: int = 1) -> int:
    """The data-parallel size, or a clear error when tp x pp does not divide the world or the expert-parallel
    size does not divide the data-parallel one."""
    if tp < 1 or pp < 1 or ep < 1:
        raise LayoutError(f"tensor_parallel={tp}, pipeline_parallel={pp} and expert_parallel={ep} must be >= 1")
    if world_size % (tp * pp):
        raise LayoutError(f"tensor_parallel x pipeline_parallel = {tp} x {pp} = {tp * pp} does not divide the "
                          f"world size {world_size}; launch a multiple of {tp * pp} processes or change the layout")
    dp = world_size // (tp * pp)
    if dp % ep:
        raise LayoutError(f"parallel.expert={ep} does not divide the data-parallel size {dp} (world {world_size} / "
                          f"tensor {tp} / pipeline {pp}): experts are split over data-parallel ranks; launch "
                          f"{tp * pp * ep} x n processes or lower parallel.expert")
    return dp
