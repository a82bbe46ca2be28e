"""Every launch script's command line goes through the config loader: the sbatch scripts' STAGE, CONFIG and
DEFAULTS as bash sets them, and the command lines the stage wrappers' headers show."""
import os
import re
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch")


def _sbatch_command(path: str):
    """(stage, config, defaults) as the script sets them: bash runs it with `source` (its call of common.sh)
    replaced by a print."""
    script = ('source() { printf "%s\\n" "$STAGE" "$CONFIG" "${DEFAULTS[@]}"; }; SLURM_SUBMIT_DIR=. ; '
              f'. {shlex.quote(path)}')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    stage, config, *defaults = out.splitlines()
    return stage, config, defaults


def _header_commands(path: str):
    """The `deepspeed ... launch/X.sh ARGS` / `bash launch/X.sh ARGS` lines of a wrapper's header, as argument
    lists after the script (lines with a `...` placeholder left out)."""
    name = os.path.basename(path)
    for line in open(path):
        m = re.match(rf"#\s+(?:deepspeed|bash)\b.*launch/{re.escape(name)}\s+(.*?)\s*\\?$", line)
        if m and "..." not in m.group(1):
            yield shlex.split(m.group(1))


SBATCH = sorted(f for f in os.listdir(os.path.join(LAUNCH, "slurm")) if f.endswith(".sbatch"))
WRAPPERS = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh") and "megatron_p2t.cli" in
                  open(os.path.join(LAUNCH, f)).read())


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_defaults_load(name):
    from megatron_p2t.config import load_config
    stage, config, defaults = _sbatch_command(os.path.join(LAUNCH, "slurm", name))
    assert stage in ("align", "instruct") and os.path.exists(os.path.join(ROOT, config))
    cfg = load_config(os.path.join(ROOT, config), defaults)
    assert isinstance(cfg.train.lr, float)       # `train.lr=1e-4` is a string to YAML 1.1


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_command_lines_load(name):
    from megatron_p2t.config import load_config
    commands = list(_header_commands(os.path.join(LAUNCH, name)))
    assert commands, f"launch/{name} shows no command line"
    for argv in commands:
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        load_config(os.path.join(ROOT, config), overrides)
