"""kto_lite.data.load: reading every format from every file type, bad input, labels, the report, tokenization."""

import hashlib
import json
import re

import pytest
from conftest import FILE_TYPES, build_tokenizer, write_rows

from kto_lite.commands.data import main
from kto_lite.data import (
    DataReport,
    Example,
    complete_weights,
    encode_prompt,
    load_data,
    normalize_label,
    suggest_weights,
    tokenize,
)
from kto_lite.data.lengths import length_problem
from kto_lite.data.load import MAX_FIELD_CHARS
from kto_lite.errors import DataError

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


# --- every format from every file type ---

FORMATS = {
    "prompt_completion": (
        [
            {"prompt": "hi", "completion": "hello", "label": True},
            {"prompt": "2+2?", "completion": "5", "label": False},
        ],
        [Example("hi", "hello", True, 1), Example("2+2?", "5", False, 2)],
    ),
    "prompt_completion_chat": (
        [
            {"prompt": [msg(U, "hi")], "completion": [msg(A, "hello")], "label": True},
            {"prompt": [msg(U, "2+2?")], "completion": [msg(A, "5")], "label": False},
        ],
        [
            Example([msg(U, "hi")], [msg(A, "hello")], True, 1),
            Example([msg(U, "2+2?")], [msg(A, "5")], False, 2),
        ],
    ),
    "messages": (
        [
            {"messages": [msg("system", "be brief"), msg(U, "hi"), msg(A, "hello")], "label": True},
            {"messages": [msg(U, "2+2?"), msg(A, "5")], "label": False},
        ],
        [
            Example([msg("system", "be brief"), msg(U, "hi")], [msg(A, "hello")], True, 1),
            Example([msg(U, "2+2?")], [msg(A, "5")], False, 2),
        ],
    ),
    "paired_text": (
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
        [Example("2+2?", "4", True, 1), Example("2+2?", "5", False, 1)],
    ),
    "paired_messages": (  # the prompt is the messages both conversations begin with
        [{"chosen": [msg(U, "2+2?"), msg(A, "4")], "rejected": [msg(U, "2+2?"), msg(A, "5")]}],
        [
            Example([msg(U, "2+2?")], [msg(A, "4")], True, 1),
            Example([msg(U, "2+2?")], [msg(A, "5")], False, 1),
        ],
    ),
}


DETECTED = {
    "prompt_completion": "prompt_completion",
    "prompt_completion_chat": "prompt_completion",
    "messages": "messages",
    "paired_text": "paired",
    "paired_messages": "paired",
}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_from_every_file_type(tmp_path, fmt, file_type):
    rows, expected = FORMATS[fmt]
    examples, report = load_data(write_rows(tmp_path, rows, file_type))
    assert examples == expected
    assert report.data_format == DETECTED[fmt]
    assert report.conversational == isinstance(expected[0].prompt, list)
    assert (report.rows_in, report.rows_out) == (len(rows), len(expected))


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(
        '{"prompt": "a", "completion": "b", "label": 1}\n{"prompt": "c", "completion": "d", "label": 0}\n'
    )
    examples, report = load_data(path)
    assert [e.label for e in examples] == [True, False] and report.row_unit == "line"


def test_jsonl_rows_are_numbered_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '\n{"prompt": "a", "completion": "b", "label": 1}\n\n{"prompt": "c", "completion": "d", "label": 0}\n'
    )
    examples, _ = load_data(path)
    assert [e.row for e in examples] == [2, 4]


def test_paired_prompt_column_with_full_conversations(tmp_path):
    # UltraFeedback style: a prompt column plus conversations that repeat it; the shared messages win
    rows = [
        {"prompt": "2+2?", "chosen": [msg(U, "2+2?"), msg(A, "4")], "rejected": [msg(U, "2+2?"), msg(A, "5")]}
    ]
    examples, _ = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert [(e.prompt, e.completion) for e in examples] == [
        ([msg(U, "2+2?")], [msg(A, "4")]),
        ([msg(U, "2+2?")], [msg(A, "5")]),
    ]


