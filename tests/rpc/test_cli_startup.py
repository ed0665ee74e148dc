"""``serve`` fails fast and says what is wrong: ports bound before the model loads, ``--model`` checked in seconds,
one exit status for every start-up failure, a clear message when the ``server`` extra is missing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rpc_fakes import FakeApp

from server.cli import EXIT_STARTUP, serve

ROOT = Path(__file__).resolve().parents[2]
#: Bound on each subprocess (seconds): a liveness limit, not a timing assertion.
WAIT = 240


def closed_port() -> int:
    """A localhost TCP port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def busy_port():
    """A localhost port with a listening socket on it for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _serve(tmp_path: Path, *args: str, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m server serve`` with private state and a hub endpoint that refuses connections (nothing leaves
    the machine); ``prelude`` runs first in the child (e.g. an import blocker)."""
    child_env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_DISABLE_TELEMETRY": "1"}
    child_env.pop("HF_HUB_OFFLINE", None)
    child_env.pop("TRANSFORMERS_OFFLINE", None)
    child_env.update(env or {})
    argv = ["serve", "--host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
            "--adapters-dir", str(tmp_path / "adapters"), *args]
    code = f"{prelude}\nimport sys\nfrom server.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env, capture_output=True, text=True,
                          timeout=WAIT)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == EXIT_STARTUP, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qlora-server: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# --- ports before the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["port", "metrics_port"])
def test_a_busy_port_fails_before_the_app_is_built(tmp_path, busy_port, which, capsys):
    built = []
    ports = {"port": 0, "metrics_port": 0, which: busy_port}
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", **ports)
    code = serve(app.config, threading.Event(), app_factory=lambda config, metrics: built.append(1) or app)
    assert code == EXIT_STARTUP and built == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{which}: cannot bind" in err[0] and str(busy_port) in err[0]
    assert "already in use" in err[0]


def test_serve_on_a_busy_port_exits_before_loading_the_model(tmp_path, busy_port):
    # A fresh cache directory: loading would first convert the embedded model (and log "base model ... loaded").
    proc = _serve(tmp_path, "--port", str(busy_port), "--metrics-port", "-1", "--cache-dir", str(tmp_path / "cache"))
    line = _error_line(proc)
    assert f"port: cannot bind 127.0.0.1:{busy_port}" in line and "already in use" in line
    assert proc.stderr.strip().splitlines() == [line]  # nothing loaded, and no gRPC core log line either
    assert not (tmp_path / "cache").exists()


def test_serve_on_a_busy_metrics_port_exits_before_loading_the_model(tmp_path, busy_port):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", str(busy_port), "--cache-dir", str(tmp_path / "cache"))
    line = _error_line(proc)
    assert f"metrics_port: cannot bind 127.0.0.1 port {busy_port}" in line
    assert proc.stderr.strip().splitlines() == [line] and not (tmp_path / "cache").exists()


# --- --model -------------------------------------------------------------------------------------------------------


def _model_dir(root: Path, *files: str) -> Path:
    root.mkdir(parents=True)
    for name in files:
        (root / name).write_text("{}")
    return root


MODEL_CASES = {
    "missing absolute path": (lambda t: str(t / "no" / "such" / "model"), ["NOT_FOUND", "does not exist"]),
    "missing relative path": (lambda t: "./no-such-model-dir", ["NOT_FOUND", "./no-such-model-dir does not exist"]),
    "a file": (lambda t: str(_model_dir(t / "m", "config.json") / "config.json"), ["is a file"]),
    "empty directory": (lambda t: str(_model_dir(t / "m")),
                        ["not a model directory", "config.json", "weights", "tokenizer"]),
    "no tokenizer": (lambda t: str(_model_dir(t / "m", "config.json", "model.safetensors")),
                     ["missing a tokenizer"]),
    "no weights": (lambda t: str(_model_dir(t / "m", "config.json", "tokenizer.json")), ["missing weights"]),
    "missing shard": (lambda t: str(_shard_dir(t / "m")), ["weight shard", "model-00002-of-00002.safetensors"]),
}


def _shard_dir(root: Path) -> Path:
    _model_dir(root, "config.json", "tokenizer.json", "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_bad_model_path_says_what_is_wrong(tmp_path, case):
    make, fragments = MODEL_CASES[case]
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", make(tmp_path))
    line = _error_line(proc)
    assert "model: " in line
    for fragment in fragments:
        assert fragment in line


def test_an_unreachable_hub_fails_at_once_with_the_offline_hint(tmp_path):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", "qlora-test-org/no-such-model-7f3a")
    line = _error_line(proc)
    assert "cannot reach the Hugging Face hub" in line and "HF_HUB_OFFLINE=1" in line and "hf download" in line


def test_an_uncached_hub_id_in_offline_mode_fails_at_once(tmp_path):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", "qlora-test-org/no-such-model-7f3a",
                  env={"HF_HUB_OFFLINE": "1"})
    line = _error_line(proc)
    assert "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)" in line


# --- the server extra ----------------------------------------------------------------------------------------------

BLOCK_TORCH = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked by the test: " + name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def test_serve_without_the_server_extra_names_it(tmp_path):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", prelude=BLOCK_TORCH)
    line = _error_line(proc)
    assert "`serve` needs the server extra: pip install 'qlora-server[server]'" in line
    assert "torch" in line and "transformers" in line


