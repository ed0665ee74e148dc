"""Command line: ``python -m trainer CONFIG.yaml [--resume] [--json]`` trains one adapter with a progress bar."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from server.errors import Cancelled, InvalidArgument, ServerError


class _RichProgress:
    """Renders trainer progress events as a rich progress bar (one line, updated every optimizer step)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), transient=False)
        self.task = None

    def __enter__(self) -> _RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        stats = []
        if ev.get("loss") is not None:
            stats.append(f"loss {ev['loss']:.4f}")
        if ev.get("eval_loss") is not None:
            stats.append(f"eval {ev['eval_loss']:.4f}")
        stats.append(f"{ev['tokens_per_second']:.0f} tok/s")
        stats.append(f"lr {ev['learning_rate']:.2e}")
        if self.task is None:
            self.task = self.progress.add_task("train", total=ev["total_steps"], stats="")
        self.progress.update(self.task, completed=ev["step"], total=ev["total_steps"], stats="  ".join(stats))


def main(argv: list[str] | None = None) -> int:
    """Run one training job; returns the process exit code (0 ok, 2 bad config/data, 130 stopped, 1 other)."""
    from trainer.config import TrainConfig
    from trainer.train import train

    ap = argparse.ArgumentParser(prog="python -m trainer", description="QLoRA-train a LoRA adapter for qlora-server.")
    ap.add_argument("config", help="YAML or JSON file with TrainConfig fields")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    ap.add_argument("--json", action="store_true", help="print progress events as JSON lines instead of a bar")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: checkpoint and stop; second: default behaviour
        stop["requested"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    try:
        config = TrainConfig.from_file(args.config)
        signal.signal(signal.SIGINT, on_sigint)
        if args.json:
            result = train(config, on_progress=lambda ev: print(json.dumps(ev), flush=True), resume=args.resume,
                           should_stop=lambda: stop["requested"])
        else:
            with _RichProgress() as bar:
                result = train(config, on_progress=bar, resume=args.resume, should_stop=lambda: stop["requested"])
    except Cancelled as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except InvalidArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    summary = {"adapter_dir": str(result.adapter_dir), "steps": result.steps, "train_loss": result.train_loss,
               "eval_loss": result.eval_loss, "seconds": round(result.seconds, 1), "data_sha256": result.data_sha256}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
