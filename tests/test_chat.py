"""Chat: streaming, greedy determinism, a stop that ends generation, adapters on/off, feedback rows, the CLI."""

import io
import json
import multiprocessing
import threading

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM

from kto_lite.commands import chat as chat_module
from kto_lite.data import encode_prompt, load_data
from kto_lite.demo import DEMO_MODEL_DIR
from kto_lite.feedback.chat import ChatModel, append_feedback, feedback_counts, plain_prompt

QUESTION = [{"role": "user", "content": "what is the red cat ?"}]
GREEDY = dict(temperature=0, max_new_tokens=20)


def make_adapter_run(root, base_dir):
    """A fake finished run: a LoRA adapter with random non-zero B (so it changes outputs) + config.yaml."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    run = root / "run"
    model.save_pretrained(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base_dir), "load_in_4bit": True}))
    return run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat") / "base")


@pytest.fixture(scope="module")
def run(base_dir):
    return make_adapter_run(base_dir.parent, base_dir)


@pytest.fixture(scope="module")
def chat(run):
    """Unquantized, so the base's answers can be compared with a plain transformers model."""
    return ChatModel(adapter=run, load_in_4bit=False)


def test_4bit_by_default_from_the_runs_config(run, base_dir):
    chat4 = ChatModel(adapter=run)  # config.yaml: model = base_dir, load_in_4bit: true
    assert chat4.model_name == str(base_dir) and chat4.load_in_4bit and chat4.has_adapter
    q_proj = chat4.base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"
    tuned, base = chat4.generate(QUESTION, **GREEDY), chat4.generate(QUESTION, use_adapter=False, **GREEDY)
    assert tuned and base and tuned != base


def test_stream_yields_growing_text(chat):
    texts = list(chat.stream(QUESTION, **GREEDY))
    assert len(texts) > 3
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == chat.generate(QUESTION, **GREEDY)


def test_temperature_zero_is_greedy_and_seed_fixes_sampling(chat):
    assert chat.generate(QUESTION, **GREEDY) == chat.generate(QUESTION, **GREEDY)
    sample = dict(temperature=1.0, top_p=1.0, max_new_tokens=20)
    assert chat.generate(QUESTION, seed=1, **sample) == chat.generate(QUESTION, seed=1, **sample)
    assert chat.generate(QUESTION, seed=1, **sample) != chat.generate(QUESTION, seed=2, **sample)


class StopAfter(threading.Event):
    """An event that reports itself set from its n-th check on: stops at a known token, no timing race."""

    def __init__(self, n):
        super().__init__()
        self.n, self.checks = n, 0

    def is_set(self):
        self.checks += 1
        return self.checks >= self.n


def test_stop_event_stops_generation_itself(chat):
    chat.generate(QUESTION, temperature=0, max_new_tokens=60)
    assert chat.last_stats == {**chat.last_stats, "new_tokens": 60, "stopped": False}  # runs to the limit

    chat.generate(QUESTION, temperature=0, max_new_tokens=60, stop_event=StopAfter(5))
    assert chat.last_stats["new_tokens"] == 5 and chat.last_stats["stopped"]  # checked once per token

    already = threading.Event()
    already.set()
    chat.generate(QUESTION, temperature=0, max_new_tokens=60, stop_event=already)
    assert chat.last_stats["new_tokens"] == 1


def test_closing_the_stream_stops_generation(chat):
    replies = chat.stream(QUESTION, temperature=0, max_new_tokens=200)
    next(replies)
    replies.close()  # a UI that stops reading: the generation thread must not run on
    assert chat.last_stats["stopped"] and chat.last_stats["new_tokens"] < 200


def test_adapter_off_equals_the_plain_base(chat, base_dir):
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([chat.prompt_ids(QUESTION)])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                         eos_token_id=chat.tokenizer.eos_token_id, pad_token_id=chat.tokenizer.pad_token_id)
    expected = chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert chat.generate(QUESTION, use_adapter=False, **GREEDY) == expected
    assert chat.generate(QUESTION, use_adapter=True, **GREEDY) != expected


def test_system_prompt_is_in_the_prompt_and_replaces_a_given_one(chat):
    with_system = chat.prompt_ids(QUESTION, system_prompt="answer yes no")
    text = chat.tokenizer.decode(with_system)
    assert "<system> answer yes no" in text and text.index("<system>") < text.index("<user>")
    old = [{"role": "system", "content": "be big"}] + QUESTION
    assert chat.prompt_ids(old, system_prompt="answer yes no") == with_system
    assert chat.generate(QUESTION, system_prompt="answer yes no", **GREEDY) != chat.generate(QUESTION, **GREEDY)


