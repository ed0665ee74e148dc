"""Worker process of one training job: runs ``trainer.train`` and reports progress as JSON lines in its job dir.

Run as ``python -m server.training.worker JOBDIR`` (``TrainingManager`` does this, one worker per job, in its own
session so a crash, an OOM kill or a signal to the server's terminal never reaches the other side). The job
directory holds:

* ``job.json`` (read): ``{"config": TrainConfig.to_dict(), "budget": {...}}``, written by the manager (``budget``,
  optional: ``server.training.budget.JobBudget.worker_settings``, applied before the trainer is imported);
* ``progress.jsonl`` (appended, one JSON object per line, flushed at once): ``{"event": "started", "pid": N,
  "threads": T, "nice": K, "memory_budget_bytes": B}`` first (the budget in force), then every dict the trainer's ``on_progress`` gives (``event`` ``"step"``, ``"eval"`` or ``"done"``, with
  step, total_steps, loss, eval_loss, tokens_per_second, learning_rate, ...);
* ``result.json`` (written atomically on success, exit status 0): adapter_dir, steps, train_loss, eval_loss,
  seconds;
* ``error.json`` (written on failure): ``{"code": gRPC status name, "message": str, "field": str | null}``; exit
  status 1 for a ``ServerError`` (bad data, diverged loss, ...), 2 for any other exception (its traceback goes to
  the log, i.e. stderr, which the manager sends to ``worker.log``).

The worker exits with status 4 (``EXIT_ORPHANED``) when its parent process dies, so a server killed outright
never leaves a trainer running on the accelerator.

Test-only hook: when the environment variable ``QLORA_SERVER_TEST_WORKER_EXIT`` is ``"STEP"`` or
``"STEP:CODE"`` (read in :func:`main`, never at import), the worker calls ``os._exit(CODE)`` (default 3) right
after it reports optimizer step STEP, like a hard crash: no ``error.json``, no clean-up. Tests set it in the
server's environment, which the manager passes on to the worker.
"""

from __future__ import annotations

import json
import logging
import os
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
#: Environment variable of the test-only crash hook (see the module docstring).
TEST_EXIT_ENV = "QLORA_SERVER_TEST_WORKER_EXIT"
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


def _progress_writer(path: Path, crash_at: tuple[int, int] | None) -> tuple[Callable[[dict], None], Any]:
    f = open(path, "a", encoding="utf-8", buffering=1)

    def emit(record: dict) -> None:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        if crash_at is not None and record.get("event") == "step" and record.get("step") == crash_at[0]:
            os._exit(crash_at[1])  # test-only: a hard crash mid-run

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


def run(job_dir: Path) -> int:
    """Run the job in ``job_dir`` (see the module docstring for the files); returns the exit status (0 on
    success, ``EXIT_ERROR`` or ``EXIT_INTERNAL`` on failure, with ``error.json`` written)."""
    job_dir = Path(job_dir)
    crash_at = parse_test_exit(os.environ.get(TEST_EXIT_ENV))
    emit, progress_file = _progress_writer(job_dir / PROGRESS_FILE, crash_at)
    try:
        from server.training.budget import apply_worker_budget

        applied = apply_worker_budget(_read_budget(job_dir))
        emit({"event": "started", "pid": os.getpid(), **applied})
        from server.errors import ServerError

        try:
            from trainer.config import TrainConfig
            from trainer.train import train

            spec = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
            config = TrainConfig.from_dict(spec["config"])
            result = train(config, on_progress=_with_cuda_memory(emit, config.device))
        except ServerError as exc:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m server.training.worker JOBDIR``. Starts the parent watchdog, logs to stderr,
    runs the job; returns the exit status (64 for a bad command line)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m server.training.worker JOBDIR", file=sys.stderr)
        return 64
    configure_logging(level=logging.INFO, stream=sys.stderr)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watchdog", daemon=True).start()
    return run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
