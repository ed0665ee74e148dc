"""Builds qlora-server's Grafana dashboards (overview, adapters, training) as code and writes them as JSON.

Usage (from the repository root, with the dev extra installed)::

    python deploy/grafana/build_dashboards.py            # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/build_dashboards.py --check    # exit 1 when the committed JSON is not a fresh build

Every panel queries the Prometheus data source chosen by the ``datasource`` variable and filters on the
``instance`` variable (instances that export ``qlora_server_build_info``); the adapters dashboard adds an
``adapter`` variable. Rates use Grafana's ``$__rate_interval``; "over the range" stats use ``$__range``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import prometheus as prom_m

#: Where the JSON goes (next to this file).
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
#: Tag shared by the three dashboards (their cross-links list dashboards with it).
TAG = "qlora-server"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Label matchers every query starts with.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
NOT_OK = 'code!="OK"'


# --- small helpers over the SDK's builders ----------------------------------------------------------------------


def query(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
          table: bool = False) -> prom_b.Dataquery:
    """One PromQL target."""
    q = prom_b.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    else:
        q = q.range()
    if table:
        q = q.format(prom_m.PromQueryFormat.TABLE)
    return q


def rate(metric: str, extra: str = "") -> str:
    """``rate(metric{SEL, extra}[$__rate_interval])``."""
    return f"rate({metric}{{{SEL}{', ' + extra if extra else ''}}}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "", extra: str = "") -> str:
    """The ``q`` quantile of a histogram's recent observations, optionally per label ``by``."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', extra)}))"


def timeseries(title: str, description: str, unit: str, targets: list[prom_b.Dataquery], *, width: int = 12,
               height: int = 8, stack: bool = False, min_zero: bool = True) -> ts_b.Panel:
    """A time-series panel with a table legend (mean / max / last)."""
    p = (ts_b.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
         .span(width).height(height).line_width(1).fill_opacity(10 if not stack else 40)
         .show_points(common_m.VisibilityMode.NEVER)
         .legend(common_b.VizLegendOptions().display_mode(common_m.LegendDisplayMode.TABLE)
                 .placement(common_m.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max", "lastNotNull"]))
         .tooltip(common_b.VizTooltipOptions().mode(common_m.TooltipDisplayMode.MULTI)
                  .sort(common_m.SortOrder.DESCENDING)))
    if stack:
        p = p.stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL))
    if min_zero:
        p = p.min(0)
    for t in targets:
        p = p.with_target(t)
    return p


def stat(title: str, description: str, unit: str, target: prom_b.Dataquery, *, width: int = 4,
         height: int = 4, decimals: int | None = None,
         text_mode: common_m.BigValueTextMode = common_m.BigValueTextMode.AUTO) -> stat_b.Panel:
    """A single-value panel showing the last value, with a sparkline."""
    p = (stat_b.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
         .span(width).height(height).graph_mode(common_m.BigValueGraphMode.AREA)
         .color_mode(common_m.BigValueColorMode.VALUE).text_mode(text_mode)
         .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .with_target(target))
    if decimals is not None:
        p = p.decimals(decimals)
    return p


def table(title: str, description: str, target: prom_b.Dataquery, *, width: int = 24, height: int = 5) -> table_b.Panel:
    """A table of an instant query's series (one row per series, labels as columns)."""
    return (table_b.Panel().title(title).description(description).datasource(DATASOURCE)
            .span(width).height(height).with_target(target)
            .with_transformation(dash_m.DataTransformerConfig(
                id_val="organize", options={"excludeByName": {"Time": True, "Value": True, "__name__": True}})))


def dashboard(uid: str, title: str, description: str, variables: list) -> dash_b.Dashboard:
    """A dashboard with the shared settings: tag, time range, refresh, variables, links to its siblings."""
    d = (dash_b.Dashboard(title).uid(uid).description(description).tags([TAG]).editable()
         .time("now-1h", "now").refresh("30s").timezone("browser")
         .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
         .link(dash_b.DashboardLink("qlora-server").type(dash_m.DashboardLinkType.DASHBOARDS).tags([TAG])
               .as_dropdown(True).include_vars(True).keep_time(True)))
    for v in variables:
        d = d.with_variable(v)
    return d


