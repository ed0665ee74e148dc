"""Runs qlora-server briefly under mixed-adapter traffic, scrapes /metrics over time and plots latency, memory and
adapter-cache behaviour to a PNG (docs/metrics.png).

Usage (CPU is fine; needs matplotlib, which is not a project dependency: ``pip install matplotlib``)::

    python bench/plot_metrics.py                          # a small random model, 45 s of traffic
    python bench/plot_metrics.py --model DIR --device cuda --seconds 120 --out /tmp/metrics.png

Without ``--model`` it builds a small random Llama (byte tokenizer) in a temporary directory, as the tests do.
Traffic: client threads ramp up in steps (1, 2, 4, 8 concurrent), each request picking the base model or one of
``--adapters`` LoRA adapters with Zipf-like weights, through fewer accelerator slots than adapters so that the cache
loads and evicts. Every request is bounded (max_new_tokens) and the run stops by itself.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRAPE_PERIOD_S = 0.5
WINDOW_S = 3.0  # latency percentiles over the observations of the last WINDOW_S seconds


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """One scrape: ``(sample name, sorted label items) → value``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(sample: dict, name: str, **match) -> float:
    """Sum of every series of ``name`` whose labels include ``match``."""
    return sum(v for (n, labels), v in sample.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


def quantile(q: float, before: dict, after: dict, histogram: str) -> float | None:
    """The ``q`` quantile of the observations between two scrapes (linear within a bucket, like PromQL's
    ``histogram_quantile``), summed over every label but ``le``; None without observations."""
    counts: dict[float, float] = defaultdict(float)
    for sample, sign in ((after, 1), (before, -1)):
        for (name, labels), v in sample.items():
            if name == histogram + "_bucket":
                counts[float(dict(labels)["le"])] += sign * v
    bounds = sorted(counts)
    if not bounds or counts[bounds[-1]] <= 0:
        return None
    rank = q * counts[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        if counts[bound] >= rank:
            if bound == float("inf"):
                return prev_bound
            width = counts[bound] - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = bound, counts[bound]
    return prev_bound


def make_model(root: Path, adapters: int) -> tuple[Path, list[Path]]:
    from tests.tiny import make_adapter, save_tiny_base
    from tests.tiny_tokenizer import save_byte_tokenizer

    base = save_tiny_base(root, hidden=256, intermediate=512, layers=4)
    save_byte_tokenizer(base)
    return base, [make_adapter(base, root / f"adapter-{i}", seed=i, r=8,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) for i in range(adapters)]


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[float], list[dict]]:
    """Start the server, drive traffic, scrape; returns (seconds since start, scrapes)."""
    from server.engine.types import GenerationRequest, SamplingParams
    from server.rpc.client import Client, ClientError
    from tests.server_process import start_server

    if args.model:
        base, sources = Path(args.model), [Path(p) for p in args.adapter_dirs]
    else:
        base, sources = make_model(workdir, args.adapters)
    server = start_server(base, workdir / "store", workdir / "server.log", "--adapter-slots", str(args.slots),
                          "--cpu-adapter-cache", str(max(args.slots, args.host_cache)), "--device", args.device)
    stop = threading.Event()
    times: list[float] = []
    scrapes: list[dict] = []
    try:
        with Client(server.target, timeout=120) as client:
            ids = []
            for i, src in enumerate(sources):
                ids.append(f"adapter-{i}")
                client.register_adapter(ids[-1], str(src))
        choices = [""] + ids
        weights = [1.0 / (rank + 1) for rank in range(len(choices))]
        t0 = time.monotonic()

        def scraper() -> None:
            while not stop.is_set():
                scrapes.append(scrape(server.metrics_port))
                times.append(time.monotonic() - t0)
                stop.wait(SCRAPE_PERIOD_S)

        def client_loop(worker: int, start_at: float) -> None:
            rng = random.Random(worker)
            stop.wait(start_at)
            with Client(server.target, timeout=120) as c:
                while not stop.is_set():
                    adapter = rng.choices(choices, weights)[0]
                    try:
                        c.generate(GenerationRequest(
                            request_id="", adapter_id=adapter, prompt=f"request from worker {worker}: " + "x" *
                            rng.randint(4, 64), params=SamplingParams(max_new_tokens=rng.randint(8, 48))))
                    except ClientError as exc:
                        print(f"worker {worker}: {exc}", file=sys.stderr)

        step = args.seconds / 4
        threads = [threading.Thread(target=scraper, daemon=True)]
        # concurrency 1, 2, 4, 8 over four equal phases
        starts = [0.0] + [step] + [2 * step] * 2 + [3 * step] * 4
        threads += [threading.Thread(target=client_loop, args=(i, s), daemon=True) for i, s in enumerate(starts)]
        for t in threads:
            t.start()
        stop.wait(args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=180)
    finally:
        stop.set()
        server.stop()
    return times, scrapes


def plot(times: list[float], scrapes: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lag = max(1, round(WINDOW_S / SCRAPE_PERIOD_S))
    xs = times[lag:]
    pairs = list(zip(scrapes[:-lag], scrapes[lag:]))

    def q_series(q: float, histogram: str) -> list[float]:
        return [v * 1000 if (v := quantile(q, a, b, histogram)) is not None else float("nan") for a, b in pairs]

    def rate_series(name: str, **match) -> list[float]:
        return [(total(b, name, **match) - total(a, name, **match)) / WINDOW_S for a, b in pairs]

    fig, axes = plt.subplots(2, 2, figsize=(14, 9), constrained_layout=True)
    fig.suptitle(title)

    ax = axes[0][0]
    for q, style in ((0.5, "-"), (0.95, "--")):
        ax.plot(xs, q_series(q, "qlora_server_request_latency_seconds"), style, color="tab:blue",
                label=f"end-to-end p{round(q * 100)}")
        ax.plot(xs, q_series(q, "qlora_server_time_to_first_token_seconds"), style, color="tab:orange",
                label=f"time to first token p{round(q * 100)}")
    ax.set_title(f"Latency (percentiles over {WINDOW_S:g} s windows)")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0][1]
    ax.plot(xs, rate_series("qlora_server_generated_tokens_total"), color="tab:green", label="generated tokens/s")
    ax.set_ylabel("tokens / s")
    ax2 = ax.twinx()
    ax2.plot(times, [total(s, "qlora_server_running_requests") for s in scrapes], color="tab:purple",
             label="running requests")
    ax2.plot(times, [total(s, "qlora_server_waiting_requests") for s in scrapes], color="tab:gray",
             label="waiting requests")
    ax2.set_ylabel("requests")
    ax.set_title("Throughput and scheduler")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)

    ax = axes[1][0]
    mib = 2 ** 20
    for component, color in (("base_weights", "tab:blue"), ("adapter_banks", "tab:orange"),
                             ("adapter_host_cache", "tab:green"), ("kv_cache", "tab:red")):
        ax.plot(times, [total(s, "qlora_server_component_memory_bytes", component=component) / mib for s in scrapes],
                color=color, label=component)
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    device_kinds = sorted({(dict(lb)["device"], dict(lb)["kind"]) for s in scrapes for (n, lb) in s
                           if n == "qlora_server_accelerator_memory_bytes" and dict(lb)["kind"] in ("allocated", "peak")})
    for device, kind in device_kinds:
        ax2.plot(times, [total(s, "qlora_server_accelerator_memory_bytes", device=device, kind=kind) / mib
                         for s in scrapes], ":", label=f"{device} {kind}")
    ax2.set_ylabel("MiB (dotted: device)")
    ax.set_title("Memory by component; device allocated / peak")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)

    ax = axes[1][1]
    for tier, color in (("gpu", "tab:blue"), ("cpu", "tab:orange")):
        hits = [total(s, "qlora_server_adapter_cache_hits_total", tier=tier) for s in scrapes]
        misses = [total(s, "qlora_server_adapter_cache_misses_total", tier=tier) for s in scrapes]
        evictions = [total(s, "qlora_server_adapter_evictions_total", tier=tier) for s in scrapes]
        ax.plot(times, hits, "-", color=color, label=f"{tier} hits")
        ax.plot(times, misses, "--", color=color, label=f"{tier} misses")
        ax.plot(times, evictions, ":", color=color, label=f"{tier} evictions")
    ax.set_title("Adapter cache (cumulative; gpu = accelerator slots, cpu = host memory)")
    ax.set_ylabel("lookups / evictions")
    ax.legend(loc="upper left", fontsize=8)

    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds")
            ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a small random Llama made here)")
    p.add_argument("--adapter-dirs", nargs="*", default=[], help="PEFT adapter directories (with --model)")
    p.add_argument("--adapters", type=int, default=4, help="random adapters to make without --model (default 4)")
    p.add_argument("--slots", type=int, default=2, help="accelerator adapter slots (default 2)")
    p.add_argument("--host-cache", type=int, default=3, help="adapters kept in host memory (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--seconds", type=float, default=45.0, help="traffic duration (default 45)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "metrics.png", help="PNG to write")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plot-metrics-") as tmp:
        times, scrapes = run(args, Path(tmp))
    if len(scrapes) < 2 * round(WINDOW_S / SCRAPE_PERIOD_S):
        print("too few scrapes to plot", file=sys.stderr)
        return 1
    requests = total(scrapes[-1], "qlora_server_generations_total")
    title = (f"qlora-server /metrics during {args.seconds:g} s of traffic ({int(requests)} generations, "
             f"{args.device}, {args.slots} adapter slots for {len(args.adapter_dirs) or args.adapters} adapters)")
    plot(times, scrapes, args.out, title)
    print(f"wrote {args.out} ({len(scrapes)} scrapes, {int(requests)} generations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
