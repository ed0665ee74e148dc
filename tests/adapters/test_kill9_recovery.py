"""Issue item 6: the adapter registry and the job store recover from anything kill -9 can leave. A child process
registers, replaces and unregisters adapters and records jobs in a loop until it is SIGKILLed at varying points;
each restart must show only whole adapters (no staging, moved-aside or half-written files) and every job record."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.adapters.store import META_FILE, VERSION_FILE, AdapterStore
from server.training.jobs import QUEUED, SUCCEEDED, JobStore
from tests.server_process import REPO

CHILD = r'''
import itertools, pickle, sys, time
from server.adapters.store import AdapterStore
from server.training.jobs import Job, JobStore, RUNNING, SUCCEEDED
spec, root, db, srcs = pickle.load(open(sys.argv[1], "rb"))
store, jobs = AdapterStore(root, spec), JobStore(db)
start = int(sys.argv[2])
for i in itertools.count(start):
    store.register(f"ad{i % 3}", srcs[i % 2], replace=True)
    if i % 4 == 3:
        store.unregister(f"ad{(i + 1) % 3}") if f"ad{(i + 1) % 3}" in {a.adapter_id for a in store.list()} else None
    jobs.create(Job(job_id=f"j{i}", state="queued", adapter_id=f"ad{i % 3}", created_at=float(i),
                    output_dir="/tmp/x", dataset_path="/d.jsonl", config={"r": 4}))
    jobs.transition(f"j{i}", RUNNING, started_at=float(i), pid=1)
    if i % 2:
        jobs.transition(f"j{i}", SUCCEEDED, finished_at=float(i) + 0.5)
    print(i, flush=True)
'''


def _run_and_kill(args: list[str], iterations: int) -> int:
    """Run the child until it printed ``iterations`` lines, then SIGKILL it mid-work; the last finished index."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    last = -1
    try:
        for _ in range(iterations):
            line = proc.stdout.readline()
            assert line, "the child died"
            last = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    return last


def test_registry_and_job_store_survive_kill_9(tmp_path, spec, adapter):
    root, db = tmp_path / "store", tmp_path / "state" / "jobs.db"
    params = tmp_path / "params.pkl"
    params.write_bytes(pickle.dumps((spec, root, db, [adapter(seed=1), adapter(seed=2, r=8, lora_alpha=16)])))
    start, done, begun = 0, [], set()
    for iterations in (3, 5, 8):  # killed at different points of the loop, each time on what the last one left
        last = _run_and_kill([str(params), str(start)], iterations)
        done += range(start, last + 1)
        begun |= {f"j{i}" for i in range(start, last + 2)}  # the killed iteration's job may exist, or not
        time.sleep(0.01)
        # What kill -9 can also leave: half-written temporaries of the atomic JSON writes.
        (root / f"{VERSION_FILE}.tmp").write_text('{"last_ver')
        (root / "ad0" / f"{META_FILE}.tmp").write_text("{") if (root / "ad0").is_dir() else None

        store = AdapterStore(root, spec)
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != VERSION_FILE]
        assert leftovers == []
        assert not list(root.glob("*/*.tmp"))
        on_disk = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert [a.adapter_id for a in store.list()] == on_disk  # no directory skipped as broken
        for info in store.list():
            assert store.load(info.adapter_id).info.sha256 == info.sha256
        assert len(on_disk) >= 1  # the last finished iteration registered one

        jobs = JobStore(db)
        jobs.recover_interrupted(now=1e9)
        records = {j.job_id: j for j in jobs.list()}
        for i in done:  # every finished iteration's job is there, whole
            job = records[f"j{i}"]
            assert job.adapter_id == f"ad{i % 3}" and job.config == {"r": 4}
            assert job.state == (SUCCEEDED if i % 2 else QUEUED)  # a job left running is queued to resume
            assert (job.error, job.restarts) == ("", 0 if i % 2 else 1)
        assert set(records) <= begun
        jobs.close()
        start = last + 2
