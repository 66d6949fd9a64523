"""Every command the README shows works.

- The "Run the tests" block is what CI runs: its lines must appear in .ci/run in order.
- Other shell commands run here. Install lines (pip, venv) change the environment, so
  they run only under CI=true, where .ci/run has just made that environment.
- Python blocks run as they are.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands(block):
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def user_env():
    """The environment a user has: no interpreter flag set by this test session."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def without_env(cmd):
    """The command without leading ``VAR=value`` assignments."""
    return re.sub(r"^(\w+=(\"[^\"]*\"|\S*)\s+)+", "", cmd)


def is_install(cmd):
    return without_env(cmd).startswith(("pip ", "python3 -m venv", "python -m venv"))


def test_readme_has_the_two_setup_blocks():
    shell = blocks("bash")
    assert any("pytest tests" in b for b in shell), "no test block"
    assert any("python -m divattn" in b and "pytest" not in b for b in shell), "no main-job block"


def test_test_block_is_what_ci_runs():
    ci = commands((ROOT / ".ci" / "run").read_text())
    (block,) = [b for b in blocks("bash") if "pytest tests" in b]
    pos = 0
    for cmd in commands(block):
        assert cmd in ci[pos:], f"README command {cmd!r} is not in .ci/run (after line {pos})"
        pos = ci.index(cmd, pos) + 1


def writes_committed_files(cmd):
    return without_env(cmd).startswith(("pytest benchmarks", "python benchmarks/render.py"))


@pytest.mark.parametrize("cmd", sorted({c for b in blocks("bash") if "pytest tests" not in b for c in commands(b)}))
def test_shell_command_runs(cmd):
    if is_install(cmd) and os.environ.get("CI") != "true":
        pytest.skip("changes this environment's packages; runs under CI=true, after .ci/run has installed")
    if writes_committed_files(cmd) and os.environ.get("CI") != "true":
        pytest.skip("rewrites the committed benchmark records; runs under CI=true, in a throwaway clone")
    env = user_env()
    bare = without_env(cmd)
    if bare.startswith(("python -m divattn", "pip ", "pytest ", "python benchmarks/")):
        prefix = cmd[: len(cmd) - len(bare)]
        for tool, exe in (("python -m", f"{sys.executable} -m"), ("pip ", f"{sys.executable} -m pip "),
                          ("pytest ", f"{sys.executable} -m pytest "), ("python benchmarks/", f"{sys.executable} benchmarks/")):
            if bare.startswith(tool):
                bare = exe + bare[len(tool):]
                break
        cmd = prefix + bare
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd!r} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index):
    code = blocks("python")[index]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"README python block {index} failed:\n{out.stderr[-3000:]}"
