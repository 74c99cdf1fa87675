"""python -m kto_lite sample: seeded sampling that does not depend on the batch size, resuming after a real
kill, refusing to mix arguments, judged rows that are training data, and the exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kto_lite.commands.sample import main as sample_main
from kto_lite.data import load_data
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.generation import generate_samples, load_models, model_spec, read_prompts, row_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import demo_task  # noqa: E402

ARGS = ["--load_in_4bit", "false", "--temperature", "1", "--top_p", "0.95", "--max_new_tokens", "16"]


@pytest.fixture(scope="module")
def demo():
    return load_models(model_spec(str(DEMO_MODEL_DIR), load_in_4bit=False))


@pytest.fixture
def prompts(tmp_path):
    return demo_task.write_prompts(tmp_path / "prompts.jsonl", 12, seed=3, split="eval")


def exit_code(argv):
    """The command's exit code, whether it returns it or argparse exits with it."""
    try:
        return sample_main(argv)
    except SystemExit as e:
        return e.code


def texts(demo, prompts, **kwargs):
    out = generate_samples(demo.model, demo.tokenizer, prompts, temperature=1.0, top_p=0.95, max_new_tokens=16,
                           **kwargs)
    return [(k, [s.text for s in samples]) for k, samples in out]


def test_samples_do_not_depend_on_batch_size_or_on_resuming(demo):
    prompts = demo_task.make_prompts(10, seed=0)
    reference = texts(demo, prompts, n=3, seed=7, batch_size=64)
    assert [k for k, _ in reference] == list(range(10))
    for batch_size in (1, 4, 7):  # 7: a batch ends inside a prompt's samples
        assert texts(demo, prompts, n=3, seed=7, batch_size=batch_size) == reference
    # resuming at prompt 6: the same samples, because each is seeded by its prompt's index in the file
    rest = texts(demo, prompts[6:], n=3, seed=7, batch_size=5, indices=list(range(6, 10)))
    assert [s for _, s in rest] == [s for _, s in reference[6:]]
    assert texts(demo, prompts, n=3, seed=8, batch_size=64) != reference
    # samples differ within a prompt (each has its own generator), so n samples are n draws
    assert any(len(set(s)) > 1 for _, s in reference)


def test_greedy_is_deterministic_and_samples_follow_the_model(demo):
    prompts = demo_task.make_prompts(16, seed=1, split="eval")
    out = generate_samples(demo.model, demo.tokenizer, prompts, n=2, temperature=0, max_new_tokens=16)
    greedy = [[s.text for s in samples] for _, samples in out]
    assert all(a == b for a, b in greedy)  # greedy: both samples alike
    assert sum(demo_task.judge(p, g[0]) for p, g in zip(prompts, greedy)) >= 13  # the demo's mode is right


def test_row_seeds_are_distinct():
    seeds = {row_seed(s, i, j) for s in range(3) for i in range(50) for j in range(8)}
    assert len(seeds) == 3 * 50 * 8


