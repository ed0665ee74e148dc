"""Measures a training job's base memory and start-up with the server's shared base vs. loading its own copy.

Usage: ``python -m bench.train_shared_base [--model smollm2] [--steps 4] [--device cpu|cuda]``. Builds the real app
(CPU by default), runs one job
with ``training_share_base`` on, then one with it off, and prints for each: seconds from ``create`` to the job's
first optimizer step (wall clock, includes the worker's Python/torch imports) and from the trainer's start to it
(the worker's own ``elapsed_seconds``: tokenizer, data, base model, Trainer set-up, step 1), and the worker's
memory from ``/proc/<pid>/smaps_rollup`` sampled at its first step (Rss, Pss, Private, Shared, KiB), plus the Rss of its
mapping of the server's shared arena (``/proc/<pid>/smaps``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return {"Rss": out["Rss"], "Pss": out["Pss"],
            "Private": out["Private_Clean"] + out["Private_Dirty"],
            "Shared": out["Shared_Clean"] + out["Shared_Dirty"]}


def _arena_rss(pid: int, inode: int | None) -> int:
    if inode is None:
        return 0
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            inside = fields[4] == str(inode)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _gpu_used() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def run_one(model: str, share: bool, steps: int, root: Path, device: str = "cpu") -> dict:
    root = Path(tempfile.mkdtemp(dir=root))
    from server.app import build_app
    from server.config import ModelConfig, ServerConfig
    from server.training.jobs import JobRequest

    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f" ok {i}!"}) + "\n" for i in range(32)))
    config = ServerConfig(model=ModelConfig(model=model, device=device), adapters_dir=root / f"store-{share}",
                          state_dir=root / f"state-{share}", metrics_port=-1, training_share_base=share)
    app = build_app(config)
    try:
        shared = app.training._shared_base
        inode = os.fstat(shared._fd).st_ino if shared is not None and getattr(shared, "_fd", None) is not None else None
        gpu_used_before = _gpu_used()
        t0 = time.monotonic()
        job = app.training.create(JobRequest(f"bench-{share}", str(data), config={
            "max_steps": steps, "batch_size": 2, "max_seq_length": 64, "eval_fraction": 0.0, "save_steps": 1000}))
        while app.training.get(job.job_id).step < 1:
            if app.training.get(job.job_id).state in ("failed", "cancelled"):
                raise SystemExit(app.training.get(job.job_id).error)
            time.sleep(0.01)
        first_step_s = time.monotonic() - t0
        pid = app.training.get(job.job_id).pid
        mem = _rollup(pid)
        mem["arena_Rss"] = _arena_rss(pid, inode)
        gpu_used_first_step = _gpu_used()
        while app.training.get(job.job_id).state not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.1)
        progress = (Path(job.output_dir) / "progress.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in progress]
        base = [f'{r["message"]} in {r["seconds"]:.2f} s' for r in records if r.get("event") == "base"]
        first = next(r for r in records if r.get("event") == "step")
        trainer_s = first["elapsed_seconds"]
        return {"share": share, "create_to_first_step_s": round(first_step_s, 2),
                "trainer_start_to_first_step_s": round(trainer_s, 2), "worker_kib": mem,
                "base": base, "state": app.training.get(job.job_id).state,
                "arena_bytes": shared.nbytes if shared is not None else None,
                # CUDA only: the worker's own allocator at its first step (the base is not in it when shared), and
                # the device's used bytes (all processes) before the job and at its first step
                "worker_cuda_allocated_bytes": first.get("memory_bytes"),
                "device_used_bytes_before_and_at_step1": [gpu_used_before, gpu_used_first_step]}
    finally:
        app.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu", help="the server's device: cpu or cuda")
    p.add_argument("--order", default="on,off", help="runs, in order: on = shared, off = loaded (default on,off)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shared-base-bench-"))
    for share in (word == "on" for word in args.order.split(",")):
        print(json.dumps(run_one(args.model, share, args.steps, root, args.device)), flush=True)


if __name__ == "__main__":
    main()
