"""What a person sees and does: plain progress lines through a pipe, the ETA, Ctrl-C on a real trainer process."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.console import PlainProgress, format_duration, step_line

ROOT = Path(__file__).resolve().parents[2]
#: Bound of every wait on a trainer subprocess (seconds): liveness on a loaded 2-core machine, not a timing check.
WAIT_S = 240.0
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\d+\.\d{4})  (\d+) tokens/s  eta (\?|\d+:\d\d:\d\d)$")


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0, max_value=10 * 86400, allow_nan=False))
def test_eta_is_h_mm_ss_and_means_the_seconds(seconds):
    text = format_duration(seconds)
    h, m, s = text.split(":")
    assert len(m) == len(s) == 2 and int(m) < 60 and int(s) < 60
    assert int(h) * 3600 + int(m) * 60 + int(s) == round(seconds)


def test_eta_unknown():
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?" and format_duration(-1) == "?"


@settings(max_examples=40, deadline=None)
@given(every=st.integers(1, 12), total=st.integers(1, 60))
def test_plain_progress_prints_a_step_line_every_logging_steps_and_at_the_end(every, total):
    out = io.StringIO()
    show = PlainProgress(out, every)
    show({"event": "phase", "phase": "training", "step": 0, "total_steps": total})
    for step in range(1, total + 1):
        show({"event": "step", "phase": "training", "step": step, "total_steps": total, "loss": 1.0 / step,
              "tokens_per_second": 100.0 + step, "eta_seconds": float(total - step)})
    lines = out.getvalue().splitlines()
    assert lines[0] == "phase training"
    printed = [int(STEP_LINE.match(line).group(1)) for line in lines[1:]]
    assert printed == [s for s in range(1, total + 1) if s % every == 0 or s == total]
    last = STEP_LINE.match(lines[-1])
    assert last.group(5) == "0:00:00" and float(last.group(3)) == round(1.0 / total, 4)


def test_step_line_names_every_number():
    line = step_line({"step": 10, "total_steps": 50, "loss": 1.23456, "tokens_per_second": 812.4,
                      "eta_seconds": 200.0})
    assert line == "step 10/50  loss 1.2346  812 tokens/s  eta 0:03:20"


# ---------------------------------------------------------------------------------------------------------------
# Real trainer processes (tiny model), stdout piped


def _write_config(tmp_path: Path, model_dir: Path, data: Path, **overrides) -> Path:
    cfg = {"model": str(model_dir), "dataset": str(data), "output_dir": str(tmp_path / "out"), "max_steps": 7,
           "batch_size": 4, "learning_rate": 1e-3, "lora_dropout": 0.0, "r": 4, "lora_alpha": 8,
           "eval_fraction": 0.1, "eval_max_examples": 6, "logging_steps": 3, "save_steps": 1000, "seed": 0}
    cfg.update(overrides)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


COMMANDS = {
    "qlora-server train": [sys.executable, "-m", "server", "train"],
    "python -m trainer": [sys.executable, "-m", "trainer"],
}


def test_piped_stdout_gets_plain_progress_lines(tiny_model_dir, learnable_data, tmp_path):
    for name, argv in COMMANDS.items():
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        cfg = _write_config(work, tiny_model_dir, learnable_data)
        run = subprocess.run([*argv, str(cfg)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=WAIT_S)
        assert run.returncode == 0, (name, run.stderr[-3000:])
        lines = run.stdout.splitlines()
        steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
        assert all(steps), (name, lines)
        assert [int(m.group(1)) for m in steps] == [3, 6, 7], (name, lines)  # every logging_steps, and the last
        assert all(m.group(2) == "7" and int(m.group(4)) > 0 and m.group(5) != "?" for m in steps), lines
        phases = [line.split()[1] for line in lines if line.startswith("phase ")]
        assert phases == ["loading", "training", "evaluating", "saving"], (name, lines)
        evaluating = [line for line in lines if line.startswith("evaluating ")]
        assert evaluating and evaluating[-1] == "evaluating 6/6 examples", (name, lines)
        assert "\x1b[" not in run.stdout  # no terminal control codes in a pipe
        # stderr is our log: no library warnings or progress bars that are not the user's concern
        noise = [line for line in run.stderr.splitlines()
                 if "Warning" in line or "Loading weights" in line or "kernels-community" in line
                 or "[transformers]" in line]
        assert noise == [], (name, noise)
        assert (work / "out" / "adapter" / "adapter_model.safetensors").is_file()


class _Proc:
    """A trainer subprocess whose stdout and stderr lines are collected by reader threads."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink, tag in ((self.proc.stdout, self.out, "out"), (self.proc.stderr, self.err, "err")):
            threading.Thread(target=self._read, args=(stream, sink, tag), daemon=True).start()

    def _read(self, stream, sink: list[str], tag: str) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            self.lines.put((tag, line.rstrip("\n")))

    def wait_line(self, tag: str, pattern: str) -> str:
        """The next line on ``tag`` ("out"/"err") that contains ``pattern`` (bounded by ``WAIT_S``)."""
        import time

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                got_tag, line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if got_tag == tag and pattern in line:
                return line
        raise AssertionError(f"no {tag} line with {pattern!r}; stdout {self.out[-20:]} stderr {self.err[-20:]}")

    def wait(self) -> int:
        try:
            return self.proc.wait(WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("checkpoint-*")) if (out / "checkpoints").is_dir() else []


