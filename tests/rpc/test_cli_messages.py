"""What the command line prints when something is wrong: one line, no traceback, no silent surprises — for a bad
``--target``, a library's multi-line error text, a range message, and Ctrl-C in a client command."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.argtypes import float_in, one_line, target_address
from server.cli import main

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60  # liveness bound for subprocesses (seconds), not a timing assertion


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@settings(max_examples=60, deadline=None)
@given(port=st.one_of(st.integers(-(10**6), 0), st.integers(65536, 10**7)),
       host=st.sampled_from(["127.0.0.1", "localhost", "[::1]", ""]))
def test_a_target_port_out_of_range_or_without_host_is_refused_not_wrapped(port, host):
    with pytest.raises(Exception) as err:
        target_address(f"{host}:{port}")
    assert "HOST:PORT" in str(err.value) or "brackets" in str(err.value)


@settings(max_examples=40, deadline=None)
@given(port=st.integers(1, 65535), host=st.sampled_from(["127.0.0.1", "localhost", "[::1]", "example.org"]))
def test_a_valid_target_passes_unchanged(port, host):
    assert target_address(f"{host}:{port}") == f"{host}:{port}"


@pytest.mark.parametrize("target", ["127.0.0.1:115587", "127.0.0.1:-1", "", "::1:50051", "127.0.0.1"])
def test_every_client_command_refuses_a_bad_target_before_connecting(target, capsys):
    for argv in (["generate", "--prompt", "hi"], ["adapters", "list"], ["jobs", "list"]):
        code, err = _run([*argv, "--target", target], capsys)
        assert code == 2 and len(err) == 1 and "argument --target:" in err[0], (argv, err)


@settings(max_examples=50, deadline=None)
@given(lo=st.one_of(st.none(), st.floats(-1e6, 1e6)), span=st.one_of(st.none(), st.floats(0, 1e6)),
       lo_open=st.booleans(), hi_open=st.booleans())
def test_range_messages_never_show_an_infinite_bound(lo, span, lo_open, hi_open):
    hi = None if span is None or lo is None else lo + span
    parse = float_in(lo, hi, lo_open=lo_open, hi_open=hi_open)
    with pytest.raises(Exception) as err:
        parse("nan")
    assert "inf" not in str(err.value).replace("'nan'", ""), str(err.value)


@given(text=st.text())
def test_one_line_has_no_line_breaks(text):
    assert not set(one_line(text)) & {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("r: [1, 2\nlora_alpha: 3\n")
    code, err = _run(["jobs", "create", "--target", "127.0.0.1:1", "--adapter-id", "a", "--dataset", "d.jsonl",
                      "--config", str(bad)], capsys)
    assert code in (1, 2) and len(err) == 1 and "config" in err[0], err


def test_ctrl_c_in_a_client_command_is_one_line_and_status_130():
    """A server that accepts the connection and never answers: the client waits until Ctrl-C."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "server", "generate", "--prompt", "hi", "--timeout", "300",
                                 "--target", f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # let it import and start waiting (no assertion on time)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["qlora-server: interrupted"], err
