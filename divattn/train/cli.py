"""``divattn train``: train a video model; a YAML config, then ``KEY=VALUE`` overrides.

With no arguments it trains the built-in default: a tiny divided-attention TimeSformer
on the synthetic motion task, sized for a CPU. ``--config`` takes a YAML file or the
name of a config shipped with the package (``--list-configs``). Under ``torchrun`` every process runs
this command; rank 0 writes the logs, checkpoints and ``summary.json``.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, load_config


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=3e-4 model.attention_type=space_only "
                             "(values are read as YAML)")
    parser.add_argument("--config", "-c", metavar="FILE|NAME",
                        help="YAML config file, or the name of a built-in one (see --list-configs); "
                             "its keys replace the built-in defaults")
    parser.add_argument("--list-configs", action="store_true", help="list the built-in configs and exit")
    parser.add_argument("--output-dir", "-o", metavar="DIR", default=os.path.join("runs", "default"),
                        help="where config.yaml, checkpoint.pt, logs and summary.json go (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR/checkpoint.pt when it exists, else start afresh; the checkpoint's "
                             "config is the base and KEY=VALUE overrides apply on top")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args) -> int:
    from ..train import checkpoint as ckpt_io
    from .loop import CHECKPOINT, NonFiniteLossError, train

    if args.list_configs:
        from .config import list_configs

        builtin = list_configs()
        width = max(map(len, builtin), default=0)
        for name, (_, summary) in builtin.items():
            print(f"{name:<{width}}  {summary}".rstrip())
        return 0
    resume = args.resume_from
    if resume is not None and not os.path.exists(resume):
        print(f"divattn train: --resume-from {resume}: no such file", file=sys.stderr)
        return 2
    if resume is None and args.resume:
        candidate = os.path.join(args.output_dir, CHECKPOINT)
        if os.path.exists(candidate):
            resume = candidate
        else:
            print(f"divattn train: no {candidate} yet; starting afresh", flush=True)
    try:
        base = None
        if resume is not None:
            if args.config:
                print("divattn train: --config is ignored when resuming (the checkpoint's config is the base; "
                      "use KEY=VALUE overrides)", file=sys.stderr)
            base = ckpt_io.load_checkpoint(resume)["config"]
            cfg = load_config(None, args.overrides, base=base)
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as e:
        print(f"divattn train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from .config import dump

        print(dump(cfg), end="")
        return 0
    try:
        summary = train(cfg, args.output_dir, resume=resume)
    except NonFiniteLossError as e:
        print(f"divattn train: {e}", file=sys.stderr)
        return 1
    return 0 if summary is not None else 1