def test_paired_text_without_prompt_is_an_error(tmp_path):
    path = write_rows(tmp_path, [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}], "jsonl")
    with pytest.raises(DataError, match=r"data\.jsonl, line 1: no 'prompt' column"):
        load_data(path)


def test_kto_tag_is_a_label_column(tmp_path):
    rows = [{"messages": [msg(U, "hi"), msg(A, "yo")], "kto_tag": "good"}]
    examples, _ = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert examples[0].label is True


def test_column_map(tmp_path):
    rows = [{"question": "hi", "answer": "yo", "rating": "👍", "prompt": "ignored"}]
    path = write_rows(tmp_path, rows, "csv")
    examples, report = load_data(path, {"question": "prompt", "answer": "completion", "rating": "label"})
    assert examples == [Example("hi", "yo", True, 1)]
    assert report.columns == ["prompt", "completion", "label"]
    with pytest.raises(
        DataError, match=r"columns \(--column\) maps column 'nope', but the file's columns are \['question', 'answer', "
        r"'rating', 'prompt'\]"
    ):
        load_data(path, {"nope": "prompt"})
    with pytest.raises(DataError, match="'score' is not one of"):
        load_data(path, {"rating": "score"})


def test_input_file_is_never_modified(tmp_path, chat_tokenizer):
    rows = FORMATS["messages"][0]
    for file_type in FILE_TYPES:
        path = write_rows(tmp_path, rows, file_type)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        before = [
            (f, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in files
            if f.is_file()
        ]
        examples, report = load_data(path)
        tokenize(examples, chat_tokenizer, max_length=64, max_prompt_length=32, report=report)
        after = [
            (f, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in files
            if f.is_file()
        ]
        assert before == after, file_type


# --- bad input: the message names the file, the row and the value ---


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": 1}\n\n{"prompt": "a", "completion": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: malformed JSON .*column 31.*oops") as e:
        load_data(path)
    assert e.value.row == 3


def test_malformed_json_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n  {"prompt": "a", "completion": "b", "label": 1},\n  {"prompt": "a" "completion": "b"}\n]'
    )
    with pytest.raises(DataError, match=r"bad\.json, line 3: malformed JSON .*delimiter"):
        load_data(path)


def test_json_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": 1}\n["a", "b", 1]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object.*got list \['a', 'b', 1\]"):
        load_data(path)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = b'{"prompt": "a", "completion": "b", "label": 1}\n'
    path.write_bytes(first + b'{"prompt": "caf\xe9", "completion": "b", "label": 1}\n')
    offset = len(first) + len(b'{"prompt": "caf')
    with pytest.raises(
        DataError, match=rf"latin1\.jsonl, line 2: not valid UTF-8 at byte offset {offset} \(bytes b'\\xe9"
    ):
        load_data(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion,label\na,b,yes\n")
    assert load_data(path)[0] == [Example("a", "b", True, 1)]


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("empty.jsonl", "", "the file is empty"),
        ("blank.jsonl", "\n  \n", "the file is empty"),
        ("empty.json", "", "the file is empty"),
        ("empty.csv", "", "the file is empty"),
        ("list.json", "[ ]", "the file has no data rows"),
        ("header.csv", "prompt,completion,label\n", "the file has no data rows"),
        ("empty.parquet", "", "the file is empty"),
    ],
)
def test_empty_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: {problem}"):
        load_data(path)


def test_missing_columns_lists_found_and_accepted(tmp_path):
    path = write_rows(tmp_path, [{"question": "q", "answer": "a", "rating": 5}], "jsonl")
    with pytest.raises(DataError) as e:
        load_data(path)
    text = str(e.value)
    assert "data.jsonl" in text and "['question', 'answer', 'rating']" in text
    assert (
        "(1) prompt, completion, label" in text
        and "(2) messages, label" in text
        and "(3) chosen, rejected" in text
    )
    # the way out, spelt as the YAML key and the flag of train and data take it
    assert "columns: {question: prompt, answer: completion, rating: label}" in text
    assert "--column question=prompt --column answer=completion --column rating=label" in text


def test_missing_label_column_is_named(tmp_path):
    path = write_rows(tmp_path, [{"prompt": "q", "completion": "a"}], "jsonl")
    with pytest.raises(DataError, match="label column .* is missing"):
        load_data(path)


