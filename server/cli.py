"""The ``qlora-server`` command line: ``serve`` runs the server; ``generate`` and ``adapters`` are gRPC clients."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from server.argtypes import (
    INT32_MAX,
    INT64_MAX,
    MAX_TIMEOUT_S,
    UINT64_MAX,
    OneLineErrorParser,
    float_in,
    int_in,
    one_line,
    target_address,
)
from server.config import (
    COMPUTE_DTYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    EMBEDDED_MODEL,
    MIN_MAX_MESSAGE_BYTES,
    EngineConfig,
    ModelConfig,
    ServerConfig,
    TrainingLimits,
)
from server.engine.types import MAX_TOP_LOGPROBS
from server.errors import ServerError
from server.rpc.tls import add_client_tls_options, client_tls_from_args
from server.training.commands import add_jobs_command, add_train_command

DEFAULT_TARGET = "localhost:50051"
#: Seconds in-flight RPCs get to finish after SIGTERM / SIGINT before they are cancelled.
DEFAULT_SHUTDOWN_GRACE = 10.0
#: Upper bounds of ``serve``'s sizing options: far above any sensible value, low enough that no C integer
#: overflows and a typo (an extra digit or ten) is refused up front rather than as an out-of-memory at load.
MAX_ADAPTER_SLOTS = 4096
MAX_BATCH_SIZE = 65536
MAX_LORA_RANK = 65536
MAX_PREFILL_TOKENS = 2**20
MAX_KV_BLOCK_SIZE = 1024
MAX_GRPC_WORKERS = 100_000
MAX_SHUTDOWN_GRACE_S = 86400.0
#: Exit status of ``serve`` whenever the server does not start: a bad option, a port that cannot be bound, a model
#: that cannot be found or loaded, a missing ``server`` extra (one line on stderr says which). Also argparse's.
EXIT_STARTUP = 2

# --- argument parsing ----------------------------------------------------------------------------------------------
#
# Each sub-command is registered by one small function taking the sub-parsers object; it sets ``func`` (called with
# the parsed namespace, returns the exit status). To add a command (e.g. ``train``), write ``add_train_command``
# next to these and list it in ``COMMANDS``.


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """``serve``: load the model and serve gRPC (+ Prometheus metrics) until SIGTERM / SIGINT."""
    p = sub.add_parser("serve", help="run the server", description="Bind the gRPC and metrics ports, load the base "
                       "model and serve gRPC until SIGTERM or SIGINT. Unset options take the config defaults.",
                       epilog=f"Exit status: 0 after a clean shutdown; {EXIT_STARTUP} when the server does not start "
                       "(a bad option, a port in use, a model that cannot be found or loaded, the server extra not "
                       "installed), with one line on stderr saying why.")
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"local directory, hub id, or '{EMBEDDED_MODEL}' for the embedded model (default)")
    p.add_argument("--host", default="[::]", help="address to bind (default [::] = all interfaces)")
    p.add_argument("--port", type=int_in(0, 65535), default=50051,
                   help="gRPC port; 0 picks a free one (default 50051)")
    p.add_argument("--metrics-port", type=int_in(-1, 65535), default=9400,
                   help="Prometheus exposition port; 0 picks a free one, -1 disables it (default 9400)")
    p.add_argument("--http-port", type=int_in(0, 65535), default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                   "/v1/chat/completions) on this port; 0 picks a free one (default: off). Same security as gRPC: "
                   "--api-keys-file keys as 'Authorization: Bearer KEY', HTTPS with --tls-cert/--tls-key, client "
                   "certificates with --tls-client-ca")
    p.add_argument("--metrics-host", default=None,
                   help="address the metrics endpoint binds (default: --host); metrics stay plaintext HTTP")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="PEM certificate (chain): serve gRPC (and --http-port) over TLS (with --tls-key; default "
                        "plaintext)")
    p.add_argument("--tls-key", type=Path, default=None, help="unencrypted PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None,
                   help="PEM CA bundle: mutual TLS, clients must present a certificate it signed")
    p.add_argument("--adapters-dir", type=Path, default=Path("adapters"), help="adapter store directory")
    p.add_argument("--state-dir", type=Path, default=None, help="training jobs' database and outputs")
    p.add_argument("--cache-dir", type=Path, default=None, help="where converted models are cached")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="auto (default: bfloat16 where the device runs it natively — CUDA with bf16, CPUs with "
                        "AVX512-BF16/AMX — else float32, float16 on older GPUs), bfloat16, float16 or float32")
    p.add_argument("--cpu-4bit-kernel", default="exact", choices=("exact", "fused"),
                   help="exact (default): 4-bit layers dequantize and multiply on a CPU, the trainer's numerics; "
                        "fused: bitsandbytes' AVX512-BF16 kernel, ~2x faster decode, 3-5%% of the largest logit off")
    p.add_argument("--adapter-slots", type=int_in(1, MAX_ADAPTER_SLOTS), default=None,
                   help="adapters resident on the accelerator at once")
    p.add_argument("--cpu-adapter-cache", type=int_in(1, INT32_MAX), default=None,
                   help="adapters kept in host memory (default: the larger of 32 and --adapter-slots)")
    p.add_argument("--max-batch-size", type=int_in(1, MAX_BATCH_SIZE), default=None, help="rows decoded together")
    p.add_argument("--max-lora-rank", type=int_in(1, MAX_LORA_RANK), default=None,
                   help="largest adapter rank accepted")
    p.add_argument("--prefill-tokens", type=int_in(1, MAX_PREFILL_TOKENS), default=None,
                   help=f"token budget of one prefill step; longer prompts are prefilled in chunks (default "
                        f"{EngineConfig.prefill_tokens})")
    p.add_argument("--kv-cache-bytes", type=int_in(0, INT64_MAX), default=None,
                   help="size of the paged KV cache (bytes); 0 = auto (default): room for --max-batch-size "
                        "full-length rows, capped at half the free GPU memory (1 GiB on a CPU)")
    p.add_argument("--kv-block-size", type=int_in(1, MAX_KV_BLOCK_SIZE), default=None,
                   help=f"tokens per KV cache block (default {EngineConfig.kv_block_size})")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                   help="capture the decode step in CUDA graphs at start-up (default on; ignored on a CPU)")
    p.add_argument("--training-share-base", choices=("on", "off"), default=None,
                   help="training jobs use the server's loaded base read-only instead of loading their own copy "
                        "(default on)")
    p.add_argument("--grpc-workers", type=int_in(0, MAX_GRPC_WORKERS), default=None,
                   help="gRPC handler threads (at least, and by default, --max-generations + --max-streams + 16)")
    p.add_argument("--max-generations", type=int_in(0, MAX_GRPC_WORKERS), default=None,
                   help="concurrent Generation RPCs; one more is RESOURCE_EXHAUSTED (default 0 = batch + queue)")
    p.add_argument("--max-streams", type=int_in(1, MAX_GRPC_WORKERS), default=None,
                   help=f"concurrent WatchTrainingJob + UploadAdapter RPCs (default {ServerConfig.max_streams})")
    p.add_argument("--max-message-bytes", type=int_in(MIN_MAX_MESSAGE_BYTES, INT32_MAX), default=None,
                   help=f"largest gRPC message sent or received (default {DEFAULT_MAX_MESSAGE_BYTES})")
    p.add_argument("--max-prompt-tokens", type=int_in(0, INT32_MAX), default=None,
                   help="longest prompt in tokens (default 0 = the context)")
    p.add_argument("--max-stop-strings", type=int_in(0, INT32_MAX), default=None,
                   help=f"most stop strings per request (default {EngineConfig.max_stop_strings})")
    p.add_argument("--max-stop-chars", type=int_in(1, INT32_MAX), default=None,
                   help=f"longest stop string in characters (default {EngineConfig.max_stop_chars})")
    p.add_argument("--max-upload-bytes", type=int_in(1, INT64_MAX), default=None,
                   help="size cap of one adapter upload (bytes)")
    p.add_argument("--shutdown-grace", type=float_in(0.0, MAX_SHUTDOWN_GRACE_S), default=DEFAULT_SHUTDOWN_GRACE,
                   help=f"seconds in-flight RPCs get at shutdown (default {DEFAULT_SHUTDOWN_GRACE:g})")
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of plain text")
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in request logs (off by default)")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="JSON/YAML file of API-key hashes and roles (README: Security), for gRPC and --http-port; "
                        "reloaded on SIGHUP; default: no keys, every RPC open")
    p.add_argument("--allowed-path", type=Path, action="append", default=[], metavar="DIR",
                   help="a root RegisterAdapter and CreateTrainingJob may read server paths under (repeatable); "
                        "default: any path without keys, none (upload only) with --api-keys-file")
    p.add_argument("--training-memory-bytes", type=int_in(0, INT64_MAX), default=0,
                   help="memory budget of a training job (bytes; CPU: worker RSS, CUDA: its allocator); 0 = auto "
                        "(default): half the memory free on the device when the job is created and when it starts")
    p.add_argument("--training-threads", type=int_in(0, 4096), default=0,
                   help="CPU threads of a training job; 0 = auto (default): half the cores, at least 1")
    p.add_argument("--training-nice", type=int_in(0, 19), default=TrainingLimits.nice,
                   help=f"niceness of a training job's worker (default {TrainingLimits.nice}: serving wins the cores)")
    p.set_defaults(func=_cmd_serve)


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, type=target_address,
                   help=f"server address HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float_in(0.0, MAX_TIMEOUT_S, lo_open=True), default=None,
                   help="deadline of each call (seconds)")
    p.add_argument("--api-key", default=None, help="API key, sent as 'authorization: Bearer KEY' metadata")
    add_message_size_option(p)
    add_client_tls_options(p)


def add_message_size_option(p: argparse.ArgumentParser) -> None:
    """``--max-message-bytes`` of the client commands (the same default as ``serve``'s)."""
    p.add_argument("--max-message-bytes", type=int_in(MIN_MAX_MESSAGE_BYTES, INT32_MAX),
                   default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest gRPC message sent or received; upload chunks stay below it (default %(default)s)")


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    """``generate``: one request against a running server; prints the text."""
    p = sub.add_parser("generate", help="generate text", description="Send one generation request and print "
                       "the text.")
    _add_client_options(p)
    p.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text (no chat template)")
    src.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered with the chat template")
    p.add_argument("--system", default=None, help="system message placed before --chat")
    p.add_argument("--max-new-tokens", type=int_in(1, INT32_MAX), default=256,
                   help="tokens to generate at most (default 256; the server caps it)")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0,
                   help="nucleus mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int_in(0, INT32_MAX), default=0, help="0 = disabled (default)")
    p.add_argument("--repetition-penalty", type=float_in(0.0, lo_open=True), default=1.0,
                   help="1 = disabled (default)")
    p.add_argument("--seed", type=int_in(0, UINT64_MAX), default=None, help="seed of the request's sampler")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past EOS until --max-new-tokens or a stop string (for benchmarks)")
    p.add_argument("--logprobs", action="store_true",
                   help="print each generated token's log-probability to stderr, one JSON line per token")
    p.add_argument("--top-logprobs", type=int_in(0, MAX_TOP_LOGPROBS), default=0, metavar="K",
                   help=f"also print the K most likely tokens per position (0..{MAX_TOP_LOGPROBS}; implies "
                        "--logprobs; default 0)")
    p.add_argument("--prompt-logprobs", type=int_in(0, MAX_TOP_LOGPROBS), default=None, metavar="K",
                   help="score the prompt: print the log-probability of each prompt token after the first (the "
                        "model's own distribution: no temperature, no penalty) and the K most likely tokens there "
                        f"(0..{MAX_TOP_LOGPROBS}) to stderr, one JSON line per token marked \"prompt\": true, before "
                        "the generated tokens' lines")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="SCHEMA", default=None, type=_schema_text,
                     help="structured output: the answer is JSON valid against this JSON Schema (JSON text, or "
                          "@FILE to read it from a file)")
    fmt.add_argument("--json-object", action="store_true", help="structured output: the answer is a JSON object")
    fmt.add_argument("--regex", default=None, help="structured output: the whole answer matches this regex")
    fmt.add_argument("--choice", action="append", default=None,
                     help="structured output: the answer is exactly one of these strings (repeatable)")
    p.add_argument("--request-id", default="", help="request id (default: the server makes one)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(func=_cmd_generate)


def add_adapters_command(sub: argparse._SubParsersAction) -> None:
    """``adapters list|get|register|unregister|upload``."""
    p = sub.add_parser("adapters", help="manage adapters", description="Manage the server's LoRA adapters.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="list adapters")
    _add_client_options(a)
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=_cmd_adapters_list)
    a = actions.add_parser("get", help="describe one adapter (JSON)")
    _add_client_options(a)
    a.add_argument("--id", required=True, help="adapter id")
    a.set_defaults(func=_cmd_adapters_get)
    a = actions.add_parser("register", help="register a directory on the server")
    _add_client_options(a)
    a.add_argument("--id", required=True, help="adapter id")
    a.add_argument("--path", required=True, help="adapter directory on the server")
    a.add_argument("--replace", action="store_true", help="replace an adapter with this id")
    a.set_defaults(func=_cmd_adapters_register)
    a = actions.add_parser("unregister", help="remove an adapter")
    _add_client_options(a)
    a.add_argument("--id", required=True, help="adapter id")
    a.set_defaults(func=_cmd_adapters_unregister)
    a = actions.add_parser("upload", help="upload a local adapter directory")
    _add_client_options(a)
    a.add_argument("--id", required=True, help="adapter id")
    a.add_argument("--dir", required=True, type=Path,
                   help="local directory with adapter_config.json and adapter_model.safetensors")
    a.add_argument("--replace", action="store_true", help="replace an adapter with this id")
    a.set_defaults(func=_cmd_adapters_upload)


def add_keys_command(sub: argparse._SubParsersAction) -> None:
    """``keys hash|generate``: make the entries of ``--api-keys-file``."""
    p = sub.add_parser("keys", help="API-key helpers", description="Make entries of the --api-keys-file.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("hash", help="print the sha256 of a key read from stdin (one line)")
    a.set_defaults(func=_cmd_keys_hash)
    a = actions.add_parser("generate", help="print a new random key and its sha256")
    a.set_defaults(func=_cmd_keys_generate)


def _cmd_keys_hash(args: argparse.Namespace) -> int:
    from server.auth import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("qlora-server: error: no key on stdin", file=sys.stderr, flush=True)
        return 1
    print(hash_key(key), flush=True)
    return 0


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    import secrets

    from server.auth import hash_key

    key = secrets.token_urlsafe(32)
    print(json.dumps({"key": key, "sha256": hash_key(key)}), flush=True)
    return 0


#: Sub-command registrars, in help order (``train`` and ``jobs`` live in server/training/commands.py).
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_serve_command,
    add_generate_command,
    add_adapters_command,
    add_train_command,
    add_jobs_command,
    add_keys_command,
)


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    """The full argument parser with every registrar in ``commands`` applied."""
    parser = OneLineErrorParser(prog="qlora-server", description="One NF4 base model, many LoRA adapters, "
                                     "served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in commands:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qlora-server`` and ``python -m server``; returns the exit status (0 ok, 1 a client RPC
    failed, 2 (:data:`EXIT_STARTUP`) bad arguments — one line on stderr naming the option — or the server did not
    start)."""
    args = build_parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:
        missing = missing_server_modules()
        if missing:
            print(f"qlora-server: error: `{args.command}` needs the server extra: pip install 'qlora-server[server]' "
                  f"(missing: {', '.join(missing)})", file=sys.stderr, flush=True)
            return EXIT_STARTUP
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C in a client command (serve and train handle their own): no traceback
        print("qlora-server: interrupted", file=sys.stderr, flush=True)
        return 130


# --- serve ---------------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build the :class:`ServerConfig` of ``serve``'s arguments; options left unset keep the config defaults.
    Raises :class:`InvalidArgument` naming the bad config field."""
    model_kw = {"model": args.model, "device": args.device, "compute_dtype": args.compute_dtype,
                "cpu_4bit_kernel": args.cpu_4bit_kernel}
    if args.cache_dir is not None:
        model_kw["cache_dir"] = args.cache_dir
    engine_kw = {name: getattr(args, name) for name in ("adapter_slots", "cpu_adapter_cache", "max_batch_size",
                                                        "max_lora_rank", "prefill_tokens", "kv_cache_bytes",
                                                        "kv_block_size", "max_prompt_tokens", "max_stop_strings",
                                                        "max_stop_chars") if getattr(args, name) is not None}
    if args.cuda_graphs is not None:
        engine_kw["cuda_graphs"] = args.cuda_graphs == "on"
    if "adapter_slots" in engine_kw and "cpu_adapter_cache" not in engine_kw:
        engine_kw["cpu_adapter_cache"] = max(EngineConfig.cpu_adapter_cache, engine_kw["adapter_slots"])
    server_kw = {"host": args.host, "port": args.port, "metrics_port": args.metrics_port,
                 "adapters_dir": args.adapters_dir, "log_json": args.log_json,
                 "log_prompts": args.log_prompts, "api_keys_file": args.api_keys_file,
                 "allowed_paths": tuple(args.allowed_path)}
    if args.training_share_base is not None:
        server_kw["training_share_base"] = args.training_share_base == "on"
    for name in ("state_dir", "grpc_workers", "max_upload_bytes", "max_generations", "max_streams",
                 "max_message_bytes", "metrics_host", "tls_cert", "tls_key", "tls_client_ca", "http_port"):
        if getattr(args, name) is not None:
            server_kw[name] = getattr(args, name)
    training = TrainingLimits(memory_bytes=args.training_memory_bytes, threads=args.training_threads,
                              nice=args.training_nice)
    return ServerConfig(model=ModelConfig(**model_kw), engine=EngineConfig(**engine_kw), training=training,
                        **server_kw)


#: Commands that load a model: they need the ``server`` extra (the others are gRPC clients: grpcio and protobuf).
SERVER_COMMANDS = ("serve", "train")
#: Top-level modules ``serve`` and ``train`` need beyond the client: the ``server`` extra of pyproject.toml.
#: (``gguf`` is in the extra too but only the embedded model's one-time conversion needs it:
#: ``server.model.source.check_model_source`` asks for it then.)
SERVER_EXTRA_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors",
                        "grpc_health", "grpc_reflection", "prometheus_client", "psutil")


def missing_server_modules() -> list[str]:
    """The :data:`SERVER_EXTRA_MODULES` that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for name in SERVER_EXTRA_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def check_writable_dir(path: Path, field: str) -> None:
    """Make sure ``path`` is a directory this process can create files in (creating it if absent), so a bad
    ``--adapters-dir`` / ``--state-dir`` fails start-up at once, before the model loads.

    Raises:
        FailedPrecondition: (``field``) it exists and is not a directory, cannot be created, or is not writable.
    """
    import tempfile

    from server.errors import FailedPrecondition

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FailedPrecondition(f"{path} exists and is not a directory", field=field)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise FailedPrecondition(f"{path} cannot be used as a directory here: {exc.strerror or exc}",
                                 field=field) from None


def _default_app_factory(config: ServerConfig, metrics):
    """Check ``--model`` in seconds (:func:`server.model.source.check_model_source`: a missing path, a directory
    lacking model files, an unreachable or offline hub), then build the app with ``server.app.build_app``."""
    from server.model.source import check_model_source

    check_writable_dir(config.adapters_dir, "adapters_dir")
    check_writable_dir(config.state_dir, "state_dir")
    check_model_source(config.model)
    from server.app import build_app  # heavy (torch, transformers): imported only once the model looks loadable

    return build_app(config, metrics=metrics)


def metrics_bind_address(host: str) -> str:
    """The gRPC host as an address ``prometheus_client`` binds (brackets stripped; ``[::]`` → ``::``)."""
    host = host.strip("[]")
    return host or "0.0.0.0"


def _announce(line: str) -> None:
    print(line, flush=True)


def _start_metrics_endpoint(config: ServerConfig, registry):
    """Serve ``registry`` on ``config.metrics_port`` now; returns ``(httpd, note)`` (``httpd`` None when disabled).
    Raises :class:`FailedPrecondition` (field ``metrics_port``) when the port cannot be bound."""
    from prometheus_client import start_http_server

    from server.errors import FailedPrecondition

    if config.metrics_port < 0:
        return None, "metrics off"
    host = metrics_bind_address(config.metrics_host or config.host)
    try:
        httpd, _ = start_http_server(config.metrics_port, addr=host, registry=registry)
    except OSError as exc:
        reason = ("already in use (another server running?)" if exc.errno == errno.EADDRINUSE
                  else exc.strerror or str(exc))
        raise FailedPrecondition(f"cannot bind {host} port {config.metrics_port}: "
                                 f"{reason}", field="metrics_port") from None
    return httpd, f"metrics on :{httpd.server_port}"


def _close_httpd(httpd) -> None:
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()


def serve(config: ServerConfig, stop: threading.Event, *, grace_seconds: float = DEFAULT_SHUTDOWN_GRACE,
          app_factory: Callable[[ServerConfig, object], object] | None = None,
          announce: Callable[[str], None] = _announce) -> int:
    """Bind the gRPC and metrics ports, then build the app (load the base model), serve, announce
    ``qlora-server listening on HOST:PORT (metrics on :N)``, block until ``stop`` is set, then shut down
    gracefully: health → NOT_SERVING, new RPCs refused with UNAVAILABLE while the running ones finish (at most
    ``grace_seconds``; gRPC cancels what is left), ``app.close()``, metrics endpoint closed.

    The ports are bound before the model loads, so a port clash is reported in seconds; the metrics endpoint
    answers (process metrics) while the model loads; gRPC starts once the app is built.

    ``app_factory(config, metrics)`` builds the app around the :class:`server.metrics.Metrics` being exported
    (default ``server.app.build_app``). Returns the exit status: 0 after a clean shutdown (also when ``stop`` is
    set while the model loads), :data:`EXIT_STARTUP` when start-up fails (one line on stderr naming the field:
    ``port``, ``metrics_port``, ``model``, …).
    """
    from server.metrics import Metrics
    from server.rpc.server import (add_services, bind_grpc_server, format_address, new_drain, new_health_servicer,
                                   rpc_limits)
    from server.rpc.tls import log_transport, server_credentials
    from server.rpc.training import TrainingServicer

    log = logging.getLogger("qlora_server")
    metrics = Metrics(config.engine.top_adapter_labels)
    httpd = grpc_server = app = http_sock = http_server = None
    restore_hup = None
    drain = new_drain()
    gate = None
    try:
        keys = _load_security(config)
        if keys is not None:
            from server.access import Gate

            gate = Gate(keys)  # one gate for gRPC and HTTP: the same keys (reloaded together) and per-key limits
            if threading.current_thread() is threading.main_thread():
                from server.auth import reload_on_sighup

                restore_hup = reload_on_sighup(keys)
        grpc_server, port = bind_grpc_server(config.host, config.port, workers=config.rpc_workers, metrics=metrics,
                                             keys=gate, limits=rpc_limits(config),
                                             credentials=server_credentials(config),
                                             max_message_bytes=config.max_message_bytes, drain=drain)
        httpd, metrics_note = _start_metrics_endpoint(config, metrics.registry)
        if config.http_port is not None:
            from server.http.server import bind_http_socket

            http_sock = bind_http_socket(config.host, config.http_port)
            scheme = "HTTPS" if config.tls_cert is not None else "HTTP"
            metrics_note += f", OpenAI-compatible {scheme} on :{http_sock.getsockname()[1]}"
        address = format_address(config.host, port)
        log_transport(config, address, log)
        log.info("bound %s (%s); loading base model %s", address, metrics_note, config.model.model)
        app = (app_factory or _default_app_factory)(config, metrics)
        health = new_health_servicer()
        training = getattr(app, "training", None)  # the TrainingManager; absent in apps that do not train
        add_services(grpc_server, app, health_servicer=health,
                     training_servicer=None if training is None else TrainingServicer(training, config.allowed_paths))
    except BaseException as exc:
        if http_sock is not None:
            http_sock.close()
        if restore_hup is not None:
            restore_hup()
        if grpc_server is not None:
            grpc_server.stop(None)
        _close_httpd(httpd)
        if app is not None:
            app.close()
        if isinstance(exc, ServerError):
            return _startup_error(exc)
        if isinstance(exc, Exception):
            log.error("start-up failed", exc_info=True)
            return _startup_error(exc)
        raise  # KeyboardInterrupt (a second Ctrl-C), SystemExit
    if stop.is_set():  # SIGTERM / SIGINT while the model loaded
        if restore_hup is not None:
            restore_hup()
        log.info("stopped before serving")
        if http_sock is not None:
            http_sock.close()
        grpc_server.stop(None)
        app.close()
        _close_httpd(httpd)
        return 0

    grpc_server.start()
    if http_sock is not None:
        from server.http.server import HttpServer, log_http_transport

        try:
            http_server = HttpServer(app, http_sock, gate).start()
        except BaseException as exc:
            grpc_server.stop(None)
            app.close()
            _close_httpd(httpd)
            http_sock.close()
            if restore_hup is not None:
                restore_hup()
            return _startup_error(exc) if isinstance(exc, Exception) else 1
        log_http_transport(config, http_server, gate is not None, log)
    log.info("serving on %s (%s)", address, metrics_note)
    announce(f"qlora-server listening on {address} ({metrics_note})")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down (grace %.1f s)", grace_seconds)
        shutting_down = getattr(app, "shutting_down", None)
        if shutting_down is not None:
            shutting_down.set()
        health.enter_graceful_shutdown()
        # New RPCs are refused (UNAVAILABLE) while the port stays open and the running ones finish; what is
        # still running when the grace period ends is cancelled by gRPC.
        began = time.monotonic()
        drain.start()
        drain.wait(grace_seconds)
        grpc_server.stop(max(0.0, grace_seconds - (time.monotonic() - began))).wait()
        if http_server is not None:
            http_server.stop()
        app.close()
        _close_httpd(httpd)
        if restore_hup is not None:
            restore_hup()
    return 0


def _load_security(config: ServerConfig):
    """The :class:`server.auth.KeyStore` of ``--api-keys-file`` (None without one), after checking every
    ``--allowed-path`` is a directory. Raises FailedPrecondition (``api_keys_file`` / ``allowed_path``)."""
    from server.errors import FailedPrecondition

    for root in config.allowed_paths:
        if not Path(root).is_dir():
            raise FailedPrecondition(f"{root} is not a directory", field="allowed_path")
    if config.api_keys_file is None:
        return None
    from server.auth import KeyStore

    keys = KeyStore(config.api_keys_file)
    logging.getLogger("qlora_server").info("API keys on: %d keys from %s", len(keys), config.api_keys_file)
    return keys


def _startup_error(exc: Exception) -> int:
    if isinstance(exc, ServerError):
        line = f"{exc.code}: {exc}"
    else:
        line = f"INTERNAL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    print(one_line(f"qlora-server: error: {line}"), file=sys.stderr, flush=True)
    return EXIT_STARTUP


def _cmd_serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_json)
    try:
        config = config_from_args(args)
    except ServerError as exc:
        return _startup_error(exc)
    stop = threading.Event()
    previous = {}

    def on_signal(signum, frame):
        stop.set()
        for sig, handler in previous.items():  # a second signal acts at once
            signal.signal(sig, handler)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        return serve(config, stop, grace_seconds=args.shutdown_grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_logging(log_json: bool) -> None:
    from server.logs import configure_logging

    configure_logging(json_lines=log_json)


# --- clients -------------------------------------------------------------------------------------------------------


def _client_command(fn: Callable[..., None]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn(client, args)``; a failed RPC prints ``error: CODE: message`` to stderr and exits 1."""

    def run(args: argparse.Namespace) -> int:
        from server.rpc.client import Client, ClientError

        try:
            with Client(args.target, timeout=args.timeout, api_key=args.api_key,
                        max_message_bytes=args.max_message_bytes, tls=client_tls_from_args(args)) as client:
                fn(client, args)
        except ClientError as exc:
            print(one_line(f"error: {exc.code}: {exc.message}"), file=sys.stderr, flush=True)
            return 1
        return 0

    return run


def _schema_text(value: str) -> str:
    """``--json-schema``'s value: the schema text itself, or ``@FILE``'s contents (UTF-8). Raises
    ``argparse.ArgumentTypeError`` (a usage error, exit 2) when FILE cannot be read."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read the schema file {value[1:]!r}: "
                                         f"{getattr(exc, 'strerror', None) or exc}") from None


def _response_format_from_args(args: argparse.Namespace):
    """``generate``'s structured-output option as a :class:`ResponseFormat` (None when none is given)."""
    from server.engine.types import ResponseFormat

    schema = getattr(args, "json_schema", None)
    if schema is not None:
        return ResponseFormat("json_schema", schema)
    if getattr(args, "json_object", False):
        return ResponseFormat("json_object")
    if getattr(args, "regex", None) is not None:
        return ResponseFormat("regex", args.regex)
    if getattr(args, "choice", None):
        return ResponseFormat("choice", choices=tuple(args.choice))
    return None


def generation_request_from_args(args: argparse.Namespace):
    """The :class:`GenerationRequest` of ``generate``'s arguments (validated by the server, not here)."""
    from server.engine.types import ChatMessage, GenerationRequest, SamplingParams

    messages: tuple = ()
    if args.chat is not None:
        messages = ((ChatMessage("system", args.system),) if args.system else ()) + (ChatMessage("user", args.chat),)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs,
                            top_logprobs=args.top_logprobs, prompt_logprobs=args.prompt_logprobs,
                            response_format=_response_format_from_args(args))
    return GenerationRequest(request_id=args.request_id, adapter_id=args.adapter, prompt=args.prompt,
                             messages=messages, params=params)


