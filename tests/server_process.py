"""Runs the real ``qlora-server serve`` as a subprocess on free loopback ports (shared by e2e, monitoring, bench)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_READY = re.compile(r"listening on (\S+):(\d+) \(metrics on :(\d+)[,)]")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, wait up to ``timeout_s`` seconds, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class ServerProcess:
    """A running server: its process, ports and log file (stderr)."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self):
        import grpc

        return grpc.insecure_channel(self.target)

    def stubs(self):
        """``(GenerationStub, AdaptersStub)`` on a new channel."""
        from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg

        ch = self.channel()
        return pbg.GenerationStub(ch), pbg.AdaptersStub(ch)

    def exposition(self) -> str:
        """The current ``/metrics`` text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def stop(self) -> int:
        return stop_process(self.proc)


def start_server(model: str | Path, adapters_dir: Path, log_path: Path, *extra: str, device: str = "cpu",
                 timeout_s: float = 600.0) -> ServerProcess:
    """Start ``python -m server serve`` on ports 0 (free ones), training state next to ``log_path`` (never in
    the repository), and wait for its ready line. ``extra`` flags come last and win.

    Raises:
        RuntimeError: the server exited or printed no ready line within ``timeout_s`` seconds (the log's tail is
            in the message).
    """
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(model), "--device", device,
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--adapters-dir", str(adapters_dir),
           "--state-dir", str(Path(log_path).parent / f"{Path(log_path).stem}-state"), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps reading stdout so the server never blocks on a full pipe
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"server did not announce itself; log:\n{Path(log_path).read_text()[-4000:]}")
        match = _READY.search(line)
        if match:
            return ServerProcess(proc, int(match.group(2)), int(match.group(3)), Path(log_path))
