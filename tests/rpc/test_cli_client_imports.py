"""Every client command (``generate``, ``adapters …``, ``jobs …``) runs where ``import torch`` and ``import
transformers`` fail: against a fake server it works, against a closed port it reports the connection error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rpc_fakes import write_adapter_dir
from test_cli_startup import BLOCK_TORCH, closed_port

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120

RUN_BLOCKED = BLOCK_TORCH + """
from server.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not leaked, leaked
sys.exit(code)
"""


def _commands(tmp_path: Path) -> list[list[str]]:
    """Each client command with arguments that succeed against the fake server (in this order)."""
    src = write_adapter_dir(tmp_path / "src")
    return [
        ["generate", "--prompt", "hello big world"],
        ["generate", "--chat", "hi", "--stream", "--max-new-tokens", "8", "--temperature", "0.5", "--seed", "1"],
        ["adapters", "register", "--id", "reg", "--path", str(src)],
        ["adapters", "upload", "--id", "up", "--dir", str(src)],
        ["adapters", "list"],
        ["adapters", "list", "--json"],
        ["adapters", "get", "--id", "reg"],
        ["adapters", "unregister", "--id", "reg"],
        ["jobs", "create", "--adapter-id", "a", "--dataset", "/srv/data.jsonl", "--r", "8", "--truncate"],
        ["jobs", "list"],
        ["jobs", "get", "job-0000000000000000"],
        ["jobs", "watch", "job-0000000000000000"],
        ["jobs", "cancel", "job-0000000000000000"],
        ["jobs", "create", "--adapter-id", "b", "--dataset", "/srv/data.jsonl", "--watch"],
    ]


def _run_blocked(argv: list[str], target: str) -> subprocess.CompletedProcess:
    where = 2 if argv[0] in ("adapters", "jobs") else 1  # after the action of a two-level command
    argv = argv[:where] + ["--target", target, "--timeout", "30"] + argv[where:]
    return subprocess.run([sys.executable, "-c", RUN_BLOCKED, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=WAIT)


def test_client_commands_work_without_torch(address, app, training, tmp_path):
    for argv in _commands(tmp_path):
        proc = _run_blocked(argv, address)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)
        assert proc.stdout.strip(), argv
    assert sorted(app.store.adapters) == ["up"]
    assert [r.adapter_id for r in training.requests] == ["a", "b"]
    assert dict(training.requests[0].config) == {"r": 8, "truncate": True}


def test_adapters_list_json_without_torch(address, app, tmp_path):
    write_adapter_dir(tmp_path / "src")
    assert _run_blocked(["adapters", "upload", "--id", "hot", "--dir", str(tmp_path / "src")], address).returncode == 0
    proc = _run_blocked(["adapters", "list", "--json"], address)
    assert [a["adapter_id"] for a in json.loads(proc.stdout)] == ["hot"]


@pytest.mark.parametrize("index", range(14))
def test_client_commands_report_a_closed_port_in_one_line(tmp_path, index):
    argv = _commands(tmp_path)[index]
    proc = _run_blocked(argv, f"127.0.0.1:{closed_port()}")
    assert proc.returncode == 1, (argv, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE: ") and "Traceback" not in proc.stderr
