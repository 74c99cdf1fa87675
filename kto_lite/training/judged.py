"""Judged success during training: the policy's own sampled answers to held-out prompts, judged.

KTO's metrics (loss, reward margin, z0) say how far the policy moved from its reference, not whether its
answers got better. With `eval_prompts` and `judge` set, the recipe (recipe.py) asks a `JudgedEvaluation`:

    from_config  before the model loads: read the prompts, build the judge, refuse a judge that cannot work on
                 the file's columns (judges.Judge.check_columns)
    begin        before the first optimizer step: the starting point's judged success, logged as step 0 (a
                 resumed run takes its record back from metrics.jsonl instead)
    evaluate     every eval_steps and at the end: the keys of the logged line
    finish       the adapter kept (keep_best: the best evaluation's checkpoint) and why, for status.json

An evaluation samples eval_samples_per_prompt answers to every prompt with the model being trained
(`generation.generate_samples` on the PeftModel: adapters on, eval mode so no LoRA dropout, the KV cache on;
no second copy of the weights; training mode is restored after), judges them (`judges.apply_judge`) and logs

    eval_judged_success        the share of judged answers the judge accepts
    eval_judged_success_low    its 95% interval (judges.clustered_interval: the prompts are clusters)
    eval_judged_success_high
    eval_judge_failures        answers the judge could not label (left out of the share); only when > 0

Common random numbers: answer j to prompt i is drawn with its own generator seeded from (seed, i, j)
(generation.row_seed) at every evaluation, so the same weights always get the same number, and the
difference between two evaluations comes from the weights, not from the draws.

Several processes (DDP): process r samples the prompts i with i mod N = r, and the per-prompt counts are
gathered, so every process holds the same result, and by the seeding above the one a single process gets.

judged_samples.jsonl keeps, for every evaluation, the first answer to each of the first SAMPLES_KEPT
prompts with the judge's verdict: the same prompts every time, so a person sees what the judge rewards
and how the answers change.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from kto_lite.config import TrainConfig
from kto_lite.errors import DataError
from kto_lite.files import write_text
from kto_lite.generation import Prompts, generate_samples, read_prompts
from kto_lite.judges import INTERVAL, Judge, JudgeError, apply_judge, clustered_interval, make_judge
from kto_lite.runs import BEST_CHECKPOINT, RunDir, best_checkpoint, read_jsonl, read_metrics

SAMPLES_KEPT = 4  # prompts whose first answer is kept in judged_samples.jsonl at every evaluation
SAMPLES_FILE = "judged_samples.jsonl"
GENERATION_BATCH = 32  # sequences generated together: as `sample` and `evaluate` default to
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # what keep_best copies into output_dir


@dataclass
class Evaluation:
    """One judged evaluation: the share of judged answers the judge accepts, with its interval."""

    step: int
    success: float | None  # None: the judge labeled nothing
    low: float | None
    high: float | None
    correct: int
    judged: int
    failures: int  # answers the judge could not label
    samples: list[dict] = field(default_factory=list)  # the kept answers with their verdicts
    per_prompt: list[tuple[int, int]] = field(default_factory=list)  # (right, judged) of each prompt, in file order

    def metrics(self) -> dict:
        """The keys of the metrics.jsonl line (none when nothing could be judged)."""
        out = {} if self.success is None else {"eval_judged_success": self.success, "eval_judged_success_low": self.low,
                                               "eval_judged_success_high": self.high}
        return out | ({"eval_judge_failures": self.failures} if self.failures else {})


class JudgedEvaluation:
    """The judged evaluations of one run, and what keep_best and early_stopping_patience decide from them."""

    def __init__(self, config: TrainConfig, prompts: Prompts, judge: Judge, run: RunDir, accelerator,
                 show_progress: bool = True):
        self.config, self.prompts, self.judge, self.run, self.accelerator = config, prompts, judge, run, accelerator
        self.show_progress = show_progress and accelerator.is_local_main_process
        self.history: list[tuple[int, float | None]] = []  # (step, success) of every evaluation so far
        self.best: Evaluation | None = None  # keep_best: the best one, whose checkpoint is kept
        self.last: Evaluation | None = None
        self.seconds = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig, run: RunDir, accelerator, show_progress: bool = True
                    ) -> JudgedEvaluation | None:
        """None without a judge. Raises (DataError, JudgeSpecError: exit 2) for prompts or a judge that cannot
        work, before anything is loaded."""
        if not config.judge:
            return None
        prompts = read_prompts(config.eval_prompts)
        judge = make_judge(config.judge, reference_column=config.reference_column, threshold=config.judge_threshold)
        judge.check_columns(prompts.columns, prompts.path)
        if not prompts.rows:
            raise DataError(f"{prompts.path}: eval_prompts holds no prompt", path=prompts.path)
        return cls(config, prompts, judge, run, accelerator, show_progress)

    # ------------------------------------------------------------------ the recipe's calls
    def begin(self, start: int, model, tokenizer, save_checkpoint: Callable[[int], None]) -> None:
        """Step 0: evaluate the starting point and log it as its own metrics.jsonl line (keep_best also checkpoints
        it: the run may never do better). A resumed run takes its evaluations back from metrics.jsonl."""
        if start > 0:
            self._resume(start)
            return
        evaluation = self._evaluate(0, model, tokenizer)
        line = {"step": 0, "epoch": 0.0, **evaluation.metrics()}
        self.run.log(line)
        self.accelerator.log(line, step=0)  # trackers (report_to); no-op without
        if self.keep_checkpoint(0, total=None):
            save_checkpoint(0)

    def due(self, step: int, total: int) -> bool:
        return step % self.config.eval_steps == 0 or step == total

    def evaluate(self, step: int, model, tokenizer) -> dict:
        """The judged-success keys of step `step`'s metrics line."""
        return self._evaluate(step, model, tokenizer).metrics()

    def keep_checkpoint(self, step: int, total: int | None) -> bool:
        """Whether step `step`'s weights need a checkpoint now (the final one is saved anyway): under keep_best a
        new best, and the last weights of a run that stops early."""
        new_best = self.config.keep_best and self.best is not None and self.best.step == step
        return (new_best or self.stop_early) and step != total

    @property
    def stop_early(self) -> bool:
        """early_stopping_patience evaluations in a row without a better judged success than the best before them."""
        patience = self.config.early_stopping_patience
        return patience is not None and self._since_best() >= patience

    def finish(self) -> dict:
        """status.json's record of the judged evaluation: which step's adapter the run kept, and why. With
        keep_best the best checkpoint's adapter replaces the last one in output_dir (the last stays in checkpoints/)."""
        last_step = self.history[-1][0] if self.history else None
        record = {"evaluations": len(self.history), "seconds": round(self.seconds, 3), "interval": INTERVAL}
        if self.last is not None and self.last.per_prompt:  # paired comparisons of runs (benchmarks/judged_bench.py)
            record["last"] = {"step": self.last.step, "per_prompt": [list(c) for c in self.last.per_prompt]}
        if self.stop_early:
            record["stopped_early"] = {
                "step": last_step, "why": f"no better judged success in {self.config.early_stopping_patience} "
                "evaluation(s) in a row (early_stopping_patience)"}
        if self.config.keep_best and self.best is not None:
            if self.accelerator.is_main_process:
                folder = best_checkpoint(self.run.path)
                if folder is None or folder.name != f"checkpoint-{self.best.step}":
                    raise FileNotFoundError(f"keep_best: the checkpoint of step {self.best.step} is missing from "
                                            f"{self.run.path / 'checkpoints'}")
                for name in ADAPTER_FILES:
                    shutil.copyfile(folder / name, self.run.path / name)
            record["kept"] = {"step": self.best.step, "eval_judged_success": self.best.success,
                              "eval_judged_success_low": self.best.low, "eval_judged_success_high": self.best.high,
                              "why": f"keep_best: the best judged success of {len(self.history)} evaluation(s)"}
        elif last_step is not None:
            record["kept"] = {"step": last_step, "why": "the last step (keep_best is off)"}
        return {"judged": record}

    # ------------------------------------------------------------------ one evaluation
    def _evaluate(self, step: int, model, tokenizer) -> Evaluation:
        started = time.perf_counter()
        self.run.status("running", phase="judged evaluation", step=step)
        per_prompt = gather_object(self._sample_and_judge(model, tokenizer)) if self.accelerator.num_processes > 1 \
            else self._sample_and_judge(model, tokenizer)
        per_prompt.sort(key=lambda r: r["index"])
        counts = [(r["correct"], r["judged"]) for r in per_prompt]
        correct, judged = sum(y for y, _ in counts), sum(m for _, m in counts)
        success = low = high = None
        if judged:
            success = correct / judged
            low, high, _ = clustered_interval(counts)
        evaluation = Evaluation(step, success, low, high, correct, judged,
                                sum(r["failures"] for r in per_prompt), [s for r in per_prompt for s in r["kept"]],
                                counts)
        self._record(evaluation)
        self.seconds += time.perf_counter() - started
        return evaluation

    def _sample_and_judge(self, model, tokenizer) -> list[dict]:
        """This process's share of the prompts: per prompt, how many answers were right, judged, not judged."""
        c, rows = self.config, self.prompts.rows
        mine = list(range(self.accelerator.process_index, len(rows), self.accelerator.num_processes))
        results = []
        bar = tqdm(total=len(mine) * c.eval_samples_per_prompt, desc="judged evaluation", unit="answer",
                   disable=not self.show_progress, leave=False)
        with bar, self.accelerator.autocast():
            samples = generate_samples(
                model, tokenizer, [rows[i].prompt for i in mine], n=c.eval_samples_per_prompt,
                temperature=c.eval_temperature, top_p=c.eval_top_p, max_new_tokens=c.eval_max_new_tokens,
                seed=c.seed, batch_size=GENERATION_BATCH, indices=mine, use_chat_template=c.use_chat_template,
                progress=bar)
            for k, answers in samples:
                i, row = mine[k], rows[mine[k]]
                verdicts = [apply_judge(self.judge, row.prompt, a.text, row.row) for a in answers]
                labels = [label for label, _ in verdicts if label is not None]
                kept = [self._kept_sample(i, row, answers[0].text, *verdicts[0])] if i < SAMPLES_KEPT else []
                results.append({"index": i, "correct": sum(labels), "judged": len(labels),
                                "failures": len(verdicts) - len(labels), "kept": kept})
        return results

    def _kept_sample(self, i: int, row, answer: str, verdict: bool | None, reason: str | None) -> dict:
        sample = {"prompt_index": i, "prompt": row.prompt, "answer": answer, "verdict": verdict}
        if self.judge.needs_reference:
            try:
                sample["reference"] = self.judge.reference(row.row)
            except JudgeError:
                pass
        return sample | ({"judge_error": reason} if reason else {})

    # ------------------------------------------------------------------ the record: best, patience, samples
    def _record(self, evaluation: Evaluation) -> None:
        improved = evaluation.success is not None and (self.best is None or evaluation.success > self.best.success)
        self.history.append((evaluation.step, evaluation.success))
        self.last = evaluation
        if improved:
            self.best = evaluation
            if self.config.keep_best and self.accelerator.is_main_process:  # protected from save_total_limit
                write_text(self.run.path / BEST_CHECKPOINT, json.dumps(  # whole or not at all (files.py)
                    {"step": evaluation.step, "eval_judged_success": evaluation.success}) + "\n")
        if self.accelerator.is_main_process:
            with open(self.run.path / SAMPLES_FILE, "a", encoding="utf-8") as f:
                for sample in evaluation.samples:
                    f.write(json.dumps({"step": evaluation.step, **sample}, ensure_ascii=False) + "\n")

    def _since_best(self) -> int:
        """Evaluations after the best one (all of them when none judged anything)."""
        if self.best is None:
            return len(self.history)
        return len(self.history) - 1 - [step for step, _ in self.history].index(self.best.step)

    def _resume(self, start: int) -> None:
        """The evaluations up to `start` from metrics.jsonl (already cut after `start`); later kept samples go."""
        for row in read_metrics(self.run.path):
            if "eval_judged_success" in row and row["step"] <= start:
                evaluation = Evaluation(row["step"], row["eval_judged_success"], row.get("eval_judged_success_low"),
                                        row.get("eval_judged_success_high"), 0, 0, 0)
                self.history.append((evaluation.step, evaluation.success))
                if self.best is None or evaluation.success > self.best.success:
                    self.best = evaluation
        path = self.run.path / SAMPLES_FILE
        if self.accelerator.is_main_process and path.is_file():
            kept = [row for row in read_jsonl(path) if row["step"] <= start]
            write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))


