"""The feedback loop: rounds of sample -> judge -> train -> evaluate, one run folder per round.

Round r (1, 2, ...):
1. sample --n answers to every training prompt with the current policy: round 1 the base (or the
   config's init_adapter), round r the adapter of round r-1; the seed is `seed + r`, so each round
   draws fresh samples;
2. judge them into KTO rows (label = the judge's verdict);
3. train round r from the previous round's adapter (config field init_adapter; `reference` says
   whether KL is measured against the base or against that adapter, docs/loop.md), at the config's
   learning rate x learning_rate_decay^(r-1) (default 0.5: halved every round, measured in docs/loop.md);
4. evaluate the new adapter on the held-out prompts (seed `seed`, the same for every round and for
   the base, so the rounds are compared on common random numbers). The round's training itself judges
   the same prompts with the same draws at step 0, every eval_steps and at the end (training/judged.py):
   its metrics.jsonl shows how judged success moved within the round (docs/loop.md: what that costs).

<output_dir>/round-r/ is a normal run folder (adapter, metrics.jsonl, config.yaml, status.json) that
also holds samples.jsonl (the round's training data), eval_samples.jsonl and round.json (its line of the
table). <output_dir>/loop.json records the arguments; rerunning the same loop continues where it
stopped (finished rounds are kept, a round's sampling and training resume), and `--rounds` may grow.
The command line is kto_lite/commands/loop.py.
"""


from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from kto_lite.config import TrainConfig
from kto_lite.errors import UsageError
from kto_lite.feedback.evaluate import evaluate_one
from kto_lite.feedback.sample import (
    SampleArgs,
    build_judge,
    sample_to_file,
    side_files,
    summarize,
)
from kto_lite.files import write_text
from kto_lite.generation import LOAD_OPTIONS, Loaded, Prompts, load_models, model_spec, read_prompts
from kto_lite.judges import Judge
from kto_lite.runs import checkpoints, read_status
from kto_lite.training import recipe

# A round after the first trains at this fraction of the previous round's learning rate (`LoopArgs`,
# docs/loop.md "Learning rate across rounds": measured on SmolLM2, the same rate again added nothing,
# half of it +0.08 on held-out phrasings of the practised sums). The app's "Train the next round" too.
LEARNING_RATE_DECAY = 0.5


class LoopStopped(RuntimeError):
    """Training of a round stopped before it finished (Ctrl-C, SIGTERM): rerun to continue."""


@dataclass
class LoopArgs:
    rounds: int
    prompts: str
    eval_prompts: str
    sampling: SampleArgs  # judge, n, temperature, ... (seed: set per round from the config's seed)
    eval_n: int
    sample_batch_size: int = 32
    eval_judge: str | None = None  # None: the sampling judge
    # base | init_adapter, for rounds that start from an adapter (None: the config's `reference`). Here,
    # not only in the config, because a config cannot say init_adapter before there is an adapter.
    reference: str | None = None
    learning_rate_decay: float = LEARNING_RATE_DECAY  # round r trains at the config's learning rate x this^(r-1)


def round_dir(config: TrainConfig, r: int) -> Path:
    return Path(config.output_dir) / f"round-{r}"


def run_loop(config: TrainConfig, args: LoopArgs, *, show_progress: bool = True, echo=print) -> list[dict]:
    """Run (or continue) the rounds; `echo` gets one line per round. Returns the rows of the table."""
    train_prompts, eval_prompts = read_prompts(args.prompts), read_prompts(args.eval_prompts)
    build_judge(args.sampling, train_prompts)  # refuse a bad spec or a missing reference column now
    judge = build_judge(_eval_args(config, args), eval_prompts)
    _check_loop_folder(config, args, train_prompts, eval_prompts)
    state = _Models(config)
    table = [_base_row(config, args, state, eval_prompts, judge, show_progress)]
    echo(format_row(table[0]))
    for r in range(1, args.rounds + 1):
        table.append(_round(config, args, r, state, train_prompts, eval_prompts, judge, show_progress))
        echo(format_row(table[-1]))
    state.free()
    write_text(Path(config.output_dir) / "rounds.json", json.dumps(table, indent=1) + "\n")
    return table


# --------------------------------------------------------------------------- one round


