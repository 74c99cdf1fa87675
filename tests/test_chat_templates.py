"""The prompt/completion boundary with the chat templates users meet, on a real tokenizer.

Each official template (tests/chat_templates_data.py: Llama-3.1, Llama-3.2, Qwen2.5, Gemma-2,
Mistral v0.3, Phi-3, and SmolLM2's own ChatML) is set on the real SmolLM2-135M-Instruct tokenizer,
given that family's control tokens as special tokens, exactly as its own tokenizer declares them.
The scored tokens (TokenizedExample.completion_ids) must be exactly what the model produces after the
prompt at chat time and until it stops: the answer as the template writes it, then the end-of-turn,
nothing after it; the prompt ids must be exactly what chat encodes.
"""

from __future__ import annotations

import datetime
import json

import pytest
from chat_templates_data import SPECIALS, TEMPLATES
from real_model import smollm2_gguf

from kto_lite.data import Example, load_data
from kto_lite.data.tokenize import encode_prompt, tokenize
from kto_lite.errors import DataError
from kto_lite.feedback.chat import ChatModel

pytestmark = pytest.mark.real_model  # every test uses the SmolLM2 tokenizer
SYSTEM = [{"role": "system", "content": "Be brief."}]
HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
QUESTION = [{"role": "user", "content": "What is 2+3?"}]
CASES = {  # name -> (prompt messages, answer)
    "single turn": (QUESTION, "2 + 3 = 5."),
    "system prompt": (SYSTEM + QUESTION, "5"),
    "multi-turn": (HISTORY + QUESTION, "It is 5."),
    "multi-turn + system": (SYSTEM + HISTORY + QUESTION, "Five."),
}
# How each template writes an answer: a prefix it adds, and whether it trims the content.
REPLY = {
    "llama-3.1": ("", True), "llama-3.2": ("", True), "qwen-2.5": ("", False), "gemma-2": ("", True),
    "mistral-v0.3": (" ", True), "phi-3": ("", False), "chatml": ("", False),
}
NO_SYSTEM_ROLE = {"gemma-2"}


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer (49,152 tokens, ChatML), read from its GGUF file once, saved."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir):
    """name -> the SmolLM2 tokenizer with that family's template and control tokens."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
        s = SPECIALS[name]
        controls = [t for t in [*s["others"], s["end_of_turn"]] if t != s["eos"]]
        spec = {"eos_token": s["eos"], "additional_special_tokens": controls}
        if s["bos"]:
            spec["bos_token"] = s["bos"]
        tokenizer.add_special_tokens(spec)
        if template is not None:
            tokenizer.chat_template = template
        out[name] = tokenizer
    return out


def expected_completion(name: str, answer: str) -> str:
    prefix, trims = REPLY[name]
    return prefix + (answer.strip() if trims else answer) + SPECIALS[name]["end_of_turn"]


def one(examples, tokenizer):
    [tokenized] = tokenize(examples, tokenizer, max_length=None, max_prompt_length=None)
    return tokenized


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", TEMPLATES)
def test_completion_is_the_answer_and_the_end_of_turn(tokenizers, name, case):
    tokenizer = tokenizers[name]
    prompt, answer = CASES[case]
    if name in NO_SYSTEM_ROLE and prompt[0]["role"] == "system":
        pytest.skip("no system role (test_template_without_system_role)")
    t = one([Example(prompt, answer, True, 1)], tokenizer)
    want = expected_completion(name, answer)
    assert tokenizer.decode(t.completion_ids) == want
    assert t.completion_ids == tokenizer(want, add_special_tokens=False)["input_ids"]  # no token off
    # the prompt is exactly what generation starts from, and what the template renders for it
    assert t.prompt_ids == encode_prompt(prompt, tokenizer)
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             date_string="26 Jul 2024")
    assert tokenizer.decode(t.prompt_ids) == rendered


@pytest.mark.parametrize("name", TEMPLATES)
def test_nothing_after_the_end_of_turn_is_scored(tokenizers, name):
    """ChatML writes "\\n" after <|im_end|>, Gemma "\\n" after <end_of_turn>, Phi-3 "\\n<|endoftext|>" after
    <|end|>: generation stops at the end-of-turn, so those tokens are never produced and must not count."""
    tokenizer = tokenizers[name]
    t = one([Example(QUESTION, "5", True, 1)], tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(SPECIALS[name]["end_of_turn"])
    assert t.completion_ids[-1] == end_of_turn
    assert t.completion_ids.count(end_of_turn) == 1


@pytest.mark.parametrize("name", TEMPLATES)
def test_whitespace_around_the_answer_does_not_shift_the_scored_tokens(tokenizers, name):
    """Templates that trim (Llama, Gemma, Mistral) score the trimmed answer; the others keep it as given."""
    tokenizer = tokenizers[name]
    for answer in ("  5", "5 \n", "\n5\n\n", " 5 "):
        t = one([Example(QUESTION, answer, True, 1)], tokenizer)
        assert tokenizer.decode(t.completion_ids) == expected_completion(name, answer), repr(answer)
        assert t.prompt_ids == encode_prompt(QUESTION, tokenizer)


def test_mistral_system_prompt_keeps_the_space_before_the_answer(tokenizers):
    """Mistral v0.3 puts the system message into the *last* user turn, so it moves once an answer
    follows and the rendered prompt is no prefix of the conversation. The reply still starts with the
    template's space, as without a system prompt (it once lost it: " 5</s>" vs "5</s>")."""
    tokenizer = tokenizers["mistral-v0.3"]
    plain = one([Example(QUESTION, "5", True, 1)], tokenizer)
    with_system = one([Example(SYSTEM + QUESTION, "5", True, 1)], tokenizer)
    assert with_system.completion_ids == plain.completion_ids
    assert tokenizer.decode(with_system.prompt_ids).endswith("[INST] Be brief.\n\nWhat is 2+3?[/INST]")


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.2"])
def test_llama_date_line_is_the_same_every_day(tokenizers, name, monkeypatch):
    """Llama-3.2 prints today's date into the system turn (strftime_now). Training, the reference cache
    and chat must see the same tokens on any day: templates render with one fixed date."""
    import transformers.utils.chat_template_utils as ctu

    tokenizer = tokenizers[name]

    def on_day(day):
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime(2025, 3, day, 12, 0)

        monkeypatch.setattr(ctu, "datetime", Clock)

    on_day(1)
    trained = one([Example(SYSTEM + QUESTION, "5", True, 1)], tokenizer)
    on_day(2)
    assert encode_prompt(SYSTEM + QUESTION, tokenizer) == trained.prompt_ids
    text = tokenizer.decode(trained.prompt_ids)
    assert "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n" \
           "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>" in text


