from data_tools.clean import CleanOptions, clean, clean_function_text
from data_tools.records import ProteinRecord


def test_strips_evidence_and_citations():
    raw = ("Catalyzes X (PubMed:123, PubMed:456). Binds Y (PubMed:1, Ref.3) {ECO:0000269|PubMed:1, "
           "ECO:0000305}. Required for Z (By similarity). {ECO:0000250|UniProtKB:P11558}.")
    assert clean_function_text(raw) == "Catalyzes X. Binds Y. Required for Z (By similarity)."


def test_keeps_ordinary_parentheses():
    assert clean_function_text("Forms the (CoM-S-S-CoB) heterodisulfide.") == "Forms the (CoM-S-S-CoB) heterodisulfide."


def _rec(**kw):
    base = dict(accession="P1", sequence="M" * 100, function="Does things.", reviewed=True)
    base.update(kw)
    return ProteinRecord(**base)


def test_drop_reasons():
    o = CleanOptions(min_length=30, max_length=1024)
    assert clean(_rec(reviewed=False), o) == (None, "unreviewed")
    assert clean(_rec(function=""), o) == (None, "no_function")
    assert clean(_rec(sequence="M" * 29), o) == (None, "too_short")
    assert clean(_rec(sequence="M" * 1025), o) == (None, "too_long")
    assert clean(_rec(function="{ECO:0000305}"), o) == (None, "function_empty_after_cleaning")
    kept, why = clean(_rec(sequence="M" * 1024, reviewed=None), o)
    assert why == "" and kept.function == "Does things."


def test_length_limits_are_options():
    assert clean(_rec(sequence="M" * 2000), CleanOptions(max_length=4096))[1] == ""
    assert clean(_rec(reviewed=False), CleanOptions(require_reviewed=False))[1] == ""