def _print_logprobs(logprobs, prompt: bool = False) -> None:
    """One JSON line per token on stderr: ``{"token_id", "token", "logprob", "bytes", "top_logprobs": [{"token_id",
    "token", "logprob", "bytes"}]}`` (``bytes``: the token's exact bytes as a list of ints, OpenAI's shape), plus
    ``"prompt": true`` for a scored prompt token."""
    def entry(t) -> dict:
        return {"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
                "bytes": list(t.token_bytes or t.token.encode())}

    for lp in logprobs:
        line = {**entry(lp), "top_logprobs": [entry(t) for t in lp.top_logprobs]}
        if prompt:
            line["prompt"] = True
        print(json.dumps(line), file=sys.stderr, flush=True)


@_client_command
def _cmd_generate(client, args: argparse.Namespace) -> None:
    request = generation_request_from_args(args)
    if not args.stream:
        result = client.generate(request)
        print(result.text, flush=True)
        _print_logprobs(result.prompt_logprobs, prompt=True)
        _print_logprobs(result.logprobs)
        return
    for event in client.generate_stream(request):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        _print_logprobs(event.prompt_logprobs, prompt=True)
        _print_logprobs(event.logprobs)
    sys.stdout.write("\n")
    sys.stdout.flush()


def adapter_json(info, residency: str) -> dict:
    """A JSON-ready dict of an adapter (the server-internal ``path`` left out)."""
    d = dataclasses.asdict(info)
    d.pop("path", None)
    d["target_modules"] = list(info.target_modules)
    d["residency"] = residency
    d["registered_at_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.registered_at))
    return d


def _print_adapter(info, residency: str) -> None:
    print(json.dumps(adapter_json(info, residency), indent=2), flush=True)


@_client_command
def _cmd_adapters_list(client, args: argparse.Namespace) -> None:
    adapters = client.list_adapters()
    if args.json:
        print(json.dumps([adapter_json(i, r) for i, r in adapters], indent=2), flush=True)
        return
    rows = [("ID", "RANK", "ALPHA", "MODULES", "SIZE_BYTES", "RESIDENCY", "BASE_MODEL")]
    rows += [(i.adapter_id, str(i.max_rank), f"{i.lora_alpha:g}", str(i.module_count), str(i.size_bytes), r,
              i.base_model) for i, r in adapters]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    sys.stdout.flush()


@_client_command
def _cmd_adapters_get(client, args: argparse.Namespace) -> None:
    _print_adapter(*client.get_adapter(args.id))


@_client_command
def _cmd_adapters_register(client, args: argparse.Namespace) -> None:
    _print_adapter(*client.register_adapter(args.id, args.path, replace=args.replace))


@_client_command
def _cmd_adapters_unregister(client, args: argparse.Namespace) -> None:
    client.unregister_adapter(args.id)
    print(f"unregistered {args.id}", flush=True)


@_client_command
def _cmd_adapters_upload(client, args: argparse.Namespace) -> None:
    _print_adapter(*client.upload_adapter(args.id, args.dir, replace=args.replace))
