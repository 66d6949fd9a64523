"""``divattn`` / ``python -m divattn``: the command line.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``main(args) -> int``; this table is the only place that lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("divattn.cli.info", "show versions, devices and which backends can run, and why not"),
    "demo": ("divattn.cli.demo", "run the fused ops on a TimeSformer-shaped input and check them against the reference"),
    "train": ("divattn.train.cli", "train a video model (built-in default: a tiny TimeSformer on a synthetic motion task)"),
    "bench": ("divattn.bench.cli", "time divided and joint attention with every provider available here on one shape"),
    "kernels": ("divattn.cli.kernels", "compile the GPU kernels ahead of time (no GPU) and report registers, spills, "
                                       "shared memory, occupancy and tensor-core use"),
}


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` (all of them when ``argv`` is None)
    imports its module for its arguments, so ``divattn --help`` and ``divattn train --help``
    import nothing they do not show (no torch)."""
    from . import __version__

    chosen = None
    if argv is not None:
        chosen = next((a for a in argv if not a.startswith("-")), "")
    parser = argparse.ArgumentParser(prog="divattn", description="Fused divided space-time attention.")
    parser.add_argument("--version", action="version", version=f"divattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if chosen is None or chosen == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
