"""Fixtures: the OpenAI-compatible HTTP API over the rpc tests' fake App, and the official openai client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rpc"))  # rpc_fakes

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rpc_fakes import FakeApp, write_adapter_dir  # noqa: E402

from server.http.server import HttpServer, bind_http_socket  # noqa: E402


@pytest.fixture
def app(tmp_path: Path) -> FakeApp:
    fake = FakeApp(tmp_path / "adapters")
    fake.store.register("alpha", write_adapter_dir(tmp_path / "src"), False)
    return fake


@pytest.fixture
def client(app: FakeApp):
    server = HttpServer(app, bind_http_socket("127.0.0.1", 0)).start()
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                        timeout=30)
    server.stop()
