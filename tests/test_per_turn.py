"""Per-turn labels: chat logs with a thumb on every reply, as `messages` rows whose assistant messages carry a label.

Each labelled assistant message is one example whose prompt is the conversation before it; unlabelled assistant
messages are context only. The data report counts turns per conversation and labels per turn, and the chat
feedback file stores such conversations next to its prompt/completion/label rows.
"""

import json

import pytest
from chat_templates_data import SPECIALS, TEMPLATES
from conftest import build_tokenizer, write_rows

from kto_lite.data import load_data
from kto_lite.data.tokenize import encode_prompt, tokenize
from kto_lite.errors import DataError
from kto_lite.feedback.chat import append_feedback, feedback_counts


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


SYSTEM, U1, U2, U3 = msg("system", "Be brief."), msg("user", "Hi"), msg("user", "What is 2+3?"), msg("user", "And 2+4?")
A1 = msg("assistant", "Hello! How can I help?", label=True)
A2 = msg("assistant", "2 + 3 = 6.")  # not rated: context only
A3 = msg("assistant", "2 + 4 = 6.", label="👎")  # any label spelling the data formats accept
CONVERSATION = [SYSTEM, U1, A1, U2, A2, U3, A3]


def plain(*messages):
    return [{k: v for k, v in m.items() if k != "label"} for m in messages]


# --------------------------------------------------------------------------- one example per labelled reply


def test_each_labelled_reply_is_an_example_with_the_conversation_before_it(tmp_path):
    examples, report = load_data(write_rows(tmp_path, [{"messages": CONVERSATION}], "jsonl"))
    assert [(e.prompt, e.completion, e.label, e.row) for e in examples] == [
        (plain(SYSTEM, U1), plain(A1), True, 1),
        (plain(SYSTEM, U1, A1, U2, A2, U3), plain(A3), False, 1),  # the unrated reply is in the prompt
    ]
    assert report.data_format == "messages" and report.per_turn_labels and report.rows_out == 2
    assert (report.n_desirable, report.n_undesirable) == (1, 1)


@pytest.mark.parametrize("template", ["llama-3.1", "qwen-2.5", "gemma-2"])
def test_per_turn_examples_tokenize_as_chat_encodes_them(tmp_path, template):
    """With a real chat template, each example's prompt ids are what chat encodes for the conversation up to
    that reply, and its completion is the reply as the template writes it, ending with the end-of-turn."""
    s = SPECIALS[template]
    tokenizer = build_tokenizer(TEMPLATES[template], eos_token=s["eos"])
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in s["others"] + [s["end_of_turn"]]
                                                                if t != s["eos"]]})
    if s["bos"]:
        tokenizer.add_special_tokens({"bos_token": s["bos"]})
    conversation = CONVERSATION if template != "gemma-2" else CONVERSATION[1:]  # gemma-2 has no system role
    examples, _ = load_data(write_rows(tmp_path, [{"messages": conversation}], "jsonl"))
    tokenized = tokenize(examples, tokenizer, max_length=None, max_prompt_length=None)
    assert len(tokenized) == 2
    for example, ids in zip(examples, tokenized):
        assert ids.prompt_ids == encode_prompt(example.prompt, tokenizer)
        reply = tokenizer.decode(ids.completion_ids)
        assert reply.strip().startswith(example.completion[0]["content"]) and reply.endswith(s["end_of_turn"])
    assert "2 + 3 = 6." in tokenizer.decode(tokenized[1].prompt_ids)  # context, not scored


def test_the_label_column_labels_the_final_reply(tmp_path):
    rows = [{"messages": [U1, A1, U2, msg("assistant", "5")], "label": "good"},
            {"messages": [U2, msg("assistant", "5")], "label": False}]  # an ordinary format-2 row
    examples, _ = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert [(e.completion[0]["content"], e.label, e.row) for e in examples] == [
        ("Hello! How can I help?", True, 1), ("5", True, 1), ("5", False, 2)]


