"""The training stages, one class each over the one driver (training/driver.py), and the command that runs each.
A stage module imports no other stage's module: what stages share lives below them (training/joined.py for the
joined model's next-token step, training/batches.py, the trainer, the losses)."""
from __future__ import annotations

from megatron_p2t import parts
from megatron_p2t.training.driver import Stage
from megatron_p2t.training.stages.align_hscale import AlignHScale
from megatron_p2t.training.stages.instruct import FeatureAlignment, Instruct, PretrainLM
from megatron_p2t.training.stages.warmup_structure import WarmupStructure

# align.objective -> the stage `megatron-p2t align` runs (parts.ALIGN_OBJECTIVES says what each is)
ALIGN = {"hscale": AlignHScale, "feature": FeatureAlignment, "lm": PretrainLM}
# command -> its stage; `align` resolves align.objective against the recipe's parts
COMMANDS = {"warmup-structure": WarmupStructure, "pretrain-lm": PretrainLM, "instruct": Instruct}


def for_command(command: str, cfg) -> Stage:
    """A fresh stage for one run of `command` on `cfg`."""
    if command == "align":
        return ALIGN[parts.align_objective(cfg.align.objective, cfg.model)]()
    return COMMANDS[command]()
