"""Transformer pieces megatron-core's layer specs take in: the packed-row core attention."""