def test_message_content_given_as_parts(chat):
    parts = [{"role": "user", "content": [{"type": "text", "text": "what is the red cat ?"}], "metadata": None}]
    assert chat.prompt_ids(parts) == chat.prompt_ids(QUESTION)


def test_base_model_without_adapter_or_chat_template(tmp_path):
    base = make_model_dir(tmp_path / "plain", chat_template=False)
    chat = ChatModel(str(base), load_in_4bit=False)
    assert not chat.has_adapter
    # one user message: exactly the plain-text prompt tokens training uses
    assert chat.prompt_ids(QUESTION) == encode_prompt(QUESTION[0]["content"], chat.tokenizer, use_chat_template=False)
    history = QUESTION + [{"role": "assistant", "content": "a dog"}, {"role": "user", "content": "why ?"}]
    assert plain_prompt(history) == "User: what is the red cat ?\nAssistant: a dog\nUser: why ?\nAssistant:"
    assert chat.generate(QUESTION, use_adapter=False, **GREEDY) == chat.generate(QUESTION, **GREEDY)


def test_sample_gives_the_replies_of_the_sample_command(chat, run, tmp_path):
    from kto_lite.commands.sample import main as sample_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "how is the dog ?"}) + "\n" + json.dumps({"prompt": QUESTION}) + "\n")
    out = tmp_path / "samples.jsonl"
    args = ["--adapter", str(run), "--load_in_4bit", "false", "--prompts", str(prompts), "--n", "3", "--seed", "7",
            "--temperature", "1", "--top_p", "0.9", "--max_new_tokens", "12", "--out", str(out)]
    assert sample_main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [r["completion"].lstrip() for r in rows if r["prompt_index"] == 1]
    assert chat.sample(QUESTION, 3, seed=7, index=1, temperature=1, top_p=0.9, max_new_tokens=12) == expected


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ChatModel(adapter=tmp_path)
    assert chat_module.main(["--adapter", str(tmp_path)]) == 2  # an input error, not a failure


def test_sample_gives_n_reproducible_replies_in_one_batch(chat):
    options = dict(temperature=1.0, top_p=1.0, max_new_tokens=12)
    replies = chat.sample(QUESTION, 4, seed=3, **options)
    assert len(replies) == 4 and len(set(replies)) > 1  # independent samples, not one repeated
    assert chat.sample(QUESTION, 4, seed=3, **options) == replies
    assert chat.sample(QUESTION, 4, seed=4, **options) != replies
    assert chat.sample(QUESTION, 4, seed=3, index=1, **options) != replies  # another prompt's draws
    assert chat.sample(QUESTION, 2, seed=3, **options) == replies[:2]  # reply j's draws are its own
    assert chat.sample(QUESTION, 1, temperature=0, max_new_tokens=20) == [chat.generate(QUESTION, **GREEDY)]
    base = chat.sample(QUESTION, 1, use_adapter=False, temperature=0, max_new_tokens=20)
    assert base == [chat.generate(QUESTION, use_adapter=False, **GREEDY)]
    with pytest.raises(ValueError, match="greedy"):
        chat.sample(QUESTION, 2, temperature=0)


# --------------------------------------------------------------------------- feedback


def test_append_feedback_writes_rows_load_data_reads(tmp_path):
    path = tmp_path / "runs" / "feedback.jsonl"
    assert feedback_counts(path) == {"rows": 0, "desirable": 0, "undesirable": 0}
    append_feedback(path, QUESTION, "yes good answer .", True)
    conversation = [{"role": "system", "content": "be brief"}] + QUESTION
    counts = append_feedback(path, conversation, "no bad", label=False)
    assert counts == feedback_counts(path) == {"rows": 2, "desirable": 1, "undesirable": 1}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"prompt": "what is the red cat ?", "completion": "yes good answer .", "label": True}
    assert rows[1]["prompt"] == conversation and rows[1]["label"] is False
    examples, _ = load_data(path)
    text = [e.completion if isinstance(e.completion, str) else e.completion[-1]["content"] for e in examples]
    assert [(e.prompt, t, e.label) for e, t in zip(examples, text)] == [
        ("what is the red cat ?", "yes good answer .", True), (conversation, "no bad", False)]


def test_append_feedback_after_a_torn_line(tmp_path):
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "cut of')
    assert append_feedback(path, "a", "c", False) == {"rows": 2, "desirable": 1, "undesirable": 1}
    assert json.loads(path.read_text().splitlines()[-1])["completion"] == "c"


