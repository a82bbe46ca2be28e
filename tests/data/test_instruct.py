"""Stage-2 prompts, labels and packing (no model: tests/models covers packed == unpacked through the model)."""
import numpy as np
import pytest
import torch

from megatron_p2t.data.instruct import (SYSTEM_PROMPT, InstructConfig, PromptBuilder, collate_instruct,
                                        pack_rows)

PH = "<|reserved_special_token_1|>"


@pytest.fixture(scope="module")
def builder(tiny_tokenizer):
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    return PromptBuilder(load_text_tokenizer(tiny_tokenizer), InstructConfig(), PH, seed=3)


def _text(b, ids):
    return b.tok.decode([int(i) for i in ids])


def test_labels_cover_the_answer_and_eot_only_and_placeholders_match_the_protein(builder):
    answer = builder._encode("Catalyzes the hydrolysis of ATP.") + [builder.eot]
    e = builder.encode({"name": "Kinase X", "organism": "Homo sapiens"}, "P1", answer, n_protein=9, epoch=0,
                       train=False)
    assert (e.ids == builder.placeholder).sum() == 9
    learned = e.targets[e.targets != -100]
    assert learned.tolist() == answer     # position t predicts t+1: exactly the answer tokens are targets
    assert e.targets[-1] == -100          # the last token predicts nothing (packing cannot leak)
    text = _text(builder, e.ids)
    assert SYSTEM_PROMPT in text and "Protein name: Kinase X; Taxon: Homo sapiens; Sequence embeddings:" in text
    assert text.count("<|start_header_id|>assistant<|end_header_id|>") == 1
    assert _text(builder, e.ids[-len(answer):]).startswith("Catalyzes")


def test_name_and_taxon_are_dropped_at_the_configured_rate_deterministically(builder):
    meta = {"name": "N", "organism": "O"}
    shown = [builder.user_turn(meta, f"K{i}", epoch=1, train=True) for i in range(2000)]
    for part in ("Protein name: N", "Taxon: O"):
        rate = 1 - sum(part in s for s in shown) / len(shown)
        assert 0.77 < rate < 0.83, (part, rate)
    assert shown[:50] == [builder.user_turn(meta, f"K{i}", epoch=1, train=True) for i in range(50)]
    assert shown[:50] != [builder.user_turn(meta, f"K{i}", epoch=2, train=True) for i in range(50)]
    assert builder.user_turn(meta, "K0", 0, train=False) == f"Protein name: N; Taxon: O; Sequence embeddings: {PH}"


def test_mol_instructions_and_multi_turn_conversations(builder):
    e = builder.encode({"instruction": "What does this protein do?", "task": "general_function"}, "Q9", [5, 6], 4, 0)
    assert "What does this protein do?\nSequence embeddings:" in _text(builder, e.ids)
    assert e.targets[e.targets != -100].tolist() == [5, 6, builder.eot]
    conv = [{"from": "human", "value": "<protein>\nIs it an enzyme?"}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Which class?"}, {"from": "gpt", "value": "A kinase."}]
    e = builder.encode({"conversations": conv}, "C1", [], 6, 0)
    learned = _text(builder, e.targets[e.targets != -100])
    assert learned == "Yes.<|eot_id|>A kinase.<|eot_id|>"
    text = _text(builder, e.ids)
    assert "Sequence embeddings: " + PH * 6 + "\nIs it an enzyme?" in text and "Which class?" in text
    with pytest.raises(ValueError, match="unknown speaker"):
        builder.encode({"conversations": [{"from": "robot", "value": "x"}]}, "C2", [], 3, 0)
    # generation asks each question from the same tokens training saw before that answer
    for j in (1, 3):
        prompt = builder.conversation_prompt_ids(conv[:j], 6)
        assert e.ids[:len(prompt)].tolist() == prompt and e.targets[len(prompt) - 1] != -100
        assert e.targets[len(prompt) - 2] == -100


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 9, 3, 4, 12, 1], capacity=12)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 9, 3, 4, 12, 1][i] for i in r) <= 12 for r in rows) and len(rows) == 3