def datasource_variable() -> dash_b.DatasourceVariable:
    return dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, query_expr: str) -> dash_b.QueryVariable:
    """A multi-value variable over a label's values, defaulting to All (regex ``.*``)."""
    return (dash_b.QueryVariable(name).label(label).datasource(DATASOURCE).query(query_expr)
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dash_m.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dash_m.VariableOption(selected=True, text="All", value="$__all")))


def instance_variable() -> dash_b.QueryVariable:
    return label_variable("instance", "Instance", "label_values(qlora_server_build_info, instance)")


def add_row(d: dash_b.Dashboard, title: str, panels: list, next_id: list[int]) -> None:
    """Append a row and its panels, numbering panels in order (ids are stable across builds)."""
    d.with_row(dash_b.Row(title).id(next_id[0]))
    next_id[0] += 1
    for p in panels:
        d.with_panel(p.id(next_id[0]))
        next_id[0] += 1


# --- the dashboards ----------------------------------------------------------------------------------------------


def overview() -> dash_b.Dashboard:
    """Traffic, latency percentiles, errors and memory of the serving path."""
    d = dashboard("qlora-overview", "qlora-server / Overview",
                  "Traffic, latency percentiles, errors and memory of qlora-server.",
                  [datasource_variable(), instance_variable()])
    ids = [1]
    rpc_rate = f"sum({rate('qlora_server_requests_total')})"
    add_row(d, "Traffic", [
        stat("RPC rate", "Finished RPCs per second, all methods and codes.", "reqps", query(rpc_rate), width=4),
        stat("Error ratio", "Share of finished RPCs whose gRPC status is not OK.", "percentunit",
             query(f"(sum({rate('qlora_server_requests_total', NOT_OK)}) or vector(0)) / {rpc_rate}"),
             width=4, decimals=2),
        stat("Running requests", "Requests in the running decode batch.", "short",
             query(f"sum(qlora_server_running_requests{{{SEL}}})"), width=4),
        stat("Waiting requests", "Requests queued for a batch row.", "short",
             query(f"sum(qlora_server_waiting_requests{{{SEL}}})"), width=4),
        stat("Output tokens / s", "Generated tokens per second, all adapters.", "short",
             query(f"sum({rate('qlora_server_generated_tokens_total')})"), width=4),
        stat("Base model", "The base model (id and quantization) of the first instance selected.", "none",
             query(f"max by (model, quant_type) (qlora_server_build_info{{{SEL}}})", "{{model}} ({{quant_type}})",
                   instant=True), width=4, text_mode=common_m.BigValueTextMode.NAME),
        timeseries("RPCs by method and status", "Finished RPCs per second by gRPC method and status code.", "reqps",
                   [query(f"sum by (method, code) ({rate('qlora_server_requests_total')})", "{{method}} {{code}}")]),
        timeseries("Tokens", "Prompt tokens prefilled (in) and tokens generated (out) per second.", "short",
                   [query(f"sum({rate('qlora_server_prompt_tokens_total')})", "in (prompt)", "A"),
                    query(f"sum({rate('qlora_server_generated_tokens_total')})", "out (generated)", "B")]),
        timeseries("Running and waiting requests", "Rows in the decode batch and requests queued for a row.",
                   "short", [query(f"sum(qlora_server_running_requests{{{SEL}}})", "running", "A"),
                             query(f"sum(qlora_server_waiting_requests{{{SEL}}})", "waiting", "B")]),
        timeseries("Decode batch size", "Rows per decode step: mean and 95th percentile.", "short",
                   [query(f"sum({rate('qlora_server_batch_size_sum')}) / sum({rate('qlora_server_batch_size_count')})",
                          "mean", "A"),
                    query(quantile(0.95, "qlora_server_batch_size"), "p95", "B")]),
    ], ids)
    latency = []
    for title, metric, desc, unit in (
            ("End-to-end latency", "qlora_server_request_latency_seconds",
             "Arrival to last token of finished generations.", "s"),
            ("Time to first token", "qlora_server_time_to_first_token_seconds",
             "Arrival to first generated token (includes queue wait and prefill).", "s"),
            ("Time per output token", "qlora_server_time_per_output_token_seconds",
             "Mean time per output token after the first, per generation.", "s"),
            ("Queue wait", "qlora_server_queue_wait_seconds", "Arrival to start of prefill.", "s")):
        latency.append(timeseries(title, desc + " Percentiles over all adapters.", unit,
                                  [query(quantile(q, metric), f"p{round(q * 100)}", ref)
                                   for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))]))
    latency.append(timeseries("Engine step duration", "Duration of one prefill or decode step (p50 and p99).", "s",
                              [query(quantile(0.5, "qlora_server_step_seconds", "phase"), "{{phase}} p50", "A"),
                               query(quantile(0.99, "qlora_server_step_seconds", "phase"), "{{phase}} p99", "B")]))
    latency.append(timeseries("Mean latencies", "Mean end-to-end latency and time to first token.", "s",
                              [query(f"sum({rate('qlora_server_request_latency_seconds_sum')}) / "
                                     f"sum({rate('qlora_server_request_latency_seconds_count')})", "end-to-end", "A"),
                               query(f"sum({rate('qlora_server_time_to_first_token_seconds_sum')}) / "
                                     f"sum({rate('qlora_server_time_to_first_token_seconds_count')})", "TTFT", "B")]))
    add_row(d, "Latency", latency, ids)
    add_row(d, "Errors", [
        timeseries("Failed RPCs by status", "RPCs per second that ended with a status other than OK.", "reqps",
                   [query(f"sum by (code) ({rate('qlora_server_requests_total', NOT_OK)})", "{{code}}")],
                   stack=True),
        timeseries("Generations by finish reason", "Finished generations per second: stop, length, eos, or error "
                   "(cancelled, deadline exceeded or failed after queueing).", "reqps",
                   [query(f"sum by (finish_reason) ({rate('qlora_server_generations_total')})", "{{finish_reason}}")],
                   stack=True),
    ], ids)
    add_row(d, "Memory", [
        timeseries("Accelerator memory", "Per device: allocated, reserved (PyTorch caching allocator), peak "
                   "allocated and total bytes. Device cpu when the model runs on the CPU.", "bytes",
                   [query(f"qlora_server_accelerator_memory_bytes{{{SEL}}}", "{{instance}} {{device}} {{kind}}")]),
        timeseries("Memory by component", "Base-model weights, adapter banks (accelerator slots), host adapter "
                   "cache and KV cache.", "bytes",
                   [query(f"sum by (component) (qlora_server_component_memory_bytes{{{SEL}}})", "{{component}}")],
                   stack=True),
        timeseries("KV cache blocks", "Blocks of the paged KV cache reserved by admitted requests (used) and free. "
                   "Requests wait in the queue while too few are free.", "short",
                   [query(f"sum by (state) (qlora_server_kv_cache_blocks{{{SEL}}})", "{{state}}")], stack=True),
        timeseries("Process memory", "Resident set size of the server process.", "bytes",
                   [query(f"process_resident_memory_bytes{{{SEL}}} and on (instance) "
                          f"qlora_server_build_info{{{SEL}}}", "{{instance}}")]),
        stat("Start-up time", "Seconds the slowest selected instance spent at start-up: load (weights and "
             "quantization) and capture (CUDA graphs and their self-check; 0 on a CPU or with graphs off).", "s",
             query(f"max by (phase) (qlora_server_startup_seconds{{{SEL}}})", "{{phase}}"), width=12, height=8),
        table("Build", "Versions, base model, quantization, LoRA dtype, CUDA graphs and KV cache size per instance.",
              query(f"qlora_server_build_info{{{SEL}}}", instant=True, table=True), width=12, height=8),
    ], ids)
    return d


