import numpy as np

from megatron_p2t.data import esm_alphabet


def test_matches_hf_esm_tokenizer(tmp_path, sample_records):
    from transformers import EsmTokenizer
    hf = EsmTokenizer(vocab_file=esm_alphabet.write_vocab(str(tmp_path)))
    assert hf.vocab_size == esm_alphabet.VOCAB_SIZE == 33
    assert (hf.cls_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == \
        (esm_alphabet.CLS, esm_alphabet.PAD, esm_alphabet.EOS, esm_alphabet.UNK, esm_alphabet.MASK)
    seqs = [r.sequence for r in sample_records[:200]] + ["MKUOXBZ"]
    for s in seqs:
        assert np.array_equal(esm_alphabet.encode(s), hf(s)["input_ids"]), s[:20]


def test_roundtrip_and_lowercase():
    ids = esm_alphabet.encode("mkvL")
    assert esm_alphabet.decode(ids) == "MKVL" and ids[0] == esm_alphabet.CLS and ids[-1] == esm_alphabet.EOS
