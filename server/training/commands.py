"""The ``train`` (local QLoRA run, optional registration) and ``jobs`` (Training-service client) CLI commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from server.argtypes import (
    FLOAT32_MAX,
    INT32_MAX,
    INT64_MAX,
    MAX_TIMEOUT_S,
    float_in,
    int_in,
    one_line,
    target_address,
)
from server.errors import Cancelled, InvalidArgument, ServerError
from server.logs import quiet_libraries
from server.rpc.tls import add_client_tls_options, client_tls_from_args

_INT32 = int_in(-INT32_MAX - 1, INT32_MAX)
_FLOAT32 = float_in(-FLOAT32_MAX, FLOAT32_MAX)
_DOUBLE = float_in()

#: Flags of ``jobs create``, one per ``TrainingConfig`` field: (field, argparse type, help). The types refuse what
#: the wire cannot carry (past int32 / float32, NaN, infinities) with a one-line usage error; the server checks the
#: meaning (``config.<field>`` in its INVALID_ARGUMENT). ``target_modules`` takes a comma-separated list; a ``bool``
#: field is ``--name`` / ``--no-name``.
CONFIG_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("r", _INT32, "LoRA rank"),
    ("lora_alpha", _FLOAT32, "LoRA alpha"),
    ("lora_dropout", _FLOAT32, "dropout on the LoRA input, in [0, 1)"),
    ("target_modules", str, "comma-separated module names (default: every linear layer of the blocks)"),
    ("use_rslora", bool, "rank-stabilized scaling alpha / sqrt(r)"),
    ("learning_rate", _DOUBLE, "peak learning rate"),
    ("lr_scheduler", str, "constant_with_warmup (default), linear or cosine"),
    ("warmup_ratio", _DOUBLE, "share of the steps spent warming up, in [0, 1)"),
    ("max_grad_norm", _DOUBLE, "gradient-norm clip, > 0"),
    ("weight_decay", _DOUBLE, "AdamW weight decay, >= 0"),
    ("max_steps", _INT32, "optimizer steps (overrides --num-epochs)"),
    ("num_epochs", _DOUBLE, "passes over the dataset"),
    ("batch_size", _INT32, "examples per device batch"),
    ("gradient_accumulation_steps", _INT32, "batches per optimizer step"),
    ("max_seq_length", _INT32, "longest example (tokens)"),
    ("truncate", bool, "cut longer examples to --max-seq-length instead of refusing the dataset"),
    ("optim", str, "paged_adamw_8bit or paged_adamw_32bit"),
    ("seed", int_in(0, INT64_MAX), "random seed"),
    ("eval_fraction", _DOUBLE, "share of the dataset held out for evaluation, in [0, 1)"),
    ("eval_steps", _INT32, "evaluate every N steps (0 = only at the end)"),
    ("eval_max_examples", _INT32, "evaluate on at most this many held-out examples"),
    ("save_steps", _INT32, "checkpoint every N steps"),
    ("save_total_limit", _INT32, "checkpoints kept"),
    ("logging_steps", _INT32, "record the training loss every N steps"),
    ("zero_loss_patience", _INT32, "fail after this many consecutive steps of exactly 0 loss"),
    ("gradient_checkpointing", bool, "recompute activations in the backward pass (default on)"),
    ("packing", bool, "concatenate each micro-batch's examples into one unpadded row (default off)"),
)


def _default_target() -> str:
    from server.cli import DEFAULT_TARGET  # server.cli is loaded: it calls these registrars

    return DEFAULT_TARGET


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=_default_target(), type=target_address,
                   help="server address HOST:PORT (default %(default)s)")
    p.add_argument("--timeout", type=float_in(0.0, MAX_TIMEOUT_S, lo_open=True), default=None,
                   help="deadline of each call (seconds)")
    p.add_argument("--api-key", default=None, help="API key, sent as 'authorization: Bearer KEY' metadata")
    from server.cli import add_message_size_option  # server.cli is loaded: it calls these registrars

    add_message_size_option(p)
    add_client_tls_options(p)


def _error(message: str) -> None:
    print(one_line(f"error: {message}"), file=sys.stderr, flush=True)


# --- train -----------------------------------------------------------------------------------------------------------


def add_train_command(sub: argparse._SubParsersAction) -> None:
    """``train CONFIG [--adapter-id ID] [--resume] [--register | --upload] [--replace] [--target HOST:PORT]``:
    run the trainer in this process with a progress bar; optionally register the result with a server."""
    p = sub.add_parser("train", help="train a LoRA adapter locally",
                       description="Run a QLoRA training run in this process and optionally register the adapter "
                       "with a running server. Ctrl-C finishes the current step, keeps a complete checkpoint and "
                       "stops (--resume continues); a second Ctrl-C aborts at once. When stdout is not a terminal, "
                       "progress is printed as plain lines every logging_steps steps.")
    p.add_argument("config", type=Path, help="TrainConfig file (.yaml, .yml or .json)")
    p.add_argument("--adapter-id", default=None, help="adapter id (default: the config's adapter_id)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    reg = p.add_mutually_exclusive_group()
    reg.add_argument("--register", action="store_true",
                     help="register the result with the server at --target by path (RegisterAdapter; the server "
                     "must see this machine's files)")
    reg.add_argument("--upload", action="store_true",
                     help="upload the result to the server at --target (UploadAdapter; works across machines)")
    p.add_argument("--replace", action="store_true", help="replace an adapter with this id on the server")
    _add_client_options(p)
    p.set_defaults(func=cmd_train)


def _progress_console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``train``; returns the exit status: 0 done (and registered), 1 training failed or the registration
    RPC failed, 2 an invalid config or data, 130 stopped by Ctrl-C (the first one finishes the step and keeps a
    complete checkpoint for ``--resume``; a second one aborts at once; never an adapter).

    Progress: a rich bar (on stderr) when stdout is a terminal, else plain lines on stdout: each phase, and a step
    line (step/max_steps, loss, tokens/s, ETA) every ``logging_steps`` steps (``trainer.console``)."""
    from trainer.config import TrainConfig
    from trainer.console import RichProgress, abort_message, progress_display, stop_on_sigint

    try:
        config = TrainConfig.from_file(args.config)
        if args.adapter_id is not None:
            config = config.replace(adapter_id=args.adapter_id)
    except ServerError as exc:
        _error(f"{exc.code}: {exc}")
        return 2
    console = _progress_console()
    display = progress_display(config.logging_steps, sys.stdout, console)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    if isinstance(display, RichProgress):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    quiet_libraries()
    root.setLevel(logging.INFO)
    stop = threading.Event()
    restore = stop_on_sigint(stop)
    try:
        from trainer.train import train

        with display as show:
            result = train(config, on_progress=show, resume=args.resume, should_stop=stop.is_set)
    except KeyboardInterrupt:
        _error(abort_message(config.checkpoint_dir))
        return 130
    except Cancelled as exc:
        _error(f"{exc} (run again with --resume to continue)")
        return 130
    except InvalidArgument as exc:
        _error(f"{exc.code}: {exc}")
        return 2
    except ServerError as exc:
        _error(f"{exc.code}: {exc}")
        return 1
    finally:
        restore()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    eval_note = "n/a" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    print(f"adapter written to {result.adapter_dir} ({result.steps} steps, train loss {result.train_loss:.4f}, "
          f"eval loss {eval_note}, {result.seconds:.0f} s)", flush=True)
    if not (args.register or args.upload):
        return 0
    from server.cli import adapter_json
    from server.rpc.client import Client, ClientError

    try:
        with Client(args.target, timeout=args.timeout, api_key=args.api_key,
                    max_message_bytes=args.max_message_bytes, tls=client_tls_from_args(args)) as client:
            if args.upload:
                info, residency = client.upload_adapter(config.adapter_id, result.adapter_dir, replace=args.replace)
            else:
                info, residency = client.register_adapter(config.adapter_id, str(Path(result.adapter_dir).resolve()),
                                                          replace=args.replace)
    except ClientError as exc:
        _error(f"{exc.code}: {exc.message} (the adapter stays in {result.adapter_dir})")
        return 1
    print(json.dumps(adapter_json(info, residency), indent=2), flush=True)
    return 0


