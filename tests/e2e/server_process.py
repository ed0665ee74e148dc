"""Starts the real ``qlora-server serve`` as a subprocess on free ports and stops it (shared by e2e tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg

REPO = Path(__file__).resolve().parents[2]
_READY = re.compile(r"listening on (\S+):(\d+) \(metrics on :(\d+)\)")


@dataclass
class ServerProcess:
    """A running server: its process, ports and gRPC stubs."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stubs(self):
        ch = self.channel()
        return pbg.GenerationStub(ch), pbg.AdaptersStub(ch)

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: str, adapters_dir: Path, log_path: Path, *extra: str, device: str = "cpu") -> ServerProcess:
    """Run ``python -m server serve`` on ports 0 (free ones) and wait for its ready line.

    Raises:
        RuntimeError: the server exited or printed no ready line (the log's tail is in the message).
    """
    cmd = [sys.executable, "-m", "server", "serve", "--model", model, "--device", device, "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--adapters-dir", str(adapters_dir), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()  # blocks until the ready line or exit (the server prints nothing else)
    match = _READY.search(line)
    if not match:
        proc.kill()
        proc.wait()
        log.close()
        raise RuntimeError(f"server did not start ({line!r}):\n{log_path.read_text()[-3000:]}")
    return ServerProcess(proc, int(match.group(2)), int(match.group(3)), log_path)