@pytest.mark.parametrize(
    "file_type,where",
    [
        ("jsonl", "line 2"),
        ("json", r"item 2 \(line 7\)"),
        ("csv", r"data row 2 \(line 3\)"),
        ("parquet", "row 2"),
    ],
)
def test_unknown_label_names_file_row_and_value(tmp_path, file_type, where):
    rows = [
        {"prompt": "a", "completion": "b", "label": "yes"},
        {"prompt": "c", "completion": "d", "label": "maybe"},
    ]
    path = write_rows(tmp_path, rows, file_type)
    with pytest.raises(
        DataError, match=rf"{path.name}, {where}: 'label': unknown label 'maybe'; accepted: "
    ) as e:
        load_data(path)
    assert (e.value.row, e.value.value) == (2, "maybe")


def test_every_bad_row_is_listed(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": v} for v in ["ok", "yes", "2", "no", "meh"]]
    with pytest.raises(DataError) as e:
        load_data(write_rows(tmp_path, rows, "jsonl"))
    assert [line.split(": ")[0].rsplit("/")[-1] for line in str(e.value).splitlines()] == [
        "data.jsonl, line 1",
        "data.jsonl, line 3",
        "data.jsonl, line 5",
    ]


def test_bad_rows_are_listed_up_to_twenty(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": "?"}] * 25
    with pytest.raises(DataError) as e:
        load_data(write_rows(tmp_path, rows, "jsonl"))
    lines = str(e.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more lines with problems"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": 42, "completion": "b", "label": 1}, "'prompt' must be text or a list of .* got 42"),
        ({"prompt": "a", "label": 1}, "'completion' is missing or null"),
        ({"prompt": [{"role": "user"}], "completion": "b", "label": 1}, "'prompt' has a message that is not"),
        ({"messages": "hi", "label": 1}, "'messages' must be a list"),
    ],
)
def test_wrong_value_types(tmp_path, row, message):
    rows = [{"prompt": "a", "completion": "b", "label": 1}, row] if "messages" not in row else [row]
    with pytest.raises(DataError, match=rf"data\.jsonl, line {len(rows)}: {message}"):
        load_data(write_rows(tmp_path, rows, "jsonl"))


def test_csv_row_with_extra_fields(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion,label\na,b,1\na,b,c,1\n")
    with pytest.raises(DataError, match=r"bad\.csv, data row 2 \(line 3\): 4 fields but the header has 3"):
        load_data(path)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'"):
        load_data(tmp_path / "data.txt")
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="save_to_disk"):
        load_data(tmp_path)


def test_gigantic_rows_are_dropped_with_a_reason(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b", "label": 1},
        {"prompt": "a", "completion": "x" * (MAX_FIELD_CHARS + 1), "label": 0},
        {"prompt": "c", "completion": "d", "label": 0},
    ]
    examples, report = load_data(write_rows(tmp_path, rows, "csv"))
    assert [e.row for e in examples] == [1, 3]
    assert report.dropped == {"a field over 1,000,000 characters": [2]}
    assert any("Dropped 1 data row(s), a field over 1,000,000 characters: 2" in w for w in report.warnings)


def test_long_csv_fields_below_the_limit_load(tmp_path):
    rows = [{"prompt": "a", "completion": "y" * 200_000, "label": 1}]  # over csv's default field limit
    assert load_data(write_rows(tmp_path, rows, "csv"))[0][0].completion == "y" * 200_000


def test_unusable_rows_are_dropped_and_reported(tmp_path):
    rows = [
        {"messages": [msg(U, "hi"), msg(A, "yo")], "label": 1},
        {"messages": [msg(U, "hi"), msg(A, "yo"), msg(U, "and?")], "label": 1},
        {"messages": [msg(U, "hi"), msg(A, "  ")], "label": 0},
    ]
    examples, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert [e.row for e in examples] == [1]
    assert report.dropped == {
        "the conversation does not end with an assistant message": [2],
        "empty completion": [3],
    }
    assert report.empty_completion_rows == [3]
    paired = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    examples, report = load_data(write_rows(tmp_path, paired, "jsonl", name="paired"))
    assert report.dropped == {"chosen and rejected are identical": [1]} and len(examples) == 2