# --- jobs ------------------------------------------------------------------------------------------------------------


def add_jobs_command(sub: argparse._SubParsersAction) -> None:
    """``jobs create|get|list|cancel|watch``: the server's Training service."""
    p = sub.add_parser("jobs", help="manage training jobs on a server",
                       description="Create, inspect, cancel and watch the server's QLoRA training jobs.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("create", help="queue a training job (JSON of the job)")
    _add_client_options(a)
    a.add_argument("--adapter-id", required=True, help="id to register the trained adapter under")
    a.add_argument("--dataset", required=True, help="JSONL dataset path as the server sees it")
    a.add_argument("--replace", action="store_true", help="replace an adapter with this id when the job succeeds")
    a.add_argument("--config", type=Path, default=None,
                   help="JSON/YAML file mapping TrainingConfig fields to values (flags below override it)")
    for name, typ, text in CONFIG_FLAGS:
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            a.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            a.add_argument(flag, dest=name, type=typ, default=None, help=text)
    a.add_argument("--watch", action="store_true", help="then watch it (exit status as `jobs watch`)")
    a.set_defaults(func=_client_command(_jobs_create))
    a = actions.add_parser("get", help="describe one job (JSON)")
    _add_client_options(a)
    a.add_argument("job_id", help="job id")
    a.set_defaults(func=_client_command(lambda c, args: _print_json(job_json(c.get_training_job(args.job_id)))))
    a = actions.add_parser("list", help="list jobs, newest first")
    _add_client_options(a)
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=_client_command(_jobs_list))
    a = actions.add_parser("cancel", help="cancel a queued or running job (JSON of the job)")
    _add_client_options(a)
    a.add_argument("job_id", help="job id")
    a.set_defaults(func=_client_command(lambda c, args: _print_json(job_json(c.cancel_training_job(args.job_id)))))
    a = actions.add_parser("watch", help="print a job's progress until it ends; exit 0 only if it succeeded")
    _add_client_options(a)
    a.add_argument("job_id", help="job id")
    a.set_defaults(func=_client_command(lambda c, args: _watch(c, args.job_id)))


