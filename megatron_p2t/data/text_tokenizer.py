"""The decoder's tokenizer: loaded with AutoTokenizer from a directory, as real runs load LLaMA-3.1's.

Nothing can be downloaded in tests or on air-gapped clusters, so `build_llama3_style_tokenizer` trains a small
byte-level BPE on local text and lays out LLaMA-3.1's 256 special tokens in LLaMA-3.1's order right after the
BPE vocabulary (so every special id is `base + (LLaMA id - 128000)`), with LLaMA-3.1's chat template. It is
saved with save_pretrained and loaded back through the same `load_text_tokenizer` path.
"""
from __future__ import annotations

from typing import Iterable, List

LLAMA3_SPECIAL_BASE = 128000
_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
          7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}


def llama3_special_tokens() -> List[str]:
    """The 256 special tokens of LLaMA-3.1 in id order (128000..128255)."""
    out, reserved = [], 0
    for i in range(256):
        if i in _NAMED:
            out.append(_NAMED[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


# LLaMA-3.1-Instruct's template for plain chat (no tool calls): a system turn carries the knowledge-cutoff
# header, every turn ends with <|eot_id|>, and add_generation_prompt opens an assistant turn.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_llama3_style_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    specials = llama3_special_tokens()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=131072)
    fast.chat_template = LLAMA31_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return load_text_tokenizer(out_dir)


def load_text_tokenizer(path: str, end_token: str = "<|eot_id|>"):
    """end_token: what ends every answer and document (data.text_end): LLaMA-3.1-Instruct's <|eot_id|>, or the
    base model's eos (ProLLaMA, on LLaMA-2: </s>); it must be one token of this tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if end_token_id(tok, end_token) is None:
        raise ValueError(f"{path}: the tokenizer has no {end_token!r} token to end texts with; set data.text_end to "
                         f"one it has (its eos: {tok.eos_token!r})")
    return tok


def end_token_id(tok, end_token: str):
    """The id of `end_token` in `tok`, or None when it is not a token of it."""
    i = tok.convert_tokens_to_ids(end_token)
    return None if i is None or (i == tok.unk_token_id and end_token != tok.unk_token) else i


def special_id(tok, llama3_id: int) -> int:
    """The id in `tok` of the token that LLaMA-3.1 numbers `llama3_id` (e.g. 128003 -> the placeholder)."""
    return tok.convert_tokens_to_ids(llama3_special_tokens()[llama3_id - LLAMA3_SPECIAL_BASE])
