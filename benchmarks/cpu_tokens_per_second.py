"""Training throughput on this CPU, for the app's "expected minutes" (kto_lite/presets.py reads the result).

For each model: one epoch of `python -m kto_lite train` (the command the app starts, every default
except the epoch count) on the first --rows examples of its guided-start data, timed from outside
(the process's wall time) and from inside (status.json's "timing": the reference pass and the
training steps). What the app needs from it:

    tokens_per_second   tokens of the epoch's examples / (reference pass + training) seconds
    startup_seconds     the rest of the wall time: Python, imports, loading the model and the data
    tokens_per_char     tokens per character of prompt + completion text (the tokenizer alone)
    template_tokens     tokens the chat template adds per example (role markers, a default system turn)

so that a run of R examples with C characters takes about
startup + epochs * (R * template_tokens + C * tokens_per_char) / tokens_per_second.

    OMP_NUM_THREADS=2 python benchmarks/cpu_tokens_per_second.py --rows 96  # both models, ~5 min on 2 idle cores
    OMP_NUM_THREADS=1 python benchmarks/cpu_tokens_per_second.py --rows 96  # one thread: when the cores are shared

Run it alone on the machine: the numbers are the machine's. Two threads on two cores that other work
also uses are far slower than one (each parallel region waits for a thread that is not running: 6-10
tokens/s for SmolLM2 against 52 with one thread, measured side by side); the results file says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kto_lite.data import load_data, tokenize  # noqa: E402
from kto_lite.model import load_tokenizer, resolve_model  # noqa: E402
from kto_lite.presets import GUIDED_STARTS, local_source  # noqa: E402
from kto_lite.runs import read_status  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpu_tokens_per_second.json"


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(str(m.get("content", "")) for m in content)
    return str(content)


def text_stats(model: str, data: Path, rows: int) -> dict:
    """Characters and tokens of the first `rows` examples: raw text, and as training tokenizes them."""
    examples = load_data(data)[0][:rows]
    tokenizer = load_tokenizer(resolve_model(model or None))
    chars = sum(len(_text(ex.prompt)) + len(_text(ex.completion)) for ex in examples)
    raw = sum(len(tokenizer(_text(ex.prompt) + _text(ex.completion), add_special_tokens=False)["input_ids"])
              for ex in examples)
    trained = sum(len(t.prompt_ids) + len(t.completion_ids)
                  for t in tokenize(examples, tokenizer, max_length=None, max_prompt_length=None))
    return {"examples": len(examples), "chars": chars, "raw_tokens": raw, "tokens": trained,
            "tokens_per_char": raw / chars, "template_tokens": (trained - raw) / len(examples)}


def train_once(model: str, data: Path, rows: int, work: Path) -> dict:
    """One epoch on the first `rows` examples, as the app starts it; wall time and the trainer's timing."""
    subset = work / f"{Path(model or 'demo').name}-{rows}.jsonl"
    subset.write_text("".join(data.read_text().splitlines(keepends=True)[:rows]))
    out = work / f"run-{Path(model or 'demo').name}"
    argv = [sys.executable, "-m", "kto_lite", "train", "--data", str(subset), "--output_dir", str(out),
            "--num_epochs", "1"] + (["--model", model] if model else [])
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    status = read_status(out)
    timing = status["timing"]
    busy = timing["reference_seconds"] + timing["train_seconds"]
    return {"command": " ".join(argv[1:]), "wall_seconds": round(wall, 1), "steps": status["step"],
            "reference_seconds": timing["reference_seconds"], "train_seconds": timing["train_seconds"],
            "trained_tokens": timing["tokens"], "startup_seconds": round(wall - busy, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[start.model for start in GUIDED_STARTS.values()],
                        help="models to time ('' is the built-in demo model)")
    parser.add_argument("--rows", type=int, default=160, help="examples trained on (one epoch)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    data_of = {start.model: start.data for start in GUIDED_STARTS.values()}
    load_before = os.getloadavg()
    measured = {}
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            source = local_source(model) if model else ""
            stats = text_stats(source, data_of[model], args.rows)
            run = train_once(source, data_of[model], args.rows, Path(work))
            # the epoch's tokens as training counts them (examples' non-padding tokens), per second of work
            speed = run["trained_tokens"] / (run["reference_seconds"] + run["train_seconds"])
            measured[model] = {"source": source, "tokens_per_second": round(speed, 1),
                               "startup_seconds": run["startup_seconds"],
                               "tokens_per_char": round(stats["tokens_per_char"], 4),
                               "template_tokens": round(stats["template_tokens"], 1), "run": run, "text": stats}
            print(f"{model or 'demo'}: {speed:.0f} tokens/s, startup {run['startup_seconds']:.0f} s", flush=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python "
                   f"benchmarks/cpu_tokens_per_second.py --rows {args.rows}",
        "models": measured,
    }
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
