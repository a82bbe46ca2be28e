"""Run by test_lm.py under torchrun with 2 processes: a decoder-only recipe's stage 1 (LoRA + the embedding and
output layer trained fully) on packed protein documents -- at TP=1 (every rank the whole model) and then TP=2
(vocabulary-parallel embedding and output layer), in one launch. Writes per rank: the packed loss against every
document run alone, and at TP=2 the loss and every trainable gradient (in HF layout) against TP=1's."""
import argparse
import json
import os

import torch
import torch.distributed as dist

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_p2t.checkpoint import llama_hf
    from megatron_p2t.config import load_config
    from megatron_p2t.data.loader import ProteinTextLoader
    from megatron_p2t.models.lora import lora_layers
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    from megatron_p2t.training import joined
    from tests.training.dist_instruct_main import _column_rows
    ref = {}
    for tp in (1, 2):
        cfg = load_config(os.path.join(ROOT, "configs", "prollama_tiny_cpu.yaml"),
                          a.overrides + [f"parallel.tensor={tp}", "model.llm_lora.dropout=0.0"])
        ps.destroy_model_parallel()
        layout = state.initialize(ParallelConfig(tensor=tp))
        model, llama_cfg, _, _ = joined.build(cfg, layout)
        with torch.no_grad():  # B starts at zero; move it off zero, identically at every layout, so A has gradients
            g = torch.Generator().manual_seed(5)
            for name, m in sorted(lora_layers(model.llm).items()):
                full = torch.randn(m.lora_B.shape[0] * (tp if m.kind == "column" else 1), m.lora_B.shape[1],
                                   generator=g) * 0.05
                m.lora_B.copy_(_column_rows(name, full, llama_cfg, layout.tp_rank, tp) if m.kind == "column"
                               else full)
        ld = joined.make_loader(cfg, layout, documents=True)
        # the same raw batch on every rank (the run's own loader splits by data-parallel rank)
        raw = next(iter(ProteinTextLoader(joined.stage_data(cfg, True), dp_rank=0, dp_size=1)))
        ld.pack = True
        batch = ld.convert(raw)
        model.zero_grad(set_to_none=True)
        loss, n = joined.forward_loss(model, batch)
        loss.backward()
        trainable = sorted({k.split(".")[1] if "lora_" not in k else "lora"
                            for k, p in model.named_parameters() if p.requires_grad})
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        # each document alone: one row, its own positions, no neighbours
        alone = []
        with torch.no_grad():
            ld.pack = False
            one = ld.convert(raw)
            for i in range(one["input_ids"].shape[0]):
                b = {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[0] == one["input_ids"].shape[0] else v)
                     for k, v in one.items()}
                li, ni = joined.forward_loss(model, b)
                alone.append((float(li), float(ni)))
        alone_loss = sum(l * k for l, k in alone) / sum(k for _, k in alone)
        out = {"tp": tp, "loss": float(loss), "tokens": int(n), "rows": int(batch["input_ids"].shape[0]),
               "documents": len(alone), "alone_loss_diff": abs(alone_loss - float(loss)), "trainable": trainable,
               "cut": ld.stats["cut"]}
        with torch.no_grad():   # the gradients in HF layout (PEFT names), whatever the sharding
            for k, p in model.named_parameters():
                if k in grads:
                    p.copy_(grads[k])
        slices = llama_hf.lora_hf_slices(model.llm, llama_cfg, layout.tp_rank, tp) + llama_hf.saved_module_slices(
            model.llm, llama_cfg, cfg.model.llm_lora.modules_to_save, layout.tp_rank, tp)
        if tp == 1:
            ref = {"loss": float(loss), "grads": {s.name: s.tensor for s in slices}}
        else:
            diffs = {}
            for s in slices:
                want = ref["grads"][s.name] if s.dim is None else ref["grads"][s.name].narrow(s.dim, s.start,
                                                                                              s.stop - s.start)
                diffs[s.name] = float((s.tensor - want).abs().max())
            out.update(vs_tp1_loss=abs(float(loss) - ref["loss"]), vs_tp1_grad=max(diffs.values()),
                       worst=max(diffs, key=diffs.get), compared=len(diffs),
                       saved_compared=sum("lora_" not in k for k in diffs))
        with open(os.path.join(a.work, f"tp{tp}_rank{dist.get_rank()}.json"), "w") as f:
            json.dump(out, f)
    state.destroy()


if __name__ == "__main__":
    main()
