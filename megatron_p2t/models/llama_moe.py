"""LLaMA with every MLP a mixture of experts (model.decoder=llama_moe, SEPIT's last stage): megatron-core's MoELayer
(router, token dispatcher, SequentialMLP experts) in the decoder layer spec, expert parallelism over the
data-parallel ranks (parallel.expert) through megatron-core's expert groups.

Four things differ from megatron-core's stock layer, each narrow:
- Capacity (token dropping) applies in training only, as in Switch Transformer and GShard; evaluation and
  generation route every token, as the exported Hugging Face model does. The router also counts, per step, the
  tokens each expert was given and how many were dropped (`take_router_stats`), for the log and TensorBoard.
- Without sequence parallelism (which megatron-core's local, non-Transformer-Engine spec does not offer) a
  tensor-parallel MoE layer refuses to train, as a performance guard. Each tensor-parallel rank then holds all of
  the layer's tokens, not a slice, and the allgather dispatcher hands every copy to the experts: the reduce-scatter
  that ends the layer still gives each rank the full, correct output, but experts do tp times the work and
  accumulate tp copies of their gradient, and the Switch loss, which sums token counts over the tensor-parallel
  group as if each rank held a slice, counts the batch tp times. The layer here skips the guard, divides the
  experts' gradients by tp, and has the router count over its own tokens only; the EP x TP parity test checks
  losses and gradients against one process.
- The allgather dispatcher (the CPU path; alltoall creates a CUDA stream) assumes every rank of the expert group
  holds as many tokens; stage-2 batches differ in length between data-parallel ranks, so each rank pads to the
  group's largest count (`PaddedAllGatherDispatcher`).
- Padding is left out of routing in training. megatron-core hands GPTModel's `padding_mask` ([b, s], True at
  padding) to the MoE layer, but its router only leaves padding out of the Switch loss: padding tokens are still
  routed and take capacity from real tokens (they look alike, so they crowd one expert). The model passes a packed
  batch's padding (segment 0; models/p2t.py); the router here gives those rows no expert, computes capacity over
  the real tokens only and leaves them out of the counts. (megatron-core's router docstrings say True marks valid
  tokens; its code, and TransformerLayer's docstring, treat True as padding.) Padded (unpacked) batches hand in
  the collate's `padding_mask` (data/instruct.py) the same way.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

from megatron_p2t.models.parts_config import MoEConfig
from megatron_p2t.models.specs import segment_attention
from megatron_p2t.parallel.state import collective_device

if not hasattr(moe_utils, "te_general_gemm"):
    # megatron-core 0.16.1 imports te_general_gemm only when Transformer Engine is installed, then tests it for None
    # in the router's gating linear: without TE the name is missing and routing fails with a NameError
    moe_utils.te_general_gemm = None


def dispatcher(moe: MoEConfig) -> str:
    """alltoall on GPUs (megatron-core's choice for expert parallelism); its DtoH copies use a CUDA side stream
    created at construction, so on CPU the allgather dispatcher (same routing, gather + reduce-scatter)."""
    if moe.dispatcher != "auto":
        return moe.dispatcher
    return "alltoall" if torch.cuda.is_available() else "allgather"


def config_overrides(moe: MoEConfig, ffn_hidden_size: int) -> dict:
    """TransformerConfig keys of the MoE layers."""
    return dict(num_moe_experts=moe.experts, moe_router_topk=moe.top_k, moe_router_pre_softmax=True,
                moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=moe.aux_loss, moe_expert_capacity_factor=moe.capacity_factor,
                moe_token_drop_policy="probs", moe_ffn_hidden_size=ffn_hidden_size,
                moe_token_dispatcher_type=dispatcher(moe), moe_grouped_gemm=False,
                moe_router_dtype="fp32")


class Router(TopKRouter):
    """TopKRouter with capacity in training only, and per-step routing counts."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.capacity_factor = config.moe_expert_capacity_factor
        self.config = copy.copy(config)          # megatron-core's routing on it drops nothing; routing() below does
        self.config.moe_expert_capacity_factor = None
        if not config.sequence_parallel and self.tp_cp_group.size() > 1:
            self.tp_cp_group = _OneRank()        # every tensor-parallel rank routes all tokens (module docstring)
        self._stats = None     # [tokens per expert..., tokens, dropped] since take_stats, where routing runs

    def routing(self, logits, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask)
        if not self.training:
            return probs, routing_map
        real = None
        if padding_mask is not None:     # [s, b], True at padding: no expert, no capacity, not counted
            real = ~padding_mask.reshape(-1)
            routing_map = routing_map & real[:, None]
            probs = probs * real[:, None]
        load = routing_map.sum(0).double()
        if self.capacity_factor is not None:
            probs, routing_map = self._drop(probs, routing_map, real)
        if torch._C._current_graph_task_id() != -1:
            return probs, routing_map     # recomputed in backward (model.recompute): counted in the forward already
        with torch.no_grad():     # counted on the device, read once per step (no sync per layer)
            routed = load.sum()
            row = torch.cat([load, routed[None], (routed - routing_map.sum())[None]])
            self._stats = row if self._stats is None else self._stats + row
        return probs, routing_map

    def _drop(self, probs, routing_map, real):
        """Capacity over the real tokens (all when `real` is None), megatron-core's drop policy."""
        drop = lambda p, m: moe_utils.apply_router_token_dropping(
            p, m, router_topk=self.topk, capacity_factor=self.capacity_factor,
            drop_policy=self.config.moe_token_drop_policy)
        if real is None:
            return drop(probs, routing_map)
        kept_probs, kept_map = drop(probs[real], routing_map[real])
        return (probs.new_zeros(probs.shape).index_put((real,), kept_probs),
                routing_map.new_zeros(routing_map.shape).index_put((real,), kept_map))

    def take_stats(self) -> torch.Tensor:
        """[tokens given to each expert..., tokens routed, tokens dropped] since the last call (then reset)."""
        out = (self._stats.cpu() if self._stats is not None
               else torch.zeros(self.config.num_moe_experts + 2, dtype=torch.float64))
        self._stats = None
        return out


class PaddedAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """megatron-core's allgather dispatcher assumes every rank of the expert group holds as many tokens (sequence
    parallelism over equal-length rows); stage-2 batches differ in length between data-parallel ranks. Each rank
    pads its tokens to the group's largest count with rows routed to no expert, and drops them again after the
    reduce-scatter that ends the layer."""

    _pad = 0

    def token_dispatch(self, hidden_states, probs):
        self._pad = 0
        if self.tp_size > 1 or self.ep_size > 1:
            n = torch.tensor([hidden_states.shape[0]], device=hidden_states.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX, group=self.tp_ep_group)
            self._pad = int(n) - hidden_states.shape[0]
        if self._pad:
            hidden_states = torch.nn.functional.pad(hidden_states, (0, 0, 0, self._pad))
            probs = torch.nn.functional.pad(probs, (0, 0, 0, self._pad))
            self.routing_map = torch.cat([self.routing_map, self.routing_map.new_zeros(
                self._pad, self.routing_map.shape[1])])
        return super().token_dispatch(hidden_states, probs)

    def token_combine(self, hidden_states):
        out = super().token_combine(hidden_states)
        return out[:out.shape[0] - self._pad] if self._pad else out


class DecoderMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if config.moe_token_dispatcher_type == "allgather":
            self.token_dispatcher = PaddedAllGatherDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection or get_default_pg_collection())
        tp = self.attn_tp_group.size()
        if tp > 1 and not config.sequence_parallel:   # tp copies of every token reach the experts
            for p in self.experts.parameters():
                p.register_hook(lambda g, tp=tp: g / tp)

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if self.training and not self.config.sequence_parallel and self.attn_tp_group.size() > 1:
            group, self.attn_tp_group = self.attn_tp_group, _OneRank()   # the guard only (module docstring)
            try:
                return super().forward(hidden_states, intermediate_tensors, padding_mask)
            finally:
                self.attn_tp_group = group
        return super().forward(hidden_states, intermediate_tensors, padding_mask)