def adapters() -> dash_b.Dashboard:
    """Adapter cache behaviour and per-adapter traffic."""
    adapter_sel = 'adapter=~"$adapter"'
    d = dashboard("qlora-adapters", "qlora-server / Adapters",
                  "LoRA adapter cache (accelerator slots backed by host memory) and per-adapter traffic. Per-adapter "
                  "series exist for the first N adapters that receive requests (top_adapter_labels); later ones are "
                  "counted as 'other', the base model as 'base'.",
                  [datasource_variable(), instance_variable(),
                   label_variable("adapter", "Adapter",
                                  'label_values(qlora_server_generations_total{instance=~"$instance"}, adapter)')])
    ids = [1]

    def ratio(tier: str, window: str) -> str:
        hits = f"sum(increase(qlora_server_adapter_cache_hits_total{{{SEL}, tier=\"{tier}\"}}[{window}]))"
        misses = f"sum(increase(qlora_server_adapter_cache_misses_total{{{SEL}, tier=\"{tier}\"}}[{window}]))"
        return f"{hits} / ({hits} + {misses})"

    add_row(d, "Cache", [
        stat("Registered adapters", "Adapters in the store.", "short",
             query(f"sum(qlora_server_adapters_registered{{{SEL}}})")),
        stat("Slots in use", "Accelerator adapter slots holding an adapter, of all slots.", "percentunit",
             query(f"sum(qlora_server_adapters_resident{{{SEL}, tier=\"gpu\"}}) / "
                   f"sum(qlora_server_adapter_slots{{{SEL}}})")),
        stat("Host-cached adapters", "Adapters loaded in host memory behind the slots.", "short",
             query(f"sum(qlora_server_adapters_resident{{{SEL}, tier=\"cpu\"}})")),
        stat("Slot hit ratio", "Share of adapter lookups found in an accelerator slot over the time range.",
             "percentunit", query(ratio("gpu", "$__range")), decimals=1),
        stat("Host hit ratio", "Share of slot misses served from host memory (no disk load) over the time range.",
             "percentunit", query(ratio("cpu", "$__range")), decimals=1),
        stat("Adapter cache memory", "Bytes of the accelerator slot banks plus the host adapter cache.", "bytes",
             query(f"sum(qlora_server_component_memory_bytes{{{SEL}, "
                   f"component=~\"adapter_banks|adapter_host_cache\"}})")),
        timeseries("Hit ratio by tier", "Share of lookups served by each tier (gpu: accelerator slots; cpu: host "
                   "memory, consulted on a slot miss).", "percentunit",
                   [query(f"sum by (tier) ({rate('qlora_server_adapter_cache_hits_total')}) / "
                          f"(sum by (tier) ({rate('qlora_server_adapter_cache_hits_total')}) + "
                          f"sum by (tier) ({rate('qlora_server_adapter_cache_misses_total')}))", "{{tier}}")]),
        timeseries("Hits and misses", "Adapter lookups per second by tier and outcome.", "ops",
                   [query(f"sum by (tier) ({rate('qlora_server_adapter_cache_hits_total')})", "{{tier}} hit", "A"),
                    query(f"sum by (tier) ({rate('qlora_server_adapter_cache_misses_total')})", "{{tier}} miss",
                          "B")]),
        timeseries("Loads and evictions", "Adapters loaded into and evicted from each tier per second.", "ops",
                   [query(f"sum by (tier) ({rate('qlora_server_adapter_loads_total')})", "{{tier}} load", "A"),
                    query(f"sum by (tier) ({rate('qlora_server_adapter_evictions_total')})", "{{tier}} eviction",
                          "B")]),
        timeseries("Load latency", "Time to load an adapter: disk → host (cpu) and host → slot (gpu); p50 and p99.",
                   "s", [query(quantile(0.5, "qlora_server_adapter_load_seconds", "tier"), "{{tier}} p50", "A"),
                         query(quantile(0.99, "qlora_server_adapter_load_seconds", "tier"), "{{tier}} p99", "B")]),
        timeseries("Resident adapters", "Adapters held per tier, and the number of accelerator slots.", "short",
                   [query(f"sum by (tier) (qlora_server_adapters_resident{{{SEL}}})", "{{tier}}", "A"),
                    query(f"sum(qlora_server_adapter_slots{{{SEL}}})", "slots", "B")]),
        timeseries("Adapter cache memory", "Bytes of the accelerator slot banks (preallocated) and of the adapters "
                   "held in host memory.", "bytes",
                   [query(f"sum by (component) (qlora_server_component_memory_bytes{{{SEL}, "
                          f"component=~\"adapter_banks|adapter_host_cache\"}})", "{{component}}")]),
    ], ids)
    per = f"{adapter_sel}"
    add_row(d, "Per adapter", [
        timeseries("Requests by adapter", "Finished generations per second by adapter.", "reqps",
                   [query(f"sum by (adapter) ({rate('qlora_server_generations_total', per)})", "{{adapter}}")],
                   stack=True),
        timeseries("Finish reasons by adapter", "Finished generations per second by adapter and finish reason.",
                   "reqps", [query(f"sum by (adapter, finish_reason) "
                                   f"({rate('qlora_server_generations_total', per)})",
                                   "{{adapter}} {{finish_reason}}")]),
        timeseries("Tokens by adapter", "Prompt tokens (in) and generated tokens (out) per second by adapter.",
                   "short",
                   [query(f"sum by (adapter) ({rate('qlora_server_prompt_tokens_total', per)})", "{{adapter}} in",
                          "A"),
                    query(f"sum by (adapter) ({rate('qlora_server_generated_tokens_total', per)})",
                          "{{adapter}} out", "B")]),
        timeseries("p95 end-to-end latency by adapter", "95th percentile of arrival to last token.", "s",
                   [query(quantile(0.95, "qlora_server_request_latency_seconds", "adapter", per), "{{adapter}}")]),
        timeseries("p95 time to first token by adapter", "95th percentile of arrival to first token.", "s",
                   [query(quantile(0.95, "qlora_server_time_to_first_token_seconds", "adapter", per),
                          "{{adapter}}")]),
        timeseries("Median time per output token by adapter", "50th percentile of the per-generation mean time "
                   "per output token.", "s",
                   [query(quantile(0.5, "qlora_server_time_per_output_token_seconds", "adapter", per),
                          "{{adapter}}")]),
        table("Top adapters", "The 10 adapters with the most finished generations over the time range.",
              query(f"topk(10, sum by (adapter) (increase(qlora_server_generations_total{{{SEL}, {per}}}"
                    f"[$__range])))", instant=True, table=True)),
    ], ids)
    return d


