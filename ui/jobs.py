"""Training jobs: one run folder per job under the runs folder, one training process at a time.

The app never trains in its own process. It starts the command a user would type,
`python -m kto_lite train --FIELD VALUE ...`, in a new session (closing the app or the browser does not
stop it), and follows it only by reading the run folder the trainer writes: status.json and
metrics.jsonl (docs/design.md, "The run folder"). So a page reload, a second tab or a restarted app finds a running job again
by scanning the runs folder for a `running` status whose pid is alive.

stdout and stderr go to <run>/train.log. The trainer refuses an output_dir that already holds files, so
the log is first opened as runs/.logs/<run>.log and moved into the run folder once the trainer has
created it; the process keeps writing to the same open file after the move.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kto_lite.runs import pid_alive, read_metrics, read_status

PENDING_LOGS = ".logs"  # runs/.logs/<run>.log until the run folder exists
LOG_NAME = "train.log"
PLOTS = {  # plot title -> {metrics.jsonl key: legend name}
    "loss": {"loss": "train", "eval_loss": "eval"},
    "rewards": {"rewards/chosen": "desirable", "rewards/rejected": "undesirable", "rewards/margins": "margin"},
    "kl": {"kl": "train", "eval_kl": "eval"},
    "learning rate": {"learning_rate": "learning rate"},
    "judged success": {"eval_judged_success": "judged success", "eval_judged_success_low": "95% low",
                       "eval_judged_success_high": "95% high"},
}


# ---------------------------------------------------------------------- run folders
def slugify(text: str, default: str = "run") -> str:
    """Lowercase letters, digits and dashes only: safe as a folder name on every OS."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return slug or default


def new_run_dir(runs_dir: Path, label: str) -> Path:
    """runs/<YYYYmmdd-HHMMSS>-<slug>: a fresh folder name, never derived from an uploaded file's name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(runs_dir) / f"{stamp}-{slugify(label)}"
    n = 2
    while path.exists() or pending_log(path).exists():
        path = Path(runs_dir) / f"{stamp}-{slugify(label)}-{n}"
        n += 1
    return path


def pending_log(run: Path) -> Path:
    return run.parent / PENDING_LOGS / f"{run.name}.log"


def log_path(run: Path) -> Path:
    """Where the run's log is now: <run>/train.log, moved there from runs/.logs once the folder exists."""
    final, pending = run / LOG_NAME, pending_log(run)
    if pending.exists() and run.is_dir() and not final.exists():
        try:
            os.replace(pending, final)  # same filesystem: the writer's open file moves with it
        except OSError:
            return pending
    return final if final.exists() else pending


