"""Model parts as megatron-core modules: ESM-2 encoder, projector, LLaMA-3 decoder, the joined model and the
stage-1 alignment model. Shapes come in as HF configs and the Layout; no checkpoint reading here."""
