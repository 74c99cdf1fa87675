"""Kill a demo training with SIGKILL at seeded random moments and at its writers' worst moments; resume each.

    python tests/kill_campaign.py [--kills 20] [--seed 0] [--out benchmarks/results/kill_campaign.json]

A kill is either timed (a random delay after a random phase begins: loading, the reference pass, training,
which holds the steps and the checkpoint writes) or named: KTO_LITE_KILL_AT (kto_lite/files.py) makes the
process kill itself when a write is complete but not yet renamed into place (a checkpoint folder, the
final adapter's files, status.json). After each kill, before anything else runs, nothing half-written may be
visible: every checkpoint folder and the adapter (when its config is there) load, the data file is
unchanged. Then `--resume_from_checkpoint true` runs to the end and must give the uninterrupted run's
adapter and the same loss at every step. Anything else counts as data lost (which must be none).

The results go to --out as JSON (date, command, kills tried, outcomes, data lost, one record per kill).
tests/test_faults.py uses the same helpers for its named kills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_STEPS = 6, 2  # checkpoints at steps 2, 4 and 6
NAMED = ("checkpoint-2", "checkpoint-4", "checkpoint-6", "adapter_model.safetensors", "adapter_config.json",
         "status.json")
PHASES = ("loading tokenizer and data", "reference log-probs", "training")


def demo_command(out: Path, *extra: str) -> list[str]:
    """The demo run (built-in model, its sample feedback) with checkpoints every SAVE_STEPS steps."""
    return [sys.executable, "-m", "kto_lite", "train", "--output_dir", str(out), "--max_steps", str(STEPS),
            "--save_steps", str(SAVE_STEPS), *extra]


def environment(cache: Path, kill_at: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "KTO_LITE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    env.pop("KTO_LITE_KILL_AT", None)
    if kill_at:
        env["KTO_LITE_KILL_AT"] = kill_at
    return env


def run(out: Path, cache: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(demo_command(out, *extra), env=environment(cache, kill_at), capture_output=True, text=True,
                          timeout=900, cwd=REPO)


def killed_at_random(out: Path, cache: Path, phase: str, delay: float) -> dict:
    """Start the demo run, wait until status.json says `phase` began, wait `delay` s more, SIGKILL it."""
    proc = subprocess.Popen(demo_command(out), env=environment(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    seen = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        status = read_json(out / "status.json")
        if status and status.get("phase") in PHASES[PHASES.index(phase):] + ("finished",):
            seen = status.get("phase")
            break
        time.sleep(0.02)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    status_before = read_json(out / "status.json") or {}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"phase_seen": seen, "at": f"{status_before.get('phase')} step {status_before.get('step')}",
            "finished_before_the_kill": finished_first}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible_state_problems(out: Path) -> list[str]:
    """What a reader or a resume would trip on right after a kill: anything under a final name that is not whole."""
    import torch
    from safetensors.torch import load_file

    from kto_lite.runs import checkpoints

    problems = []
    for folder in checkpoints(out):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            torch.load(folder / "training_state.pt", weights_only=False)
            load_file(folder / "adapter_model.safetensors")
        except Exception as e:  # noqa: BLE001 - any failure is a half-written checkpoint
            problems.append(f"{folder.name}: {type(e).__name__}: {e}")
    if (out / "adapter_config.json").is_file():
        try:
            load_file(out / "adapter_model.safetensors")
        except Exception as e:  # noqa: BLE001
            problems.append(f"adapter: {type(e).__name__}: {e}")
    for name in ("status.json", "config.yaml", "data_report.json"):
        path = out / name
        if path.exists() and name.endswith(".json") and read_json(path) is None:
            problems.append(f"{name} unreadable")
    return problems


def compare(out: Path, baseline: Path) -> list[str]:
    """How a resumed run differs from the uninterrupted one: status, adapter, every step's loss."""
    import torch
    from safetensors.torch import load_file

    from kto_lite.runs import read_metrics, read_status

    problems = []
    if (read_status(out) or {}).get("status") != "finished":
        problems.append(f"status {(read_status(out) or {}).get('status')}")
    try:
        a, b = load_file(out / "adapter_model.safetensors"), load_file(baseline / "adapter_model.safetensors")
        if a.keys() != b.keys() or any(not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a):
            problems.append("adapter differs from the uninterrupted run's")
    except Exception as e:  # noqa: BLE001
        problems.append(f"adapter unreadable: {e}")
    steps = {r["step"]: r for r in read_metrics(out)}
    expected = {r["step"]: r for r in read_metrics(baseline)}
    if sorted(steps) != sorted(expected):
        problems.append(f"metrics steps {sorted(steps)}, expected {sorted(expected)}")
    for step, row in expected.items():
        if step in steps and abs(steps[step]["loss"] - row["loss"]) > 1e-6 * max(1.0, abs(row["loss"])):
            problems.append(f"step {step}: loss {steps[step]['loss']} vs {row['loss']}")
    return problems