def test_judged_samples_are_kto_training_data(tmp_path, prompts, capsys):
    out = tmp_path / "samples.jsonl"
    assert sample_main(["--prompts", str(prompts), "--n", "3", "--judge", "exact", "--out", str(out), *ARGS]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 36 and [r["prompt_index"] for r in rows] == [i for i in range(12) for _ in range(3)]
    assert all(r["label"] == demo_task.judge(r["prompt"], r["completion"]) for r in rows)
    assert all(r["answer"] == demo_task.reference_answer(r["prompt"]) for r in rows)  # the reference is kept
    examples, report = load_data(out)
    assert len(examples) == 36 and report.n_desirable == sum(r["label"] for r in rows)
    printed = capsys.readouterr().out
    share = sum(r["label"] for r in rows) / 36
    assert f"desirable share {share:.3f}" in printed and "desirable: " in printed and "undesirable: " in printed


def test_rows_the_judge_fails_on_are_set_aside_with_the_reason(tmp_path, capsys):
    rows = [{"prompt": "What is 1 + 2?", "answer": "1 + 2 = 3."}, {"prompt": "What is 2 + 2?"},
            {"prompt": "What is 3 + 2?", "answer": "3 + 2 = 5."}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.jsonl"
    assert sample_main(["--prompts", str(prompts), "--n", "2", "--judge", "exact", "--out", str(out), *ARGS]) == 0
    assert [json.loads(line)["prompt_index"] for line in out.read_text().splitlines()] == [0, 0, 2, 2]
    failed = [json.loads(line) for line in (tmp_path / "s.failed.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in failed] == [(1, 0), (1, 1)]
    assert "reference answer" in failed[0]["judge_error"]
    printed = capsys.readouterr().out
    assert "could not label 2 samples" in printed and "line 2, sample 0:" in printed


@pytest.mark.slow
def test_resumes_after_a_real_kill_to_the_same_file(tmp_path):
    prompts = demo_task.write_prompts(tmp_path / "prompts.jsonl", 60, seed=0)
    command = ["--prompts", str(prompts), "--n", "2", "--seed", "3", "--judge", "exact", *ARGS]
    whole = tmp_path / "whole.jsonl"
    assert sample_main([*command, "--out", str(whole), "--batch_size", "32"]) == 0

    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "kto_lite", "sample", *command, "--out", str(killed),
                                "--batch_size", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if killed.is_file() and killed.read_text().count("\n") >= 10:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = killed.read_text()
    assert 10 <= partial.count("\n") < 120  # killed mid-way: some of the 120 rows, not all

    with killed.open("a") as f:  # as if the kill had also cut a line short, inside the next prompt
        f.write(whole.read_text().splitlines()[partial.count("\n")][:25])
    assert sample_main([*command, "--out", str(killed), "--batch_size", "5"]) == 0
    assert killed.read_text() == whole.read_text()


def test_a_rerun_with_other_arguments_is_refused_and_the_file_kept(tmp_path, prompts, capsys):
    out = tmp_path / "s.jsonl"
    assert sample_main(["--prompts", str(prompts), "--n", "2", "--out", str(out), *ARGS]) == 0
    before = out.read_text()
    assert sample_main(["--prompts", str(prompts), "--n", "2", "--seed", "1", "--out", str(out), *ARGS]) == 2
    assert "seed: 0 then, 1 now" in capsys.readouterr().err
    assert out.read_text() == before
    # the same arguments: nothing left to do, nothing changed
    assert sample_main(["--prompts", str(prompts), "--n", "2", "--out", str(out), "--batch_size", "3", *ARGS]) == 0
    assert out.read_text() == before
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"mine": 1}\n')
    assert sample_main(["--prompts", str(prompts), "--out", str(foreign), *ARGS]) == 2
    assert foreign.read_text() == '{"mine": 1}\n'


def test_prompts_in_other_formats(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": messages + [{"role": "assistant", "content": "2"}], "label": True})
                    + "\n" + json.dumps({"prompt": messages}) + "\n")
    loaded = read_prompts(path)
    assert [r.prompt for r in loaded.rows] == [messages, messages]  # a KTO row's answer is not the prompt
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,answer\n"What is 1 + 1?",2\n')
    assert read_prompts(csv).rows[0].prompt == "What is 1 + 1?"
    assert read_prompts(csv).rows[0].row["answer"] == "2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--judge", "exactly"], "unknown judge"),
        (["--judge", "python:no_such_module_xyz:f"], "cannot import"),
        (["--judge", "exact", "--reference_column", "gold"], "no column 'gold'"),
        (["--n", "0"], "--n must be at least 1"),
        (["--top_p", "0"], "--top_p"),
        (["--judge_threshold", "0.5"], "need --judge"),
        (["--adapter", "/no/such/run"], "no adapter here"),
        (["--nn", "3"], "did you mean --n"),
    ],
)
def test_usage_errors_exit_2(tmp_path, prompts, capsys, args, message):
    assert exit_code(["--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"), *ARGS, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_bad_prompt_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?"}\n{"question": "x"}\n')
    assert sample_main(["--prompts", str(bad), "--out", str(tmp_path / "s.jsonl"), *ARGS]) == 2
    assert "p.jsonl, line 2: no prompt" in capsys.readouterr().err
    assert sample_main(["--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "s.jsonl")]) == 2
