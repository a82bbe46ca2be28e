"""A decoder-only recipe's data: language-model documents (stage 1), plain prompts (stage 2), and tokenizers that
end texts with their own eos (LLaMA-2's </s>) instead of LLaMA-3.1-Instruct's <|eot_id|>."""
import dataclasses

import numpy as np
import pytest
import torch

from megatron_p2t.data.instruct import InstructConfig, PromptBuilder
from megatron_p2t.data.lm import DocumentLoader
from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader


@pytest.fixture(scope="module")
def llama2_style_tokenizer(tmp_path_factory, sample_records):
    """A byte-level BPE with LLaMA-2's special tokens (<s>, </s>, <unk>) and no chat template or <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((r.function for r in sample_records if r.function),
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = str(tmp_path_factory.mktemp("llama2_tok"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


def _loader(built_sample, tokenizer, **kw):
    out, _ = built_sample
    return ProteinTextLoader(LoaderConfig(manifest=f"{out}/manifest.json", text_tokenizer=tokenizer, batch_size=12,
                                          num_workers=0, shuffle_block=12, **kw))


def test_documents_are_bos_text_end_and_pack_with_their_own_positions(built_sample, tiny_tokenizer):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    tok = load_text_tokenizer(tiny_tokenizer)
    loader = _loader(built_sample, tiny_tokenizer, max_text_tokens=1000)
    raw = next(iter(loader))
    docs = DocumentLoader(loader, tok.bos_token_id, pack_length=512)
    b = docs.convert(raw)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    row0 = b["input_ids"][0]
    seg = b["attention_mask"][0]
    first = row0[seg == 1]
    assert first[0] == tok.bos_token_id and first[-1] == eot                    # <bos> text <end>
    assert tok.decode(first[1:-1].tolist()) in raw["texts"]
    assert (b["position_ids"][0][seg == 2][:3] == torch.arange(3)).all()        # positions restart per document
    # every token after each document's first is a target, the last predicts nothing
    lab, mask = b["labels"][0], b["loss_mask"][0]
    n = int((seg == 1).sum())
    assert mask[:n - 1].all() and mask[n - 1] == 0 and (lab[:n - 1] == first[1:]).all()
    assert b["input_ids"].shape[0] < 12 and docs.stats["documents"] == 12 and docs.stats["cut"] == 0


def test_a_document_longer_than_a_row_arrives_as_a_seeded_window(built_sample, tiny_tokenizer):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    tok = load_text_tokenizer(tiny_tokenizer)
    whole = next(iter(_loader(built_sample, tiny_tokenizer, max_text_tokens=1000)))
    cut = next(iter(_loader(built_sample, tiny_tokenizer, max_text_tokens=15, text_crop="window")))
    again = next(iter(_loader(built_sample, tiny_tokenizer, max_text_tokens=15, text_crop="window")))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    n_cut = 0
    for i in range(12):
        full = whole["text_ids"][i][whole["text_mask"][i]].tolist()
        win = cut["text_ids"][i][cut["text_mask"][i]].tolist()
        assert win == again["text_ids"][i][again["text_mask"][i]].tolist()        # seeded: the same window again
        if cut["cut"][i]:
            n_cut += 1
            assert len(win) == 15 and eot not in win                               # unended: a fragment
            assert any(full[a:a + 15] == win for a in range(len(full) - 14))      # a window of the text
        else:
            assert win == full
    assert n_cut >= 6
    docs = DocumentLoader(_loader(built_sample, tiny_tokenizer, max_text_tokens=15, text_crop="window"),
                          tok.bos_token_id, pack_length=16)
    docs.convert(cut)
    assert docs.stats["cut"] == n_cut


def test_plain_prompts_are_bos_instruction_input_with_the_answer_learned(tiny_tokenizer):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    tok = load_text_tokenizer(tiny_tokenizer)
    b = PromptBuilder(tok, InstructConfig(template="plain"), None)
    meta = {"instruction": "[Determine superfamily]", "input": "Seq=<MKVLAAG>"}
    answer = b._encode("Superfamily=<Globin-like superfamily>") + [b.eot]
    e = b.encode(meta, "P1", answer, n_protein=0, epoch=0)
    prompt = [tok.bos_token_id] + b._encode("[Determine superfamily] Seq=<MKVLAAG>")
    assert e.ids.tolist() == prompt + answer and e.targets[e.targets != -100].tolist() == answer
    assert b.prompt_ids(meta, "P1", 0) == prompt
    with pytest.raises(ValueError, match="set instruct.template=plain"):
        PromptBuilder(tok, InstructConfig(), None)
    with pytest.raises(ValueError, match="plain template needs an instruction"):
        b.prompt_ids({"name": "Kinase"}, "P2", 0)
    with pytest.raises(ValueError, match="conversations need the chat template"):
        b.encode({"conversations": [{"from": "human", "value": "?"}]}, "P3", [], 0, 0)


def test_texts_end_with_the_tokenizers_own_eos(built_sample, llama2_style_tokenizer):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    with pytest.raises(ValueError, match=r"no '<\|eot_id\|>' token.*set data.text_end.*'</s>'"):
        load_text_tokenizer(llama2_style_tokenizer)
    tok = load_text_tokenizer(llama2_style_tokenizer, "</s>")
    raw = next(iter(_loader(built_sample, llama2_style_tokenizer, text_end="</s>")))
    ends = [raw["text_ids"][i][raw["text_mask"][i]][-1] for i in range(12)]
    assert all(int(e) == tok.eos_token_id for e in ends)
    with pytest.raises(ValueError, match="text_crop='middle'"):
        _loader(built_sample, llama2_style_tokenizer, text_end="</s>", text_crop="middle")