def test_per_turn_labels_in_a_csv_cell(tmp_path):
    path = write_rows(tmp_path, [{"messages": json.dumps(CONVERSATION, ensure_ascii=False)}], "csv")
    examples, _ = load_data(path)
    assert [e.label for e in examples] == [True, False]


# --------------------------------------------------------------------------- rows that cannot be read


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": [msg("user", "hi", label=True), A1]}], "message 1 is a 'user' message with a label"),
        ([{"messages": [U1, msg("assistant", "yo", label="maybe")]}], "line 1: message 2, 'label': unknown label"),
        ([{"messages": [U1, msg("assistant", "yo", label=False)], "label": True}],
         "the row's label \\(True\\) contradicts the label of its final message \\(False\\)"),
        ([{"messages": CONVERSATION, "label": None}, {"messages": [U1, msg("assistant", "yo")]}],
         "line 2: 'label': unknown label None"),  # a label column: a row without any label is misread
    ],
)
def test_bad_per_turn_rows_name_the_row_and_message(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_data(write_rows(tmp_path, rows, "jsonl"))


def test_a_conversation_without_any_label_is_still_a_missing_label_column(tmp_path):
    with pytest.raises(DataError, match="label column .* is missing"):
        load_data(write_rows(tmp_path, [{"messages": [U1, msg("assistant", "yo")]}], "jsonl"))


def test_a_conversation_nobody_rated_is_dropped_and_reported(tmp_path):
    """A chat log holds many conversations without a thumb: they are not errors."""
    rows = [{"messages": CONVERSATION}, {"messages": [U1, msg("assistant", "yo"), U2]}]
    examples, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert len(examples) == 2 and report.dropped == {"no labelled assistant message": [2]}


# --------------------------------------------------------------------------- the data report


def test_the_report_shows_turns_per_conversation_and_labels_per_turn(tmp_path):
    rows = [{"messages": CONVERSATION},
            {"messages": [U1, msg("assistant", "Hey.", label=False)]},
            {"messages": [U2, msg("assistant", "5", label=True), U3, msg("assistant", "6", label=True)]}]
    _, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert report.conversations == 3
    assert report.assistant_turns == [0, 1, 1, 1]  # one conversation each with 1, 2 and 3 assistant turns
    assert report.labels_by_turn == {"1": [2, 1], "2": [1, 0], "3": [0, 1]}
    text = report.format()
    assert "conversations      3 (1 turn: 1, 2 turns: 1, 3 turns: 1 assistant)" in text
    assert "turn 1: 2 desirable / 1 undesirable; turn 2: 1 desirable / 0 undesirable; turn 3: 0 desirable" in text
    assert json.loads(json.dumps(report.to_dict()))["labels_by_turn"] == report.labels_by_turn  # data_report.json


# --------------------------------------------------------------------------- the chat feedback file


def test_the_feedback_file_holds_rated_replies_and_rated_conversations(tmp_path):
    path = tmp_path / "feedback.jsonl"
    append_feedback(path, [U1], "Hello!", True)  # a rated reply, as the Chat tab has always written it
    counts = append_feedback(path, [SYSTEM, U1, {**A1, "label": True}, U2, {**A2, "label": None}, U3,
                                    {**A3, "label": False}])  # a conversation with a thumb on two replies
    assert counts == {"rows": 3, "desirable": 2, "undesirable": 1} == feedback_counts(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "Hi", "completion": "Hello!", "label": True}
    assert lines[1]["messages"][4] == plain(A2)[0]  # an unrated reply is stored without a label
    examples, report = load_data(path)
    assert report.data_format == "prompt_completion+messages"
    assert [(e.row, e.label) for e in examples] == [(1, True), (2, True), (2, False)]


@pytest.mark.parametrize(
    ("conversation", "message"),
    [([U1, msg("assistant", "yo")], "no rated reply"), ([msg("user", "hi", label=True)], "only assistant replies")],
)
def test_a_conversation_without_a_rated_reply_is_refused(tmp_path, conversation, message):
    with pytest.raises(ValueError, match=message):
        append_feedback(tmp_path / "feedback.jsonl", conversation)
    assert not (tmp_path / "feedback.jsonl").exists()
