"""Sampling answers to a prompt file into a JSON-lines file, optionally judged into KTO rows.

Output, one JSON line per sample, in prompt order:
    {"prompt", "completion", "prompt_index", "sample_index", "truncated", <reference column>}
and with a judge also "label" and "judge": the file is then KTO training data (format 1) as it stands.
Samples the judge could not label go to <out stem>.failed.jsonl with the reason ("judge_error").

Resumable: the samples of each prompt are appended as soon as they are done. An interrupted run
keeps them; the same call continues after the last complete prompt, and gives the same file as an
uninterrupted run (kto_lite/generation.py: every sample is seeded on its own). <out stem>.meta.json records the
arguments that decide the samples; a rerun with different ones is refused, never overwritten.
The command line is kto_lite/commands/sample.py.
"""


from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kto_lite.errors import UsageError
from kto_lite.files import write_text
from kto_lite.generation import (
    Loaded,
    ModelSpec,
    Prompts,
    generate_samples,
)
from kto_lite.judges import REFERENCE_COLUMNS, Judge, apply_judge, make_judge
from kto_lite.runs import read_jsonl

EXAMPLE_CHARS = 160
INFORMATIONAL = ("adapter", "prompts")  # paths, spelled in many ways: their contents' hashes are compared  # how much of an example prompt and answer the summary shows


@dataclass
class SampleArgs:
    """What decides the samples (recorded in the meta file; batch_size is not: it changes nothing)."""

    n: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0
    judge: str | None = None
    reference_column: str | None = None
    judge_threshold: float | None = None


def side_files(out: Path) -> tuple[Path, Path]:
    """(meta, failed) next to `out`: samples.jsonl -> samples.meta.json, samples.failed.jsonl."""
    return out.with_suffix(".meta.json"), out.with_suffix(".failed.jsonl")


def sample_to_file(loaded: Loaded, adapter: str | None, prompts: Prompts, out: str | Path, args: SampleArgs, *,
                   batch_size: int = 32, show_progress: bool = True) -> dict:
    """Sample `prompts` with `adapter` (None: the base) into `out`, resuming what is there; return the summary.

    UsageError when `out` holds another job's samples or the judge cannot work on this file.
    """
    out = Path(out)
    judge = build_judge(args, prompts)
    start = resume_point(out, sample_meta(loaded.spec, adapter, prompts, args), args.n)
    failed_path = side_files(out)[1]
    todo = list(range(start, len(prompts.rows)))
    reference_columns = [args.reference_column] if args.reference_column else list(REFERENCE_COLUMNS)
    bar = tqdm(total=len(todo) * args.n, desc="sampling", unit="sample", disable=not show_progress or not todo)
    with loaded.use(adapter) as model, bar:
        samples = generate_samples(
            model, loaded.tokenizer, [prompts.rows[i].prompt for i in todo], n=args.n,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
            batch_size=batch_size, indices=todo, use_chat_template=loaded.use_chat_template, progress=bar)
        for k, completions in samples:
            i = todo[k]
            row = prompts.rows[i]
            keep = {c: row.row[c] for c in reference_columns if c in row.row}
            good, failed = [], []
            for j, sample in enumerate(completions):
                line = {"prompt": row.prompt, "completion": sample.text, "prompt_index": i, "sample_index": j,
                        "truncated": sample.truncated, **keep}
                if judge is None:
                    good.append(line)
                    continue
                label, reason = apply_judge(judge, row.prompt, sample.text, row.row)
                if label is None:
                    failed.append({**line, "judge": judge.spec, "judge_error": reason})
                else:
                    good.append({**line, "label": label, "judge": judge.spec})
            # a prompt is done once all its n rows are in the two files (resume_point)
            _append(failed_path, failed)
            _append(out, good)
    return summarize(out, prompts)


def build_judge(args: SampleArgs, prompts: Prompts) -> Judge | None:
    if args.judge is None:
        if args.reference_column or args.judge_threshold is not None:
            raise UsageError("--reference_column and --judge_threshold need --judge")
        return None
    judge = make_judge(args.judge, reference_column=args.reference_column, threshold=args.judge_threshold)
    judge.check_columns(prompts.columns, prompts.path)
    return judge


def sample_meta(spec: ModelSpec, adapter: str | None, prompts: Prompts, args: SampleArgs) -> dict:
    """Everything that decides the samples (the meta file): model, loading options, adapter, prompts, args."""
    return {"model": spec.model_name, **spec.options, "use_chat_template": spec.use_chat_template,
            "adapter": adapter, "adapter_sha256": _adapter_hash(adapter), "prompts": prompts.path,
            "prompts_sha256": prompts.fingerprint(), **asdict(args)}


