"""A client-only install — ``pip install .`` without extras, in a fresh virtual environment without the system's
packages — has no torch, and its ``qlora-server`` reports a closed port in one line and generates against a
server. Needs PyPI (marker ``network``)."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from test_cli_startup import closed_port

ROOT = Path(__file__).resolve().parents[2]
#: What a wheel of the project needs; the copy keeps pip's in-tree build files (build/, *.egg-info) out of ROOT.
SOURCES = ("pyproject.toml", "README.md", "server", "trainer")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("client-install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    proc = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env_dir


@pytest.mark.network
def test_the_client_install_has_no_torch(client_venv):
    code = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'peft') if u.find_spec(m)])"
    out = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=client_venv)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.network
def test_the_client_install_reports_a_closed_port(client_venv):
    proc = subprocess.run([str(client_venv / "bin" / "qlora-server"), "adapters", "list", "--target",
                           f"127.0.0.1:{closed_port()}", "--timeout", "30"], capture_output=True, text=True,
                          timeout=120, cwd=client_venv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE: "), proc.stderr


@pytest.mark.network
def test_the_client_install_generates(client_venv, address, app):
    proc = subprocess.run([str(client_venv / "bin" / "qlora-server"), "generate", "--target", address, "--prompt",
                           "hello from the client", "--timeout", "30"], capture_output=True, text=True, timeout=120,
                          cwd=client_venv)
    assert proc.returncode == 0 and proc.stdout == "hello from the client\n", proc.stderr
    assert app.engine.submitted[0].prompt == "hello from the client"


@pytest.mark.network
def test_serve_in_the_client_install_names_the_extra(client_venv):
    proc = subprocess.run([str(client_venv / "bin" / "qlora-server"), "serve"], capture_output=True, text=True,
                          timeout=120, cwd=client_venv)
    assert proc.returncode == 2 and "pip install 'qlora-server[server]'" in proc.stderr, proc.stderr