def resume_outcome(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("resuming from "):
            return "resumed from " + Path(line.split()[2]).name
        if "nothing to resume" in line:
            return "nothing to resume: started over"
    return "unknown"


def one_kill(root: Path, baseline: Path, data: Path, kind: str, rng: random.Random, index: int) -> dict:
    """Kill one run (timed or named), check what is visible, resume it, compare it with the baseline."""
    out, cache = root / f"kill{index:02d}", root / f"cache{index:02d}"  # a fresh cache: the reference pass runs
    data_before = file_hash(data)
    if kind == "timed":
        phase = rng.choice(PHASES)
        # within each phase as long as it lasts on 2 CPU cores (measured: loading ~2 s, reference ~2 s, 6 steps
        # with 3 checkpoints, the adapter and the model card ~4 s), so that most kills land inside it
        delay = rng.uniform(0, {"loading tokenizer and data": 2.0, "reference log-probs": 2.0, "training": 4.0}[phase])
        record = {"kill": f"timed: {delay:.2f} s into {phase}", **killed_at_random(out, cache, phase, delay)}
    else:
        result = run(out, cache, kill_at=kind)
        record = {"kill": f"named: {kind}", "returncode": result.returncode}
    visible = visible_state_problems(out)
    resumed = run(out, cache, "--resume_from_checkpoint", "true")
    problems = visible + ([f"resume failed: {resumed.stderr[-500:]}"] if resumed.returncode else [])
    problems += compare(out, baseline) if not resumed.returncode else []
    if file_hash(data) != data_before:
        problems.append("the data file changed")
    return {**record, "outcome": resume_outcome(resumed.stdout), "data_lost": problems}


def campaign(kills: int, seed: int, root: Path) -> dict:
    from kto_lite.demo import DEMO_SAMPLES

    rng = random.Random(seed)
    baseline = root / "baseline"
    result = run(baseline, root / "cache_baseline")
    if result.returncode:
        raise RuntimeError(f"the uninterrupted run failed: {result.stderr[-2000:]}")
    kinds = list(NAMED) + ["timed"] * max(0, kills - len(NAMED))
    records = []
    for i, kind in enumerate(kinds[:kills]):
        records.append(one_kill(root, baseline, DEMO_SAMPLES["kto"], kind, rng, i))
        print(json.dumps(records[-1]), flush=True)
    return {"kills": len(records), "outcomes": dict(Counter(r["outcome"] for r in records)),
            "data_lost": sum(bool(r["data_lost"]) for r in records), "runs": records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kill_campaign.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="kill_campaign-") as tmp:
        summary = campaign(args.kills, args.seed, Path(tmp))
    summary = {"date": time.strftime("%Y-%m-%d"), "command": f"python tests/kill_campaign.py --kills {args.kills} "
               f"--seed {args.seed}", "steps": STEPS, "save_steps": SAVE_STEPS, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['kills']} kills, outcomes {summary['outcomes']}, runs with data lost: {summary['data_lost']}")
    return 1 if summary["data_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
