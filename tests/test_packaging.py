"""divattn as a package index serves it: the sdist and the wheel, built from this clone,
hold what an installed user needs, and the wheel works in a fresh virtual environment.

The distributions are built once, from a copy of this clone's files as a fresh clone has
them (``python -m build --no-isolation``: the wheel is built from the sdist, so a file
the sdist lacks fails the wheel too). The fresh
environment has no pip of its own and no view of this clone; it sees the torch, triton
and other dependencies already installed here through a ``.pth`` line, so nothing is
downloaded or reinstalled, and the wheel goes in with ``--no-deps``.
"""

import email
import importlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import divattn
from divattn.train.config import list_configs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = (".py", ".cpp", ".cu", ".cuh", ".h", ".yaml")  # what the package ships
TINY_TRAIN = ["train.epochs=1", "data.synthetic.train_size=32", "data.synthetic.val_size=16",
              "train.batch_size=16", "eval.batch_size=16", "data.num_workers=0", "model.depth=1",
              "log.tensorboard=false", "log.progress=false"]


def need(module):
    """Import a packaging tool from the test extra; a skip locally, a failure under CI."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is in the test extra: pip install -e '.[test]'")


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def setup_sources(root):
    """The files setup.py compiles into the extension, relative to ``root`` (its folder)."""
    return runpy.run_path(str(Path(root) / "setup.py"), run_name="divattn_setup")["csrc_sources"]()


def package_tree():
    """Every file the package should ship, relative to the clone, as the wheel names it."""
    out = set()
    for path in (ROOT / "divattn").rglob("*"):
        if path.is_file() and path.suffix in PACKAGE_FILES and "__pycache__" not in path.parts:
            out.add(path.relative_to(ROOT).as_posix())
    return out


# Left out of the copy the distributions are built from: what a fresh clone does not have
# (an old egg-info's SOURCES.txt would otherwise add its files to the sdist).
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "runs", "__pycache__",
                                        ".pytest_cache", ".benchmarks", "*.so", "*.o")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    need("build")
    src = tmp_path_factory.mktemp("src") / "divattn"
    shutil.copytree(ROOT, src, ignore=NOT_IN_A_CLONE)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=out)
    (sdist,) = out.glob("divattn-*.tar.gz")
    (wheel,) = out.glob("divattn-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh environment with the wheel installed: (python, bin folder, env for its commands)."""
    home = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(home / "env")])
    python = home / "env" / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # this environment's dependencies (not the clone: an editable install's finder is not a site dir here)
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_divattn_test_deps.pth").write_text("\n".join(sorted(here)) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(dists[1])])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.pop("TRITON_INTERPRET", None)
    env["PATH"] = f"{home / 'env' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return python, home / "env" / "bin", env, home


def test_pyproject_is_valid_and_the_version_has_one_source():
    validator = need("validate_pyproject.api").Validator()
    toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = toml.load(f)
    validator(pyproject)
    project = pyproject["project"]
    assert project["name"] == "divattn" and project["dynamic"] == ["version"] and "version" not in project
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "divattn.__version__"}
    assert project["scripts"] == {"divattn": "divattn.__main__:main"}
    assert {"test", "bench"} <= set(project["optional-dependencies"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", divattn.__version__)


def test_twine_accepts_the_distributions(dists):
    need("twine")
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dists)])


def test_sdist_holds_every_compiled_source_and_config(dists, tmp_path):
    sdist, _ = dists
    top = sdist.name[: -len(".tar.gz")]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path, filter="data")
    compiled = setup_sources(ROOT)
    assert compiled and all(src.startswith("divattn/csrc/") for src in compiled), compiled
    headers = set()
    for src in compiled:
        text = (ROOT / src).read_text()
        headers |= {f"divattn/csrc/{h}" for h in re.findall(r'#include\s+"([^"]+)"', text)}
    missing = sorted((set(compiled) | headers | package_tree()) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert {"pyproject.toml", "setup.py", "README.md", "PKG-INFO"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) or n.endswith((".so", ".o", ".pyc")) for n in names)
    # setup.py run from the unpacked sdist finds the same sources, so DIVATTN_BUILD_CUDA=1 compiles them
    unpacked = tmp_path / top
    assert setup_sources(unpacked) == compiled
    probe = run([sys.executable, "-c", "import runpy; runpy.run_path('setup.py', run_name='probe')['_cuda_extension']()"],
                cwd=unpacked, env={**os.environ, "DIVATTN_BUILD_CUDA": "1"})
    assert "no sources" not in probe.stderr
    if torch.version.cuda is None:
        assert "needs a CUDA build of torch" in probe.stderr


