"""Every command the README shows works.

- The "Run the tests" block is what CI runs: its lines must appear in .ci/run in order.
- Other shell commands run here. Install lines (pip, venv) change the environment, so
  they run only under CI=true, where .ci/run has just made that environment.
- Python blocks run as they are.
- ``sh`` blocks (the install recipes: from an index, a wheel, an sdist, with the CUDA
  extension) are shown, not run; tests/test_packaging.py installs a built wheel.
"""

import concurrent.futures
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
    assert any("divattn train" in b and "pip install -e ." in b and "pytest" not in b for b in shell), "no main-job block"


def test_test_block_is_what_ci_runs():
    ci = commands((ROOT / ".ci" / "run").read_text())
    (block,) = [b for b in blocks("bash") if "pytest tests" in b]
    pos = 0
    for cmd in commands(block):
        assert cmd in ci[pos:], f"README command {cmd!r} is not in .ci/run (after line {pos})"
        pos = ci.index(cmd, pos) + 1


def runs_the_benchmarks(cmd):
    return without_env(cmd).startswith(("pytest benchmarks", "python benchmarks/render.py"))


# A training command from the README runs here shortened (as CI's learning check does):
# the full default run takes minutes; tests/train/test_learns.py checks a shortened run learns.
SHORT_TRAIN = ["train.epochs=1", "data.synthetic.train_size=128", "data.synthetic.val_size=64",
               "log.tensorboard=false", "log.progress=false"]


def is_train(cmd):
    return without_env(cmd).startswith(("divattn train", "python -m divattn train"))


def skip_reason(cmd):
    """Why a README shell command does not run here (None: it runs)."""
    if is_install(cmd) and os.environ.get("CI") != "true":
        return "changes this environment's packages; runs under CI=true, after .ci/run has installed"
    if runs_the_benchmarks(cmd) and os.environ.get("CI") != "true":
        return "the whole benchmark suite takes minutes; runs under CI=true"
    return None


def run_shell_command(cmd, tmp_path):
    """Run a README shell command as a user would: ``(first, command run, process)``, where
    ``first`` is the training run a ``--resume`` resumes (else None; when it fails, the
    command does not run and the process is None)."""
    env = user_env()
    first = None
    if is_train(cmd) and "--print-config" not in cmd:
        if "--resume" in cmd:  # resume needs a run to resume: make one first
            first = subprocess.run([sys.executable, "-m", "divattn", "train", *SHORT_TRAIN, "--output-dir",
                                    str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True)
            if first.returncode != 0:
                return first, cmd, None
        cmd = f"{cmd} {' '.join(SHORT_TRAIN)} --output-dir {tmp_path / 'run'}"
    if without_env(cmd).startswith("divattn "):
        cmd = cmd.replace("divattn ", "python -m divattn ", 1)
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
    return first, cmd, out


def run_python_block(index):
    return subprocess.run([sys.executable, "-c", blocks("python")[index]], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=900)


class Ahead:
    """The selected tests' commands, started ahead of their tests a few at a time (each is its
    own process, most of them busy on one core), in the tests' order. A command that changes
    the environment or times the benchmarks runs alone, in its test: the commands before it
    have ended and none after it has started."""

    def __init__(self, jobs):
        self.jobs = jobs  # [(key, runs alone, function)] in the tests' order
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self.started = {}
        self.next = 0
        self._start()

    def _start(self):
        while self.next < len(self.jobs) and not self.jobs[self.next][1]:
            key, _, fn = self.jobs[self.next]
            self.started.setdefault(key, self.pool.submit(fn))
            self.next += 1

    def result(self, key, fn):
        """What ``fn`` (the command of ``key``) returns: from its run started ahead, else run now."""
        if key in self.started:
            return self.started.pop(key).result()
        concurrent.futures.wait(list(self.started.values()))
        try:
            return fn()
        finally:
            keys = [k for k, _, _ in self.jobs]
            if key in keys:
                self.next = max(self.next, keys.index(key) + 1)
            self._start()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def ahead(request, tmp_path_factory):
    jobs = []
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module or not hasattr(item, "callspec"):
            continue
        params = item.callspec.params
        if item.originalname == "test_shell_command_runs" and skip_reason(params["cmd"]) is None:
            cmd, alone = params["cmd"], is_install(params["cmd"]) or runs_the_benchmarks(params["cmd"])
            jobs.append((("shell", cmd), alone,
                         lambda cmd=cmd, tmp=tmp_path_factory.mktemp("cmd"): run_shell_command(cmd, tmp)))
        elif item.originalname == "test_python_block_runs":
            jobs.append((("python", params["index"]), False, lambda i=params["index"]: run_python_block(i)))
    runs = Ahead(jobs)
    yield runs
    runs.close()


@pytest.mark.parametrize("cmd", sorted({c for b in blocks("bash") if "pytest tests" not in b for c in commands(b)}))
def test_shell_command_runs(cmd, tmp_path, ahead):
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    first, cmd, out = ahead.result(("shell", cmd), lambda: run_shell_command(cmd, tmp_path))
    if first is not None:
        assert first.returncode == 0, first.stderr[-3000:]
    assert out.returncode == 0, f"{cmd!r} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def test_install_section_names_every_way_and_this_version():
    import divattn

    shown = "\n".join(blocks("sh"))
    for way in ("pip install divattn ", "-py3-none-any.whl", ".tar.gz", "pip install -e .", "python -m build",
                "DIVATTN_BUILD_CUDA=1 pip install --no-build-isolation"):
        assert way in shown, f"the install section does not show {way!r}"
    versions = set(re.findall(r"divattn-(\d+\.\d+\.\d+)", README))
    assert versions == {divattn.__version__}, versions


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, ahead):
    out = ahead.result(("python", index), lambda: run_python_block(index))
    assert out.returncode == 0, f"README python block {index} failed:\n{out.stderr[-3000:]}"
