"""``divattn train``: train a video model; a YAML config, then ``KEY=VALUE`` overrides.

With no arguments it trains the built-in default: a tiny divided-attention TimeSformer
on the synthetic motion task, sized for a CPU. ``--config`` takes a YAML file or the
name of a config shipped with the package (``--list-configs``). Under ``torchrun`` every process runs
this command; rank 0 writes the logs, checkpoints and ``summary.json``.

The config and the data are checked before the first step. A user error (config, paths,
data, checkpoint) exits 2 with one line ``divattn train: <sentence>``; a diverged loss or a
failed process of a ``torchrun`` exits 1 the same way; ``--debug`` or ``DIVATTN_DEBUG=1``
shows the traceback instead. ``--list-configs``, ``--print-config`` and ``--help`` do not
import torch.
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
    parser.add_argument("--print-config", action="store_true", help="print the resolved (and validated) config and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (also: DIVATTN_DEBUG=1)")


def main(args) -> int:
    """Run ``divattn train``: 0 when done, 2 with one line for a user error (config, paths,
    data, checkpoint), 1 with one line when the loss diverged or another process failed."""
    debug = args.debug or os.environ.get("DIVATTN_DEBUG", "") not in ("", "0")
    try:
        return _main(args)
    except Exception as e:
        code = _exit_code(e)
        if code is None or debug:
            raise
        # a user error is the same on every rank: rank 0 says it; a failure is each rank's own
        if code == 1 or os.environ.get("RANK", "0") == "0":
            print(f"divattn train: {_sentence(e)}", file=sys.stderr, flush=True)
        return code


def _main(args) -> int:
    if args.list_configs:
        from .config import list_configs

        builtin = list_configs()
        width = max(map(len, builtin), default=0)
        for name, (_, summary) in builtin.items():
            print(f"{name:<{width}}  {summary}".rstrip())
        return 0
    from .logs import CHECKPOINT

    resume = args.resume_from
    if resume is not None and not os.path.exists(resume):
        raise ConfigError(f"--resume-from {resume}: no such file")
    if resume is None and args.resume:
        candidate = os.path.join(args.output_dir, CHECKPOINT)
        if os.path.exists(candidate):
            resume = candidate
        elif not args.print_config:
            print(f"divattn train: no {candidate} yet; starting afresh", flush=True)
    if resume is not None:
        from .checkpoint import load_checkpoint

        if args.config:
            print("divattn train: --config is ignored when resuming (the checkpoint's config is the base; "
                  "use KEY=VALUE overrides)", file=sys.stderr)
        cfg = load_config(None, args.overrides, base=load_checkpoint(resume)["config"])
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from .config import dump

        print(dump(cfg), end="")
        return 0
    from .loop import train

    summary = train(cfg, args.output_dir, resume=resume)
    return 0 if summary is not None else 1


def _exit_code(e: Exception):
    """2 for the user errors the CLI foresees, 1 for a diverged loss or a failed peer, None
    for anything else (a bug: its traceback is shown)."""
    if isinstance(e, ConfigError):
        return 2
    from ..data import DataError, VideoDecodeError
    from .checkpoint import CheckpointError
    from .distributed import PeerFailure
    from .loop import NonFiniteLossError

    if isinstance(e, (DataError, CheckpointError, VideoDecodeError, PermissionError)):
        return 2
    if isinstance(e, (NonFiniteLossError, PeerFailure)):
        return 1
    return None


def _sentence(e: Exception) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, PermissionError):
        return f"{e.filename}: permission denied"
    if type(e).__name__ == "VideoDecodeError":
        return f"{text} (validation videos must decode; fix or remove the file from data.val_file)"
    return text