def training() -> dash_b.Dashboard:
    """Training jobs, loss and throughput."""
    d = dashboard("qlora-training", "qlora-server / Training",
                  "QLoRA training jobs run by the server: jobs by state, the running job's step, loss and throughput.",
                  [datasource_variable(), instance_variable()])
    ids = [1]
    add_row(d, "Training", [
        stat("Jobs by state", "Training jobs per state.", "short",
             query(f"sum by (state) (qlora_server_training_jobs{{{SEL}}})", "{{state}}"), width=8),
        stat("Current step", "Step of the running training job.", "short",
             query(f"max(qlora_server_training_step{{{SEL}}})"), width=8),
        stat("Latest loss", "Latest training loss of the running job.", "none",
             query(f"max(qlora_server_training_loss{{{SEL}}})"), width=8, decimals=3),
        timeseries("Jobs by state", "Training jobs per state over time.", "short",
                   [query(f"sum by (state) (qlora_server_training_jobs{{{SEL}}})", "{{state}}")], stack=True),
        timeseries("Loss", "Training loss of the running job.", "none",
                   [query(f"qlora_server_training_loss{{{SEL}}}", "{{instance}}")], min_zero=False),
        timeseries("Step", "Current step of the running job.", "short",
                   [query(f"qlora_server_training_step{{{SEL}}}", "{{instance}}")]),
        timeseries("Throughput", "Training tokens per second of the running job.", "short",
                   [query(f"qlora_server_training_tokens_per_second{{{SEL}}}", "{{instance}}")]),
        timeseries("Job memory", "The running job's memory budget, its estimated peak, and its current and peak "
                   "use (worker RSS on a CPU, CUDA allocator bytes on a GPU).", "bytes",
                   [query(f"max by (kind) (qlora_server_training_memory_bytes{{{SEL}}})", "{{kind}}")]),
        timeseries("Job CPU threads", "CPU threads of the running job's worker (--training-threads).", "short",
                   [query(f"max(qlora_server_training_threads{{{SEL}}})", "threads")]),
    ], ids)
    return d


#: File stem → builder of each dashboard.
DASHBOARDS: dict[str, Callable[[], dash_b.Dashboard]] = {
    "overview": overview,
    "adapters": adapters,
    "training": training,
}


def render(builder: dash_b.Dashboard) -> str:
    """The dashboard's JSON text, as committed (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name (``NAME.json``) → JSON text of every dashboard."""
    return {f"{name}.json": render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing; exit 1 on "
                        "any difference")
    args = parser.parse_args(argv)
    built = build_all()
    if args.check:
        stale = [name for name, text in built.items()
                 if not (args.out / name).is_file() or (args.out / name).read_text() != text]
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in built) if args.out.is_dir() else []
        for name in stale + extra:
            print(f"out of date: {args.out / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in built.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
