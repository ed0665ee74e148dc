"""Worker process of one training job: runs ``trainer.train`` and reports progress as JSON lines in its job dir.

Run as ``python -m server.training.worker JOBDIR`` (``TrainingManager`` does this, one worker per job, in its own
session so a crash, an OOM kill or a signal to the server's terminal never reaches the other side). The job
directory holds:

* ``job.json`` (read): ``{"config": TrainConfig.to_dict(), "resume": bool, "budget": {...}}``, written by the
  manager; with ``resume`` the run continues from the last complete checkpoint in the output directory (from step 0
  if none); ``budget`` (optional: ``server.training.budget.JobBudget.worker_settings``) is applied before the
  trainer is imported;
* ``shared_base.pkl`` (read when present): the server's base to train on instead of loading one
  (``server.training.shared_base``); ``progress.jsonl`` then says ``"event": "base"`` with ``source`` shared or
  loaded;
* ``worker.lock``: held (``flock``) for the worker's whole life; a worker waits for it first, so a resumed run
  never overlaps the dying worker of the interrupted one (the kernel releases it when that process exits);
* ``progress.jsonl`` (appended, one JSON object per line, flushed at once): ``{"event": "started", "pid": N,
  "threads": T, "nice": K, "memory_budget_bytes": B}`` first (the budget in force), for a resumed run
  ``{"event": "resume", "resumed_from_step": N, "step": N}`` next, then every dict the trainer's ``on_progress``
  gives (``event`` ``"step"``, ``"eval"`` or ``"done"``, with step, total_steps, loss, eval_loss,
  tokens_per_second, learning_rate, ...; on CUDA, step events add ``memory_bytes`` and ``peak_memory_bytes``);
* ``result.json`` (written atomically on success, exit status 0): adapter_dir, steps, train_loss, eval_loss,
  seconds;
* ``error.json`` (written on failure): ``{"code": gRPC status name, "message": str, "field": str | null}``; exit
  status 1 for a ``ServerError`` (bad data, diverged loss, ...), 2 for any other exception (its traceback goes to
  the log, i.e. stderr, which the manager sends to ``worker.log``).

The worker exits with status 4 (``EXIT_ORPHANED``) when its parent process dies, so a server killed outright
never leaves a trainer running on the accelerator.

SIGTERM asks the worker to stop at the end of its current optimizer step: the trainer's ``should_stop`` hook saves
a complete checkpoint there (none before the first step), no adapter is written, and the worker exits with status
5 (``EXIT_STOPPED``) and no ``error.json``; a later run with ``resume`` continues from that checkpoint.

Test-only hook: when the environment variable ``QLORA_SERVER_TEST_WORKER_EXIT`` is ``"STEP"`` or
``"STEP:CODE"`` (read in :func:`main`, never at import), the worker calls ``os._exit(CODE)`` (default 3) right
after it reports optimizer step STEP, like a hard crash: no ``error.json``, no clean-up. Tests set it in the
server's environment, which the manager passes on to the worker. Likewise ``QLORA_SERVER_TEST_WORKER_PAUSE``
= ``"STEP"`` makes the worker wait, right after it reports step STEP (before that step's checkpoint is saved),
until it is asked to stop (SIGTERM) or killed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from server.logs import configure_logging

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_FILE = "worker.log"
#: Sub-directory of the job dir that is the trainer's ``output_dir`` (checkpoints, run manifest, adapter).
OUTPUT_SUBDIR = "output"
#: Exit status after a ``ServerError`` (described in ``error.json``).
EXIT_ERROR = 1
#: Exit status after an unexpected exception (described in ``error.json``, traceback in the log).
EXIT_INTERNAL = 2
#: Exit status when the parent (the server) died.
EXIT_ORPHANED = 4
#: Exit status after a stop on request (SIGTERM): a complete checkpoint is saved, the run can be resumed.
EXIT_STOPPED = 5
#: Lock file held by the running worker (see the module docstring).
WORKER_LOCK_FILE = "worker.lock"
#: Environment variable of the test-only crash hook (see the module docstring).
TEST_EXIT_ENV = "QLORA_SERVER_TEST_WORKER_EXIT"
#: Environment variable of the test-only pause hook (see the module docstring).
TEST_PAUSE_ENV = "QLORA_SERVER_TEST_WORKER_PAUSE"
#: How often the worker checks that its parent is alive (seconds).
PARENT_POLL_S = 1.0

log = logging.getLogger("qlora_server.training.worker")


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def parse_test_exit(value: str | None) -> tuple[int, int] | None:
    """Parse the test hook's value ``"STEP"`` or ``"STEP:CODE"`` into ``(step, code)`` (code defaults to 3);
    None when unset or empty. Raises ValueError for anything else."""
    if not value:
        return None
    step, _, code = value.partition(":")
    return int(step), int(code) if code else 3


def _watch_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os._exit(EXIT_ORPHANED)


def _progress_writer(path: Path, crash_at: tuple[int, int] | None, pause_at: int | None,
                     stop: threading.Event) -> tuple[Callable[[dict], None], Any]:
    f = open(path, "a", encoding="utf-8", buffering=1)

    def emit(record: dict) -> None:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        if record.get("event") == "step":
            if crash_at is not None and record.get("step") == crash_at[0]:
                os._exit(crash_at[1])  # test-only: a hard crash mid-run
            while pause_at is not None and record.get("step") == pause_at and not stop.wait(0.05):
                pass  # test-only: hold here until asked to stop (or killed)

    return emit, f


def _read_budget(job_dir: Path) -> dict | None:
    """The ``budget`` of ``job.json`` (None when absent or unreadable: the trainer's own read reports that)."""
    try:
        return json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8")).get("budget")
    except (OSError, ValueError, AttributeError):
        return None


def _with_cuda_memory(emit: Callable[[dict], None], device: str) -> Callable[[dict], None]:
    """``emit`` that adds ``memory_bytes`` / ``peak_memory_bytes`` (the CUDA allocator's allocated and peak
    allocated bytes) to each step event when training runs on CUDA; ``emit`` itself otherwise."""
    import torch

    if not torch.cuda.is_available() or not (device.startswith("cuda") or device == "auto"):
        return emit

    def emit_with_memory(record: dict) -> None:
        if record.get("event") == "step":
            record = {**record, "memory_bytes": int(torch.cuda.memory_allocated()),
                      "peak_memory_bytes": int(torch.cuda.max_memory_allocated())}
        emit(record)

    return emit_with_memory


def _hold_worker_lock(job_dir: Path) -> int:
    """Wait for, and take, the job directory's ``WORKER_LOCK_FILE``; returns its descriptor (held until exit)."""
    fd = os.open(job_dir / WORKER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for the previous worker of this job to exit")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def run(job_dir: Path, stop: threading.Event | None = None) -> int:
    """Run the job in ``job_dir`` (see the module docstring for the files); returns the exit status (0 on
    success, ``EXIT_STOPPED`` when ``stop`` was set and the trainer stopped early, ``EXIT_ERROR`` or
    ``EXIT_INTERNAL`` on failure, with ``error.json`` written). ``stop`` (set by SIGTERM in :func:`main`) is the
    trainer's ``should_stop``."""
    job_dir = Path(job_dir)
    stop = threading.Event() if stop is None else stop
    crash_at = parse_test_exit(os.environ.get(TEST_EXIT_ENV))
    pause = os.environ.get(TEST_PAUSE_ENV)
    lock_fd = _hold_worker_lock(job_dir)
    emit, progress_file = _progress_writer(job_dir / PROGRESS_FILE, crash_at, int(pause) if pause else None, stop)
    try:
        from server.training.budget import apply_worker_budget

        applied = apply_worker_budget(_read_budget(job_dir))
        emit({"event": "started", "pid": os.getpid(), **applied})
        from server.errors import Cancelled, ServerError

        try:
            from trainer.config import TrainConfig
            from server.training.shared_base import worker_loader
            from trainer.train import last_complete_checkpoint, train

            spec = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
            config = TrainConfig.from_dict(spec["config"])
            resume = bool(spec.get("resume", False))
            if resume:  # the checkpoint the trainer will pick (it ignores incomplete ones the same way)
                checkpoint = last_complete_checkpoint(config.checkpoint_dir)
                step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0
                emit({"event": "resume", "resumed_from_step": step, "step": step})
            result = train(config, on_progress=_with_cuda_memory(emit, config.device), resume=resume,
                           should_stop=stop.is_set, load_base=worker_loader(job_dir, emit))
        except ServerError as exc:
            if isinstance(exc, Cancelled) and stop.is_set():
                log.info("stopped on request: %s", exc)
                return EXIT_STOPPED
            log.error("training failed: %s: %s", exc.code, exc)
            write_json_atomically(job_dir / ERROR_FILE, {"code": exc.code, "message": str(exc), "field": exc.field})
            return EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - anything else is reported, with its traceback in the log
            if type(exc).__name__ == "OutOfMemoryError" and applied["memory_budget_bytes"]:
                log.error("training ran out of its memory budget:\n%s", traceback.format_exc())
                write_json_atomically(job_dir / ERROR_FILE, {
                    "code": "RESOURCE_EXHAUSTED", "field": "config.batch_size",
                    "message": f"the job needed more than its memory budget of {applied['memory_budget_bytes']} "
                               f"bytes; lower config.batch_size or config.max_seq_length, or raise "
                               f"--training-memory-bytes ({exc})"})
                return EXIT_ERROR
            log.error("training crashed:\n%s", traceback.format_exc())
            write_json_atomically(job_dir / ERROR_FILE, {"code": "INTERNAL", "field": None,
                                                         "message": f"{type(exc).__name__}: {exc}"})
            return EXIT_INTERNAL
        write_json_atomically(job_dir / RESULT_FILE, {
            "adapter_dir": str(result.adapter_dir), "steps": result.steps, "train_loss": result.train_loss,
            "eval_loss": result.eval_loss, "seconds": result.seconds})
        return 0
    finally:
        progress_file.close()
        os.close(lock_fd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m server.training.worker JOBDIR``. Starts the parent watchdog, turns SIGTERM into a
    stop at the end of the current step, logs to stderr, runs the job; returns the exit status (64 for a bad
    command line)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m server.training.worker JOBDIR", file=sys.stderr)
        return 64
    configure_logging(level=logging.INFO, stream=sys.stderr)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watchdog", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    return run(Path(argv[0]), stop)


if __name__ == "__main__":
    sys.exit(main())
