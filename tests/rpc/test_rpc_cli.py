"""The command line: help, start-up errors, client commands against a fake server, and ``serve`` with a fake app."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_fakes import FakeApp, write_adapter_dir

from server.cli import main, serve

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_the_commands():
    proc = _run_module("--help")
    assert proc.returncode == 0
    for command in ("serve", "generate", "adapters"):
        assert command in proc.stdout


@pytest.mark.parametrize("argv", [["serve", "--help"], ["generate", "--help"], ["adapters", "upload", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "usage: qlora-server" in capsys.readouterr().out


def test_serve_with_a_bad_config_exits_2_naming_the_field():
    proc = _run_module("serve", "--port", "70000", "--metrics-port", "-1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --port: must be an integer in [0, 65535]" in lines[0]


def test_generate_prints_the_text(address, capsys):
    assert main(["generate", "--target", address, "--prompt", "hello big world"]) == 0
    assert capsys.readouterr().out == "hello big world\n"


def test_generate_stream_and_chat(address, app, capsys):
    assert main(["generate", "--target", address, "--chat", "hi there", "--system", "terse", "--stream",
                 "--temperature", "0.7", "--seed", "3", "--stop", "END", "--timeout", "60"]) == 0
    assert capsys.readouterr().out == "system: terse user: hi there\n"
    params = app.engine.submitted[0].params
    assert (params.temperature, params.seed, params.stop) == (0.7, 3, ("END",))
    assert app.engine.submitted[0].deadline is not None



def test_generate_ignore_eos_flag_reaches_the_engine(address, app, capsys):
    assert main(["generate", "--target", address, "--prompt", "a b", "--max-new-tokens", "8", "--ignore-eos"]) == 0
    assert main(["generate", "--target", address, "--prompt", "a b"]) == 0
    capsys.readouterr()
    assert [r.params.ignore_eos for r in app.engine.submitted] == [True, False]
    assert app.engine.submitted[0].params.max_new_tokens == 8


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_logprobs_flags_print_json_lines_to_stderr(address, app, capsys, stream):
    assert main(["generate", "--target", address, "--prompt", "a b", "--top-logprobs", "2", *stream]) == 0
    out = capsys.readouterr()
    assert out.out == "a b\n"
    lines = [json.loads(line) for line in out.err.splitlines()]
    assert [d["token_id"] for d in lines] == [0, 1] and [d["logprob"] for d in lines] == [0.0, -0.125]
    assert [t["token_id"] for t in lines[1]["top_logprobs"]] == [1, 100]
    assert all(d["bytes"] == list(d["token"].encode()) for d in lines)  # the fake gives no bytes: the text's
    assert app.engine.submitted[0].params.top_logprobs == 2


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_prompt_logprobs_print_prompt_lines_first(address, app, capsys, stream):
    assert main(["generate", "--target", address, "--prompt", "a b c", "--prompt-logprobs", "1", "--logprobs",
                 *stream]) == 0
    out = capsys.readouterr()
    assert out.out == "a b c\n"
    lines = [json.loads(line) for line in out.err.splitlines()]
    assert [(d["token_id"], d.get("prompt", False)) for d in lines] == [
        (1, True), (2, True), (0, False), (1, False), (2, False)]
    assert [d["logprob"] for d in lines[:2]] == [-0.25, -0.5] and lines[0]["top_logprobs"][0]["token_id"] == 1
    assert app.engine.submitted[0].params.prompt_logprobs == 1
    for bad in ("-1", "21", "x"):
        with pytest.raises(SystemExit):
            main(["generate", "--target", address, "--prompt", "a", "--prompt-logprobs", bad])
    capsys.readouterr()


def test_client_errors_print_code_and_exit_1(address, capsys):
    assert main(["generate", "--target", address, "--prompt", "x", "--adapter", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: ") and "nope" in err
    assert main(["generate", "--target", address, "--prompt", "x", "--max-new-tokens", "65"]) == 1  # cap: 64
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: max_new_tokens: ")


def test_adapters_commands(address, app, tmp_path, capsys):
    src = write_adapter_dir(tmp_path / "src")
    assert main(["adapters", "register", "--target", address, "--id", "reg", "--path", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_id"] == "reg"
    assert main(["adapters", "upload", "--target", address, "--id", "hot-up", "--dir", str(src)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter_id"] == "hot-up" and out["residency"] == "gpu" and "path" not in out
    assert (Path(app.store.root) / "hot-up" / "adapter_model.safetensors").read_bytes() == \
        (src / "adapter_model.safetensors").read_bytes()
    assert main(["adapters", "list", "--target", address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "ID" and [row.split()[0] for row in table[1:]] == ["hot-up", "reg"]
    assert main(["adapters", "list", "--target", address, "--json"]) == 0
    assert [a["adapter_id"] for a in json.loads(capsys.readouterr().out)] == ["hot-up", "reg"]
    assert main(["adapters", "get", "--target", address, "--id", "reg"]) == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 8
    assert main(["adapters", "unregister", "--target", address, "--id", "reg"]) == 0
    capsys.readouterr()
    assert main(["adapters", "get", "--target", address, "--id", "reg"]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


def test_upload_of_a_missing_directory_fails_locally(address, tmp_path, capsys):
    assert main(["adapters", "upload", "--target", address, "--id", "x", "--dir", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: dir: ")


def test_unreachable_server_is_reported(capsys):
    assert main(["adapters", "list", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_serve_announces_serves_and_shuts_down(tmp_path):
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=0)
    stop, ready, lines, result = threading.Event(), threading.Event(), [], []

    def announce(line: str) -> None:
        lines.append(line)
        ready.set()

    thread = threading.Thread(target=lambda: result.append(
        serve(app.config, stop, grace_seconds=1.0, app_factory=lambda config, metrics: app, announce=announce)))
    thread.start()
    try:
        assert ready.wait(WAIT)
        line = lines[0]
        assert line.startswith("qlora-server listening on 127.0.0.1:") and "(metrics on :" in line
        grpc_port = int(line.split("127.0.0.1:")[1].split(" ")[0])
        metrics_port = int(line.rsplit(":", 1)[1].rstrip(")"))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=WAIT).read().decode()
        assert 'qlora_server_requests_total{code="OK",method="grpc.health.v1.Health/Check"} 1.0' in body
    finally:
        stop.set()
        thread.join(WAIT)
    assert result == [0] and app.closed


def test_serve_start_up_error_exits_2(tmp_path, capsys):
    from server.errors import InvalidArgument

    def failing_factory(config, metrics):
        raise InvalidArgument("no such model", field="model")

    app = FakeApp(tmp_path / "adapters", port=0, metrics_port=-1)
    assert serve(app.config, threading.Event(), app_factory=failing_factory) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model: no such model" in err[0]


def test_generate_structured_output_options(tmp_path, capsys):
    """--json-schema (inline or @FILE), --json-object, --regex, --choice become the request's response_format; a
    schema file that cannot be read is a usage error (exit 2, one line), and two formats at once are refused."""
    from server.cli import build_parser, generation_request_from_args
    from server.engine.types import ResponseFormat

    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}', encoding="utf-8")
    parser = build_parser()

    def fmt(*flags):
        return generation_request_from_args(parser.parse_args(["generate", "--prompt", "p", *flags])).params \
            .response_format

    assert fmt() is None
    assert fmt("--json-schema", '{"type": "string"}') == ResponseFormat("json_schema", '{"type": "string"}')
    assert fmt("--json-schema", f"@{schema}") == ResponseFormat("json_schema", '{"type": "object"}')
    assert fmt("--json-object") == ResponseFormat("json_object")
    assert fmt("--regex", "[0-9]+") == ResponseFormat("regex", "[0-9]+")
    assert fmt("--choice", "yes", "--choice", "no") == ResponseFormat("choice", choices=("yes", "no"))
    for bad in ([f"@{tmp_path / 'missing.json'}"], [f"@{tmp_path}"], ["{}", "--regex", "a"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["generate", "--prompt", "p", "--json-schema", *bad])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read the schema file" in err and "Traceback" not in err
