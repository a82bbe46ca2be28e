"""Where `Prot2TextForGeneration` was imported from before inference/ held it: exported models' cards and users'
code name `megatron_p2t.hf_model`, so it keeps answering."""
from megatron_p2t.inference.model import Prot2TextForGeneration, Projector  # noqa: F401