# --- labels ---

DESIRABLE = [
    True,
    1,
    1.0,
    "1",
    "1.0",
    "true",
    " TRUE ",
    "yes",
    "Yes",
    "desirable",
    "Desirable",
    "good",
    "up",
    "UP\n",
    "👍",
    "👍🏽",
    "👍\ufe0f",
    "👍🏿\ufe0f",
]
UNDESIRABLE = [
    False,
    0,
    0.0,
    "0",
    "0.0",
    "false",
    "False",
    "no",
    " NO",
    "undesirable",
    "bad",
    "BAD",
    "down",
    "👎",
    "👎🏻",
]


@pytest.mark.parametrize("value", DESIRABLE)
def test_desirable_labels(value):
    assert normalize_label(value) is True


@pytest.mark.parametrize("value", UNDESIRABLE)
def test_undesirable_labels(value):
    assert normalize_label(value) is False


@pytest.mark.parametrize("value", [2, -1, 0.5, "", "maybe", "y", "👌", None, float("nan"), [1]])
def test_unknown_labels(value):
    with pytest.raises(ValueError, match="unknown label"):
        normalize_label(value)


def test_numpy_labels():
    np = pytest.importorskip("numpy")
    assert normalize_label(np.bool_(True)) is True and normalize_label(np.int64(0)) is False


# --- report ---


@pytest.mark.parametrize(
    "n_d,n_u,expected",
    [
        (10, 10, (1.0, 1.0)),
        (12, 10, (1.0, 1.0)),
        (10, 30, (1.0, 1 / 3)),
        (40, 10, (1 / 3, 1.0)),
        (5, 0, (1.0, 1.0)),
        (0, 5, (1.0, 1.0)),
        (0, 0, (1.0, 1.0)),
    ],
)
def test_suggest_weights(n_d, n_u, expected):
    assert suggest_weights(n_d, n_u) == pytest.approx(expected)


def test_suggested_weights_satisfy_eq8_and_keep_the_larger_at_one():
    for n_d in range(1, 60):
        for n_u in range(1, 60):
            w_d, w_u = suggest_weights(n_d, n_u)
            assert 1 - 1e-9 <= w_d * n_d / (w_u * n_u) <= 4 / 3 + 1e-9
            assert max(w_d, w_u) == 1.0


def test_one_auto_weight_completes_the_set_one_into_eq8():
    for n_d, n_u in [(20, 10), (10, 20), (7, 7), (3, 40)]:
        for w in (0.5, 1.0, 1.33, 3.0):
            w_d, w_u = complete_weights(w, "auto", n_d, n_u)
            assert w_d == w and 1 - 1e-9 <= w_d * n_d / (w_u * n_u) <= 4 / 3 + 1e-9
            w_d, w_u = complete_weights("auto", w, n_d, n_u)
            assert w_u == w and 1 - 1e-9 <= w_d * n_d / (w_u * n_u) <= 4 / 3 + 1e-9
    assert complete_weights(1.0, "auto", 7, 7) == (1.0, 1.0)  # already in range: 1.0 stays
    assert complete_weights("auto", "auto", 20, 10) == suggest_weights(20, 10)
    assert complete_weights(2.0, 0.5, 20, 10) == (2.0, 0.5)  # both set: kept as given
    assert complete_weights("auto", 0.5, 5, 0) == (1.0, 0.5)  # one-sided: nothing to balance


def test_report_counts_duplicates_conflicts_and_empties(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b", "label": "good"},  # 1
        {"prompt": "", "completion": "b", "label": "bad"},  # 2 empty prompt: kept
        {"prompt": "a", "completion": "b", "label": "good"},  # 3 duplicate of 1
        {"prompt": "a", "completion": "b", "label": "bad"},  # 4 contradicts 1 and 3
        {"prompt": "c", "completion": "", "label": "bad"},
    ]  # 5 empty completion: dropped
    examples, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert (report.rows_in, report.rows_out, report.n_desirable, report.n_undesirable) == (5, 4, 2, 2)
    assert report.duplicate_rows == [[1, 3]]
    assert report.conflicting_rows == [[1, 3, 4]]
    assert report.empty_prompt_rows == [2] and report.empty_completion_rows == [5]
    assert report.dropped == {"empty completion": [5]}
    assert (report.desirable_weight, report.undesirable_weight) == (1.0, 1.0)