def _adapter_hash(adapter: str | None) -> str | None:
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


# --------------------------------------------------------------------------- the files


def resume_point(out: Path, meta: dict, n: int) -> int:
    """The first prompt index to sample. Writes the meta file for a new job; checks it for an old one.

    Rows are appended prompt by prompt (to `out`, or to the failed file when the judge could not label
    them); the first prompt whose n rows are not all there (killed mid-prompt, or a line cut short), and
    anything after it, is removed from both files and sampled again.
    """
    meta_path, failed_path = side_files(out)
    if not out.exists() and not meta_path.exists():
        if out.suffix != ".jsonl":
            raise UsageError(f"--out {out}: the samples are JSON lines; give a .jsonl file name")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        out.touch()
        return 0
    if not meta_path.is_file():
        raise UsageError(f"{out} exists and was not written by `sample` (no {meta_path.name} next to it); "
                             "choose another --out")
    old = json.loads(meta_path.read_text())
    changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in meta.items()
               if old.get(k) != v and k not in INFORMATIONAL]
    if changed:
        raise UsageError(f"{out} holds samples made with other arguments ({'; '.join(changed)}); "
                             "rerun with the same ones to continue, or choose another --out")
    rows = read_jsonl(out) + read_jsonl(failed_path)
    counts: dict[int, int] = {}
    for row in rows:
        counts[row["prompt_index"]] = counts.get(row["prompt_index"], 0) + 1
    start = 0
    while counts.get(start) == n:
        start += 1
    for path in (out, failed_path):  # drop the first incomplete prompt and anything cut short
        kept = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in read_jsonl(path) if r["prompt_index"] < start)
        if path.exists() and path.read_text(encoding="utf-8") != kept:
            write_text(path, kept)
    return start


def _append(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # one write per prompt
        f.flush()


# --------------------------------------------------------------------------- summary


def summarize(out: str | Path, prompts: Prompts | None = None) -> dict:
    """Counts of a samples file (and its failed rows), the desirable share, one example per label."""
    out = Path(out)
    rows, failed = read_jsonl(out), read_jsonl(side_files(out)[1])
    labeled = [r for r in rows if "label" in r]
    desirable = [r for r in labeled if r["label"]]
    undesirable = [r for r in labeled if not r["label"]]
    where = (lambda i: prompts.rows[i].where) if prompts else (lambda i: f"prompt {i + 1}")
    return {
        "out": str(out),
        "samples": len(rows) + len(failed),
        "prompts": len({r["prompt_index"] for r in rows + failed}),
        "truncated": sum(r.get("truncated", False) for r in rows + failed),
        "labeled": len(labeled),
        "desirable": len(desirable),
        "undesirable": len(undesirable),
        "desirable_share": len(desirable) / len(labeled) if labeled else None,
        "examples": {"desirable": desirable[0] if desirable else None,
                     "undesirable": undesirable[0] if undesirable else None},
        "failures": [{"where": where(r["prompt_index"]), "sample_index": r["sample_index"],
                      "reason": r["judge_error"]} for r in failed],
    }


def format_summary(summary: dict, judged: bool) -> str:
    lines = [f"{summary['samples']} samples of {summary['prompts']} prompts in {summary['out']}"]
    if summary["truncated"]:
        lines.append(f"{summary['truncated']} stopped at max_new_tokens before a stop token (raise "
                     "--max_new_tokens if answers are cut)")
    if judged:
        share = summary["desirable_share"]
        lines.append(f"labeled {summary['labeled']}: {summary['desirable']} desirable, {summary['undesirable']} "
                     f"undesirable" + (f" (desirable share {share:.3f})" if share is not None else ""))
        for label, row in summary["examples"].items():
            if row is not None:
                lines.append(f"  {label}: {_short(row['prompt'])} -> {_short(row['completion'])}")
        failures = summary["failures"]
        if failures:
            lines.append(f"the judge could not label {len(failures)} samples (listed with the reason in "
                         f"{side_files(Path(summary['out']))[1].name}):")
            lines += [f"  {f['where']}, sample {f['sample_index']}: {f['reason']}" for f in failures[:10]]
            if len(failures) > 10:
                lines.append(f"  ... and {len(failures) - 10} more")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else value[-1]["content"] if value else ""
    text = json.dumps(text, ensure_ascii=False)
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 4] + '..."'


# --------------------------------------------------------------------------- command line