BLOCK_GGUF = BLOCK_TORCH.replace('("torch", "transformers")', '("gguf",)')


def test_only_the_embedded_models_conversion_needs_gguf(tmp_path):
    """A server of any other model starts without ``gguf`` (the GPU image has none); converting the embedded model
    asks for it by name."""
    other = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", str(tmp_path / "no-such-model"),
                   prelude=BLOCK_GGUF)
    line = _error_line(other)
    assert "does not exist" in line and "extra" not in line  # got past the extra check to the --model check
    embedded = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--cache-dir", str(tmp_path / "fresh-cache"),
                      prelude=BLOCK_GGUF)
    line = _error_line(embedded)
    assert "model: converting the embedded model needs the gguf package" in line
    assert not (tmp_path / "fresh-cache").exists() or not any((tmp_path / "fresh-cache").rglob("*.safetensors"))


def test_train_without_the_server_extra_names_it(tmp_path):
    code = f"{BLOCK_TORCH}\nfrom server.cli import main\nsys.exit(main(['train', {str(tmp_path / 'c.yaml')!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    line = _error_line(proc)
    assert "`train` needs the server extra: pip install 'qlora-server[server]'" in line


@pytest.fixture
def hub_404():
    """A local HTTP server answering 404 to everything, as a hub endpoint."""
    import http.server

    class NotFoundHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFoundHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_a_hub_id_the_hub_does_not_know_is_not_found(tmp_path, hub_404):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", "qlora-test-org/no-such-model-7f3a",
                  env={"HF_ENDPOINT": hub_404})
    line = _error_line(proc)
    assert "NOT_FOUND: model: hub id 'qlora-test-org/no-such-model-7f3a' not found on" in line


def test_a_hub_that_never_answers_fails_after_the_probe_timeout(tmp_path):
    # Connections are accepted (the kernel's backlog) but nothing ever answers: only the probe's timeout ends it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", "qlora-test-org/silent-7f3a",
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"})
    line = _error_line(proc)
    assert "cannot reach the Hugging Face hub" in line and "within 5 s" in line and "HF_HUB_OFFLINE=1" in line


@pytest.mark.parametrize("value, path_like", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", False), ("gpt2", False), ("/abs/model", True), ("./model", True),
    ("../model", True), ("~/model", True), ("a/b/c", True), ("model/", True), ("has space/x", True),
    ("org\\name", True)])
def test_what_counts_as_a_path(value, path_like):
    from server.model.source import looks_like_path

    assert looks_like_path(value) is path_like


def test_a_relative_path_whose_first_part_exists_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from server.config import ModelConfig
    from server.errors import NotFound
    from server.model.source import check_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(NotFound) as info:
        check_model_source(ModelConfig(model="models/llama"))
    assert info.value.field == "model" and "models/llama does not exist" in str(info.value)


def test_a_complete_model_directory_passes(tmp_path):
    from server.config import ModelConfig
    from server.model.source import check_model_source

    assert check_model_source(ModelConfig(model=str(_model_dir(tmp_path / "m", "config.json", "model.safetensors",
                                                                 "tokenizer.json")))) == "directory"
    _shard_dir(tmp_path / "sharded")
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").write_text("")
    assert check_model_source(ModelConfig(model=str(tmp_path / "sharded"))) == "directory"


# --- files the server cannot use: one line naming the field, whatever the fault ------------------------------------

def _bad_dir(kind: str, tmp_path: Path) -> str:
    if kind == "a file":
        target = tmp_path / "plain-file"
        target.write_text("x")
        return str(target)
    if kind == "under a file":
        (tmp_path / "f").write_text("x")
        return str(tmp_path / "f" / "sub")
    return "/proc/qlora-no-such-dir"  # /proc refuses new entries even to root


@pytest.mark.parametrize("option,field", [("--adapters-dir", "adapters_dir"), ("--state-dir", "state_dir")])
@pytest.mark.parametrize("kind", ["a file", "under a file", "not creatable"])
def test_an_unusable_directory_fails_start_up_before_the_model_loads(tmp_path, option, field, kind):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--cache-dir", str(tmp_path / "cache"),
                  option, _bad_dir(kind, tmp_path))
    line = _error_line(proc)
    assert f"FAILED_PRECONDITION: {field}:" in line
    assert not (tmp_path / "cache").exists()  # nothing converted or loaded


@pytest.mark.parametrize("weights,tokenizer", [("not safetensors", '{"version": "1.0"}'),
                                               (None, "{}"), ("\x00" * 64, "not json")])
def test_corrupt_model_files_are_one_line_naming_model(tmp_path, weights, tokenizer):
    """A directory that looks complete but whose files are corrupt fails with one line, no traceback."""
    from tests.tiny import save_tiny_base

    model = save_tiny_base(tmp_path)
    if weights is not None:
        (model / "model.safetensors").write_text(weights)
    (model / "tokenizer.json").write_text(tokenizer)
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--model", str(model))
    line = _error_line(proc)
    assert "FAILED_PRECONDITION: model: cannot load base model" in line