def _round(config: TrainConfig, args: LoopArgs, r: int, state: _Models, train_prompts: Prompts,
           eval_prompts: Prompts, judge: Judge, show_progress: bool) -> dict:
    """Sample, judge, train and evaluate round r, or continue it; its row of the table."""
    folder = round_dir(config, r)
    if (folder / "round.json").is_file():
        return json.loads((folder / "round.json").read_text())
    previous = str(round_dir(config, r - 1)) if r > 1 else config.init_adapter
    reference = _reference(config, args, previous)
    learning_rate = round_learning_rate(config, r, args.learning_rate_decay)
    staging = Path(config.output_dir) / f".round-{r}-samples"  # train() wants output_dir to itself
    seconds: dict[str, float] = {}
    if not _trained(folder):
        start = time.perf_counter()
        sampling = dataclasses.replace(args.sampling, seed=config.seed + r)  # fresh draws every round
        sample_to_file(state.get(previous), previous, train_prompts, staging / "samples.jsonl", sampling,
                       batch_size=args.sample_batch_size, show_progress=show_progress)
        seconds["sample"] = time.perf_counter() - start
        state.free()  # training loads its own copy of the base
        start = time.perf_counter()
        _train_round(config, folder, staging / "samples.jsonl", previous, reference, learning_rate,
                     _judged_evaluation(config, args), show_progress)
        seconds["train"] = time.perf_counter() - start
        _move_samples(staging, folder)
    start = time.perf_counter()
    result, rows = evaluate_one(state.get(str(folder)), str(folder), eval_prompts, judge, _eval_args(config, args),
                                batch_size=args.sample_batch_size, show_progress=show_progress)
    _write_jsonl(folder / "eval_samples.jsonl", rows)
    seconds["evaluate"] = time.perf_counter() - start
    summary = summarize(folder / "samples.jsonl")
    record = {"round": r, "adapter": str(folder), "init_adapter": previous, "reference": reference,
              "learning_rate": learning_rate,
              **_result_fields(result), "samples": summary["samples"], "desirable": summary["desirable"],
              "desirable_share": summary["desirable_share"], "judge_failures_in_samples": len(summary["failures"]),
              "seconds": seconds}  # this invocation's: a round continued after a crash shows the rest only
    write_text(folder / "round.json", json.dumps(record, indent=1) + "\n")
    return record


def _base_row(config: TrainConfig, args: LoopArgs, state: _Models, eval_prompts: Prompts, judge: Judge,
              show_progress: bool) -> dict:
    """Round 0: the starting policy (the base, or the config's init_adapter) on the held-out prompts."""
    path = Path(config.output_dir) / "round-0.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result, rows = evaluate_one(state.get(config.init_adapter), config.init_adapter, eval_prompts, judge,
                                _eval_args(config, args), batch_size=args.sample_batch_size,
                                show_progress=show_progress)
    _write_jsonl(Path(config.output_dir) / "round-0.eval_samples.jsonl", rows)
    record = {"round": 0, "adapter": config.init_adapter, **_result_fields(result),
              "seconds": {"evaluate": time.perf_counter() - start}}
    write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def _train_round(config: TrainConfig, folder: Path, samples: Path, previous: str | None, reference: str,
                 learning_rate: float, judged: dict, show_progress: bool):

    resume = folder.exists() and bool(checkpoints(folder))
    round_config = dataclasses.replace(
        config, data=str(samples), output_dir=str(folder), init_adapter=previous,
        reference=reference, learning_rate=learning_rate, resume_from_checkpoint=resume,
        overwrite_output_dir=folder.exists() and not resume,  # a round that failed before its first checkpoint
        **judged)
    recipe.train(round_config, show_progress=show_progress)  # through the module: tests stand in for it
    status = read_status(folder) or {}
    if status.get("status") != "finished":
        raise LoopStopped(f"training of {folder.name} {status.get('status', 'stopped')} at step "
                          f"{status.get('step', '?')}; rerun the same command to continue")


def _judged_evaluation(config: TrainConfig, args: LoopArgs) -> dict:
    """The round's judged evaluation (training/judged.py): the held-out prompts, judge, sampling and seed of the
    loop's own evaluation, so each round's metrics.jsonl shows its judged success from step 0 and its last
    evaluation draws the answers the round's row is computed from."""
    eval_args = _eval_args(config, args)
    return dict(eval_prompts=args.eval_prompts, judge=eval_args.judge, reference_column=eval_args.reference_column,
                judge_threshold=eval_args.judge_threshold, eval_samples_per_prompt=eval_args.n,
                eval_temperature=eval_args.temperature, eval_top_p=eval_args.top_p,
                eval_max_new_tokens=eval_args.max_new_tokens)


