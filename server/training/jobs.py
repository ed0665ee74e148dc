"""Training-job records persisted in one SQLite file (WAL mode): plain job types, queries and state transitions."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from server.errors import FailedPrecondition, InvalidArgument, NotFound

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
#: Every job state, in lifecycle order.
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
#: States a job never leaves.
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
#: The state machine: the states each non-terminal state may move to. queued → running | cancelled | failed;
#: running → succeeded | failed | cancelled | queued. running → queued is an interruption (the server shut down,
#: crashed or was killed while the job ran, see :meth:`JobStore.requeue_interrupted`): the job waits to resume
#: from its last checkpoint, keeping its place (queues are FIFO by ``created_at``). Terminal states have no
#: successor.
TRANSITIONS: Mapping[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
}
#: How many times a job may be interrupted and resumed; the next interruption fails it (``INTERRUPTED_ERROR``),
#: so a job that brings its server down (or is caught in a crash loop) does not run forever.
MAX_RESTARTS = 3
#: Start of the ``error`` of a job failed for being interrupted more than ``MAX_RESTARTS`` times.
INTERRUPTED_ERROR = "interrupted too often"
#: Phases of a running job, in order (``phase``): the worker loads the tokenizer, data and base model, trains
#: (with checkpoint saves), evaluates on the held-out split (also between steps when ``eval_steps`` is set),
#: saves the adapter; then the server registers it.
PHASES = ("loading", "training", "evaluating", "saving", "registering")
#: The phases the trainer itself goes through (``trainer.train`` reports these; the server adds ``registering``).
TRAINER_PHASES = PHASES[:-1]
#: File name of the jobs database inside the state directory.
DB_FILE = "jobs.sqlite3"

#: Version 2 added the ``phase`` column, version 3 ``resumed_from_step`` and ``restarts`` (an older database is
#: upgraded in place when opened).
_SCHEMA_VERSION = 3
#: Columns added after version 1, with their definitions (``ALTER TABLE ... ADD COLUMN`` when missing).
_ADDED_COLUMNS = (("phase", "TEXT NOT NULL DEFAULT ''"), ("resumed_from_step", "INTEGER NOT NULL DEFAULT 0"),
                  ("restarts", "INTEGER NOT NULL DEFAULT 0"))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    adapter_id   TEXT NOT NULL,
    replace      INTEGER NOT NULL,
    dataset_path TEXT NOT NULL,
    config       TEXT NOT NULL,
    step         INTEGER NOT NULL DEFAULT 0,
    total_steps  INTEGER NOT NULL DEFAULT 0,
    loss         REAL,
    eval_loss    REAL,
    error        TEXT NOT NULL DEFAULT '',
    phase        TEXT NOT NULL DEFAULT '',
    resumed_from_step INTEGER NOT NULL DEFAULT 0,
    restarts     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    output_dir   TEXT NOT NULL,
    pid          INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
"""
_COLUMNS = ("id", "state", "adapter_id", "replace", "dataset_path", "config", "step", "total_steps", "loss",
            "eval_loss", "error", "phase", "resumed_from_step", "restarts", "created_at", "started_at", "finished_at",
            "output_dir", "pid")