def log_tail(run: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of the log as a terminal would show them: tqdm's carriage-return redraws reduced to
    their last state, a nested bar (the judged evaluation inside the training's) drawn over its own line
    and gone once closed."""
    path = log_path(run)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(_as_shown(text)[-lines:]).strip("\n")


_CONTROL = re.compile(r"(\r?\n|\r|\x1b\[[0-9;]*[A-Za-z])")  # line ends, carriage returns, ANSI escapes


def _as_shown(text: str) -> list[str]:
    """The screen lines `text` leaves on a terminal, for what tqdm writes: text overwrites from the cursor, a
    line break goes to the start of the next line, a carriage return to the start of this one, ESC[A (cursor
    up) to the line above; other escapes are dropped. A line that was overwritten with blanks (a closed
    bar, leave=False) is left out; an empty line of the log stays."""
    shown, row, col = [""], 0, 0
    for token in _CONTROL.split(text):
        if token in ("\n", "\r\n"):
            row, col = row + 1, 0
            if row == len(shown):
                shown.append("")
        elif token == "\r":
            col = 0
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        elif token and not token.startswith("\x1b"):
            line = shown[row].ljust(col)
            shown[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in shown if line.strip() or not line]


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders (those with a status.json), newest first. Folders starting with '_' or '.' are the app's."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.iterdir()
             if p.is_dir() and p.name[0] not in "._" and (p / "status.json").is_file()]
    return sorted(found, key=lambda p: (p / "status.json").stat().st_mtime, reverse=True)


def has_adapter(run: Path) -> bool:
    return (Path(run) / "adapter_model.safetensors").is_file()


@dataclass
class RunState:
    """What the app shows of a run: the trainer's status.json, with a dead process told apart."""

    state: str  # starting | running | finished | stopped | failed | stopping
    phase: str = ""
    step: int = 0
    total_steps: int | None = None
    message: str = ""
    pid: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


def run_state(run: Path) -> RunState:
    JOBS.reap()  # first: an exited job's early failure is recorded in its status.json
    status = read_status(run)
    if status is None:
        proc = JOBS.process_for(run)
        if proc is not None:
            return RunState("starting", phase="starting Python and loading libraries", pid=proc.pid)
        return RunState("failed", message="no status.json: the training process never started")
    state = RunState(status.get("status", "failed"), status.get("phase", ""), int(status.get("step") or 0),
                     status.get("total_steps"), status.get("message", ""), status.get("pid"))
    if state.state == "running":
        if not pid_alive(state.pid) or JOBS.exited(run):
            state.state = "failed"  # killed (the OOM killer sends SIGKILL) or crashed before writing its status
            state.message = ("the training process is gone without saying why (killed, e.g. out of memory?); "
                             "its last log lines:")
        elif JOBS.stop_requested(run):
            state.state = "stopping"
    return state


def find_active(runs_dir: Path) -> Path | None:
    """The run being trained now, whoever started it (this app, a previous app, or a terminal)."""
    JOBS.reap()
    if JOBS.run is not None and JOBS.process_for(JOBS.run) is not None:
        status = read_status(JOBS.run)
        if status is None or status.get("status") == "running":  # not one that is only exiting
            return JOBS.run
    for run in list_runs(runs_dir):
        status = read_status(run) or {}
        if status.get("status") == "running" and pid_alive(status.get("pid")):
            return run
    return None


def busy_message(run: Path) -> str:
    """What a second start is told: the run that holds the device."""
    return (f"**Busy:** `{run.name}` is training: one job at a time. Stop it (Train tab) or wait for it to "
            "finish, then start again.")


# ---------------------------------------------------------------------- progress
_FIRST_SEEN: dict[str, tuple[float, int]] = {}  # run -> (time, step) when training was first seen


def eta_seconds(run: Path, state: RunState, now: float | None = None) -> float | None:
    """Remaining time from the speed seen since this app first saw the run training (None: not known yet)."""
    if state.state not in ("running", "stopping") or state.phase != "training" or not state.total_steps:
        return None
    now = time.time() if now is None else now
    t0, s0 = _FIRST_SEEN.setdefault(str(run), (now, state.step))
    if state.step <= s0 or now <= t0:
        return None
    return (now - t0) / (state.step - s0) * (state.total_steps - state.step)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating..."
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def metric_frames(run: Path | None) -> dict:
    """{plot title: long-format DataFrame(step, value, series), or None before the first logged step}.

    Two quirks of gr.LinePlot shape this: an empty frame breaks its axes for good (so None is sent
    instead), and it keeps the series of the first frame it draws (so every series the run will log,
    eval included, gets a NaN point at the first step: the legend knows it from the start).
    """
    import pandas as pd

    rows = read_metrics(run) if run is not None else []
    with_eval = run is not None and _has_eval(run)
    frames = {}
    for title, keys in PLOTS.items():
        points = [(r["step"], float(r[key]), name) for r in rows for key, name in keys.items()
                  if key in r and "step" in r and r[key] is not None]
        if not points:
            frames[title] = None
            continue
        first = min(p[0] for p in points)
        names = [name for key, name in keys.items()
                 if not key.startswith("eval_") or with_eval or any(key in r for r in rows)]
        padding = [(first, math.nan, name) for name in names]
        frame = pd.DataFrame(padding + points, columns=["step", "value", "series"])
        frames[title] = frame.astype({"step": "int64", "value": "float64"})
    return frames


def steps_logged(run: Path) -> int:
    """Training lines in metrics.jsonl (points a curve can be drawn through)."""
    return sum(1 for row in read_metrics(run) if "step" in row and "loss" in row)


def _has_eval(run: Path) -> bool:
    """Whether the run evaluates (its config.yaml has eval_data or an eval_fraction)."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool(config.get("eval_data")) or float(config.get("eval_fraction") or 0) > 0


def files_signature(run: Path) -> tuple:
    """Changes whenever anything the progress view shows changes (cheap: three stat calls)."""
    sig = []
    for path in (run / "status.json", run / "metrics.jsonl", log_path(run)):
        try:
            st = path.stat()
            sig.append((st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append(None)
    return tuple(sig)


# ---------------------------------------------------------------------- the process
class JobManager:
    """Starts and stops the one training process; remembers it so that it can be reaped."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.run: Path | None = None
        self._stopping: set[str] = set()

    def reap(self) -> None:
        """Collect an exited child (else it stays a zombie and its pid looks alive)."""
        if self.proc is not None and self.proc.poll() is not None and self.run is not None:
            if read_status(self.run) is None:
                _record_early_failure(self.run, self.proc.returncode, self.stop_requested(self.run))
            log_path(self.run)

    def process_for(self, run: Path) -> subprocess.Popen | None:
        self.reap()
        if self.proc is not None and self.run == Path(run) and self.proc.poll() is None:
            return self.proc
        return None

    def exited(self, run: Path) -> bool:
        return self.proc is not None and self.run == Path(run) and self.proc.poll() is not None

    def stop_requested(self, run: Path) -> bool:
        return str(run) in self._stopping

    def start(self, argv: list[str], run: Path, *, resume: bool = False) -> subprocess.Popen:
        """Start `python <argv>` writing `run`. Raises RuntimeError when a job is already running."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is None and self.run is not None:
                if (read_status(self.run) or {}).get("status") not in (None, "running"):
                    try:  # a finished job still exiting: let it go first
                        self.proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
            busy = find_active(run.parent)
            if busy is not None:
                raise RuntimeError(f"A training job is already running: {busy.name}. Stop it or wait for it "
                                   "to finish; one job at a time.")
            log = run / LOG_NAME if resume else pending_log(run)
            log.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(log, "ab") as out:
                out.write(f"$ python {' '.join(argv)}\n".encode())
                out.flush()
                self.proc = subprocess.Popen(  # no shell: argv goes to Python as is
                    [sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True,  # Ctrl-C in the app's terminal does not reach it
                )
            self.run = Path(run)
            self._stopping.discard(str(run))
            _FIRST_SEEN.pop(str(run), None)
            return self.proc

    def stop(self, run: Path) -> str:
        """Ask the trainer to stop after this step (SIGTERM: it saves a checkpoint and the adapter)."""
        proc = self.process_for(run)
        pid = proc.pid if proc is not None else (read_status(run) or {}).get("pid")
        if not pid_alive(pid):
            return f"{run.name} is not running."
        os.kill(int(pid), signal.SIGTERM)
        self._stopping.add(str(run))
        return (f"Stop requested for {run.name}: it finishes the current step, then saves a checkpoint and the "
                "adapter.")


def _record_early_failure(run: Path, returncode: int, stopped: bool) -> None:
    """The process ended before the trainer wrote status.json (e.g. a bad argument): say so in the run folder."""
    run.mkdir(parents=True, exist_ok=True)
    message = (f"stopped before training began (exit code {returncode})" if stopped else
               f"the training command exited with code {returncode} before starting; see train.log")
    status = {"status": "stopped" if stopped else "failed", "phase": "starting", "step": 0, "total_steps": None,
              "message": message,
              "pid": None, "updated": time.time()}
    (run / "status.json").write_text(json.dumps(status, indent=1))


JOBS = JobManager()  # one per app process: one training at a time