def round_learning_rate(config: TrainConfig, r: int, decay: float = LEARNING_RATE_DECAY) -> float:
    """Round r's learning rate: the config's (or its model's default) x decay^(r-1). Also the app's next round."""
    return config.resolved().learning_rate * decay ** (r - 1)


def _reference(config: TrainConfig, args: LoopArgs, previous: str | None) -> str:
    if not previous:
        return "base"  # round 1 from the base has no adapter to refer to
    return args.reference or config.reference


def _trained(folder: Path) -> bool:
    return (read_status(folder) or {}).get("status") == "finished" and (folder / "samples.jsonl").is_file()


def _move_samples(staging: Path, folder: Path) -> None:
    """The round's samples join its run folder; config.yaml's `data` follows them."""
    for path in (staging / "samples.jsonl", *side_files(staging / "samples.jsonl")):
        if path.exists():
            shutil.move(str(path), str(folder / path.name))
    shutil.rmtree(staging, ignore_errors=True)
    config_file = folder / "config.yaml"
    if config_file.is_file():
        values = yaml.safe_load(config_file.read_text())
        values["data"] = str(folder / "samples.jsonl")
        write_text(config_file, yaml.safe_dump(values, sort_keys=False))


def _eval_args(config: TrainConfig, args: LoopArgs) -> SampleArgs:
    return dataclasses.replace(args.sampling, n=args.eval_n, seed=config.seed,
                               judge=args.eval_judge or args.sampling.judge)


def _result_fields(result) -> dict:
    return {"accuracy": result.accuracy, "low": result.low, "high": result.high, "judged": result.judged,
            "eval_judge_failures": result.judge_failures}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def format_row(row: dict) -> str:
    name = "round 0 (start)" if row["round"] == 0 else f"round {row['round']}"
    accuracy = "accuracy -" if row["accuracy"] is None else \
        f"accuracy {row['accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
    share = ""
    if row["round"] > 0:
        share = "desirable share -" if row["desirable_share"] is None else \
            f"desirable share {row['desirable_share']:.3f} of {row['samples']} samples"
    seconds = sum(row["seconds"].values())
    return f"{name:<16} {accuracy:<34} {share:<42} {seconds:7.0f} s"


# --------------------------------------------------------------------------- models and folders


class _Models:
    """At most one loaded base (with the adapters it needs) at a time; freed before training."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.loaded: Loaded | None = None
        self.adapters: tuple[str, ...] = ()

    def get(self, adapter: str | None) -> Loaded:
        if self.loaded is not None and (adapter is None or adapter in self.adapters):
            return self.loaded
        self.free()
        self.adapters = (adapter,) if adapter else ()
        c = self.config  # loaded and encoded as training loads and encodes
        spec = model_spec(c.model, list(self.adapters), **{name: getattr(c, name) for name in LOAD_OPTIONS})
        spec.use_chat_template = c.use_chat_template
        self.loaded = load_models(spec)
        return self.loaded

    def free(self) -> None:
        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_loop_folder(config: TrainConfig, args: LoopArgs, train_prompts: Prompts, eval_prompts: Prompts):
    """A new folder gets loop.json; an old one must hold a loop with the same arguments (except rounds)."""
    out = Path(config.output_dir)
    meta = {"config": {k: v for k, v in config.to_dict().items() if k not in ("resume_from_checkpoint",
                                                                           "overwrite_output_dir")},
            "prompts_sha256": train_prompts.fingerprint(), "eval_prompts_sha256": eval_prompts.fingerprint(),
            "sampling": asdict(args.sampling), "eval_n": args.eval_n, "eval_judge": args.eval_judge,
            "reference": args.reference, "learning_rate_decay": args.learning_rate_decay}
    path = out / "loop.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(meta) | set(old) if old.get(k) != meta.get(k))
        if changed:
            raise UsageError(f"{out} holds a loop run with other settings ({', '.join(changed)} differ); "
                                 "rerun with the same ones to continue, or choose another --output_dir")
        return
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"output_dir {out} is not empty and holds no loop (no loop.json); choose another "
                             "--output_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(meta, indent=1) + "\n")