# Columns update() / transition() may set (the rest are fixed at creation).
_MUTABLE = frozenset({"step", "total_steps", "loss", "eval_loss", "error", "phase", "resumed_from_step",
                      "started_at", "finished_at", "pid"})


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for: train ``config`` on ``dataset_path`` and register the result as ``adapter_id``.

    Attributes:
        adapter_id: id the trained adapter is registered under.
        dataset_path: JSONL training file on the server.
        replace: replace an adapter already registered under ``adapter_id`` when the job succeeds.
        config: hyper-parameter overrides by ``trainer.config.TrainConfig`` field name (only the fields of the
            proto ``TrainingConfig``); absent keys take the trainer's defaults.
    """

    adapter_id: str
    dataset_path: str
    replace: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One training job as stored. Times are UNIX seconds; steps are optimizer steps; losses are mean token
    cross-entropy (nats). The fields after ``output_dir`` are server-side only (the wire does not carry them; a
    job read back by the client has their defaults).

    Attributes:
        job_id: server-assigned id.
        state: one of ``STATES``.
        adapter_id: id the result is (to be) registered under.
        step: optimizer steps done.
        total_steps: optimizer steps planned; 0 until the trainer knows.
        loss: latest training loss; None before the first step.
        eval_loss: latest evaluation loss; None without an eval split or before the first evaluation.
        error: why the job failed; empty otherwise.
        phase: what a running job is doing, one of ``PHASES``; after it ends, the last phase it reached ("" if it
            never ran, and while an interrupted job waits to resume).
        resumed_from_step: the checkpoint step (optimizer steps) the job's latest run started from; 0 for a run
            from scratch (a first run, or a resume that found no complete checkpoint).
        restarts: how many times the job was interrupted while running (server shutdown, crash, kill) and put
            back in the queue to resume; at most ``MAX_RESTARTS``.
        created_at / started_at / finished_at: lifecycle instants; the last two None until reached.
        output_dir: the job's directory on the server (worker log, progress, checkpoints, adapter).
        replace: replace an existing adapter on success.
        dataset_path: absolute path of the training file.
        config: the complete ``TrainConfig`` the worker runs (``TrainConfig.to_dict()``).
        pid: the worker process id while (or after) it ran; None before.
    """

    job_id: str
    state: str
    adapter_id: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    error: str = ""
    phase: str = ""
    resumed_from_step: int = 0
    restarts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    output_dir: str = ""
    replace: bool = False
    dataset_path: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    pid: int | None = None

    @property
    def terminal(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class JobEvent:
    """A change of a job: the job as it is now and a human-readable note (e.g. ``"step 3/10 loss 1.2345"``)."""

    job: Job
    message: str = ""


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(job_id=row["id"], state=row["state"], adapter_id=row["adapter_id"], step=row["step"],
               total_steps=row["total_steps"], loss=row["loss"], eval_loss=row["eval_loss"], error=row["error"],
               phase=row["phase"], resumed_from_step=row["resumed_from_step"], restarts=row["restarts"],
               created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
               output_dir=row["output_dir"], replace=bool(row["replace"]), dataset_path=row["dataset_path"],
               config=json.loads(row["config"]), pid=row["pid"])


class JobStore:
    """Jobs in the SQLite database ``path`` (stdlib ``sqlite3``, WAL journal, one row per job).

    The file (and its directory) is created by the first :meth:`create`; until then every query answers as for
    an empty store, so a server that never trains leaves nothing on disk. All methods are thread-safe (one
    connection behind a lock). Only one process should write a store at a time; ``TrainingManager`` guards its
    state directory with a lock file.

    Args:
        path: the database file, e.g. ``<state_dir>/jobs.sqlite3``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------------------------------ connection

    def _conn(self, create: bool = False) -> sqlite3.Connection | None:
        """The open connection; None when the file does not exist and ``create`` is false. Caller holds the lock."""
        if self._db is not None:
            return self._db
        if not create and not self.path.exists():
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            db.close()
            raise FailedPrecondition(f"{self.path} has schema version {version}, newer than this server's "
                                     f"{_SCHEMA_VERSION}", field="state_dir")
        with db:
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS:  # a database of an older version
                if name not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._db = db
        return db

    def journal_mode(self) -> str | None:
        """The database's journal mode (``"wal"``), or None before the file exists."""
        with self._lock:
            db = self._conn()
            return None if db is None else db.execute("PRAGMA journal_mode").fetchone()[0]

    def close(self) -> None:
        """Close the connection (a later call reopens it)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --------------------------------------------------------------------------------------------- queries

    def get(self, job_id: str) -> Job:
        """The job ``job_id``. Raises NotFound (``field="job_id"``) when there is none."""
        with self._lock:
            return self._get(job_id)

    def _get(self, job_id: str) -> Job:
        db = self._conn()
        row = None if db is None else db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no training job {job_id!r}", field="job_id")
        return _row_to_job(row)

    def list(self) -> list[Job]:
        """Every job, newest first (by ``created_at``, then insertion order)."""
        with self._lock:
            db = self._conn()
            if db is None:
                return []
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC").fetchall()
        return [_row_to_job(r) for r in rows]

    def next_queued(self) -> Job | None:
        """The oldest queued job (FIFO), or None."""
        with self._lock:
            db = self._conn()
            row = None if db is None else db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY created_at, rowid LIMIT 1", (QUEUED,)).fetchone()
        return None if row is None else _row_to_job(row)

    def active_for_adapter(self, adapter_id: str) -> list[Job]:
        """Queued and running jobs that will register ``adapter_id``, oldest first."""
        with self._lock:
            db = self._conn()
            if db is None:
                return []
            rows = db.execute("SELECT * FROM jobs WHERE adapter_id = ? AND state IN (?, ?) ORDER BY created_at, "
                              "rowid", (adapter_id, QUEUED, RUNNING)).fetchall()
        return [_row_to_job(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs in each of ``STATES`` (every state present, 0 when none)."""
        counts = dict.fromkeys(STATES, 0)
        with self._lock:
            db = self._conn()
            if db is not None:
                for state, n in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                    counts[state] = n
        return counts

    # --------------------------------------------------------------------------------------------- changes

    def create(self, job: Job) -> Job:
        """Insert ``job`` (normally in state ``queued``); creates the database on first use. Returns it.

        Raises:
            InvalidArgument: ``job.state`` is not one of ``STATES`` (``field="state"``).
            FailedPrecondition: a job with this id exists (``field="job_id"``).
        """
        if job.state not in STATES:
            raise InvalidArgument(f"must be one of {STATES}, got {job.state!r}", field="state")
        values = (job.job_id, job.state, job.adapter_id, int(job.replace), job.dataset_path,
                  json.dumps(dict(job.config), sort_keys=True), job.step, job.total_steps, job.loss, job.eval_loss,
                  job.error, job.phase, job.resumed_from_step, job.restarts, job.created_at, job.started_at,
                  job.finished_at, job.output_dir, job.pid)
        with self._lock:
            db = self._conn(create=True)
            try:
                with db:
                    db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                               values)
            except sqlite3.IntegrityError as exc:
                raise FailedPrecondition(f"job {job.job_id!r} already exists", field="job_id") from exc
            return self._get(job.job_id)

    def update(self, job_id: str, **fields: Any) -> Job:
        """Set progress fields (``step``, ``total_steps``, ``loss``, ``eval_loss``, ``error``, ``phase``,
        ``resumed_from_step``, ``started_at``, ``finished_at``, ``pid``) without changing the state; returns the job.

        Raises:
            InvalidArgument: a field that cannot be updated (``field`` = its name), or a ``phase`` not in ``PHASES``.
            NotFound: no such job.
        """
        with self._lock:
            self._set(job_id, None, fields)
            return self._get(job_id)

    def transition(self, job_id: str, state: str, **fields: Any) -> Job:
        """Move the job to ``state`` (and set ``fields`` as in :meth:`update`) if ``TRANSITIONS`` allows it from
        its current state; atomic with respect to other writers. Returns the job.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the move is not allowed (e.g. the job already finished) (``field="job_id"``).
            InvalidArgument: an unknown ``state`` or field.
        """
        if state not in STATES:
            raise InvalidArgument(f"must be one of {STATES}, got {state!r}", field="state")
        with self._lock:
            if not self._set(job_id, state, fields):
                current = self._get(job_id)
                raise FailedPrecondition(f"job {job_id} is {current.state}; it cannot become {state}",
                                         field="job_id")
            return self._get(job_id)

    def _set(self, job_id: str, state: str | None, fields: Mapping[str, Any]) -> bool:
        for name in fields:
            if name not in _MUTABLE:
                raise InvalidArgument(f"cannot be updated (updatable: {', '.join(sorted(_MUTABLE))})", field=name)
        if "phase" in fields and fields["phase"] not in ("", *PHASES):
            raise InvalidArgument(f"must be one of {PHASES}, got {fields['phase']!r}", field="phase")
        db = self._conn()
        if db is None:
            raise NotFound(f"no training job {job_id!r}", field="job_id")
        sets = [f"{name} = ?" for name in fields]
        params: list[Any] = list(fields.values())
        where = "id = ?"
        if state is not None:
            sources = [s for s, targets in TRANSITIONS.items() if state in targets]
            sets.insert(0, "state = ?")
            params.insert(0, state)
            where += f" AND state IN ({', '.join('?' * len(sources))})"
            params += [job_id, *sources]
        else:
            params.append(job_id)
        if not sets:
            self._get(job_id)
            return True
        with db:
            cur = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", params)
        if cur.rowcount == 0:
            self._get(job_id)  # NotFound when the job does not exist
            return False
        return True

    def requeue_interrupted(self, job_id: str, now: float) -> Job:
        """A running job was interrupted (its server shuts down, or died): put it back in the queue to resume
        from its last checkpoint (``queued``, ``restarts`` + 1, ``phase`` and ``error`` cleared; its place in the
        FIFO queue is its ``created_at``), or, when it was already resumed ``MAX_RESTARTS`` times, fail it with an
        ``INTERRUPTED_ERROR`` message and ``finished_at = now`` (UNIX seconds). Atomic. Returns the job.

        Raises:
            NotFound: no such job.
            FailedPrecondition: the job is not running (``field="job_id"``).
        """
        with self._lock:
            db = self._conn()
            if db is None:
                raise NotFound(f"no training job {job_id!r}", field="job_id")
            with db:
                self._requeue(db, job_id, now)
            return self._get(job_id)

    def _requeue(self, db: sqlite3.Connection, job_id: str, now: float) -> None:
        """The update of :meth:`requeue_interrupted`, inside the caller's transaction; caller holds the lock."""
        row = db.execute("SELECT state, restarts, output_dir FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no training job {job_id!r}", field="job_id")
        if row["state"] != RUNNING:
            raise FailedPrecondition(f"job {job_id} is {row['state']}; only a running job can be interrupted",
                                     field="job_id")
        if row["restarts"] >= MAX_RESTARTS:
            error = (f"{INTERRUPTED_ERROR}: interrupted {row['restarts'] + 1} times while running (server "
                     f"shutdown, crash or kill); not resumed again after {MAX_RESTARTS} resumes; its checkpoints "
                     f"stay in {row['output_dir']}")
            db.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ? AND state = ?",
                       (FAILED, error, now, job_id, RUNNING))
        else:
            db.execute("UPDATE jobs SET state = ?, restarts = restarts + 1, phase = '', error = '', "
                       "finished_at = NULL WHERE id = ? AND state = ?", (QUEUED, job_id, RUNNING))

    def recover_interrupted(self, now: float) -> list[Job]:
        """Apply :meth:`requeue_interrupted` to every job left ``running`` (its server died: the worker watches
        its parent and exits with it), in one transaction: each goes back to the queue to resume, or fails when
        interrupted too often. Queued jobs stay queued. Returns the jobs changed, oldest first."""
        with self._lock:
            db = self._conn()
            if db is None:
                return []
            with db:
                ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY created_at, rowid",
                                                (RUNNING,))]
                for i in ids:
                    self._requeue(db, i, now)
            return [self._get(i) for i in ids]
