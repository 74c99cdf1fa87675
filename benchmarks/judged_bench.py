"""Shared by rare_desirable.py and methods.py: tasks judged by a program, the base model's judged feedback, runs
judged during training, and paired comparisons.

A measurement here: the base model samples answers to training prompts and a program judges them (the feedback
a run trains on); each run trains with kto_lite's own `train`, judging its sampled answers to held-out prompts
during training (kto_lite/training/judged.py: step 0, every eval_steps, the end), with answer j to prompt i
drawn from the same seed in every run of the same training seed (common random numbers). A run's number is its
last judged success with the clustered 95% interval; two runs of one seed are compared prompt by prompt (the
prompt-to-prompt spread cancels), and over seeds each prompt's difference is averaged first (paired_by_prompt).
Nothing is downloaded but SmolLM2 (tests/real_model.py, from PyPI).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kto_lite.config import TrainConfig  # noqa: E402
from kto_lite.runs import read_metrics, read_status  # noqa: E402

TASKS = {"real": ROOT / "recipes" / "real_task.py", "format": ROOT / "recipes" / "format_task.py",
         "demo": ROOT / "recipes" / "demo_task.py"}
Z95 = 1.959963984540054


def load_task(name: str):
    """The task module (write_prompts, SAMPLING) with `JUDGE` set (the demo task's is `exact`)."""
    spec = importlib.util.spec_from_file_location(f"{name}_task", TASKS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.JUDGE = getattr(module, "JUDGE", "exact")
    return module


def default_model(task: str) -> str | None:
    """SmolLM2-135M-Instruct's GGUF for the real-model tasks; the built-in demo model (None) for the demo task."""
    if task == "demo":
        return None
    from real_model import smollm2_gguf

    return str(smollm2_gguf())


def judged_fields(task, eval_prompts: Path, eval_n: int) -> dict:
    """TrainConfig fields of the judged evaluation: the task's judge and sampling, on the held-out prompts."""
    s = task.SAMPLING
    return dict(eval_prompts=str(eval_prompts), judge=task.JUDGE, eval_samples_per_prompt=eval_n,
                eval_temperature=s["temperature"], eval_top_p=s["top_p"], eval_max_new_tokens=s["max_new_tokens"])


def sample_feedback(work: Path, task, model: str | None, prompts: Path, *, n: int, seed: int,
                    load_in_4bit: bool, quiet: bool) -> dict:
    """The base model's n judged answers to every training prompt (resumable): `feedback.jsonl` in `work`."""
    from kto_lite.feedback.sample import SampleArgs, sample_to_file
    from kto_lite.generation import load_models, model_spec, read_prompts

    loaded = load_models(model_spec(model, load_in_4bit=load_in_4bit))
    args = SampleArgs(n=n, seed=seed, judge=task.JUDGE, **task.SAMPLING)
    start = time.perf_counter()
    summary = sample_to_file(loaded, None, read_prompts(prompts), work / "feedback.jsonl", args,
                             show_progress=not quiet)
    return {k: summary[k] for k in ("samples", "desirable", "desirable_share")} | {
        "seconds": round(time.perf_counter() - start, 1)}


def train_judged(config: TrainConfig, *, quiet: bool) -> dict:
    """Train one run (kept when it finished before) and read what its judged evaluation found."""
    from kto_lite.training.recipe import train

    out = Path(config.output_dir)
    if (read_status(out) or {}).get("status") != "finished":
        start = time.perf_counter()
        train(dataclasses.replace(config, overwrite_output_dir=True), show_progress=not quiet)  # a failed try goes
        (out / "bench_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run_result(out) | {"seed": config.seed}


def run_result(out: Path) -> dict:
    """A finished run's judged evaluations: the curve, the last one with its interval and per-prompt counts."""
    judged = [r for r in read_metrics(out) if "eval_judged_success" in r]
    last, record = judged[-1], read_status(out)["judged"]
    seconds = json.loads((out / "bench_seconds.json").read_text())["seconds"] if (out / "bench_seconds.json").is_file() \
        else None
    return {"run": str(out), "success": last["eval_judged_success"], "low": last["eval_judged_success_low"],
            "high": last["eval_judged_success_high"], "start": judged[0]["eval_judged_success"],
            "curve": [[r["step"], r["eval_judged_success"]] for r in judged], "steps": read_status(out)["step"],
            "per_prompt": record["last"]["per_prompt"], "seconds": seconds}


def success_per_prompt(rows: list[dict]) -> dict[int, float]:
    """Judged answers ({"prompt_index", "label"} or {"prompt_index", "judge_error"}, as `evaluate` and the loop
    write them) -> prompt index: the share judged right; answers the judge could not label are left out."""
    counts: dict[int, list[int]] = {}
    for r in rows:
        if "label" in r:
            counts.setdefault(r["prompt_index"], []).append(int(r["label"]))
    return {i: sum(v) / len(v) for i, v in counts.items()}


def paired_by_prompt(a: dict[int, dict[int, float]], b: dict[int, dict[int, float]]) -> dict | None:
    """a - b on the seeds both ran ({seed: {prompt index: success}}, the same held-out prompts and draws within a
    seed): per seed the mean difference over the prompts both judged, and pooled each prompt's difference averaged
    over those seeds, with a normal 95% interval over prompts (the units: the same prompts in every seed). None
    without a seed in common."""
    by_prompt: dict[int, list[float]] = {}
    per_seed = {}
    for seed in sorted(a.keys() & b.keys()):
        d = {i: a[seed][i] - b[seed][i] for i in a[seed].keys() & b[seed].keys()}
        per_seed[seed] = round(statistics.fmean(d.values()), 4)
        for i, x in d.items():
            by_prompt.setdefault(i, []).append(x)
    if not by_prompt:
        return None
    d = [statistics.fmean(v) for v in by_prompt.values()]
    mean = statistics.fmean(d)
    half = Z95 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"diff": mean, "low": mean - half, "high": mean + half, "seeds": per_seed, "prompts": len(d)}


def pooled(results: list[dict], reference: list[dict] | None = None) -> dict:
    """Over seeds: the mean success (and each seed's); against `reference` (runs of the same task, matched by
    seed) the paired difference of paired_by_prompt."""
    out = {"success": statistics.fmean(r["success"] for r in results),
           "seeds": [round(r["success"], 4) for r in results]}
    if reference is not None:
        def by_seed(runs):
            return {r["seed"]: {i: y / m for i, (y, m) in enumerate(r["per_prompt"]) if m} for r in runs}
        out["vs"] = paired_by_prompt(by_seed(results), by_seed(reference))
    return out


def environment(command: list[str]) -> dict:
    """When, where and how a result was made (kept with it, benchmarks/results/)."""
    import torch
    import transformers

    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(command),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def save(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def interval(success: float, low: float, high: float) -> str:
    return f"{success:.3f} [{low:.3f}, {high:.3f}]"


def signed(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
