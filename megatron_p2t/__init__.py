"""megatron_p2t: distributed training of protein-to-text models (Prot2Text-V2 recipe) on megatron-core + DeepSpeed."""
from megatron_p2t import _deferred_compile

__version__ = "0.1.0"

_deferred_compile.install()
