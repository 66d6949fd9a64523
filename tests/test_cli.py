import os
import subprocess
import sys

import pytest

from divattn.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "divattn", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_every_backend_with_its_state():
    out = run("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "divattn 0.1.0" in text and "torch" in text
    backends = text.split("backends:\n", 1)[1].splitlines()
    for name in ("triton", "cuda", "torch"):
        line = next(l for l in backends if l.strip().startswith(name + " "))
        assert "available" in line


def test_demo_checks_the_fused_ops(tmp_path):
    out = run("demo", "--frames", "3", "--patches", "9", "--heads", "1", "--head-dim", "16", "--order", "thw")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fused ops match the reference" in out.stdout
    assert out.stdout.count(" ok") == 4


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_importing_divattn_lets_flop_counter_count_the_kernel_ops():
    code = (
        "import torch, divattn\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "q, k, v = (torch.randn(1, 3, 5, 2, 16) for _ in range(3))\n"
        "with FlopCounterMode(display=False) as m:\n"
        "    divattn.temporal_attention(q, k, v, backend='triton')\n"
        "assert m.get_total_flops() == 2 * 2 * (1 * 5 * 2) * 3 * 3 * 16, m.get_total_flops()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"], ["train", "--list-configs"],
                                  ["train", "--print-config"]], ids=" ".join)
def test_small_commands_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from divattn.__main__ import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
