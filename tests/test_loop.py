"""The loop on the demo task: a second round beats the first, a round on reversed labels makes things worse,
every round is a run folder, and an interrupted loop continues where it stopped.

Sizes: 200 training questions x 4 samples, one epoch per round (50 optimizer steps), 400 held-out
questions x 4 samples. Every round is evaluated with the same seed (common random numbers), so a round
that changed nothing would reproduce the previous round's samples and accuracy exactly.

The margins (docs/loop.md, "The demo task, measured", has the table): at seed 0, the default,
chosen before measuring, the base is at 0.504, round 1 at 0.546, round 2 at 0.619 and a reversed round
at 0.450; rerun with 2 threads (another float summation order) the numbers were identical. Across seeds
0-4 round 1 gained +0.034..+0.077 and the reversed round lost 0.054..0.079; round 2 gained
+0.004..+0.073 over round 1 (a second round stalls in one seed of five), hence the pinned seed. The
tests ask for +0.02 per round and -0.02 for the reversed round: a round that learned nothing gives
exactly 0 (common random numbers), and the evaluation's noise on a difference is about 0.01 (measured
with evaluation seeds 0-4).
"""

import json
import sys
from pathlib import Path

import pytest

import kto_lite.training.recipe
from kto_lite.commands.loop import main as loop_main
from kto_lite.config import TrainConfig
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.errors import UsageError
from kto_lite.feedback.loop import LoopArgs, run_loop
from kto_lite.feedback.sample import SampleArgs
from kto_lite.generation import model_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import demo_task  # noqa: E402

SEED = 0
MARGIN = 0.02
REVERSED = f"python:{ROOT / 'recipes' / 'demo_task.py'}:reversed_judge"


def config(output_dir: Path) -> TrainConfig:
    """The demo recipe's settings (recipes/demo.py), one epoch per round."""
    return TrainConfig(model=str(DEMO_MODEL_DIR), output_dir=str(output_dir), num_epochs=1, load_in_4bit=False,
                       learning_rate=3e-4, beta=0.5,
                       gradient_checkpointing=False, batch_size=8, gradient_accumulation_steps=2, max_length=64,
                       max_prompt_length=32, desirable_weight="auto", undesirable_weight="auto", save_steps=0,
                       seed=SEED)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    return (str(demo_task.write_prompts(folder / "train.jsonl", 200, seed=SEED, split="train")),
            str(demo_task.write_prompts(folder / "eval.jsonl", 400, seed=SEED + 1, split="eval")))


def loop_args(prompts, rounds: int, judge: str = "exact", **kwargs) -> LoopArgs:
    """The demo setup of docs/loop.md, measured at the same rate every round (as recipes/demo.py trains)."""
    sampling = SampleArgs(n=4, judge=judge, **demo_task.SAMPLING)
    return LoopArgs(rounds, *prompts, sampling, eval_n=4, sample_batch_size=64, eval_judge="exact",
                    **{"learning_rate_decay": 1.0, **kwargs})


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, prompts):
    """Two rounds, the first attempt failing in round 2's training; the rerun continues from there."""
    out = tmp_path_factory.mktemp("loop") / "run"
    trained = []
    real_train = kto_lite.training.recipe.train

    def failing_in_round_2(config, **kwargs):
        trained.append(Path(config.output_dir).name)
        if Path(config.output_dir).name == "round-2" and trained.count("round-2") == 1:
            raise RuntimeError("simulated crash")
        return real_train(config, **kwargs)

    kto_lite.training.recipe.train = failing_in_round_2
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_loop(config(out), loop_args(prompts, 2), show_progress=False)
        assert (out / "round-1" / "round.json").is_file() and not (out / "round-2" / "round.json").exists()
        table = run_loop(config(out), loop_args(prompts, 2), show_progress=False)
    finally:
        kto_lite.training.recipe.train = real_train
    assert trained == ["round-1", "round-2", "round-2"]  # round 1 was kept, not trained again
    return out, table


@pytest.mark.slow
def test_a_second_round_beats_the_first(two_rounds):
    _, table = two_rounds
    base, first, second = (row["accuracy"] for row in table)
    assert 0.4 <= base <= 0.6  # the demo model is right about half the time
    assert first >= base + MARGIN, table
    assert second >= first + MARGIN, table
    # the second round samples from the first round's adapter, which answers right more often
    assert table[2]["desirable_share"] > table[1]["desirable_share"]