def test_template_without_system_role(tokenizers):
    """Gemma-2 refuses a system message: a clear error naming the row, in training and in chat."""
    with pytest.raises(DataError, match=r"row 7: .*System role not supported"):
        tokenize([Example(SYSTEM + QUESTION, "5", True, 7)], tokenizers["gemma-2"], max_length=None,
                 max_prompt_length=None)
    with pytest.raises(DataError, match="System role not supported"):
        encode_prompt(SYSTEM + QUESTION, tokenizers["gemma-2"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_prompt_equals_the_training_prompt(tokenizers, name):
    """ChatModel.prompt_ids (history + system prompt box) gives the ids training scored the answer after."""
    tokenizer = tokenizers[name]
    system = None if name in NO_SYSTEM_ROLE else "Be brief."
    prompt = ([{"role": "system", "content": system}] if system else []) + HISTORY + QUESTION
    trained = one([Example(prompt, "5", True, 1)], tokenizer)
    chat = ChatModel.__new__(ChatModel)  # the prompt side of a ChatModel, without loading weights
    chat.tokenizer, chat.use_chat_template = tokenizer, None
    assert chat.prompt_ids(HISTORY + QUESTION, system_prompt=system) == trained.prompt_ids


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "mistral-v0.3"])
def test_messages_rows_from_a_file(tokenizers, name, tmp_path):
    """Data format 2 (`messages` + label): the last assistant message is the completion."""
    tokenizer = tokenizers[name]
    messages = SYSTEM + HISTORY + QUESTION + [{"role": "assistant", "content": "Five."}]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": messages, "label": "good"}) + "\n")
    examples, _ = load_data(path)
    t = one(examples, tokenizer)
    assert tokenizer.decode(t.completion_ids) == expected_completion(name, "Five.")
    assert t.prompt_ids == encode_prompt(SYSTEM + HISTORY + QUESTION, tokenizer)
