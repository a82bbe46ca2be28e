"""megatron_p2t: distributed training of protein-to-text models (Prot2Text-V2 recipe) on megatron-core + DeepSpeed."""
__version__ = "0.1.0"
