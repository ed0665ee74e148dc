"""What a person running the trainer sees and does: a progress bar on a terminal, plain lines otherwise, Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

#: Told on stderr at the first Ctrl-C.
STOP_NOTICE = "stopping after the current step; Ctrl-C again to abort at once (nothing half-written is kept)"


def format_duration(seconds: float | None) -> str:
    """``seconds`` as ``h:mm:ss`` (e.g. ``0:03:20``; ``27:46:40`` past a day); ``?`` when unknown (None)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def step_line(ev: dict[str, Any]) -> str:
    """The one-line summary of a ``"step"`` progress event (see ``trainer.train.ProgressFn``), e.g.
    ``step 10/50  loss 1.2345  812 tokens/s  eta 0:03:20`` (loss in nats, ETA as h:mm:ss)."""
    parts = [f"step {ev.get('step', 0)}/{ev.get('total_steps', 0)}"]
    if ev.get("loss") is not None:
        parts.append(f"loss {ev['loss']:.4f}")
    if ev.get("eval_loss") is not None:
        parts.append(f"eval_loss {ev['eval_loss']:.4f}")
    parts.append(f"{ev.get('tokens_per_second') or 0.0:.0f} tokens/s")
    parts.append(f"eta {format_duration(ev.get('eta_seconds'))}")
    return "  ".join(parts)


class PlainProgress:
    """Progress as plain lines for a pipe or a log file: every phase change (``phase loading``), one
    :func:`step_line` every ``logging_steps`` optimizer steps and at the last step, evaluation progress about every
    quarter of the evaluated examples, and each eval loss. Each line is flushed at once.

    Args:
        stream: where lines go (e.g. ``sys.stdout``).
        logging_steps: steps between two step lines (>= 1; ``TrainConfig.logging_steps``).
    """

    def __init__(self, stream: TextIO, logging_steps: int) -> None:
        self.stream = stream
        self.every = max(1, int(logging_steps))
        self._eval_quarter = -1

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def __call__(self, ev: dict[str, Any]) -> None:
        event = ev.get("event")
        if event == "phase":
            self._eval_quarter = -1
            self._print(f"phase {ev.get('phase')}")
        elif event == "step":
            step, total = ev.get("step", 0), ev.get("total_steps", 0)
            if step % self.every == 0 or (total and step >= total):
                self._print(step_line(ev))
        elif event == "eval_progress":
            done, total = ev.get("eval_examples_done", 0), ev.get("eval_examples_total", 0)
            quarter = 4 * done // total if total else 4
            if quarter > self._eval_quarter:
                self._eval_quarter = quarter
                self._print(f"evaluating {done}/{total} examples")
        elif event == "eval" and ev.get("eval_loss") is not None:
            self._print(f"eval_loss {ev['eval_loss']:.4f} at step {ev.get('step', 0)}")


class RichProgress:
    """Progress as one rich bar on a terminal (``rich.progress``): the phase, steps done / planned, loss, eval loss,
    tokens/s, elapsed time and ETA; during an evaluation the bar counts evaluated examples.

    Args:
        console: the ``rich.console.Console`` to draw on (stderr, so stdout stays clean), or None for a new one on
            stderr.
    """

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                                 console=console or Console(stderr=True), transient=False)
        self.task = None
        self._last: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.progress.start()
        self.task = self.progress.add_task("loading", total=None, note="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.task is None:
            return
        phase = ev.get("phase") or "training"
        if ev.get("event") == "eval_progress":
            self.progress.update(self.task, description="evaluating", total=ev.get("eval_examples_total") or None,
                                 completed=ev.get("eval_examples_done", 0), note="examples")
            return
        notes = []
        if ev.get("loss") is not None:
            notes.append(f"loss {ev['loss']:.4f}")
        if ev.get("eval_loss") is not None:
            notes.append(f"eval {ev['eval_loss']:.4f}")
        if ev.get("tokens_per_second"):
            notes.append(f"{ev['tokens_per_second']:.0f} tok/s")
        if ev.get("eta_seconds") is not None:
            notes.append(f"eta {format_duration(ev['eta_seconds'])}")
        self.progress.update(self.task, description=phase, total=ev.get("total_steps") or None,
                             completed=ev.get("step", 0), note="  ".join(notes))


def progress_display(logging_steps: int, stream: TextIO | None = None, console=None):
    """The progress display for ``stream`` (default ``sys.stdout``): :class:`RichProgress` when it is a terminal,
    :class:`PlainProgress` writing to it otherwise. Use it as a context manager; call it with each progress event."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return RichProgress(console)
    return PlainProgress(stream, logging_steps)


def stop_on_sigint(stop: threading.Event, notice: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Install the trainer's Ctrl-C policy: the first SIGINT sets ``stop`` (the trainer finishes the current step,
    keeps a complete checkpoint, writes no adapter) and tells ``notice`` (default: a line on stderr); a second one
    raises ``KeyboardInterrupt`` at once (the trainer deletes an incomplete checkpoint and writes no adapter).
    Returns a function restoring the previous handler; off the main thread nothing is installed (a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    say = notice or (lambda text: print(f"\n{text}", file=sys.stderr, flush=True))

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        say(STOP_NOTICE)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def abort_message(checkpoint_dir) -> str:
    """What an aborted run (second Ctrl-C) leaves behind: the last complete checkpoint under ``checkpoint_dir``,
    if any, and never an adapter."""
    from trainer.train import last_complete_checkpoint

    kept = last_complete_checkpoint(checkpoint_dir)
    where = f"the last complete checkpoint {kept} is kept (--resume continues from it)" if kept is not None \
        else "no checkpoint is kept"
    return f"aborted: no adapter was written; {where}"
