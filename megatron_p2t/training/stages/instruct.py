"""The stages that train the joined model with its next-token step (training/joined.py): `instruct` (stage 2,
LoRA instruction tuning), LLaVA's feature alignment (Protein2Text's stage 1, what `align` runs for
align.objective=feature) and language-model pretraining of a decoder-only recipe (`pretrain-lm`)."""
from __future__ import annotations

from megatron_p2t import parts
from megatron_p2t.config import ConfigError, check_same_recipe
from megatron_p2t.parallel.layout import Layout
from megatron_p2t.training import joined
from megatron_p2t.training.driver import Stage
from megatron_p2t.training.trainer import check_optimizer


class Instruct(Stage):
    """Stage 2; with `documents`, a decoder-only recipe's stage 1 (language modelling on packed documents, the
    same model step)."""
    name = "instruct"
    documents = False

    def prepare(self, cfg):
        if self.documents and parts.encoder(cfg.model.encoder).reads_protein:
            raise ConfigError(f"language-model pretraining (`pretrain-lm`) trains a decoder-only recipe "
                              f"(model.encoder=none, model.connector=none); this config has model.encoder="
                              f"{cfg.model.encoder}")
        check_optimizer(cfg, whole_step=cfg.parallel.pipeline > 1, experts=cfg.parallel.expert > 1)
        stage = joined.stage2_config(cfg)  # its refusals too: all before any process group
        joined.check_data(cfg)
        if cfg.instruct.init_from:
            check_same_recipe(cfg.instruct.init_from, cfg, "instruct.init_from")
        return stage

    def build(self, cfg, layout: Layout):
        model, *_ = joined.build(cfg, layout)
        return model

    def loader(self, cfg, layout: Layout):
        return joined.make_loader(cfg, layout, documents=self.documents)

    def step(self, cfg, layout: Layout):
        if layout.pp > 1:
            def whole_step_fn(engine, batches):
                return (joined.pipeline_step(engine.module, batches, layout),
                        {"answer_tokens": sum(b["loss_mask"].sum() for b in batches)})
            return whole_step_fn

        def step_fn(engine, batch):
            loss, n = joined.forward_loss(engine, batch)
            return loss, {"answer_tokens": n}
        return step_fn

    def evaluate(self, cfg, layout: Layout):
        return lambda engine: joined.valid_loss(engine.module, cfg, layout, self.documents)

    def record(self, cfg) -> str:
        return "pretrain-lm" if self.documents else "instruct" if cfg.model.llm_lora.r > 0 else "align-feature"

    def trainer_micro_batch(self, cfg) -> int:
        return 1                          # packed or padded prompt rows: DeepSpeed counts micro-batches

    def param_groups(self, model, cfg):
        return joined.param_groups(model, cfg)

    def whole_step(self, layout: Layout) -> bool:
        return layout.pp > 1


class FeatureAlignment(Instruct):
    """LLaVA's feature alignment (Protein2Text's stage 1): stage 2's step with the decoder frozen, no adapters,
    on data.manifest's pairs, the connector alone trained at train.lr (joined.feature_alignment)."""

    def prepare(self, cfg):
        return super().prepare(joined.feature_alignment(cfg))


class PretrainLM(Instruct):
    """A decoder-only recipe's stage 1: continual pretraining on proteins written as text (ProLLaMA)."""
    documents = True
