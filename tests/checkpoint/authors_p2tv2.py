"""An equivalent of the authors' Prot2Text-V2 classes (`Esm2LlamaInstructForCausalLM` and its configs), written
for the tests from their public description: what `save_pretrained` of theirs writes and `from_pretrained` of
theirs expects, with the transformers version the project pins. ESM encoder (EsmModel, no pooler) -> adapter
(fc1 -> GELU -> dropout -> fc2 -> GELU -> dropout -> L2 normalise, with two LayerNorms its forward leaves
unused) -> LLaMA decoder, the placeholder tokens' embeddings replaced by the adapter's outputs."""
import torch
from transformers import EsmConfig, EsmModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel


class AdapterConfig(PretrainedConfig):
    model_type = "modality_adapter"

    def __init__(self, input_dim: int = 0, intermediate_dim: int = 0, output_dim: int = 0,
                 dropout_rate: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.intermediate_dim, self.output_dim = input_dim, intermediate_dim, output_dim
        self.dropout_rate = dropout_rate


class Adapter(PreTrainedModel):
    config_class = AdapterConfig

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.fc1 = torch.nn.Linear(config.input_dim, config.intermediate_dim)
        self.ln1 = torch.nn.LayerNorm(config.intermediate_dim)
        self.fc2 = torch.nn.Linear(config.intermediate_dim, config.output_dim)
        self.ln2 = torch.nn.LayerNorm(config.output_dim)
        self.dropout = torch.nn.Dropout(config.dropout_rate)
        self.post_init()

    def forward(self, x):
        x = self.dropout(torch.nn.functional.gelu(self.fc1(x)))
        x = self.dropout(torch.nn.functional.gelu(self.fc2(x)))
        return torch.nn.functional.normalize(x, p=2, dim=-1)


class P2TConfig(PretrainedConfig):
    model_type = "esm2llama_instruct"

    def __init__(self, esm_config=None, adapter_config=None, llama_config=None, placeholder_id: int = 128003,
                 **kwargs):
        super().__init__(**kwargs)
        self.esm_config = EsmConfig(**esm_config) if isinstance(esm_config, dict) else esm_config
        self.adapter_config = AdapterConfig(**adapter_config) if isinstance(adapter_config, dict) else adapter_config
        self.llama_config = LlamaConfig(**llama_config) if isinstance(llama_config, dict) else llama_config
        self.placeholder_id = placeholder_id

    def to_dict(self):
        out = super().to_dict()
        for k in ("esm_config", "adapter_config", "llama_config"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k).to_dict()
        return out


class P2TModel(PreTrainedModel):
    config_class = P2TConfig

    def __init__(self, config: P2TConfig):
        super().__init__(config)
        self.esm_encoder = EsmModel(config.esm_config, add_pooling_layer=False)
        self.adapter = Adapter(config.adapter_config)
        self.llama_decoder = LlamaForCausalLM(config.llama_config)
        self.post_init()

    def embed(self, input_ids, protein_ids, protein_mask):
        h = self.adapter(self.esm_encoder(input_ids=protein_ids, attention_mask=protein_mask.long()).last_hidden_state)
        emb = self.llama_decoder.get_input_embeddings()(input_ids).clone()
        emb[input_ids == self.config.placeholder_id] = h[protein_mask.bool()].to(emb.dtype)
        return emb

    def forward(self, input_ids, protein_ids, protein_mask, attention_mask=None):
        return self.llama_decoder(inputs_embeds=self.embed(input_ids, protein_ids, protein_mask),
                                  attention_mask=attention_mask).logits


def tiny(esm_dir: str, llama_dir: str, inter: int = 32, placeholder: int = 250, seed: int = 7,
         dtype=torch.float32) -> P2TModel:
    """The authors' model over tiny ESM / LLaMA configs, random weights (the adapter's LayerNorms too)."""
    torch.manual_seed(seed)
    esm_cfg, llama_cfg = EsmConfig.from_pretrained(esm_dir), LlamaConfig.from_pretrained(llama_dir)
    cfg = P2TConfig(esm_config=esm_cfg.to_dict(), llama_config=llama_cfg.to_dict(), placeholder_id=placeholder,
                    adapter_config={"input_dim": esm_cfg.hidden_size, "intermediate_dim": inter,
                                    "output_dim": llama_cfg.hidden_size, "dropout_rate": 0.3})
    model = P2TModel(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter.ln" in n:
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(len(n)))
    return model.to(dtype)
