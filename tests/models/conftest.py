"""Fixtures of the single-process model checks."""
import pytest


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from megatron_p2t.models.tiny import make_llama
    return make_llama(str(tmp_path_factory.mktemp("dense") / "llama"))
