"""The package's tiny checkpoints, re-exported for the tests (placeholder id 250 < the tiny vocab of 256)."""
from megatron_p2t.models.tiny import LLAMA31_ROPE, make_all, make_esm, make_llama, make_projector  # noqa: F401

PLACEHOLDER = 250
