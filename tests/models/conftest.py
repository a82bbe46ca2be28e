"""Fixtures of the single-process model checks."""
import os

import pytest


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from megatron_p2t.models.tiny import make_llama
    return make_llama(str(tmp_path_factory.mktemp("dense") / "llama"))


@pytest.fixture(scope="module")
def single():
    """A world of one (megatron's groups), for the single-process checks."""
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
    from tests.conftest import free_port
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    layout = state.initialize(ParallelConfig())
    yield layout
    state.destroy()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
