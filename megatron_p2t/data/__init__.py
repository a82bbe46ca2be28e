"""Streaming the shards that data_tools builds to every data-parallel rank, tokenised and batched."""
