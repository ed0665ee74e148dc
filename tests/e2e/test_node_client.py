"""The Node.js example client (examples/clients/node/generate.js) against the real server: Python's greedy text."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from server.auth import hash_key
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from tests.server_process import REPO, start_server
from tests.tiny import make_adapter, save_tiny_base
from tests.tiny_tokenizer import save_byte_tokenizer
from tests.toolchain import require_tools

NODE_DIR = REPO / "examples" / "clients" / "node"
#: What ``npm ci`` installs from; their hash names the cached install.
NPM_FILES = ("package.json", "package-lock.json")
API_KEY = "key-node-client-0123456789"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
ADAPTER = "ad-node"
PROMPT, MAX_NEW_TOKENS = "hello world", 12

pytestmark = pytest.mark.network  # the first run installs the two npm packages from the registry


def node_toolchain() -> tuple[str, str]:
    """Paths of ``node`` and ``npm``. Skips the test when either is missing, except under CI (``CI=true``), where
    that fails the test instead so that a missing install cannot pass silently."""
    return require_tools("node", "npm", hint="Debian: apt-get install nodejs npm; .ci/run installs them")


@pytest.fixture(scope="module")
def node_modules() -> tuple[str, Path]:
    """``(node, node_modules)``: the example's locked packages, installed by ``npm ci`` once per lock into a temp
    directory named after the hash of package.json + package-lock.json (later runs reuse it). The install goes to
    a fresh directory renamed into place when complete, so an interrupted or concurrent run never leaves half of
    one behind."""
    node, npm = node_toolchain()
    digest = hashlib.sha256(b"".join((NODE_DIR / name).read_bytes() for name in NPM_FILES)).hexdigest()[:16]
    final = Path(tempfile.gettempdir()) / f"qlora-server-node-client-{digest}"
    if not final.is_dir():
        work = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=final.parent))
        try:
            for name in NPM_FILES:
                shutil.copy2(NODE_DIR / name, work / name)
            proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=work,
                                  capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "npm_config_update_notifier": "false"})
            assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            try:
                work.rename(final)
            except OSError:  # another run finished the same install first: use that one
                pass
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return node, final / "node_modules"


@pytest.fixture(scope="module")
def world(node_modules, tmp_path_factory):
    """A server on the tiny model with API keys on (one admin key) and adapter ``ADAPTER`` registered; yields
    ``(server, generation stub, run_node)`` where ``run_node(*args)`` runs generate.js against it."""
    node, modules = node_modules
    root = tmp_path_factory.mktemp("node-client")
    base = save_tiny_base(root)
    save_byte_tokenizer(base)
    source = make_adapter(base, root / "src", seed=1)
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "node", "sha256": hash_key(API_KEY), "role": "admin",
                                          "scopes": []}]}))
    server = start_server(str(base), root / "store", root / "server.log", "--api-keys-file", str(keys),
                          "--allowed-path", str(root))
    try:
        gen, ad = server.stubs()
        ad.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=ADAPTER, path=str(source)), metadata=AUTH,
                           timeout=60)

        def run_node(*args: str) -> tuple[int, str, str]:
            """``(exit code, stdout, stderr)`` of ``node generate.js --target ... *args``; output decoded here,
            not by ``text=True``, so a ``\\r`` in generated text is compared as it is."""
            proc = subprocess.run([node, str(NODE_DIR / "generate.js"), "--target", server.target, *args],
                                  cwd=NODE_DIR, capture_output=True, timeout=120,
                                  env={**os.environ, "NODE_PATH": str(modules)})
            return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")

        yield server, gen, run_node
    finally:
        server.stop()


def python_reply(gen, adapter: str) -> pb.GenerateResponse:
    """The Python stubs' answer to the request generate.js makes (greedy: temperature left at 0)."""
    request = pb.GenerateRequest(adapter_id=adapter, prompt=PROMPT, max_new_tokens=MAX_NEW_TOKENS)
    return gen.Generate(request, metadata=AUTH, timeout=60)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("adapter", ["", ADAPTER], ids=["base", "adapter"])
def test_node_text_equals_python(world, adapter, stream):
    _, gen, run_node = world
    expected = python_reply(gen, adapter)
    assert expected.text != python_reply(gen, "" if adapter else ADAPTER).text  # so the adapter id must reach it
    code, out, err = run_node("--api-key", API_KEY, "--adapter", adapter, "--prompt", PROMPT,
                              "--max-new-tokens", str(MAX_NEW_TOKENS), *(["--stream"] if stream else []))
    assert code == 0, err
    assert out == expected.text + "\n"
    finish = pb.FinishReason.Name(expected.finish_reason).removeprefix("FINISH_REASON_").lower()
    assert err.splitlines()[-1] == (f"finish_reason={finish} prompt_tokens={expected.prompt_tokens} "
                                    f"completion_tokens={expected.completion_tokens}")
    assert expected.completion_tokens == MAX_NEW_TOKENS and finish == "length"
    listed = err.splitlines()
    assert listed[0] == "adapters: 1" and listed[1].split()[:2] == [ADAPTER, "rank=4"], err


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_node_unknown_adapter_is_not_found(world, stream):
    _, gen, run_node = world
    with pytest.raises(grpc.RpcError) as python_err:
        python_reply(gen, "missing")
    assert python_err.value.code() == grpc.StatusCode.NOT_FOUND
    code, out, err = run_node("--api-key", API_KEY, "--adapter", "missing", "--prompt", PROMPT,
                              *(["--stream"] if stream else []))
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("error: NOT_FOUND: "), err
    assert "missing" in err.splitlines()[-1]


def test_node_without_the_key_is_unauthenticated(world):
    _, _, run_node = world
    code, out, err = run_node("--prompt", PROMPT)
    assert code == 1 and out == ""
    assert err.splitlines() == ["error: UNAUTHENTICATED: missing API key: send metadata 'authorization: Bearer <key>'"]
