"""megatron-p2t: one entry point, a subcommand per stage. Launch scripts in launch/ only wrap it.

Each command imports what it needs when it runs, so `--help`, the data and planning commands start without
torch, megatron-core and DeepSpeed (several seconds of imports); the library modules import at their tops.
The commands live in cli/data.py, train.py, checkpoints.py and infer.py, each declared with its arguments
(cli/table.py); this module builds the parser from them and runs one."""
from __future__ import annotations

import sys

from megatron_p2t.cli import checkpoints, data, infer, train  # noqa: F401  (each registers its commands)
from megatron_p2t.cli.table import COMMANDS, leave_process_group, parser

# the order `--help` lists them in
ORDER = ("quickstart", "data-check", "make-tokenizer", "import-hf", "export-hf", "align", "cache-text",
         "warmup-structure", "pretrain-lm", "instruct", "export", "import-p2tv2", "generate", "generate-protein",
         "evaluate", "plan", "make-tiny-models")


def main(argv=None) -> int:
    p = parser([COMMANDS[n] for n in ORDER] + [c for n, c in COMMANDS.items() if n not in ORDER], __doc__)
    args, extra = p.parse_known_args(argv)
    # argparse stops filling a positional list once an option follows it (`import-p2tv2 DIR --out O a=b`,
    # `align --config C a=b --resume auto c=d`): trailing section.key=value words still belong to it
    words = bool(extra) and all("=" in e and not e.startswith("-") for e in extra)
    if words and hasattr(args, "inputs"):
        args.inputs += extra
    elif words and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    from data_tools.records import DataError
    from megatron_p2t.checkpoint.hf_dir import CheckpointError
    from megatron_p2t.config import ConfigError
    from megatron_p2t.parallel.layout import LayoutError
    from megatron_p2t.plan import PlanError
    try:
        rc = COMMANDS[args.cmd].handler(args)
    except (DataError, ConfigError, FileNotFoundError, CheckpointError, LayoutError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rc == 0:
        leave_process_group()
    return rc
