"""TLS on the gRPC port: a real server (``serve`` over the fake app) with TLS and mutual TLS, reached by the bundled
client; plaintext and untrusted clients refused; bad TLS files stop start-up with one line naming the field; the
metrics endpoint binds where ``--metrics-host`` says. Certificates come from the ``openssl`` command line."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from rpc_fakes import FakeApp, FakeTrainingManager, serving
from test_cli_startup import _error_line, _serve

from server.cli import EXIT_STARTUP, build_parser, config_from_args, main, serve
from server.config import ServerConfig
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import InvalidArgument
from server.rpc.client import Client, ClientError
from server.rpc.tls import ClientTLS, client_tls_from_args, log_transport

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command line")

OPENSSL_CNF = """
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[server]
basicConstraints = CA:FALSE
subjectAltName = DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
[client]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
"""


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-config", "openssl.cnf", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-extensions", "ca")


def _leaf(d: Path, name: str, ca: str, kind: str) -> None:
    _openssl(d, "req", "-config", "openssl.cnf", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", "openssl.cnf", "-extensions", kind)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """``ca`` signs ``server`` (SAN localhost, 127.0.0.1) and ``client``; ``other-ca`` signs ``rogue`` (a client
    certificate the server must not accept)."""
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "server")
    _leaf(d, "client", "ca", "client")
    _leaf(d, "rogue", "other-ca", "client")
    return d


def _tls(pki: Path, mutual: bool) -> dict:
    return {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key",
            **({"tls_client_ca": pki / "ca.pem"} if mutual else {})}


@contextmanager
def running(app: FakeApp):
    """``serve(app.config)`` in a thread with ``app`` as the built app; yields ``(target, metrics_port)``."""
    with serving(app) as (target, line):
        metrics = re.search(r"\((?:metrics on :(\d+)|metrics off)", line).group(1)
        yield target, metrics and int(metrics)


def _exercise(client: Client) -> None:
    """Health, ListAdapters and Generate through ``client``."""
    assert client.health() == "SERVING"
    assert client.list_adapters() == []
    request = GenerationRequest(request_id="", prompt="hello tls", params=SamplingParams(max_new_tokens=8))
    assert "hello" in client.generate(request).text


def _refused(target: str, tls: ClientTLS | None) -> ClientError:
    with Client(target, timeout=10, tls=tls) as client, pytest.raises(ClientError) as info:
        client.list_adapters()
    assert info.value.code == "UNAVAILABLE", info.value
    return info.value


# --- TLS -----------------------------------------------------------------------------------------------------------


def test_a_tls_client_reaches_a_tls_server_and_a_plaintext_one_does_not(tmp_path, pki, caplog):
    caplog.set_level(logging.INFO, logger="qlora_server")
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1, **_tls(pki, mutual=False))
    with running(app) as (target, _):
        with Client(target, timeout=10, tls=ClientTLS(ca=pki / "ca.pem")) as client:
            _exercise(client)
        port = target.rsplit(":", 1)[1]
        with Client(f"localhost:{port}", timeout=10, tls=ClientTLS(ca=pki / "ca.pem")) as client:
            assert client.health() == "SERVING"
        _refused(target, None)  # plaintext against the TLS port
        _refused(target, ClientTLS(ca=pki / "other-ca.pem"))  # the server's certificate is not trusted
        _refused(target, ClientTLS(ca=pki / "ca.pem", server_name="not-the-server.example"))
    transport = [r for r in caplog.records if "gRPC on" in r.getMessage()]
    assert len(transport) == 1 and transport[0].levelno == logging.INFO
    assert ": TLS (cert" in transport[0].getMessage()


def test_a_plaintext_server_is_not_reached_by_a_tls_client(tmp_path, pki):
    """The other direction: TLS is a property of the port, not something a client can switch on by itself."""
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1)
    with running(app) as (target, _):
        _refused(target, ClientTLS(ca=pki / "ca.pem"))
        with Client(target, timeout=10) as client:
            assert client.health() == "SERVING"


# --- mutual TLS ----------------------------------------------------------------------------------------------------


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(tmp_path, pki, caplog):
    caplog.set_level(logging.INFO, logger="qlora_server")
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1, **_tls(pki, mutual=True))
    with running(app) as (target, _):
        _refused(target, ClientTLS(ca=pki / "ca.pem"))  # no client certificate
        _refused(target, ClientTLS(ca=pki / "ca.pem", cert=pki / "rogue.pem", key=pki / "rogue.key"))  # other CA
        _refused(target, None)
        with Client(target, timeout=10, tls=ClientTLS(ca=pki / "ca.pem", cert=pki / "client.pem",
                                                        key=pki / "client.key")) as client:
            _exercise(client)
        assert app.engine.submitted and all(r.prompt == "hello tls" for r in app.engine.submitted)
    assert any("mutual TLS" in r.getMessage() and "client certificates required" in r.getMessage()
               for r in caplog.records)


def test_the_cli_client_speaks_mutual_tls(tmp_path, pki, capsys):
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1, **_tls(pki, mutual=True))
    app.training = FakeTrainingManager()  # serve registers the Training service of an app that has one
    with running(app) as (target, _):
        capsys.readouterr()
        ok = ["--target", target, "--timeout", "10", "--tls-ca", str(pki / "ca.pem"),
              "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert main(["adapters", "list", *ok]) == 0
        assert main(["jobs", "list", *ok]) == 0
        assert main(["generate", "--prompt", "hi there", *ok]) == 0
        assert "hi there" in capsys.readouterr().out
        assert main(["adapters", "list", "--target", target, "--timeout", "10"]) == 1  # plaintext
        assert main(["adapters", "list", *ok[:6]]) == 1  # TLS without a client certificate
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(line.startswith("error: UNAVAILABLE: ") for line in err)
        assert main(["adapters", "list", *ok[:8]]) == 1  # --tls-cert without --tls-key: refused before connecting
        assert capsys.readouterr().err.strip() == ("error: INVALID_ARGUMENT: --tls-cert and --tls-key go together: "
                                                   "give both or neither")
        assert main(["adapters", "list", "--target", target, "--tls-ca", str(tmp_path / "none.pem")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: INVALID_ARGUMENT: cannot read --tls-ca ") and "\n" not in err


# --- configuration and flags ---------------------------------------------------------------------------------------


def test_serve_flags_reach_the_config(pki):
    args = build_parser().parse_args(["serve", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                                      str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
                                      "--metrics-host", "127.0.0.2"])
    config = config_from_args(args)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.metrics_host) == (
        pki / "server.pem", pki / "server.key", pki / "ca.pem", "127.0.0.2")
    plain = config_from_args(build_parser().parse_args(["serve"]))
    assert (plain.tls_cert, plain.tls_key, plain.tls_client_ca, plain.metrics_host) == (None, None, None, None)


def test_client_flags_reach_the_client_tls(pki):
    parse = build_parser().parse_args
    assert client_tls_from_args(parse(["adapters", "list"])) is None  # plaintext by default
    assert client_tls_from_args(parse(["jobs", "list", "--tls"])) == ClientTLS()  # system roots
    tls = client_tls_from_args(parse(["generate", "--prompt", "x", "--tls-ca", "ca.pem", "--tls-cert", "c.pem",
                                      "--tls-key", "c.key", "--tls-server-name", "localhost"]))
    assert tls == ClientTLS(ca=Path("ca.pem"), cert=Path("c.pem"), key=Path("c.key"), server_name="localhost")


@pytest.mark.parametrize("changes, field", [
    ({"tls_cert": "server.pem"}, "tls_key"),
    ({"tls_key": "server.key"}, "tls_cert"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
    ({"metrics_host": ""}, "metrics_host"),
])
def test_tls_settings_that_do_not_go_together_are_refused(pki, changes, field):
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(**{k: (pki / v if k.startswith("tls") else v) for k, v in changes.items()})
    assert info.value.field == field


def test_a_cert_without_a_key_stops_serve_with_one_line(tmp_path, pki):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--tls-cert", str(pki / "server.pem"))
    assert _error_line(proc) == ("qlora-server: error: INVALID_ARGUMENT: tls_key: --tls-cert needs --tls-key "
                                 "(give both or neither)")


def test_a_missing_tls_file_stops_serve_with_one_line_before_the_model_loads(tmp_path, pki):
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--cache-dir", str(tmp_path / "cache"),
                  "--tls-cert", str(pki / "server.pem"), "--tls-key", str(tmp_path / "no-such.key"))
    line = _error_line(proc)
    assert f"FAILED_PRECONDITION: tls_key: cannot read --tls-key {tmp_path / 'no-such.key'}: No such file" in line
    assert not (tmp_path / "cache").exists()


def _bad_file(kind: str, pki: Path, tmp_path: Path) -> Path:
    bad = tmp_path / f"bad-{kind}"
    if kind == "missing":
        return bad
    if kind == "a directory":
        bad.mkdir()
    elif kind == "not PEM":
        bad.write_text("not a certificate\n")
    elif kind == "garbled PEM":
        bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    elif kind == "another key":
        shutil.copy(pki / "client.key", bad)
    elif kind == "encrypted key":
        _openssl(tmp_path, "pkey", "-in", str(pki / "server.key"), "-aes128", "-passout", "pass:x", "-out", str(bad))
    return bad


@pytest.mark.parametrize("field, kind, says", [
    ("tls_cert", "missing", "cannot read --tls-cert"),
    ("tls_cert", "a directory", "cannot read --tls-cert"),
    ("tls_cert", "not PEM", "is not a PEM file"),
    ("tls_cert", "garbled PEM", "holds no usable certificate"),
    ("tls_key", "missing", "cannot read --tls-key"),
    ("tls_key", "not PEM", "is not a PEM file"),
    ("tls_key", "another key", "is not a private key matching --tls-cert"),
    ("tls_key", "encrypted key", "is encrypted"),
    ("tls_client_ca", "missing", "cannot read --tls-client-ca"),
    ("tls_client_ca", "garbled PEM", "holds no usable certificate"),
])
def test_a_bad_tls_file_fails_start_up_naming_the_field(tmp_path, pki, capsys, field, kind, says):
    built = []
    tls = {**_tls(pki, mutual=True), field: _bad_file(kind, pki, tmp_path)}
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1, **tls)
    code = serve(app.config, threading.Event(), app_factory=lambda config, metrics: built.append(1) or app)
    assert code == EXIT_STARTUP and built == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qlora-server: error: FAILED_PRECONDITION: {field}: "), err
    assert says in err[0]


# --- the plaintext warning and the metrics host --------------------------------------------------------------------


@pytest.mark.parametrize("host, warned", [("[::]", True), ("0.0.0.0", True), ("10.1.2.3", True),
                                          ("server.example", True), ("127.0.0.1", False), ("[::1]", False),
                                          ("localhost", False)])
def test_plaintext_on_a_reachable_address_is_a_warning(pki, caplog, host, warned):
    caplog.set_level(logging.INFO, logger="qlora_server")
    log = logging.getLogger("qlora_server")
    log_transport(ServerConfig(host=host, metrics_port=-1), f"{host}:1", log)
    log_transport(ServerConfig(host=host, metrics_port=-1, **_tls(pki, mutual=False)), f"{host}:1", log)
    plain, tls = caplog.records
    assert (plain.levelno == logging.WARNING) is warned and "PLAINTEXT" in plain.getMessage()
    assert tls.levelno == logging.INFO and "TLS" in tls.getMessage() and "PLAINTEXT" not in tls.getMessage()


@pytest.mark.parametrize("host, metrics_host, warned", [("[::]", None, True), ("127.0.0.1", None, False),
                                                        ("[::]", "127.0.0.1", False), ("127.0.0.1", "0.0.0.0", True)])
def test_metrics_on_a_reachable_address_is_a_warning_even_with_tls(pki, caplog, host, metrics_host, warned):
    """The metrics endpoint has neither keys nor TLS and its labels carry adapter ids."""
    caplog.set_level(logging.INFO, logger="qlora_server")
    log_transport(ServerConfig(host=host, metrics_host=metrics_host, **_tls(pki, mutual=True)), f"{host}:1",
                  logging.getLogger("qlora_server"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) is warned and all("metrics" in w for w in warnings)


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_the_metrics_endpoint_binds_the_metrics_host(tmp_path):
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.2")
    with running(app) as (_, metrics_port):
        assert _accepts("127.0.0.2", metrics_port) and not _accepts("127.0.0.1", metrics_port)
    app = FakeApp(tmp_path / "adapters", host="127.0.0.2", port=0, metrics_port=0)  # default: the gRPC host
    with running(app) as (_, metrics_port):
        assert _accepts("127.0.0.2", metrics_port) and not _accepts("127.0.0.1", metrics_port)