def _client_command(fn: Callable[[Any, argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn(client, args)``; its return value (None = 0) is the exit status; a failed RPC prints
    ``error: CODE: message`` and exits 1."""

    def run(args: argparse.Namespace) -> int:
        from server.rpc.client import Client, ClientError

        try:
            with Client(args.target, timeout=args.timeout, api_key=args.api_key,
                        max_message_bytes=args.max_message_bytes, tls=client_tls_from_args(args)) as client:
                return fn(client, args) or 0
        except ClientError as exc:
            _error(f"{exc.code}: {exc.message}")
            return 1

    return run


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def job_json(job) -> dict:
    """A JSON-ready dict of a job as the API describes it (times also as ISO 8601 UTC)."""
    return {"job_id": job.job_id, "state": job.state, "adapter_id": job.adapter_id, "step": job.step,
            "total_steps": job.total_steps, "loss": job.loss, "eval_loss": job.eval_loss, "error": job.error,
            "phase": job.phase, "resumed_from_step": job.resumed_from_step, "restarts": job.restarts,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "created_at_iso": _iso(job.created_at), "started_at_iso": _iso(job.started_at),
            "finished_at_iso": _iso(job.finished_at), "output_dir": job.output_dir}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingConfig`` overrides of ``jobs create``: ``--config`` file first, flags over it.

    Raises:
        InvalidArgument: the file cannot be read or parsed, or is not a mapping (``field="config"``).
    """
    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            text = args.config.read_text(encoding="utf-8")
            if args.config.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - OSError, JSON or YAML errors alike
            raise InvalidArgument(f"cannot read {args.config}: {exc}", field="config") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"{args.config} must hold a mapping of TrainingConfig fields", field="config")
        from server.training.manager import JOB_FIXED_FIELDS

        # A trainer recipe (e.g. examples/extraction/train.yaml) also names its model, paths and adapter id: for a
        # job those come from the server and from --adapter-id / --dataset, so they are left out, and said so.
        fixed = sorted(k for k in data if k in JOB_FIXED_FIELDS)
        if fixed:
            print(f"note: {args.config}: {', '.join(fixed)} ignored (a job trains the server's model; "
                  "--adapter-id and --dataset name the rest)", file=sys.stderr, flush=True)
        config.update({k: v for k, v in data.items() if k not in JOB_FIXED_FIELDS})
    for name, _, _ in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            config[name] = [m.strip() for m in value.split(",") if m.strip()] if name == "target_modules" else value
    return config


def _jobs_create(client, args: argparse.Namespace) -> int:
    from server.rpc.client import ClientError
    from server.training.jobs import JobRequest

    try:
        config = config_from_args(args)
    except InvalidArgument as exc:
        raise ClientError(exc.code, str(exc)) from None
    job = client.create_training_job(JobRequest(adapter_id=args.adapter_id, dataset_path=args.dataset,
                                                replace=args.replace, config=config))
    _print_json(job_json(job))
    return _watch(client, job.job_id) if args.watch else 0


def _jobs_list(client, args: argparse.Namespace) -> None:
    jobs = client.list_training_jobs()
    if args.json:
        _print_json([job_json(j) for j in jobs])
        return
    rows = [("ID", "STATE", "ADAPTER", "STEP", "LOSS", "RESTARTS", "CREATED", "ERROR")]
    rows += [(j.job_id, j.state, j.adapter_id, f"{j.step}/{j.total_steps}",
              "" if j.loss is None else f"{j.loss:.4f}", _restarts(j), _iso(j.created_at) or "", j.error[:60])
             for j in jobs]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    sys.stdout.flush()


def _restarts(job) -> str:
    """``jobs list``'s RESTARTS cell: ``N (from step S)`` for a resumed job, ``""`` for one never interrupted."""
    if not job.restarts:
        return ""
    return f"{job.restarts} (from step {job.resumed_from_step})"


def _watch(client, job_id: str) -> int:
    """Print one line per event (``JOB_ID STATE[/PHASE] STEP/TOTAL [restart N from step S] MESSAGE``, e.g.
    ``job-… running/evaluating 10/50 evaluating 32/64 examples``; the restart part only for a job that was
    interrupted and resumed); 0 when the job ends succeeded, 1 when it ends otherwise."""
    last = None
    for event in client.watch_training_job(job_id):
        last = event.job
        state = f"{last.state}/{last.phase}" if last.phase and not last.terminal else last.state
        resumed = f" [restart {last.restarts} from step {last.resumed_from_step}]" if last.restarts else ""
        print(f"{last.job_id} {state} {last.step}/{last.total_steps}{resumed} {event.message}".rstrip(), flush=True)
    if last is not None and last.state == "failed":
        _error(last.error)
    return 0 if last is not None and last.state == "succeeded" else 1
