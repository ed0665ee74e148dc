"""Test helpers: a real Prometheus scraping a live server on 127.0.0.1, and the dashboards' queries to evaluate."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.server_process import REPO, free_port, stop_process
from tests.toolchain import require_tools

DASHBOARD_DIR = REPO / "deploy" / "grafana" / "dashboards"
#: What each Grafana variable becomes when a panel's PromQL is evaluated outside Grafana: every instance and
#: adapter ("All"), a rate window of 1 minute (the test's traffic lies inside it) and a 5-minute range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$instance": ".*", "$adapter": ".*"}


def prometheus_tools() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``. Skips the test when either is missing, except under CI
    (``CI=true``), where that fails the test instead so that a missing install cannot pass silently."""
    return require_tools("prometheus", "promtool", hint="Debian: apt-get install prometheus; .ci/run installs it")


class Prometheus:
    """A Prometheus server on ``127.0.0.1:port`` scraping ``targets`` every second, with its own TSDB in
    ``workdir``. Query it with :meth:`query` (the HTTP API's ``/api/v1/query``)."""

    JOB = "qlora-server"

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": self.JOB, "static_configs": [{"targets": targets}]}],
        }))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self._until(lambda: self._get("/-/ready") is not None, timeout_s, "Prometheus did not become ready")

    def wait_scraped_after(self, instant: float, scrapes: int = 2, timeout_s: float = 60.0) -> None:
        """Wait until ``scrapes`` scrapes of the job (one a second) have started after the Unix time ``instant``:
        the newest scrape's timestamp is more than ``scrapes - 1`` seconds after it."""
        def done() -> bool:
            stamps = self.query(f'timestamp(up{{job="{self.JOB}"}} == 1)')
            return bool(stamps) and float(stamps[0]["value"][1]) > instant + scrapes - 1
        self._until(done, timeout_s, f"no {scrapes} scrapes after {instant}")

    def query(self, promql: str) -> list[dict]:
        """Evaluate ``promql`` now; the result's list of samples (raises on an API error, e.g. bad syntax)."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}), raise_errors=True)
        data = json.loads(body)
        if data.get("status") != "success":
            raise AssertionError(f"query failed: {promql}: {data}")
        result = data["data"]["result"]
        if data["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def stop(self) -> None:
        stop_process(self.proc)

    def _get(self, path: str, raise_errors: bool = False) -> str | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as err:
            if raise_errors:
                raise AssertionError(f"{path}: HTTP {err.code}: {err.read().decode()[:500]}") from None
            return None
        except OSError:
            if raise_errors:
                raise
            return None

    def _until(self, ok, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                if ok():
                    return
            except (AssertionError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{message}; log:\n{self.log_path.read_text()[-2000:]}")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard.get("panels", []):
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []) or []:
                if target.get("expr"):
                    out.append((p.get("title", ""), target["expr"]))
    return out


def substitute(expr: str) -> str:
    """Replace Grafana's variables by :data:`GRAFANA_VARIABLES`; fails on any variable left over."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def has_finite_value(result: list[dict]) -> bool:
    """True when at least one sample of an instant-query result is a finite number."""
    return any(math.isfinite(float(s["value"][1])) for s in result)