def _append_many(path, worker, n):
    for i in range(n):
        append_feedback(path, f"prompt {worker} {i} " + "x" * 2000, "y" * 3000, i % 2 == 0)


def test_concurrent_appends_from_processes_and_threads(tmp_path):
    path = tmp_path / "feedback.jsonl"
    fork = multiprocessing.get_context("fork")  # the children only write files: safe to fork
    procs = [fork.Process(target=_append_many, args=(path, w, 20)) for w in range(3)]
    threads = [threading.Thread(target=_append_many, args=(path, 10 + w, 20)) for w in range(3)]
    for t in procs + threads:
        t.start()
    for t in procs + threads:
        t.join()
    assert all(p.exitcode == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 120 and all(json.loads(line)["completion"] == "y" * 3000 for line in lines)
    assert feedback_counts(path) == {"rows": 120, "desirable": 60, "undesirable": 60}


# --------------------------------------------------------------------------- the terminal chat


class _Terminal(io.StringIO):
    """Typed input: the chat shows its prompts (piped input gets the replies alone)."""

    def isatty(self) -> bool:
        return True


def test_cli_two_turns_reset_quit(run, monkeypatch, capsys):
    seen = []
    stream = ChatModel.stream

    def spy(self, messages, **kwargs):
        seen.append([m["role"] for m in messages])
        yield from stream(self, messages, **kwargs)

    monkeypatch.setattr(ChatModel, "stream", spy)
    monkeypatch.setattr("sys.stdin", _Terminal("what is the red cat ?\nwhy ?\n/reset\nhow is the dog ?\n/quit\n"))
    args = ["--adapter", str(run), "--load_in_4bit", "false", "--temperature", "0", "--max_new_tokens", "5",
            "--system", "be brief"]
    assert chat_module.main(args) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]  # history grows, /reset empties it
    out = capsys.readouterr().out
    assert out.count("bot> ") == 3 and "(conversation cleared)" in out and "unquantized" in out


def test_cli_ctrl_c_stops_the_reply_then_exits(run, monkeypatch, capsys):
    seen = []

    def interrupted(self, messages, **kwargs):
        seen.append(list(messages))
        yield "half an"
        raise KeyboardInterrupt

    monkeypatch.setattr(ChatModel, "stream", interrupted)
    answers = iter(["hello", "again"])

    def fake_input(prompt):
        if seen and len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C at the prompt
        return next(answers)

    monkeypatch.setattr("builtins.input", fake_input)
    assert chat_module.main(["--adapter", str(run), "--no-4bit"]) == 0
    assert "half an [stopped]" in capsys.readouterr().out
    assert seen[1][1] == {"role": "assistant", "content": "half an"}  # the stopped reply stays in the history


def test_cli_end_of_input_exits(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert chat_module.main(["--adapter", str(run), "--no-4bit"]) == 0


def test_cli_exit_codes(run, tmp_path, capsys):
    assert chat_module.main(["--help"]) == 0
    assert chat_module.main(["--adapter", str(run), "--max_new_token", "5"]) == 2  # misspelled flag
    assert "did you mean --max_new_tokens" in capsys.readouterr().err
    assert chat_module.main(["--adapter", str(run), "--temperature", "-1"]) == 2
    assert chat_module.main(["--adapter", str(run), "--load_in_4bit", "maybe"]) == 2
    assert chat_module.main(["--adapter", str(tmp_path / "no such run")]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    broken = tmp_path / "broken-base"  # a base folder that is not a model: an input error, named
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "config.yaml").write_text(yaml.safe_dump({"model": str(broken)}))
    assert chat_module.main(["--adapter", str(adapter)]) == 2
    assert "not one transformers can load" in capsys.readouterr().err
    (adapter / "config.yaml").write_text(yaml.safe_dump({"model": str(DEMO_MODEL_DIR)}))  # a good base, a broken
    assert chat_module.main(["--adapter", str(adapter)]) == 1  # adapter: a failure while running
    assert "error:" in capsys.readouterr().err


def test_cli_flags_use_the_shared_spelling(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    loaded = []
    monkeypatch.setattr(chat_module, "ChatModel", lambda *a, **k: loaded.append(k) or ChatModel(*a, **k))
    for flags in (["--load_in_4bit", "false"], ["--load-in-4bit", "false"], ["--no-4bit"]):
        assert chat_module.main(["--adapter", str(run), *flags, "--top_p", "0.5", "--max-new-tokens", "3"]) == 0
    assert [k["load_in_4bit"] for k in loaded] == [False, False, False]
