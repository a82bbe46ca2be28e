import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
SAMPLE = os.path.join(SHARED, "swissprot_sample.dat.gz")
MOL = os.path.join(SHARED, "mol_instructions_sample")


@pytest.fixture(autouse=True)
def _no_rendezvous_leaks(request):
    """A test that leaves RANK/WORLD_SIZE/... behind makes every later CLI subprocess think a launcher started it
    (CI failed once this way, far from the leaking test): fail the leaking test itself."""
    from megatron_p2t.parallel.launch_env import RENDEZVOUS
    keys = (*RENDEZVOUS, "MEGATRON_P2T_OWN_WORLD")
    before = {k: os.environ.get(k) for k in keys}
    yield
    after = {k: os.environ.get(k) for k in keys}
    if after != before:
        pytest.fail(f"{request.node.nodeid} changed launcher variables {before} -> {after}")


def _need(path):
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: the tests read the shared sample beside the checkout (../shared/data)")
    return path


@pytest.fixture(scope="session")
def sample_path():
    return _need(SAMPLE)


@pytest.fixture(scope="session")
def mol_dir():
    return _need(MOL)


@pytest.fixture(scope="session")
def sample_records(sample_path):
    from data_tools.readers import read_records
    return list(read_records(sample_path, skip_bad=True))


@pytest.fixture(scope="session")
def built_sample(tmp_path_factory, sample_path):
    """The shared sample built once: small shards so loaders have many shards to plan over."""
    from data_tools.build import BuildOptions, build
    out = str(tmp_path_factory.mktemp("built") / "sample")
    manifest = build(BuildOptions(inputs=[sample_path], out=out, skip_bad=True, samples_per_shard=37, quiet=True,
                                  processes=2))
    return out, manifest


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, sample_records):
    from megatron_p2t.data.text_tokenizer import build_llama3_style_tokenizer
    out = str(tmp_path_factory.mktemp("tok"))
    build_llama3_style_tokenizer((r.function for r in sample_records if r.function), out, vocab_size=1024)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src, name=None):
        dst = tmp_path / (name or os.path.basename(src))
        shutil.copy(src, dst)
        return str(dst)
    return make


def split_keys(built, split="train"):
    """Every sample key of a split of a built sample, sorted: what an exactly-once pass must yield."""
    from data_tools.shards import iter_shard_samples
    out, m = built
    return sorted(k for s in m["shards"] if s["split"] == split
                  for k, _ in iter_shard_samples(os.path.join(out, s["path"])))


@pytest.fixture(scope="session")
def family_data(tmp_path_factory, sample_records):
    """tests/synthetic.py's families built into shards by data_tools (FASTA + annotations, split by lists)."""
    from data_tools.build import BuildOptions, build
    from data_tools.split import SplitOptions
    from tests.synthetic import write_families
    root = tmp_path_factory.mktemp("families")
    paths = write_families(str(root / "src"), [r.function for r in sample_records if r.function])
    out = str(root / "data")
    manifest = build(BuildOptions(inputs=[paths["fasta"]], annotations=paths["annotations"], out=out, quiet=True,
                                  samples_per_shard=64, processes=2,
                                  split=SplitOptions(mode="lists", lists={k: paths[k] for k in
                                                                          ("train", "valid", "test")})))
    return out, manifest