def test_ctrl_c_finishes_the_step_keeps_a_complete_checkpoint_and_no_adapter(tiny_model_dir, learnable_data,
                                                                               tmp_path):
    cfg = _write_config(tmp_path, tiny_model_dir, learnable_data, max_steps=100000, logging_steps=1)
    proc = _Proc([*COMMANDS["qlora-server train"], str(cfg)])
    first = STEP_LINE.match(proc.wait_line("out", "step "))
    assert first is not None and first.group(2) == "100000"
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130, proc.err[-20:]
    last_step = max(int(m.group(1)) for m in map(STEP_LINE.match, proc.out) if m)
    assert last_step < 100000  # it stopped: it did not run to the end
    out = tmp_path / "out"
    assert [p.name for p in _checkpoints(out)] == [f"checkpoint-{last_step}"]  # the step it finished, complete
    assert (_checkpoints(out)[0] / "trainer_state.json").is_file()
    assert not (out / "adapter").exists() and not list(out.glob(".adapter.tmp-*"))
    said = "\n".join(proc.err)
    assert "stopping after the current step" in said
    assert f"after step {last_step}" in said and "no adapter was written" in said and "--resume" in said


_SLOW = """
import sys, time
import transformers
where, argv = sys.argv[1], sys.argv[2:]
if where == "step":  # every optimizer step after the first takes an hour
    original = transformers.Trainer.training_step
    def slow(self, *args, **kwargs):
        if self.state.global_step >= 1:
            time.sleep(3600)
        return original(self, *args, **kwargs)
    transformers.Trainer.training_step = slow
else:  # saving a checkpoint's optimizer state takes an hour (the model files are already written)
    def slow_save(self, output_dir):
        time.sleep(3600)
    transformers.Trainer._save_optimizer_and_scheduler = slow_save
from server.cli import main
sys.exit(main(argv))
"""


def test_second_ctrl_c_aborts_at_once_and_leaves_nothing_half_written(tiny_model_dir, learnable_data, tmp_path):
    """A step (or a checkpoint save) that would take an hour: the first Ctrl-C asks for a stop after it, the second
    aborts now; no adapter, no partial checkpoint."""
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    for where in ("step", "save"):
        work = tmp_path / where
        work.mkdir()
        cfg = _write_config(work, tiny_model_dir, learnable_data, max_steps=100000, logging_steps=1)
        proc = _Proc([sys.executable, str(script), where, "train", str(cfg)])
        proc.wait_line("out", "step 1/")
        proc.proc.send_signal(signal.SIGINT)
        proc.wait_line("err", "stopping after the current step")
        proc.proc.send_signal(signal.SIGINT)
        assert proc.wait() == 130, (where, proc.err[-20:])
        out = work / "out"
        assert _checkpoints(out) == [], where  # the save cut short left nothing behind
        assert not (out / "adapter").exists() and not list(out.glob(".adapter.tmp-*"))
        said = "\n".join(proc.err)
        assert "aborted: no adapter was written; no checkpoint is kept" in said, (where, proc.err[-20:])
        assert "Traceback" not in said


def test_json_progress_of_python_m_trainer_carries_phase_and_eta(tiny_model_dir, learnable_data, tmp_path):
    cfg = _write_config(tmp_path, tiny_model_dir, learnable_data, max_steps=3)
    run = subprocess.run([*COMMANDS["python -m trainer"], str(cfg), "--json", "--log-level", "WARNING"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines()][:-1]  # the last line is the summary
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["phase"] == "training" for e in steps)
    assert all(e["eta_seconds"] is not None and e["eta_seconds"] >= 0 for e in steps)
    assert steps[-1]["eta_seconds"] == 0
