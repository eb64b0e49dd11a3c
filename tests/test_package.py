"""Packaging: the wheel ships the kernels as tritonlstm.kernels and nothing as a top-level `kernels`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    (whl,) = out.glob("tritonlstm-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "tritonlstm/kernels/lstm.py" in names
    assert "tritonlstm/kernels/__init__.py" in names
    assert "tritonlstm/kernels/configs/nvidia-h100-80gb-hbm3.json" in names  # the tuned configs ship as data
    assert "tritonlstm/kernels/configs/nvidia-h200.json" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package would shadow others"
    top = {n.split("/")[0] for n in names}
    assert top == {"tritonlstm", next(t for t in top if t.endswith(".dist-info"))}, top


def test_wheel_runs_from_a_fresh_venv(wheel, tmp_path):
    """Installed into a new venv (torch and triton borrowed from this one), the kernels import and run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # The parent venv's site-packages give torch and triton; the editable tritonlstm there must not win.
    parent_site = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import os, sys\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, tritonlstm, tritonlstm.kernels.lstm as k\n"
            "assert 'site-packages' in k.__file__ and str(os.path.sep + 'kernels' + os.path.sep) not in "
            "tritonlstm.__file__, (k.__file__, tritonlstm.__file__)\n"
            "x = torch.randn(3, 2, 4); wi = torch.randn(16, 4); wh = torch.randn(16, 4)\n"
            "y, _ = tritonlstm.fused_lstm(x, wi, wh, backend='triton')\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('kernels') is None, 'top-level kernels installed'\n"
            "print('OK', k.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(parent_site)
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout and str(venv) in out.stdout
