from megatron_p2t.data.text_tokenizer import (LLAMA3_SPECIAL_BASE, llama3_special_tokens, load_text_tokenizer,
                                              special_id)


def test_llama3_special_layout():
    sp = llama3_special_tokens()
    assert len(sp) == 256
    # ids of LLaMA-3.1-8B-Instruct's tokenizer_config.json
    assert sp[128000 - LLAMA3_SPECIAL_BASE] == "<|begin_of_text|>"
    assert sp[128002 - LLAMA3_SPECIAL_BASE] == "<|reserved_special_token_0|>"   # Prot2Text-V2's pad
    assert sp[128003 - LLAMA3_SPECIAL_BASE] == "<|reserved_special_token_1|>"   # Prot2Text-V2's placeholder
    assert sp[128004 - LLAMA3_SPECIAL_BASE] == "<|finetune_right_pad_id|>"
    assert sp[128009 - LLAMA3_SPECIAL_BASE] == "<|eot_id|>"
    assert sp[128255 - LLAMA3_SPECIAL_BASE] == "<|reserved_special_token_247|>"


def test_tiny_tokenizer_loads_through_autotokenizer(tiny_tokenizer):
    tok = load_text_tokenizer(tiny_tokenizer)
    base = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert special_id(tok, 128009) == base + 9 == tok.convert_tokens_to_ids("<|eot_id|>")
    assert special_id(tok, 128003) == base + 3
    text = "Catalyzes the hydrolysis of ATP (EC 3.6.1.3); binds Mg(2+)."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "system", "content": "You are a scientific assistant."},
                                    {"role": "user", "content": "Describe it."}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    "You are a scientific assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                    "Describe it.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == base and special_id(tok, 128009) in ids


def test_rejects_a_non_llama3_tokenizer(tmp_path):
    import pytest
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eot_id"):
        load_text_tokenizer(str(tmp_path))