class _OneRank:
    """A process group of this rank alone, for the checks and token counts that take one."""
    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def rank() -> int:
        return 0


def layer_spec(num_experts: int, normalization: str = "RMSNorm", attention_kernel: str = "auto"):
    """megatron-core's local GPT layer with the MoE MLP (SequentialMLP experts) and SegmentAttention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                  normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = segment_attention(attention_kernel)
    spec.submodules.mlp.module = DecoderMoELayer
    spec.submodules.mlp.submodules.router = Router
    return spec


def moe_layers(model) -> List[DecoderMoELayer]:
    return [m for m in model.modules() if isinstance(m, DecoderMoELayer)]


def train_experts(model) -> int:
    """Routers and experts trainable (whatever froze the decoder); the number of parameters made so."""
    n = 0
    for m in moe_layers(model):
        for p in list(m.router.parameters()) + list(m.experts.parameters()):
            p.requires_grad_(True)
            n += 1
    return n


def is_expert_param(p) -> bool:
    """A parameter only some data-parallel ranks hold (an expert under expert parallelism): megatron-core marks
    them `allreduce=False`, as DeepSpeed's MoE does; their gradients are reduced over the expert-data-parallel
    group instead of the data-parallel one."""
    return getattr(p, "allreduce", True) is False


def take_router_stats(model, layout) -> Dict[str, float]:
    """Per MoE layer (global layer number): each expert's share of the routed tokens and the dropped fraction,
    summed over the data-parallel ranks (every rank routes its own tokens) since the last call, every pipeline
    stage's layers on every rank; collective over the data-parallel and pipeline groups. {} without MoE."""
    layers = moe_layers(model)
    if not layers:
        return {}
    stats = torch.stack([m.router.take_stats() for m in layers])
    if layout.dp > 1:
        dev = stats.to(collective_device())
        torch.distributed.all_reduce(dev, group=layout.dp_group)
        stats = dev.cpu()
    stages = [([m.layer_number for m in layers], stats)]
    if layout.pp > 1:     # every stage's layers on every rank
        stages = [None] * layout.pp
        torch.distributed.all_gather_object(stages, ([m.layer_number for m in layers], stats), group=layout.pp_group)
    out = {}
    for numbers, rows in stages:
        out.update(_shares(numbers, rows))
    return out


def _shares(numbers, stats) -> Dict[str, float]:
    out = {}
    for n, row in zip(numbers, stats):
        tokens = float(row[-2])
        if tokens == 0:
            continue
        for e, load in enumerate(row[:-2].tolist()):
            out[f"moe/layer{n:02d}/expert{e}_load"] = load / tokens
        out[f"moe/layer{n:02d}/dropped"] = float(row[-1]) / tokens
    return out
