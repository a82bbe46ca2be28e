"""The command table: each subcommand is its handler with its arguments declared beside it (litgpt's __main__
table), registered by `@command`; `main` builds the parser from the table and maps the errors users meet to
exit code 2 with the message."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: Tuple[tuple, ...]           # (flags, argparse keywords) per argument, in order
    handler: Callable


COMMANDS: Dict[str, Command] = {}


def arg(*flags: str, **kw) -> tuple:
    return flags, kw


OVERRIDES = arg("overrides", nargs="*", help="section.key=value")
LOCAL_RANK = arg("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # DeepSpeed's launcher passes it


def command(name: str, help: str, *args: tuple):
    """Register the decorated handler as subcommand `name` with these arguments."""
    def register(fn: Callable) -> Callable:
        COMMANDS[name] = Command(name, help, args, fn)
        return fn
    return register


def parser(commands: List[Command], description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-p2t", description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    for c in commands:
        s = sub.add_parser(c.name, help=c.help)
        for flags, kw in c.args:
            s.add_argument(*flags, **kw)
    return p


def torch_rank() -> int:
    """This process's rank, also after a command has left its process group (export destroys it before the
    report): every rank printing it once interleaved two reports on one line."""
    import torch
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def model_setup(args):
    """The run config and this process's Layout, for the commands that build the model."""
    from megatron_p2t.config import load_config
    from megatron_p2t.parallel import state
    cfg = load_config(args.config, args.overrides)
    return cfg, state.initialize(cfg.parallel)


def leave_process_group() -> None:
    """Every rank of a command that succeeded leaves the process group together. A rank that exits while a
    peer's gloo threads still talk to it can abort that peer at interpreter shutdown ("terminate called without
    an active exception": seen after training, and in CI after cache-text, which did not leave)."""
    import torch.distributed as dist
    if dist.is_initialized():
        from megatron_p2t.parallel import state
        dist.barrier()
        state.destroy()
