"""Runs training jobs one at a time, each in its own worker process; persists their state and fans out progress."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from server.config import ADAPTER_ID_RE, ModelConfig
from server.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound, ServerError
from server.training import worker as worker_files
from server.training.jobs import (
    CANCELLED,
    FAILED,
    PHASES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobEvent,
    JobRequest,
    JobStore,
)

log = logging.getLogger(__name__)

#: ``JobRequest.config`` keys a client may set: the fields of the proto ``TrainingConfig`` (same names as
#: ``trainer.config.TrainConfig``). The base model, device, dtype, paths and adapter id are the server's.
TRAINING_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "learning_rate",
                          "max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "max_seq_length",
                          "optim", "seed", "eval_fraction", "warmup_ratio", "lr_scheduler", "max_grad_norm",
                          "weight_decay", "truncate", "eval_steps", "save_steps", "save_total_limit", "logging_steps",
                          "zero_loss_patience", "gradient_checkpointing", "eval_max_examples", "packing")
#: ``TrainConfig`` fields a job cannot set: the server fills them (its base model, dtype, device, cache; the job's
#: dataset, directory and adapter id) or, being paths to other server-side inputs, they are not offered to jobs.
#: Every other ``TrainConfig`` field is in ``TRAINING_CONFIG_FIELDS`` (tests/rpc/test_cli_jobs_create.py checks).
JOB_FIXED_FIELDS = ("model", "compute_dtype", "device", "cache_dir", "dataset", "output_dir", "adapter_id",
                    "eval_dataset", "init_adapter")
#: Sub-directory of the state directory holding one directory per job (named by job id).
JOBS_SUBDIR = "jobs"
#: Lock file in the state directory: one server (manager) per state directory.
LOCK_FILE = "training.lock"
#: Module the worker processes run (``python -m``).
WORKER_MODULE = "server.training.worker"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds the server/ and trainer/ packages
_CLOSED = object()


def new_job_id() -> str:
    """A fresh job id: ``job-`` and 16 hex characters (64 random bits)."""
    return f"job-{uuid.uuid4().hex[:16]}"


def _bare_message(exc: ServerError) -> str:
    text = str(exc)
    prefix = f"{exc.field}: "
    return text[len(prefix):] if exc.field and text.startswith(prefix) else text


def build_train_config(request: JobRequest, model_config: ModelConfig, output_dir: Path):
    """The complete ``trainer.config.TrainConfig`` of ``request``: the server's base model (``model_config``'s
    model, compute dtype, device and cache dir), the request's dataset, adapter id and hyper-parameters, and
    ``output_dir`` as the trainer's output directory.

    Raises:
        InvalidArgument: a key of ``request.config`` that is not in ``TRAINING_CONFIG_FIELDS`` or a value the
            trainer rejects; ``field`` is ``config.<name>`` (e.g. ``config.lora_dropout``).
    """
    from trainer.config import TrainConfig

    for name in request.config:
        if name not in TRAINING_CONFIG_FIELDS:
            raise InvalidArgument(f"unknown training setting (known: {', '.join(TRAINING_CONFIG_FIELDS)})",
                                  field=f"config.{name}")
    overrides = dict(request.config)
    if "target_modules" in overrides and overrides["target_modules"] is not None:
        overrides["target_modules"] = tuple(overrides["target_modules"])
    try:
        return TrainConfig(model=model_config.model, compute_dtype=model_config.compute_dtype,
                           device=model_config.device, cache_dir=Path(model_config.cache_dir).absolute(),
                           dataset=Path(request.dataset_path), output_dir=Path(output_dir),
                           adapter_id=request.adapter_id, **overrides)
    except InvalidArgument as exc:
        if exc.field in TRAINING_CONFIG_FIELDS:
            raise InvalidArgument(_bare_message(exc), field=f"config.{exc.field}") from None
        raise


def check_servable(config, base) -> None:
    """Refuse a job whose adapter the server would refuse to register: the ``adapter_config.json`` the run of
    ``config`` (a ``TrainConfig``) would write goes through the registry's own config check,
    ``server.adapters.validation.check_adapter_config``, against ``base`` (the store's ``BaseModelSpec``).

    Raises:
        InvalidArgument: ``field`` is ``config.<name>`` (``config.r``: a rank above ``max_lora_rank``;
            ``config.target_modules``: the LM head, embeddings, a norm or container, a module the base model
            lacks), or ``config`` for a refusal of no single setting.
    """
    from server.adapters.validation import check_adapter_config
    from trainer.train import adapter_config_json

    try:
        check_adapter_config(adapter_config_json(config, base.name), base)
    except InvalidArgument as exc:
        if exc.field in TRAINING_CONFIG_FIELDS:
            raise InvalidArgument(f"{_bare_message(exc)} (the server would refuse the trained adapter)",
                                  field=f"config.{exc.field}") from None
        raise InvalidArgument(f"the server would refuse the trained adapter: {exc}", field="config") from None


def describe_exit(returncode: int, job_dir: Path) -> str:
    """The ``error`` of a job whose worker exited with ``returncode`` (``Popen.returncode``: negative = killed by
    that signal): the worker's own ``error.json`` message when it wrote one, then the exit code or signal."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        how = f"worker killed by signal {-returncode} ({name})"
    else:
        how = f"worker exited with code {returncode}"
    try:
        err = json.loads((job_dir / worker_files.ERROR_FILE).read_text(encoding="utf-8"))
        return f"{err.get('code', 'INTERNAL')}: {err.get('message', '')} ({how})"
    except (OSError, ValueError, AttributeError):
        return f"{how}; see {job_dir / worker_files.LOG_FILE}"


class _ProgressTail:
    """Reads the complete JSON lines appended to a worker's progress file since the last call."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self._path = path
        self._offset = offset  # bytes already read (a resumed job's file holds its earlier runs' lines)
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("unreadable progress line in %s: %r", self._path, line[:200])
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class _Active:
    """The job the scheduler is running."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.cancel = threading.Event()
        self.cancel_reason = ""  # the message of the final event
        self.suspend = False  # set with ``cancel`` at shutdown: stop the worker and keep the job resumable
        self.registering = False
        self.finalized = threading.Event()


class JobWatch:
    """An iterator of :class:`JobEvent` for one job: the job as it was when the watch began, then every change,
    ending after the event with a terminal state. :meth:`close` (from any thread) ends it early; iteration then
    stops, or raises :class:`Cancelled` when the manager closed it because the server is shutting down."""

    def __init__(self, manager: "TrainingManager", job_id: str) -> None:
        self.job_id = job_id
        self._manager = manager
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False

    def _put(self, event: JobEvent) -> None:
        self._queue.put(event)

    def close(self, shutdown: bool = False) -> None:
        """Stop the watch; pending events are dropped. ``shutdown=True`` makes iteration raise Cancelled."""
        self._shutdown = self._shutdown or shutdown
        self._manager._unwatch(self)
        self._queue.put(_CLOSED)

    def __iter__(self) -> Iterator[JobEvent]:
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSED:
                    if self._shutdown:
                        raise Cancelled("the server is shutting down")
                    return
                yield item
                if item.job.terminal:
                    return
        finally:
            self._manager._unwatch(self)


class TrainingManager:
    """Queues training jobs and runs them one at a time (FIFO), each in its own worker process
    (``python -m server.training.worker JOBDIR``, a new session) on this machine and accelerator, so a crash or
    an out-of-memory kill in training never takes serving down.

    State machine (persisted in ``job_store``; see ``server.training.jobs.TRANSITIONS``)::

        queued ──▶ running ──▶ succeeded      (adapter registered)
          ▲ │           ├──────▶ failed         (trainer error, worker crash/kill, registration refused,
          │ │           │                        interrupted more than jobs.MAX_RESTARTS times)
          │ └───────────┼──────▶ cancelled      (client cancel)
          └─────────────┘                       (interrupted: server shutdown, crash or kill; resumes)

    * The worker appends progress to ``<job dir>/progress.jsonl``; the scheduler thread tails it, stores step,
      total_steps, loss, eval_loss and the phase (``loading`` from the start, then ``training``, ``evaluating``,
      ``saving`` as the trainer reports them, ``registering`` by the manager) in SQLite, sets the ``training_*``
      gauges and sends a :class:`JobEvent` to every watcher (one per phase change, step, evaluation batch and
      evaluation).
    * Success (exit 0 and ``result.json``): the adapter is registered with ``adapter_store.register(adapter_id,
      adapter_dir, replace)`` (servable at once) and the job's ``output/checkpoints`` are deleted (the adapter and
      logs stay). A registration error fails the job with that error.
    * Worker failure: ``failed`` with the worker's error and the exit code (``"... (worker exited with code 1)"``)
      or signal (``"worker killed by signal 9 (SIGKILL)"``); the job directory stays for inspection.
    * Cancel: a queued job is cancelled at once; a running worker gets SIGTERM (it stops at the end of its
      current step), then SIGKILL after ``terminate_grace_s`` (to its whole process group); nothing is registered
      and the job directory is removed.
    * Interruption and resume: :meth:`close` (server shutdown) stops the running worker the same way (SIGTERM:
      the trainer saves a complete checkpoint at the end of the step; SIGKILL after the grace period) but keeps
      the job directory and puts the job back in the queue (``JobStore.requeue_interrupted``: ``restarts`` + 1).
      A job found ``running`` at :meth:`start` (its server crashed or was killed; its worker exits on its own
      within ``worker.PARENT_POLL_S`` of the parent's death) is put back the same way. Queued jobs keep their
      FIFO place by creation time, so an interrupted job runs before jobs created after it. A resumed job's
      worker continues from the last complete checkpoint in ``<job dir>/output/checkpoints`` (from step 0
      without one; ``resumed_from_step`` says which) and waits for the previous worker's ``worker.lock``. A job
      interrupted more than ``jobs.MAX_RESTARTS`` times fails (``jobs.INTERRUPTED_ERROR``). A job whose worker
      had already written its result when it was interrupted is registered without training again.

    Gauges: ``training_jobs{state}`` counts jobs per state; ``training_step{job_id}``, ``training_loss{job_id}``
    and ``training_tokens_per_second{job_id}`` follow the running job: loss and throughput have no sample before
    its first step; after it ends its step and loss stay, labelled with its id, and its throughput drops to 0,
    until the next job starts and replaces them (see ``Metrics.training_job_started``).

    Args:
        adapter_store: the server's ``AdapterStore`` (``get``, ``register``).
        job_store: the jobs database; closed by :meth:`close`.
        state_dir: holds the lock file and ``jobs/<job id>/`` (created with the first job).
        metrics: the server's ``Metrics``, or None for none.
        model_config: the resident base model (model, compute dtype, device, cache dir) every job trains on.
        python: interpreter that runs the worker (default: this one).
        terminate_grace_s: seconds between SIGTERM and SIGKILL when stopping a worker.
        poll_interval_s: how often the scheduler reads progress and checks the worker (seconds).
        shared_base: the server's base as a ``server.training.shared_base.SharedBase``: each worker trains on it
            (read-only) instead of loading its own copy; None = workers load the base.
        budget: the jobs' memory / thread / priority budgets (``server.training.budget.JobBudget``), or None for
            none. With one, :meth:`create` refuses a job whose estimated peak memory exceeds the budget
            (FAILED_PRECONDITION naming ``config.batch_size`` or ``config.max_seq_length``), the check runs again
            when the job starts (failing it), the worker runs with the budget's threads and niceness, and on the
            CPU a worker whose resident memory exceeds the budget is stopped and its job failed
            (``RESOURCE_EXHAUSTED: ...``).
    """

    def __init__(self, adapter_store, job_store: JobStore, state_dir: Path, metrics=None, *,
                 model_config: ModelConfig, python: str = sys.executable, terminate_grace_s: float = 10.0,
                 poll_interval_s: float = 0.2, budget=None, shared_base=None) -> None:
        self._store = adapter_store
        self._jobs = job_store
        self.state_dir = Path(state_dir).absolute()
        self.jobs_dir = self.state_dir / JOBS_SUBDIR
        self._metrics = metrics
        self._model_config = model_config
        self._python = python
        self._grace = terminate_grace_s
        self._poll = poll_interval_s
        self._shared_base = shared_base
        self._budget = budget
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watchers: dict[str, set[JobWatch]] = {}
        self._active: _Active | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> "TrainingManager":
        """Recover the job store (running → queued to resume, or failed after too many interruptions; see the
        class docstring), publish the job counts and start the scheduler thread. Returns self.

        Raises:
            FailedPrecondition: another live manager holds the state directory (``field="state_dir"``).
        """
        if self.state_dir.exists():
            self._acquire_state_lock()
        for job in self._jobs.recover_interrupted(time.time()):
            if job.state == QUEUED:
                log.warning("training job %s was running when the server stopped; queued to resume from its last "
                            "checkpoint (restart %d)", job.job_id, job.restarts)
            else:
                log.warning("training job %s was running when the server stopped: %s", job.job_id, job.error)
        self._refresh_counts()
        self._thread = threading.Thread(target=self._loop, name="training-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float | None = None) -> None:
        """Stop: interrupt the running job (its worker stops at the end of its step with a checkpoint, or is
        killed after the grace period; the job goes back to the queue to resume), end every watch with Cancelled,
        stop the scheduler, release the state directory and close the job store. Queued jobs stay queued. Waits
        at most ``timeout_s`` seconds for the scheduler (default: the termination grace + 30)."""
        with self._wake:
            if self._closing:
                return
            self._closing = True
            if self._active is not None:
                self._active.suspend = True
                self._active.cancel.set()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(self._grace + 30.0 if timeout_s is None else timeout_s)
        with self._lock:
            watches = [w for ws in self._watchers.values() for w in ws]
        for w in watches:
            w.close(shutdown=True)
        self._jobs.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _acquire_state_lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"{self.state_dir} is used by another running server ({LOCK_FILE} is locked)",
                                     field="state_dir") from None
        self._lock_fd = fd

    # ----------------------------------------------------------------------------------------------- API

    def create(self, request: JobRequest) -> Job:
        """Validate ``request`` and queue a job; returns it (state ``queued``). Nothing is stored when validation
        fails.

        Raises:
            InvalidArgument: a malformed ``adapter_id``; ``dataset_path`` empty, missing, not a file, unreadable or
                holding invalid JSONL records (every bad line listed); a bad training setting
                (``config.<name>``).
            AlreadyExists: ``adapter_id`` is registered, or a queued/running job will register it, and
                ``replace`` is false (``field="adapter_id"``).
            Cancelled: the server is shutting down.
            FailedPrecondition: another server holds the state directory; or the job's estimated peak memory
                exceeds the training memory budget (``field`` ``config.batch_size`` or ``config.max_seq_length``,
                see ``JobBudget.check``).
        """
        from trainer.data import read_jsonl

        if not isinstance(request.adapter_id, str) or not ADAPTER_ID_RE.fullmatch(request.adapter_id):
            raise InvalidArgument(f"must match {ADAPTER_ID_RE.pattern}, got {request.adapter_id!r}",
                                  field="adapter_id")
        if not request.dataset_path:
            raise InvalidArgument("must name a JSONL file on the server", field="dataset_path")
        dataset = Path(request.dataset_path).expanduser().absolute()
        if not dataset.exists():
            raise InvalidArgument(f"{dataset} does not exist on the server", field="dataset_path")
        if not dataset.is_file():
            raise InvalidArgument(f"{dataset} is not a file", field="dataset_path")
        job_id = new_job_id()
        job_dir = self.jobs_dir / job_id
        config = build_train_config(JobRequest(request.adapter_id, str(dataset), request.replace, request.config),
                                    self._model_config, job_dir / worker_files.OUTPUT_SUBDIR)
        read_jsonl(dataset, field="dataset_path")  # every record well formed (tokenization happens in the worker)
        check_servable(config, self._store.base)  # never train what registration would refuse
        if self._budget is not None:
            self._budget.check(config)  # the estimated peak memory fits the budget (checked again at start)
        with self._wake:  # the checks and the insert are atomic with respect to other creates
            if self._closing:
                raise Cancelled("the server is shutting down")
            if not request.replace:
                self._check_adapter_free(request.adapter_id)
            self._acquire_state_lock()
            job = self._jobs.create(Job(job_id=job_id, state=QUEUED, adapter_id=request.adapter_id,
                                        created_at=time.time(), output_dir=str(job_dir), replace=request.replace,
                                        dataset_path=str(dataset), config=config.to_dict()))
            self._refresh_counts()
            self._wake.notify_all()
        log.info("training job %s queued: adapter %s, dataset %s", job.job_id, job.adapter_id, dataset)
        return job

    def _check_adapter_free(self, adapter_id: str) -> None:
        try:
            self._store.get(adapter_id)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"adapter {adapter_id!r} is registered; set replace to overwrite it",
                                field="adapter_id")
        pending = self._jobs.active_for_adapter(adapter_id)
        if pending:
            raise AlreadyExists(f"job {pending[0].job_id} ({pending[0].state}) will register adapter "
                                f"{adapter_id!r}; set replace to overwrite it", field="adapter_id")

    def get(self, job_id: str) -> Job:
        """The job ``job_id``. Raises NotFound (``field="job_id"``)."""
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        """Every job, newest first."""
        return self._jobs.list()

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job and return it (state ``cancelled``). A running job's worker is
        terminated first (SIGTERM, then SIGKILL after the grace period), so this may block that long.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job already finished (succeeded, failed or cancelled), including one that
                finished while the cancel was in flight (``field="job_id"``).
        """
        with self._wake:
            job = self._jobs.get(job_id)
            active = self._active if self._active is not None and self._active.job_id == job_id else None
            if job.state == QUEUED and active is None:
                job = self._jobs.transition(job_id, CANCELLED, finished_at=time.time())
                self._publish(job, "cancelled before it started")
                self._refresh_counts()
                return job
            if job.terminal or active is None:
                raise FailedPrecondition(f"job {job_id} already {job.state}", field="job_id")
            if not active.registering:
                active.cancel_reason = "cancelled by a client"
                active.cancel.set()
        active.finalized.wait(self._grace + 60.0)
        job = self._jobs.get(job_id)
        if job.state != CANCELLED:
            raise FailedPrecondition(f"job {job_id} {job.state} before it could be cancelled", field="job_id")
        return job

    def watch(self, job_id: str) -> JobWatch:
        """A :class:`JobWatch` of ``job_id`` whose first event is the job as it is now.

        Raises:
            NotFound: no such job.
        """
        watch = JobWatch(self, job_id)
        with self._lock:
            job = self._jobs.get(job_id)
            watch._put(JobEvent(job, f"job is {job.state}"))
            if not job.terminal:
                if self._closing:
                    watch._shutdown = True
                    watch._queue.put(_CLOSED)
                else:
                    self._watchers.setdefault(job_id, set()).add(watch)
        return watch

    def watcher_count(self, job_id: str) -> int:
        """How many watches of ``job_id`` are open (for monitoring and tests)."""
        with self._lock:
            return len(self._watchers.get(job_id, ()))

    def _unwatch(self, watch: JobWatch) -> None:
        with self._lock:
            watchers = self._watchers.get(watch.job_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watchers[watch.job_id]

    # ------------------------------------------------------------------------------------------ internals

    def _publish(self, job: Job, message: str) -> None:
        """Send an event to the job's watchers. Caller holds the lock (so events follow store order)."""
        event = JobEvent(job, message)
        for w in self._watchers.get(job.job_id, ()):
            w._put(event)
        if job.terminal:
            self._watchers.pop(job.job_id, None)

    def _refresh_counts(self) -> None:
        if self._metrics is None:
            return
        for state, n in self._jobs.count_by_state().items():
            self._metrics.training_jobs.labels(state).set(n)

    def _loop(self) -> None:
        while True:
            with self._wake:
                job = None
                while not self._closing:
                    try:
                        job = self._jobs.next_queued()
                        if job is not None:
                            fields = {"step": 0, "resumed_from_step": 0} if job.restarts == 0 else {}
                            job = self._jobs.transition(job.job_id, RUNNING, phase="loading",
                                                        started_at=job.started_at or time.time(), **fields)
                            break
                    except (ServerError, sqlite3.Error):  # keep scheduling; retry after the wait
                        log.exception("cannot read or update the training job store")
                    self._wake.wait(5.0)
                if self._closing:
                    return
                active = _Active(job.job_id)
                self._active = active
                if self._metrics is not None:
                    self._metrics.training_job_started(job.job_id)
                self._publish(job, "started" if job.restarts == 0 else f"resuming (restart {job.restarts})")
                self._refresh_counts()
            try:
                self._execute(job, active)
            except Exception as exc:  # noqa: BLE001 - a manager bug fails the job, never the scheduler
                log.exception("training job %s: internal error", job.job_id)
                self._finish(active, FAILED, error=f"internal error in the training manager: {exc}")
            finally:
                with self._lock:
                    self._active = None
                if self._metrics is not None:
                    self._metrics.training_job_ended(job.job_id)
                active.finalized.set()

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _execute(self, job: Job, active: _Active) -> None:
        job_dir = Path(job.output_dir)
        resume = job.restarts > 0 and job_dir.is_dir()
        result_path = job_dir / worker_files.RESULT_FILE
        if not (resume and result_path.is_file()):  # else: trained before the interruption, not yet registered
            if not self._run_worker(job, job_dir, active, resume):
                return
        with self._lock:
            self._publish(self._jobs.update(job.job_id, phase="registering"),
                          f"registering adapter {job.adapter_id}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
        try:
            self._store.register(job.adapter_id, Path(result["adapter_dir"]), job.replace)
        except (ServerError, OSError) as exc:
            code = exc.code if isinstance(exc, ServerError) else "INTERNAL"
            self._finish(active, FAILED, error=f"registering adapter {job.adapter_id!r} failed: {code}: {exc}")
            return
        shutil.rmtree(job_dir / worker_files.OUTPUT_SUBDIR / "checkpoints", ignore_errors=True)
        self._finish(active, SUCCEEDED, message=f"adapter {job.adapter_id} registered")

    def _run_worker(self, job: Job, job_dir: Path, active: _Active, resume: bool) -> bool:
        """Run the job's worker to its end; True when it wrote its result (the caller registers the adapter).
        Otherwise the job is finished here (failed or cancelled) or put back in the queue (interrupted by
        :meth:`close`), and False is returned."""
        if resume:  # keep checkpoints and logs; drop what the interrupted run's end would have said
            for name in (worker_files.ERROR_FILE, worker_files.RESULT_FILE):
                (job_dir / name).unlink(missing_ok=True)
        else:
            if job_dir.exists():
                shutil.rmtree(job_dir)
            job_dir.mkdir(parents=True)
        spec: dict[str, Any] = {"config": dict(job.config), "resume": resume}
        if self._budget is not None:
            limits = self._start_budget(job)
            if isinstance(limits, str):
                self._finish(active, FAILED, error=limits)
                return False
            spec["budget"] = limits
        memory_budget = spec.get("budget", {}).get("memory_bytes", 0)
        over_budget = ""
        worker_files.write_json_atomically(job_dir / worker_files.JOB_FILE, spec)
        progress_path = job_dir / worker_files.PROGRESS_FILE
        tail = _ProgressTail(progress_path, progress_path.stat().st_size if progress_path.exists() else 0)
        fds = self._shared_base.handoff(job_dir) if self._shared_base is not None else ()
        with open(job_dir / worker_files.LOG_FILE, "ab") as log_file:
            proc = subprocess.Popen([self._python, "-m", WORKER_MODULE, str(job_dir)], stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT, env=self._worker_env(),
                                    start_new_session=True, pass_fds=fds)
        try:
            with self._lock:
                self._publish(self._jobs.update(job.job_id, pid=proc.pid), f"worker started (pid {proc.pid})")
            while True:
                for record in tail.read():
                    self._on_progress(job.job_id, record)
                if active.cancel.wait(self._poll):
                    self._terminate(proc)
                over_budget = over_budget or self._check_memory(job.job_id, proc, memory_budget)
                if over_budget:
                    self._terminate(proc)
                if proc.poll() is not None:
                    break
            for record in tail.read():
                self._on_progress(job.job_id, record)
        except BaseException:
            self._terminate(proc)
            raise
        rc = proc.returncode
        done = rc == 0 and (job_dir / worker_files.RESULT_FILE).is_file()
        with self._lock:
            stopped = active.cancel.is_set()
            suspended = stopped and active.suspend and not done  # a run that finished anyway is registered
            cancelled = stopped and not active.suspend
            active.registering = not (cancelled or suspended)
            if suspended:
                job = self._jobs.requeue_interrupted(job.job_id, time.time())
                self._publish(job, "interrupted: the server is shutting down; the job resumes from its last "
                              "checkpoint when the server starts again" if job.state == QUEUED
                              else f"failed: {job.error}")
                self._refresh_counts()
        if suspended:
            log.info("training job %s interrupted by shutdown (worker exit %s): %s", job.job_id, rc, job.state)
            return False
        if over_budget and not cancelled:
            log.warning("training job %s failed: %s", job.job_id, over_budget)
            self._finish(active, FAILED, error=over_budget)
            return False
        if cancelled:
            shutil.rmtree(job_dir, ignore_errors=True)
            self._finish(active, CANCELLED, message=active.cancel_reason or "cancelled")
            return False
        if not done:
            error = describe_exit(rc, job_dir) if rc != 0 else "worker exited with code 0 but wrote no result"
            log.warning("training job %s failed: %s", job.job_id, error)
            self._finish(active, FAILED, error=error)
            return False
        return True

    def _start_budget(self, job: Job) -> dict | str:
        """Check the job's memory again as it starts (free memory may have changed since create) and publish its
        budget and estimate; returns the worker's budget settings, or the job's error when it no longer fits."""
        from trainer.config import TrainConfig

        try:
            budget, estimate = self._budget.check(TrainConfig.from_dict(job.config))
        except ServerError as exc:
            return f"{exc.code}: {exc} (checked when the job started)"
        if self._metrics is not None:
            self._metrics.training_job_memory(job.job_id, budget=budget, estimate=estimate)
        return self._budget.worker_settings(budget)

    def _check_memory(self, job_id: str, proc: subprocess.Popen, budget: int) -> str:
        """On a CPU server: publish the worker's current and peak RSS and return the job's error when the RSS
        exceeds ``budget`` (bytes; 0 = no check), else ``""``. On CUDA the worker reports its own memory."""
        if self._budget is None or not self._budget.on_cpu:
            return ""
        from server.training.budget import read_rss

        rss = read_rss(proc.pid)
        if rss is None:
            return ""
        if self._metrics is not None:
            self._metrics.training_job_memory(job_id, current=rss[0], peak=rss[1])
        if budget and rss[0] > budget:
            return (f"RESOURCE_EXHAUSTED: the worker's resident memory ({rss[0]} bytes) exceeded the job's memory "
                    f"budget ({budget} bytes); lower config.batch_size or config.max_seq_length, or raise "
                    f"--training-memory-bytes (worker stopped)")
        return ""

    def _terminate(self, proc: subprocess.Popen) -> None:
        """SIGTERM the worker's process group, SIGKILL it after the grace period; returns once the worker is
        reaped."""
        if proc.poll() is not None:
            return
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(self._grace)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the worker leads its own session/group (start_new_session)
        except ProcessLookupError:
            pass

    def _on_progress(self, job_id: str, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "base" and isinstance(record.get("message"), str):  # shared_base: where the base came from
            with self._lock:
                self._publish(self._jobs.get(job_id), record["message"])
            return
        if event == "started" and isinstance(record.get("threads"), int):  # the budget in force, for watchers
            budget = record.get("memory_budget_bytes") or 0
            with self._lock:
                self._publish(self._jobs.get(job_id), f"worker running with {record['threads']} CPU thread(s) at "
                              f"nice {record.get('nice')}, memory budget "
                              + (f"{budget} bytes" if budget else "none"))
        if self._metrics is not None:
            if event == "started" and isinstance(record.get("threads"), int):
                self._metrics.training_job_threads(job_id, record["threads"])
            # A CUDA worker's allocator, with its step events; a CPU server reads the worker's RSS instead, and
            # mixing the two sources would make "current" and "peak" incomparable.
            cpu_server = self._budget is not None and self._budget.on_cpu
            if isinstance(record.get("memory_bytes"), int) and not cpu_server:
                self._metrics.training_job_memory(job_id, current=record["memory_bytes"],
                                                  peak=record.get("peak_memory_bytes"))
        if event not in ("phase", "step", "eval_progress", "eval", "done", "resume"):
            return
        fields: dict[str, Any] = {}
        for name in ("step", "total_steps", "resumed_from_step"):
            if isinstance(record.get(name), int):
                fields[name] = record[name]
        for name in ("loss", "eval_loss"):
            if isinstance(record.get(name), (int, float)):
                fields[name] = float(record[name])
        if record.get("phase") in PHASES:
            fields["phase"] = record["phase"]
        step, total = record.get("step"), record.get("total_steps")
        if event == "phase":
            message = f"phase {record.get('phase')}"
        elif event == "step":
            loss = fields.get("loss")
            message = f"step {step}/{total}" + (f" loss {loss:.4f}" if loss is not None else "")
            tps = record.get("tokens_per_second")
            if isinstance(tps, (int, float)):
                message += f" ({tps:.0f} tokens/s)"
        elif event == "eval_progress":
            message = f"evaluating {record.get('eval_examples_done')}/{record.get('eval_examples_total')} examples"
        elif event == "eval":
            message = f"eval loss {fields['eval_loss']:.4f} at step {step}" if "eval_loss" in fields else "eval"
        elif event == "resume":
            message = (f"resuming from the checkpoint at step {step}" if fields.get("resumed_from_step")
                       else "no complete checkpoint: training again from step 0")
        else:
            message = f"training done at step {step}"
        if event != "step":  # only a step moves the loss; other events repeat the latest one
            fields.pop("loss", None)
        with self._lock:
            job = self._jobs.update(job_id, **fields)
            self._publish(job, message)
        if self._metrics is not None and event == "step":
            tps = record.get("tokens_per_second")
            self._metrics.training_job_progress(job_id, step=fields.get("step"), loss=fields.get("loss"),
                                                tokens_per_second=float(tps) if isinstance(tps, (int, float))
                                                else None)

    def _finish(self, active: _Active, state: str, error: str = "", message: str = "") -> None:
        with self._lock:
            job = self._jobs.transition(active.job_id, state, finished_at=time.time(), error=error)
            self._publish(job, message or (f"failed: {error}" if error else state))
            self._refresh_counts()
        log.info("training job %s %s%s", job.job_id, state, f": {error}" if error else "")