@pytest.mark.slow
def test_every_round_is_a_run_folder(two_rounds):
    out, table = two_rounds
    for r in (1, 2):
        folder = out / f"round-{r}"
        assert json.loads((folder / "status.json").read_text())["status"] == "finished"
        for name in ("adapter_model.safetensors", "metrics.jsonl", "config.yaml", "samples.jsonl",
                     "eval_samples.jsonl", "round.json"):
            assert (folder / name).is_file(), name
        settings = TrainConfig.load(folder / "config.yaml")
        assert Path(settings.data) == folder / "samples.jsonl"  # the data moved in with the run
        meta = json.loads((folder / "samples.meta.json").read_text())
        assert meta["seed"] == SEED + r and meta["n"] == 4
        assert model_spec(None, [str(folder)]).model_name == str(DEMO_MODEL_DIR)  # chat/export find the base
    assert TrainConfig.load(out / "round-2" / "config.yaml").init_adapter == str(out / "round-1")
    assert json.loads((out / "round-2" / "samples.meta.json").read_text())["adapter"] == str(out / "round-1")
    assert not list(out.glob(".round-*"))  # no staging folder left behind
    assert json.loads((out / "rounds.json").read_text()) == table


@pytest.mark.slow
def test_a_finished_loop_is_kept_and_other_settings_are_refused(two_rounds, prompts, monkeypatch):
    out, table = two_rounds
    monkeypatch.setattr(kto_lite.training.recipe, "train", lambda *a, **k: pytest.fail("a finished round trained again"))
    assert run_loop(config(out), loop_args(prompts, 2), show_progress=False) == table
    with pytest.raises(UsageError, match="other settings .*sampling"):
        run_loop(config(out), loop_args(prompts, 2, judge="number"), show_progress=False)


@pytest.mark.slow
def test_a_round_on_reversed_labels_makes_things_worse(tmp_path, prompts):
    table = run_loop(config(tmp_path / "run"), loop_args(prompts, 1, judge=REVERSED), show_progress=False)
    base, reversed_round = table[0]["accuracy"], table[1]["accuracy"]
    assert reversed_round <= base - MARGIN, table
    # the labels were flipped: the share of "desirable" samples is the share of wrong answers
    rows = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert all(r["label"] != demo_task.judge(r["prompt"], r["completion"]) for r in rows)


@pytest.mark.parametrize(
    ("yaml", "extra", "message"),
    [
        ("data: x.jsonl\n", [], "`data` is made by the loop"),
        ("", ["--data", "x.jsonl"], "--data: did you mean --eval_data?"),
        ("reference: previous\n", [], "reference must be one of"),
        ("", ["--rounds", "0"], "at least 1"),
        ("", ["--learning_rate_decay", "0"], "learning_rate_decay must be in"),
        ("", ["--judge", "nope"], "unknown judge"),
        ("", ["--judge", "exact", "--reference_column", "gold"], "no column 'gold'"),
        ("lerning_rate: 1e-4\n", [], "did you mean 'learning_rate'"),
    ],
)
def test_usage_errors_exit_2(tmp_path, prompts, capsys, yaml, extra, message):
    (tmp_path / "c.yaml").write_text(yaml + f"output_dir: {tmp_path / 'run'}\n")
    argv = [str(tmp_path / "c.yaml"), "--rounds", "1", "--prompts", prompts[0], "--eval_prompts", prompts[1],
            "--judge", "exact", *extra]
    try:
        code = loop_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_judge_is_required(prompts):
    with pytest.raises(SystemExit) as exit_info:
        loop_main(["--rounds", "1", "--prompts", prompts[0], "--eval_prompts", prompts[1]])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_the_command_line_runs_rounds_with_the_reference_it_is_given(tmp_path, capsys):
    train = demo_task.write_prompts(tmp_path / "train.jsonl", 16, seed=1)
    heldout = demo_task.write_prompts(tmp_path / "eval.jsonl", 8, seed=2, split="eval")
    (tmp_path / "c.yaml").write_text(f"output_dir: {tmp_path / 'run'}\nreference: init_adapter\nmax_steps: 2\n"
                                     "load_in_4bit: false\ngradient_checkpointing: false\nbatch_size: 4\n"
                                     "save_steps: 0\n")
    argv = [str(tmp_path / "c.yaml"), "--rounds", "2", "--prompts", str(train), "--eval_prompts", str(heldout),
            "--judge", "exact", "--n", "2", "--eval_n", "1", "--max_new_tokens", "16", "--seed", "3"]
    assert loop_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out if line.startswith("round ")] == [["round", "0"], ["round", "1"],
                                                                              ["round", "2"]]
    first, second = (TrainConfig.load(tmp_path / "run" / f"round-{r}" / "config.yaml") for r in (1, 2))
    assert first.reference == "base" and first.init_adapter is None and first.seed == 3
    assert first.learning_rate == TrainConfig().resolved().learning_rate  # the demo model's own rate...
    assert second.learning_rate == pytest.approx(first.learning_rate / 2)  # ...halved in round 2 (the default)
    rounds = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert [r.get("learning_rate") for r in rounds] == [None, first.learning_rate, second.learning_rate]
    assert second.reference == "init_adapter" and second.init_adapter == str(tmp_path / "run" / "round-1")
    meta = json.loads((tmp_path / "run" / "round-2" / "samples.meta.json").read_text())
    assert meta["seed"] == 5 and meta["temperature"] == 0.7 and meta["max_new_tokens"] == 16  # seed + round
