"""Judges: each built-in judge on good and bad rows, python judges, and specs that must be refused."""

import pytest

from kto_lite.errors import UsageError
from kto_lite.judges import JudgeError, JudgeSpecError, apply_judge, last_number, make_judge

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.mark.parametrize(
    ("spec", "completion", "row", "expected"),
    [
        ("exact", " 42 \n", {"answer": "42"}, True),
        ("exact", "42.", {"answer": "42"}, False),
        ("exact", "Paris", {"answer": "paris"}, False),  # case matters: "exact" means exact
        ("exact", "5", {"answer": 5}, True),  # a number in the file compares as its text
        ("exact", "5", {"answer": 5.0}, True),
        ("contains", "The capital is Paris.", {"answer": "Paris"}, True),
        ("contains", "The capital is Lyon.", {"answer": "Paris"}, False),
        ("number", "so 17 + 25 = 42.", {"answer": "#### 42"}, True),
        ("number", "42 or maybe 43", {"answer": "42"}, False),  # the last number counts
        ("number", "It is 1,234.", {"answer": 1234}, True),
        ("number", "-7", {"answer": "-7.0"}, True),
        ("number", "no idea", {"answer": "42"}, False),  # no number: wrong, not an error
        ("regex:^yes\\b", "yes, indeed", {}, True),
        ("regex:^yes\\b", "no, yes", {}, False),
        ("regex:= {reference}\\.$", "2 + 3 = 5.", {"answer": "5"}, True),
        ("regex:= {reference}\\.$", "2 + 3 = 51.", {"answer": "5"}, False),
        ("regex:^{reference}$", "1+1", {"answer": "1+1"}, True),  # the reference is escaped
        ("regex:^{reference}$", "11", {"answer": "1+1"}, False),
    ],
)
def test_builtin_judges(spec, completion, row, expected):
    judge = make_judge(spec)
    assert judge("What is 2 + 3?", completion, row) is expected
    assert judge(MESSAGES, completion, row) is expected  # the prompt may be messages


def test_reference_column_default_order_and_explicit_name():
    row = {"solution": "1", "target": "2", "reference": "3", "answer": "4", "gold": "5"}
    assert make_judge("exact")("q", "4", row)  # "answer" first
    assert make_judge("exact")("q", "2", {"solution": "1", "target": "2"})
    assert make_judge("exact", reference_column="gold")("q", "5", row)
    assert not make_judge("exact", reference_column="gold")("q", "4", row)


def test_row_without_reference_is_a_judge_error_with_the_reason():
    judge = make_judge("number")
    label, reason = apply_judge(judge, "q", "42", {"prompt": "q"})
    assert label is None and "reference answer" in reason and "answer, reference" in reason
    label, reason = apply_judge(judge, "q", "42", {"answer": "forty-two"})
    assert label is None and "has no number" in reason
    with pytest.raises(JudgeError):
        make_judge("exact", reference_column="gold")("q", "x", {"answer": "x"})


def test_check_columns_refuses_files_without_any_reference_column():
    make_judge("regex:^a").check_columns(["prompt"], "p.jsonl")  # needs no reference
    make_judge("exact").check_columns(["prompt", "target"], "p.jsonl")
    with pytest.raises(JudgeSpecError, match="p.jsonl.*--reference_column"):
        make_judge("exact").check_columns(["prompt", "gold"], "p.jsonl")
    with pytest.raises(JudgeSpecError, match="'gold'"):
        make_judge("contains", reference_column="gold").check_columns(["prompt", "answer"], "p.jsonl")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown judge"),
        ("exactly", "unknown judge"),
        ("exact:foo", "unknown judge"),
        ("regex:", "without a pattern"),
        ("regex:(unclosed", "not a valid regular expression"),
        ("python:nomodule_xyz_123:f", "cannot import module"),
        ("python:json", "python:module:function"),
        ("python:json:no_such_function", "no function"),
        ("python:missing/file.py:f", "no such file"),
    ],
)
def test_bad_specs_are_usage_errors(spec, message):
    with pytest.raises(JudgeSpecError, match=message) as info:
        make_judge(spec)
    assert isinstance(info.value, UsageError)  # the CLI turns these into exit code 2


def test_threshold_is_refused_for_builtin_judges():
    with pytest.raises(JudgeSpecError, match="threshold"):
        make_judge("exact", threshold=0.5)


JUDGE_FILE = '''
def two_args(prompt, completion):
    return completion.strip().endswith("!")

def with_row(prompt, completion, row):
    return completion.strip() == row["gold"]

def score(prompt, completion, row):
    return len(completion) / 10

def broken(prompt, completion, row):
    raise KeyError("gold")

def text(prompt, completion, row):
    return "yes"

def messages_aware(prompt, completion, row):
    return isinstance(prompt, list) and prompt[-1]["content"].startswith("What")

def one_arg(completion):
    return True
'''


@pytest.fixture
def judge_file(tmp_path):
    path = tmp_path / "my_judges.py"
    path.write_text(JUDGE_FILE)
    return path


def test_python_file_judges(judge_file):
    assert make_judge(f"python:{judge_file}:two_args")("q", "wow!", {})
    assert not make_judge(f"python:{judge_file}:two_args")("q", "wow", {})
    assert make_judge(f"python:{judge_file}:with_row")("q", " a ", {"gold": "a"})
    assert not make_judge(f"python:{judge_file}:with_row")("q", "b", {"gold": "a"})
    assert make_judge(f"python:{judge_file}:messages_aware")(MESSAGES, "x", {})


def test_python_score_needs_a_threshold(judge_file):
    judge = make_judge(f"python:{judge_file}:score", threshold=0.5)
    assert judge("q", "12345", {}) and not judge("q", "1234", {})  # 0.5 >= 0.5; 0.4 < 0.5
    label, reason = apply_judge(make_judge(f"python:{judge_file}:score"), "q", "12345", {})
    assert label is None and "threshold" in reason


def test_python_judge_that_raises_or_returns_text_labels_nothing(judge_file):
    label, reason = apply_judge(make_judge(f"python:{judge_file}:broken"), "q", "x", {})
    assert label is None and reason == "KeyError: 'gold'"
    label, reason = apply_judge(make_judge(f"python:{judge_file}:text"), "q", "x", {})
    assert label is None and "not a bool or a number" in reason


def test_python_judge_with_wrong_signature_is_refused(judge_file):
    with pytest.raises(JudgeSpecError, match="must take"):
        make_judge(f"python:{judge_file}:one_arg")


def test_python_module_judge(judge_file, monkeypatch):
    monkeypatch.syspath_prepend(str(judge_file.parent))
    assert make_judge("python:my_judges:two_args")("q", "ok!", {})


def test_last_number():
    assert last_number("10-5") == 5  # a minus between terms is not a sign
    assert last_number("x = -5") == -5
    assert last_number("#### 1,234") == 1234
    assert last_number("so 1,234.5 apples") == 1234.5
    assert last_number("none here") is None
