"""Run under torchrun by test_checkpoints.py: HF import -> export round trip, and megatron sharded checkpoints
saved at one TP x PP layout and reloaded at another."""
import argparse
import json
import os

import torch


def build(a, layout):
    from transformers import EsmConfig, LlamaConfig

    from megatron_p2t.models import p2t
    from megatron_p2t.models.esm import ESMConfig
    from megatron_p2t.models.projector import ProjectorConfig
    llama_cfg = LlamaConfig.from_pretrained(os.path.join(a.ckpt, "llama"))
    if a.mode == "load-wrong":
        llama_cfg.intermediate_size = 96
    esm_cfg = EsmConfig.from_pretrained(os.path.join(a.ckpt, "esm"))
    pcfg = ProjectorConfig(input_dim=48, intermediate_dim=32, output_dim=64, dropout=0.0)
    from megatron_p2t import parts
    from megatron_p2t.config import ModelConfig
    mcfg = ModelConfig()
    model = p2t.Prot2TextModel(mcfg, parts.of(mcfg), ESMConfig.from_hf(esm_cfg), llama_cfg, pcfg, placeholder_id=250,
                               pre_process=layout.first_stage, post_process=layout.last_stage, layout=layout)
    return model, llama_cfg, esm_cfg, pcfg


def logits(model, tp, layout):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_p2t.parallel import pipeline
    from tests.models.dist_model_main import reference_inputs
    outs = pipeline.run(model, reference_inputs(), collect_outputs=True)
    if not layout.last_stage:
        return None
    return [gather_from_tensor_model_parallel_region(o) if tp > 1 else o for o in outs]


def main():
    """Runs every --case MODE:TP:PP in this one process group, one after another (megatron's groups are rebuilt
    between cases; a launch costs more than a case). Each case writes WORK/MODE-tpTPppPP/rankN.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, metavar="MODE:TP:PP",
                    help="MODE: roundtrip, save, load (what save wrote, at another layout) or load-wrong")
    ap.add_argument("--ckpt")
    ap.add_argument("--work")
    args = ap.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    for case in args.case:
        mode, tp, pp = case.split(":")
        a = argparse.Namespace(**vars(args), mode=mode, tp=int(tp), pp=int(pp))
        ps.destroy_model_parallel()
        result = run_case(a, state.initialize(ParallelConfig(tensor=a.tp, pipeline=a.pp)))
        out = os.path.join(a.work, f"{mode}-tp{tp}pp{pp}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(result, f)
        torch.distributed.barrier()   # a load case reads the logits a save case's rank 0 wrote
    state.destroy()


def run_case(a, layout):
    from megatron_p2t.checkpoint import p2t_hf, sharded
    from megatron_p2t.checkpoint.hf_dir import CheckpointError, HFDir
    from megatron_p2t.checkpoint.slicing import copy_into
    tp_rank, rank = layout.tp_rank, torch.distributed.get_rank()
    model, llama_cfg, esm_cfg, pcfg = build(a, layout)
    result = {}
    if a.mode in ("roundtrip", "save"):
        src = {k: HFDir(os.path.join(a.ckpt, k)) for k in ("llama", "esm", "projector")}
        copy_into(model, p2t_hf.megatron_tensors(model, src["esm"], src["llama"], src["projector"], llama_cfg, pcfg,
                                              tp_rank, a.tp), "tiny checkpoints")
    if a.mode == "roundtrip":
        out = os.path.join(a.work, f"exported-tp{a.tp}pp{a.pp}")
        p2t_hf.hf_export(model, out, llama_cfg, esm_cfg, pcfg, tp_rank, a.tp, esm_src=os.path.join(a.ckpt, "esm"))
        if rank == 0:
            from transformers import EsmModel, LlamaForCausalLM
            LlamaForCausalLM.from_pretrained(os.path.join(out, "llama"))   # plain transformers loads them
            esm, info = EsmModel.from_pretrained(os.path.join(out, "esm"), add_pooling_layer=False,
                                                 output_loading_info=True)
            derived = dict(EsmModel(esm.config, add_pooling_layer=False).named_buffers())
            compared, unequal = 0, []
            for k in ("llama", "esm", "projector"):
                got = HFDir(os.path.join(out, k))
                for name in got.keys():
                    if name.endswith("inv_freq"):    # a buffer EsmModel derives itself: compared with its own
                        same = torch.equal(got.get(name), derived[name])
                    else:
                        same = torch.equal(got.get(name), src[k].get(("esm." + name) if k == "esm" else name))
                    if not same:
                        unequal.append(name)
                    compared += 1
            result = {"compared": compared, "unequal": unequal, "esm_missing": sorted(info["missing_keys"]),
                      "llama_files": sorted(os.listdir(os.path.join(out, "llama")))}
    elif a.mode == "save":
        with torch.no_grad():  # move away from the HF weights so a reload cannot match by accident
            for p in model.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
        sharded.save(model, os.path.join(a.work, "sharded"))
        out = logits(model, a.tp, layout)
        if out is not None and tp_rank == 0:
            torch.save(out, os.path.join(a.work, "saved_logits.pt"))
    elif a.mode == "load":
        sharded.load(model, os.path.join(a.work, "sharded"))
        out = logits(model, a.tp, layout)
        if out is not None:
            ref = torch.load(os.path.join(a.work, "saved_logits.pt"))
            result = {"logit_diff": max(float((x - y).abs().max()) for x, y in zip(out, ref))}
    elif a.mode == "load-wrong":
        try:
            sharded.load(model, os.path.join(a.work, "sharded"))
            result = {"error": None}
        except CheckpointError as e:
            result = {"error": str(e)}
    else:
        raise SystemExit(f"unknown mode {a.mode!r}")
    return result


if __name__ == "__main__":
    main()
