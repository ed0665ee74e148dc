"""The committed generated protobuf / gRPC modules match what scripts/gen_protos.py makes from protos/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "server" / "rpc" / "gen"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run: python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}; run: python scripts/gen_protos.py"


def test_generated_modules_import_by_package_path():
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2, qlora_server_pb2_grpc

    assert qlora_server_pb2.DESCRIPTOR.package == "qlora_server.v1"
    assert hasattr(qlora_server_pb2_grpc, "GenerationStub")