def test_collate_packs_with_segments_positions_and_proteins_in_placeholder_order(builder):
    enc = [builder.encode({"name": f"P{i}"}, f"K{i}", list(range(10, 10 + 3 * i + 1)), n, 0, train=False)
           for i, n in enumerate((4, 7, 5))]
    prot = torch.arange(3)[:, None].expand(3, 7).clone()
    pmask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7, [1] * 5 + [0] * 2], dtype=torch.bool)
    packed = collate_instruct(enc, prot, pmask, pad_id=0, pack=True, pack_length=10 ** 4)
    padded = collate_instruct(enc, prot, pmask, pad_id=0, pack=False)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum() == sum((e.targets != -100).sum() for e in enc)
    seg, pos = packed["attention_mask"][0], packed["position_ids"][0]
    assert seg.unique().tolist() == [1, 2, 3] and (pos[seg == 2] == torch.arange(int((seg == 2).sum()))).all()
    # placeholders of the k-th sample in the row belong to the k-th protein handed to the splice
    slots = packed["input_ids"][0] == builder.placeholder
    per_seg = [int(slots[seg == s].sum()) for s in (1, 2, 3)]
    assert per_seg == packed["protein_mask"].sum(1).tolist()
    assert packed["protein_ids"][:, 0].tolist() == packed["order"].tolist()
    assert padded["attention_mask"] is None and np.array_equal(padded["order"], [0, 1, 2])
    # padded rows mark their padding (MoE routing leaves it out); packed rows' is their segment 0
    assert padded["padding_mask"].tolist() == [[j >= n for j in range(padded["input_ids"].shape[1])]
                                               for n in padded["lengths"].tolist()]
    assert "padding_mask" not in packed


def test_protein2text_conversations_go_from_json_through_shards_to_targets(tmp_path, sample_records, tiny_tokenizer):
    import json

    from data_tools.build import BuildOptions, build
    from data_tools.split import SplitOptions
    from megatron_p2t.data.instruct import InstructLoader
    from megatron_p2t.data.loader import LoaderConfig, ProteinTextLoader
    from megatron_p2t.data.text_tokenizer import load_text_tokenizer
    seqs = [r.sequence for r in sample_records if 50 <= len(r.sequence) <= 120][:3]
    rows = [{"id": f"QA{i}", "protein": s, "conversations": [
        {"from": "human", "value": "<protein>\nWhat is its function?"}, {"from": "gpt", "value": f"Function {i}."},
        {"from": "human", "value": "Where is it found?"}, {"from": "gpt", "value": f"Place {i}."}]}
        for i, s in enumerate(seqs)]
    rows.append({"id": "BAD", "protein": seqs[0], "conversations": [{"from": "human", "value": "hi"}]})
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    lists = {}
    for split, ids in (("train", ["QA0", "QA1", "QA2"]), ("valid", []), ("test", [])):
        (tmp_path / f"{split}.txt").write_text("\n".join(ids) + "\n")
        lists[split] = str(tmp_path / f"{split}.txt")
    man = build(BuildOptions(inputs=[str(tmp_path / "qa.json")], out=str(tmp_path / "data"), skip_bad=True,
                             quiet=True, processes=1, split=SplitOptions(mode="lists", lists=lists)))
    assert man["records"]["bad_input"] == {"malformed": 1} and man["records"]["kept"] == 3, man["records"]
    loader = ProteinTextLoader(LoaderConfig(manifest=str(tmp_path / "data" / "manifest.json"),
                                            text_tokenizer=tiny_tokenizer, batch_size=3, epochs=1, num_workers=0))
    tok = load_text_tokenizer(tiny_tokenizer)
    builder = PromptBuilder(tok, InstructConfig(), PH)
    batch = next(iter(InstructLoader(loader, builder, InstructConfig(pack=False), train=False)))
    for r in range(3):
        learned = tok.decode(batch["labels"][r][batch["loss_mask"][r].bool()].tolist())
        i = learned.split("Function ")[1][0]
        assert learned == f"Function {i}.<|eot_id|>Place {i}.<|eot_id|>"


def test_absent_name_and_taxon_read_unknown_token_for_token_as_the_authors_collater_writes(builder):
    # the authors' collater (Prot2Text-V2): both fields always present, "unknown" where the record has none or
    # training dropped it; the system message ends with a space; one placeholder per ESM token
    system = ("You are a scientific assistant specialized in protein function predictions. Given the sequence "
              "embeddings and other information of a protein, describe its function clearly and concisely in "
              "professional language. ")
    n = 7
    for meta, name, taxon in (({}, "unknown", "unknown"), ({"name": "Kinase X"}, "Kinase X", "unknown"),
                              ({"organism": "Homo sapiens"}, "unknown", "Homo sapiens")):
        user = f"Protein name: {name}; Taxon: {taxon}; " + "Sequence embeddings: " + PH * n
        theirs = builder.tok.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=True)
        assert builder.prompt_ids(meta, "K", n, train=False) == list(theirs["input_ids"]), meta
    # dropped in training reads "unknown" too; the option keeps the older form
    assert builder.user_turn({"name": "N"}, "K", 0, train=True).startswith("Protein name: ")
    omit = PromptBuilder(builder.tok, InstructConfig(missing_fields="omit"), PH)
    assert omit.user_turn({}, "K", 0, train=False) == f"Sequence embeddings: {PH}"
    with pytest.raises(ValueError, match="missing_fields"):
        PromptBuilder(builder.tok, InstructConfig(missing_fields="blank"), PH)
