"""Model parts as megatron-core modules: ESM-2 encoder, projector, LLaMA-3 decoder, and the joined model."""
