"""Run one pytest selection as N processes at once, each taking every N-th test.

The op test grid on a GPU spends most of its time compiling Triton kernels, on the CPU:
N processes compile N kernels at a time. As a script::

    python benchmarks/gpu/pytest_shards.py --shards 4 --junitxml ops.xml -- tests/ops -k "not cuda" -q

runs ``pytest <args> -p pytest_shards --shard i/4`` for i = 1..4 (this file is also that
pytest plugin), each with its own JUnit XML and log, waits for all, writes the merged
JUnit XML and prints every shard's summary. Exit status: the first non-zero shard's, else 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# The pytest plugin -----------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="i/N: keep every N-th collected test, starting at the i-th")


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    i, n = (int(x) for x in shard.split("/"))
    if not 1 <= i <= n:
        raise ValueError(f"--shard {shard}: expected i/N with 1 <= i <= N")
    keep = [item for k, item in enumerate(items) if k % n == i - 1]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % n != i - 1])
    items[:] = keep


# The runner -----------------------------------------------------------------------------

def merge(parts: list, out: Path) -> None:
    """One JUnit XML holding every shard's test suites."""
    merged = ET.Element("testsuites")
    for part in parts:
        if part.exists():
            root = ET.parse(part).getroot()
            merged.extend([root] if root.tag == "testsuite" else list(root))
    ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--junitxml", required=True, help="the merged JUnit XML")
    p.add_argument("--dry-run", action="store_true", help="print the shard commands and exit")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: the pytest arguments")
    args = p.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    out = Path(args.junitxml)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    cmds = [[sys.executable, "-m", "pytest", *pytest_args, "-p", "pytest_shards", f"--shard={i}/{args.shards}",
             f"--junitxml={out.with_suffix(f'.{i}.xml')}"] for i in range(1, args.shards + 1)]
    if args.dry_run:
        for cmd in cmds:
            print(" ".join(cmd))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = [out.with_suffix(f".{i}.log") for i in range(1, args.shards + 1)]
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w", encoding="utf-8") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    codes = [proc.wait() for proc in procs]
    merge([out.with_suffix(f".{i}.xml") for i in range(1, args.shards + 1)], out)
    for i, (code, log) in enumerate(zip(codes, logs), 1):
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        print(f"shard {i}/{args.shards}: exit {code}: {lines[-1] if lines else '(no output)'}")
        for ln in failed:
            print("  " + ln)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