def summary_lines(rows: list[dict], result: dict) -> list[str]:
    """recipe.summary's lines about the judged evaluation: first -> last judged success, and the step kept."""
    judged = [r for r in rows if "eval_judged_success" in r]
    record = result.get("judged")
    if not judged or not record:
        return []
    first, last = judged[0], judged[-1]
    lines = [f"  judged success {first['eval_judged_success']:.3f} -> {last['eval_judged_success']:.3f}  "
             f"(step {first['step']} -> {last['step']}, {len(judged)} evaluations)"]
    kept = record.get("kept")
    if kept and "eval_judged_success" in kept:
        lines.append(f"  kept           step {kept['step']}: judged success {kept['eval_judged_success']:.3f} "
                     f"[{kept['eval_judged_success_low']:.3f}, {kept['eval_judged_success_high']:.3f}], "
                     f"the best of {record['evaluations']} (keep_best)")
    if record.get("stopped_early"):
        lines.append(f"  stopped early  at step {record['stopped_early']['step']}: "
                     f"{record['stopped_early']['why']}")
    return lines


def judged_samples(output_dir: str | Path) -> list[dict]:
    """The kept answers of every evaluation of a run (judged_samples.jsonl), oldest first; [] without any."""
    return read_jsonl(Path(output_dir) / SAMPLES_FILE)

