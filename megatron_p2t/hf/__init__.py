"""The parts in plain torch (transformers + torch alone), as an export holds them: what `inference.model` rebuilds
an exported model from, and what the parts' specs name as their inference forms."""