def test_paired_rows_count_twice(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    _, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert (report.rows_in, report.rows_out, report.n_desirable, report.n_undesirable) == (3, 6, 3, 3)


def test_imbalanced_data_suggests_weights(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": i < 2} for i in range(8)]
    _, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert (report.desirable_weight, report.undesirable_weight) == (1.0, pytest.approx(2 / 6))
    assert any("imbalanced" in w and "undesirable_weight=0.3333" in w for w in report.warnings)


@pytest.mark.parametrize("label,side", [(True, "desirable"), (False, "undesirable")])
def test_one_sided_data_warns_with_advice(tmp_path, label, side):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": label} for i in range(3)]
    examples, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    assert len(examples) == 3
    assert (
        f"Only {side} examples (3): KTO can train on one side; use a conservative learning rate."
        in report.warnings
    )


def test_report_save_to_dict_and_format(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": 1}, {"prompt": "a", "completion": "c", "label": 0}]
    _, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    report.save(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (
        saved == report.to_dict() and saved["rows_out"] == 2 and saved["data_format"] == "prompt_completion"
    )
    assert DataReport.from_dict(saved) == report
    table = report.format()
    assert "prompt / completion / label" in table and "desirable          1 (50.0%)" in table


# --- tokenization ---


def test_plain_text_without_template(tiny_tokenizer):
    [t] = tokenize([Example("hello", " world", True, 7)], tiny_tokenizer, max_length=64, max_prompt_length=32)
    assert (
        t.prompt_ids == tiny_tokenizer("hello")["input_ids"]
        and t.prompt_ids[0] == tiny_tokenizer.bos_token_id
    )
    assert t.completion_ids == tiny_tokenizer(" world", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    assert (t.label, t.row) == (True, 7)
    assert encode_prompt("hello", tiny_tokenizer) == t.prompt_ids


def test_chat_template_for_messages(chat_tokenizer):
    ex = Example([msg("system", "be brief"), msg(U, "hello")], [msg(A, "world")], False, 1)
    assert chat_tokenizer.pad_token is None  # tokenize must not need one
    [t] = tokenize([ex], chat_tokenizer, max_length=64, max_prompt_length=32)
    assert (
        chat_tokenizer.decode(t.prompt_ids)
        == "<s><|system|>be brief<|end|>\n<|user|>hello<|end|>\n<|assistant|>"
    )
    assert (
        chat_tokenizer.decode(t.completion_ids) == "world<|end|>"
    )  # ends the turn: the model learns to stop; the "\n" the template writes after it is never generated
    assert t.prompt_ids == encode_prompt(ex.prompt, chat_tokenizer)
    assert (
        t.prompt_ids + t.completion_ids
        == chat_tokenizer(
            chat_tokenizer.apply_chat_template(ex.prompt + ex.completion, tokenize=False),
            add_special_tokens=False,
        )["input_ids"][:-1]  # all but the "\n" after the end of the turn
    )


def test_plain_text_uses_the_template_unless_switched_off(chat_tokenizer):
    ex = Example("hello", "world", True, 1)
    report = DataReport("x")
    [t] = tokenize([ex], chat_tokenizer, max_length=64, max_prompt_length=32, report=report)
    assert (
        chat_tokenizer.decode(t.prompt_ids + t.completion_ids)
        == "<s><|user|>hello<|end|>\n<|assistant|>world<|end|>"
    )
    assert report.chat_template is True
    [t] = tokenize(
        [ex], chat_tokenizer, max_length=64, max_prompt_length=32, use_chat_template=False, report=report
    )
    assert chat_tokenizer.decode(t.prompt_ids + t.completion_ids) == "<s>helloworld<|end|>"
    assert report.chat_template is False
    assert encode_prompt("hello", chat_tokenizer, use_chat_template=False) == t.prompt_ids


def test_messages_need_a_chat_template(tiny_tokenizer):
    with pytest.raises(DataError, match="no chat template"):
        tokenize(
            [Example([msg(U, "hi")], [msg(A, "yo")], True, 1)],
            tiny_tokenizer,
            max_length=9,
            max_prompt_length=5,
        )
    with pytest.raises(DataError, match="use_chat_template is on"):
        encode_prompt("hi", tiny_tokenizer, use_chat_template=True)


def test_empty_conversation_prompt(chat_tokenizer):
    [t] = tokenize(
        [Example([], [msg(A, "hello")], True, 1)], chat_tokenizer, max_length=64, max_prompt_length=32
    )
    assert (
        chat_tokenizer.decode(t.prompt_ids) == "<s><|assistant|>"
        and chat_tokenizer.decode(t.completion_ids) == "hello<|end|>"
    )


def test_template_error_names_the_row(chat_tokenizer):
    chat_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        DataError, match=r"f\.jsonl, row 4: the chat template failed \(.*roles must alternate"
    ):
        tokenize(
            [Example("a", "b", True, 4)],
            chat_tokenizer,
            max_length=9,
            max_prompt_length=5,
            report=DataReport("f.jsonl"),
        )


def test_bpe_merge_across_the_boundary(tiny_tokenizer):
    # "hello wor" + "ld": the whole text tokenizes as [hello, Ġworld], the prompt alone as [hello, Ġwor]
    prompt_ids = encode_prompt("hello wor", tiny_tokenizer)
    assert tiny_tokenizer("hello world")["input_ids"][: len(prompt_ids)] != prompt_ids  # the case is real
    report = DataReport("x")
    [t] = tokenize(
        [Example("hello wor", "ld", True, 1)],
        tiny_tokenizer,
        max_length=64,
        max_prompt_length=32,
        report=report,
    )
    assert t.prompt_ids == prompt_ids  # exactly what generation sees
    assert t.completion_ids == tiny_tokenizer("ld", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    assert report.prefix_mismatches == 1 and any("tokenized separately" in w for w in report.warnings)


# rewrites earlier user turns once an answer follows, so the prompt text is not a prefix of the whole
REWRITING_TEMPLATE = (
    "{% set answered = messages[-1]['role'] == 'assistant' %}{{ bos_token }}{% for m in messages %}"
    "{% if answered and m['role'] == 'user' %}<|user|>Q: {{ m['content'] }}<|end|>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# the generation prompt opens a block that the finished conversation does not have (DeepSeek-R1 style)
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>think: {% endif %}"
)


@pytest.mark.parametrize("template", [REWRITING_TEMPLATE, THINKING_TEMPLATE])
def test_template_that_is_not_prefix_stable(template):
    tok = build_tokenizer(template, eos_token="<|end|>")
    ex = Example([msg(U, "hello")], [msg(A, "world")], True, 1)
    prompt_text = tok.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    assert not tok.apply_chat_template(ex.prompt + ex.completion, tokenize=False).startswith(prompt_text)
    report = DataReport("x")
    [t] = tokenize([ex], tok, max_length=64, max_prompt_length=32, report=report)
    assert t.prompt_ids == encode_prompt(ex.prompt, tok)
    assert tok.decode(t.completion_ids) == "world<|end|>"
    assert report.prefix_mismatches == 1


def test_eos_is_appended_when_the_template_has_no_end_token(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    [t] = tokenize([Example("hello", "world", True, 1)], tiny_tokenizer, max_length=64, max_prompt_length=32)
    assert tiny_tokenizer.decode(t.prompt_ids) == "user: hello\nassistant:"
    assert tiny_tokenizer.decode(t.completion_ids) == " world\n</s>"


LONG = "the cat sat on the mat and the dog sat on the log."


def test_long_prompts_keep_their_end_and_bos(tiny_tokenizer):
    full = encode_prompt(LONG, tiny_tokenizer)
    report = DataReport("x")
    [t] = tokenize(
        [Example(LONG, " yes", True, 1)], tiny_tokenizer, max_length=64, max_prompt_length=5, report=report
    )
    assert t.prompt_ids == [tiny_tokenizer.bos_token_id] + full[-4:]
    assert report.truncated_prompts == 1 and report.truncated_completions == 0
    assert report.prompt_tokens["max"] == len(full)  # statistics describe the data before truncation


def test_long_prompts_without_bos_keep_their_end(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    full = encode_prompt(LONG, tiny_tokenizer)
    assert full[0] != tiny_tokenizer.bos_token_id
    [t] = tokenize([Example(LONG, " yes", True, 1)], tiny_tokenizer, max_length=64, max_prompt_length=5)
    assert t.prompt_ids == full[-5:]


def test_max_length_cuts_the_completion_tail(chat_tokenizer):
    ex = Example("hello", LONG, True, 1)
    [whole] = tokenize([ex], chat_tokenizer, max_length=None, max_prompt_length=None)
    report = DataReport("x")
    limit = len(whole.prompt_ids) + 3
    [t] = tokenize([ex], chat_tokenizer, max_length=limit, max_prompt_length=64, report=report)
    assert t.prompt_ids == whole.prompt_ids and t.completion_ids == whole.completion_ids[:3]
    assert report.truncated_completions == 1 and report.completion_tokens["max"] == len(whole.completion_ids)


def test_rows_without_completion_tokens_left_are_dropped(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": LONG, "completion": " yes", "label": 1},
        {"prompt": "hi", "completion": " yes", "label": 0},
        {"prompt": "hello", "completion": " world", "label": 1},
    ]
    examples, report = load_data(write_rows(tmp_path, rows, "jsonl"))
    out = tokenize(examples, tiny_tokenizer, max_length=6, max_prompt_length=6, report=report)
    assert [t.row for t in out] == [2, 3]
    assert report.dropped_no_completion == 1 and report.dropped == {
        "no completion token left after truncation": [1]
    }
    assert (report.rows_out, report.n_desirable, report.n_undesirable) == (2, 1, 1)
    # tokenizing again with other limits replaces, not adds to, the numbers
    tokenize(examples, tiny_tokenizer, max_length=64, max_prompt_length=64, report=report)
    assert report.dropped_no_completion == 0 and report.dropped == {} and report.rows_out == 3


def test_token_stats(tiny_tokenizer):
    examples = [Example("hello", " world", True, 1), Example(LONG, " yes", False, 2)]
    report = DataReport("x")
    tokenize(examples, tiny_tokenizer, max_length=64, max_prompt_length=64, report=report)
    lengths = sorted(len(encode_prompt(e.prompt, tiny_tokenizer)) for e in examples)
    assert (report.prompt_tokens["min"], report.prompt_tokens["max"]) == tuple(lengths)
    assert report.prompt_tokens["mean"] == pytest.approx(sum(lengths) / 2, abs=0.05)
    assert report.completion_tokens == {"min": 2, "mean": 2.0, "p50": 2.0, "p95": 2.0, "max": 2}
    assert "prompt tokens" in report.format()


# --- command line ---


def test_cli_prints_the_report_and_writes_json(tmp_path, capsys):
    rows = [
        {"prompt": "hello", "completion": " world", "label": "👍"},
        {"prompt": "hi", "completion": " log", "label": "👎"},
    ]
    path = write_rows(tmp_path, rows, "jsonl")
    assert main([str(path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "examples kept" in out and "desirable          1 (50.0%)" in out
    assert json.loads((tmp_path / "r.json").read_text())["rows_in"] == 2


def test_cli_with_a_model_shows_token_lengths(tmp_path, capsys, chat_tokenizer):
    chat_tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"question": "hello", "answer": " world", "ok": "yes"}]
    path = write_rows(tmp_path, rows, "csv")
    argv = [
        str(path),
        "--model",
        str(tmp_path / "model"),
        "--max-length",
        "8",
        "--max-prompt-length",
        "4",
        "--column",
        "question=prompt",
        "--column",
        "answer=completion",
        "--column",
        "ok=label",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"chat template +used", out) and re.search(r"truncated prompts +1", out)
    assert re.search(r"prompt tokens +min \d+", out)


def test_cli_reports_bad_data(tmp_path, capsys):
    path = write_rows(tmp_path, [{"prompt": "a", "completion": "b", "label": "maybe"}], "jsonl")
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}, line 1: 'label': unknown label 'maybe'")
    assert main([str(path), "--column", "oops"]) == 2 and "NAME=CANONICAL" in capsys.readouterr().err


# --- limits that leave nothing worth training (kto_lite/data/lengths.py, docs/data.md "Truncation") ---


@pytest.fixture(scope="module")
def demo_data():
    from kto_lite.demo import DEMO_SAMPLES
    from kto_lite.model import load_tokenizer

    return load_data(DEMO_SAMPLES["kto"])[0], load_tokenizer(None)


def whole_completions(examples, tokenizer, max_length: int) -> int:
    """Examples whose completion survives max_length (max_prompt_length derived, half of it) whole."""
    full = tokenize(examples, tokenizer, max_length=None, max_prompt_length=None)
    cut = tokenize(examples, tokenizer, max_length=max_length, max_prompt_length=max(1, max_length // 2))
    kept = {t.row: len(t.completion_ids) for t in cut}
    return sum(kept.get(t.row) == len(t.completion_ids) for t in full)


def test_a_max_length_that_cuts_most_completions_below_half_is_refused_with_the_value_that_fits(demo_data):
    examples, tokenizer = demo_data
    report = DataReport("demo")
    tokenize(examples, tokenizer, max_length=4, max_prompt_length=2, report=report)
    problem = length_problem(examples, tokenizer, report, max_length=4, max_prompt_length=2)
    assert problem.startswith(f"max_length 4 (max_prompt_length 2) leaves too little to train: {len(examples)} of "
                              f"{len(examples)} examples would keep less than half of their completion tokens")
    fits = int(re.search(r"keep their whole completion: max_length (\d+)", problem)[1])
    # the value named is the smallest at which most examples keep their whole completion
    assert whole_completions(examples, tokenizer, fits) > len(examples) / 2
    assert whole_completions(examples, tokenizer, fits - 1) <= len(examples) / 2
    assert f"max_length {fits} (max_prompt_length {fits // 2})" in problem


def test_limits_that_keep_half_of_most_completions_are_accepted(demo_data):
    examples, tokenizer = demo_data
    for max_length in (12, 64):
        report = DataReport("demo")
        tokenize(examples, tokenizer, max_length=max_length, max_prompt_length=max_length // 2, report=report)
        assert length_problem(examples, tokenizer, report, max_length=max_length,
                              max_prompt_length=max_length // 2) is None


def test_train_refuses_max_length_4_before_loading_the_model(tmp_path, capsys):
    from kto_lite.commands.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--max_length", "4", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: max_length 4 (max_prompt_length 2) leaves too little to train" in err
    assert [p.name for p in out.iterdir()] == ["status.json"]  # nothing else: no config, no adapter, no report
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "max_length 4" in status["message"]


def test_data_command_says_what_train_would_refuse(capsys):
    from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES

    assert main([str(DEMO_SAMPLES["kto"]), "--model", str(DEMO_MODEL_DIR), "--max_length", "4"]) == 2
    captured = capsys.readouterr()
    assert "truncated completions" in captured.out  # the report is printed first
    assert "train would refuse these limits: max_length 4" in captured.err


@pytest.mark.slow
def test_train_reads_other_column_names_through_column_flags(tmp_path, capsys):
    """The trainer applies the mapping itself (to data and eval_data): no converted copy of the file."""
    from kto_lite.commands.train import main as train_main
    from kto_lite.demo import DEMO_SAMPLES

    rows = [json.loads(line) for line in DEMO_SAMPLES["kto"].read_text().splitlines()[:24]]
    renamed = [{"question": r["prompt"], "answer": r["completion"], "rating": r["label"]} for r in rows]
    data = write_rows(tmp_path, renamed, "csv")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--eval_data", str(data), "--column", "question=prompt", "--column",
            "answer=completion", "--column", "rating=label", "--output_dir", str(out), "--max_steps", "1",
            "--batch_size", "4", "--gradient_accumulation_steps", "1", "--load_in_4bit", "false", "--save_steps", "0"]
    assert train_main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["columns"] == {
        "question": "prompt", "answer": "completion", "rating": "label"}
    assert json.loads((out / "data_report.json").read_text())["columns"] == ["prompt", "completion", "label"]