def test_wheel_holds_the_package_and_nothing_else(dists):
    _, wheel = dists
    assert wheel.name == f"divattn-{divattn.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(f"divattn-{divattn.__version__}.dist-info/METADATA"))
        entry_points = zf.read(f"divattn-{divattn.__version__}.dist-info/entry_points.txt").decode()
    package = {n for n in names if not n.startswith(f"divattn-{divattn.__version__}.dist-info/")}
    assert package == package_tree(), (sorted(package - package_tree()), sorted(package_tree() - package))
    assert {f"divattn/configs/{name}.yaml" for name in list_configs()} <= package
    assert set(setup_sources(ROOT)) <= package
    assert meta["Name"] == "divattn" and meta["Version"] == divattn.__version__
    assert meta["Requires-Python"] == ">=3.10" and meta["License-Expression"] == "BSD-3-Clause"
    assert any(r.startswith("torch") for r in meta.get_all("Requires-Dist"))
    assert {"test", "bench"} <= set(meta.get_all("Provides-Extra"))
    assert "divattn = divattn.__main__:main" in entry_points


def test_installed_wheel_reports_its_version_and_backends(venv):
    python, bin_dir, env, home = venv
    version = run([str(bin_dir / "divattn"), "--version"], cwd=home, env=env).stdout.strip()
    assert version == f"divattn {divattn.__version__}"
    info = run([str(bin_dir / "divattn"), "info"], cwd=home, env=env).stdout
    cuda = info[info.index("  cuda "):]
    assert "no csrc/ sources" not in cuda and "no sources" not in cuda, info
    check = run([str(python), "-c", """
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement
import divattn
from divattn.ops import cuda_ext
from divattn.train.config import list_configs
here = os.path.dirname(divattn.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)
assert md.version("divattn") == divattn.__version__
for text in md.requires("divattn"):
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        assert req.specifier.contains(md.version(req.name), prereleases=True), (text, md.version(req.name))
sources = cuda_ext._sources()
assert sources and all(s.startswith(os.path.join(here, "csrc")) for s in sources), sources
print(" ".join(sorted(os.path.basename(s) for s in sources)))
print(" ".join(list_configs()))
"""], cwd=home, env=env).stdout.splitlines()
    assert check[0].split() == sorted(os.path.basename(s) for s in setup_sources(ROOT))
    assert check[1].split() == list(list_configs())


def test_installed_wheel_runs_a_fused_op_against_the_torch_backend(venv):
    python, _, env, home = venv
    if not torch.cuda.is_available():
        env = {**env, "TRITON_INTERPRET": "1"}
    run([str(python), "-c", """
import torch
import divattn
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
B, T, N, H, D = 1, 3, 5, 2, 16
qkv = torch.randn(B, 1 + N * T, 3, H, D, device=device, dtype=torch.float64).float().requires_grad_()
outs, grads = {}, {}
for backend in ("triton", "torch"):
    q, k, v, cls = divattn.split_qkv(qkv, T, N, order="hwt", has_cls=True)
    o, o_cls = divattn.spatial_attention(q, k, v, cls=cls, backend=backend)
    ot = divattn.temporal_attention(q, k, v, backend=backend)
    loss = (o * o.detach().cos()).sum() + (o_cls * 2).sum() + (ot * ot.detach().sin()).sum()
    grads[backend], = torch.autograd.grad(loss, qkv)
    outs[backend] = (o, o_cls, ot)
for a, b in zip(outs["triton"], outs["torch"]):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(grads["triton"], grads["torch"], atol=1e-4, rtol=1e-4)
assert grads["torch"].abs().sum() > 0
"""], cwd=home, env=env)


def test_installed_wheel_trains_a_builtin_config(venv):
    python, bin_dir, env, home = venv
    out_dir = home / "run"
    listed = run([str(bin_dir / "divattn"), "train", "--list-configs"], cwd=home, env=env).stdout
    assert "synthetic_space_only" in listed
    run([str(bin_dir / "divattn"), "train", "--config", "synthetic_space_only", *TINY_TRAIN,
         "--output-dir", str(out_dir)], cwd=home, env=env)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["epochs"] == 1, summary
    assert "attention_type: space_only" in (out_dir / "config.yaml").read_text()
    wrong = subprocess.run([str(bin_dir / "divattn"), "train", "--config", "synthetic_spaceonly"], cwd=home,
                           env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "synthetic_space_only" in wrong.stderr and "kinetics400_timesformer" in wrong.stderr
    shutil.rmtree(out_dir)
