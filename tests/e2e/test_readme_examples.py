"""The README's OpenAI-compatible API and Structured output examples, run verbatim against a real server.

Every fenced block right after a ``<!-- readme-example: ... -->`` marker is run as it is written (python blocks
with this interpreter, bash blocks with bash and this environment's ``qlora-server`` on PATH) against the embedded
SmolLM2 served on the ports the README uses (gRPC 50051, HTTP 8000) with an adapter registered as ``my-adapter``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.model.embedded import converted_dir, ensure_converted
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from tests.server_process import start_server
from tests.tiny import make_adapter

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme-example:"
_BLOCK = re.compile(r"<!-- readme-example:[^>]*-->\n```(\w+)\n(.*?)\n```", re.S)


def readme_examples() -> list[tuple[str, str]]:
    """``(language, code)`` of every marked block, in README order."""
    text = README.read_text(encoding="utf-8")
    blocks = _BLOCK.findall(text)
    assert len(blocks) == text.count(MARKER), "a readme-example marker is not directly followed by a code block"
    return blocks


def test_the_readme_marks_its_api_and_structured_output_examples():
    text = README.read_text(encoding="utf-8")
    for section in ("## OpenAI-compatible API", "## Structured output"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        langs = {lang for lang, _ in _BLOCK.findall(body)}
        assert langs == {"python", "bash"}, (section, langs)  # both the openai client and curl, in each


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.config import ModelConfig

    root = tmp_path_factory.mktemp("readme")
    cache = converted_dir(ModelConfig().cache_dir).parent.parent
    model_dir = ensure_converted(cache)
    adapter = make_adapter(model_dir, root / "my-adapter", seed=5, r=8, lora_alpha=16, std=0.02,
                           target_modules=["q_proj", "v_proj"])
    proc = start_server("smollm2", root / "store", root / "server.log", "--cache-dir", str(cache),
                        "--port", "50051", "--http-port", "8000")
    _, adapters = proc.stubs()
    adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="my-adapter", path=str(adapter)))
    yield proc
    proc.stop()


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs_verbatim(server, tmp_path, index):
    lang, code = readme_examples()[index]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    elif lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"unexpected example language {lang!r}")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{lang} example {index} failed:\n{code}\n--- stdout\n{done.stdout}\n" \
                                 f"--- stderr\n{done.stderr}"
    assert done.stdout.strip(), "the example printed nothing"
    assert '"error"' not in done.stdout, done.stdout  # curl -s exits 0 on an HTTP error body
