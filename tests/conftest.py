import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
SAMPLE = os.path.join(SHARED, "swissprot_sample.dat.gz")
MOL = os.path.join(SHARED, "mol_instructions_sample")


# pytest-xdist (launch/test.sh: -n 2 --dist loadscope): a module's tests stay on one worker (module fixtures, the
# per-world-size launches of test_model_parallel, the one local SLURM, whose ports are fixed); modules sharing a
# session-scoped run (stage1_job) form one group so it runs once. The longest groups go first so both workers
# end together. (xdist's own xdist_group marks do not take under pytest 9: they rename Node._nodeid, which
# pytest 9 no longer reads; the scheduler below groups by this table instead.)
SHARED_GROUPS = {"tests/training/test_align.py": "stage1_job", "tests/launch/test_launchers.py": "stage1_job",
                 "tests/launch/test_slurm.py": "stage1_job"}
LONGEST_FIRST = ("stage1_job", "tests/training/test_instruct.py", "tests/models/test_model_parallel.py",
                 "tests/test_cli.py", "tests/checkpoint/test_p2tv2.py", "tests/training/test_protein2text.py",
                 "tests/training/test_structure_encoder.py", "tests/checkpoint/test_p2tv2_authors.py")


def group_of(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return SHARED_GROUPS.get(path, path)


@pytest.hookimpl(optionalhook=True)   # a plain pytest without xdist runs the suite in file order
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return group_of(nodeid)
    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    if getattr(config, "workerinput", None) is not None:    # an xdist worker: every worker sorts the same way
        def rank(item):
            g = group_of(item.nodeid)
            return LONGEST_FIRST.index(g) if g in LONGEST_FIRST else len(LONGEST_FIRST) + (
                0 if item.get_closest_marker("slow") else 1)
        items.sort(key=rank)


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


STAGE1_STEPS = 20


@pytest.fixture(scope="session")
def stage1_job(tmp_path_factory, built_sample, tiny_tokenizer):
    """The tiny stage-1 job at DP=2, and torchrun's run of it in ROOT/torchrun: the one reference that resume,
    ZeRO-2 and every launcher (the DeepSpeed launcher, mpirun, a hostfile, sbatch) must reproduce exactly.
    Returns (root, overrides); root/tiny holds the models."""
    from megatron_p2t.cli import main
    root = tmp_path_factory.mktemp("stage1_job")
    assert main(["make-tiny-models", "--tokenizer", tiny_tokenizer, "--out", str(root / "tiny")]) == 0
    out, _ = built_sample
    ov = [f"data.manifest={out}/manifest.json", f"data.text_tokenizer={tiny_tokenizer}", "data.batch_size=8",
          f"model.encoder_path={root}/tiny/esm", f"model.llama={root}/tiny/llama", f"train.steps={STAGE1_STEPS}",
          "train.save_every=5", "train.keep_last=5", "train.tensorboard=false"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "megatron_p2t", "align", "--config", "configs/align_tiny_cpu.yaml", *ov,
                        f"train.save_dir={root}/torchrun"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(root / "torchrun")) == STAGE1_STEPS
    return root, ov


def losses(d):
    return [json.loads(l)["loss"] for l in open(os.path.join(d, "train_log.jsonl"))]


def final_weights(d):
    import torch
    tag = open(os.path.join(d, "latest")).read().strip()
    module = torch.load(os.path.join(d, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return {k: v for k, v in module.items() if torch.is_tensor(v)}  # megatron's _extra_state entries are None


def same_run(d, ref):
    """d trained exactly as ref: the same losses at every step and bit-identical final weights."""
    assert losses(d) == losses(ref), (losses(d), losses(ref))
    import torch
    ours, theirs = final_weights(d), final_weights(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def free_port():
    """A port for a launcher that needs one given (--master_port): tests may run side by side (pytest-xdist)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    """A world of one (megatron's groups), for the single-process checks."""
    from megatron_p2t.parallel import state
    from megatron_p2t.parallel.layout import ParallelConfig
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
