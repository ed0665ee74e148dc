"""Command line: ``python -m trainer CONFIG.yaml [--resume] [--json]`` trains one adapter, showing its progress."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

from server.errors import Cancelled, InvalidArgument, ServerError


def main(argv: list[str] | None = None) -> int:
    """Run one training job; returns the process exit code (0 ok, 2 bad config/data, 130 stopped or aborted by
    Ctrl-C, 1 other). Progress: JSON lines with ``--json``; else a bar on a terminal, or plain lines every
    ``logging_steps`` steps when stdout is not a terminal (``trainer.console``)."""
    from trainer.config import TrainConfig
    from trainer.console import abort_message, progress_display, stop_on_sigint
    from server.logs import configure_logging
    from trainer.train import train

    ap = argparse.ArgumentParser(prog="python -m trainer", description="QLoRA-train a LoRA adapter for qlora-server.")
    ap.add_argument("config", help="YAML or JSON file with TrainConfig fields")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    ap.add_argument("--json", action="store_true", help="print progress events as JSON lines")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    level = logging.getLevelNamesMapping().get(args.log_level.upper())
    if level is None:
        ap.error(f"argument --log-level: unknown level {args.log_level!r} (DEBUG, INFO, WARNING, ERROR)")
    configure_logging(level=level)

    stop = threading.Event()
    restore = lambda: None  # noqa: E731
    config = None
    try:
        config = TrainConfig.from_file(args.config)
        restore = stop_on_sigint(stop)
        if args.json:
            result = train(config, on_progress=lambda ev: print(json.dumps(ev), flush=True), resume=args.resume,
                           should_stop=stop.is_set)
        else:
            with progress_display(config.logging_steps) as show:
                result = train(config, on_progress=show, resume=args.resume, should_stop=stop.is_set)
    except KeyboardInterrupt:
        print(abort_message(config.checkpoint_dir) if config is not None else "aborted", file=sys.stderr)
        return 130
    except Cancelled as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    finally:
        restore()
    summary = {"adapter_dir": str(result.adapter_dir), "steps": result.steps, "train_loss": result.train_loss,
               "eval_loss": result.eval_loss, "seconds": round(result.seconds, 1), "data_sha256": result.data_sha256}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
