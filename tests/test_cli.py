"""The command line's shared conventions (kto_lite/commands/cli.py): help, usage errors, piped chat."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kto_lite.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def exit_code(argv: list[str]) -> int:
    """A command's exit status, whether it returns it or argparse raises it (--help)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


# ---------------------------------------------------------------------- --help
@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_renders(command, capsys):
    """argparse %-formats help texts: a bare % in a field's help ("~30% slower") printed a dict of the action."""
    assert exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m kto_lite {command}")
    assert "{'option_strings'" not in out and "%(" not in out


def test_a_percent_in_a_fields_help_is_printed_as_written(capsys):
    assert exit_code(["train", "--help"]) == 0
    assert "much less memory, ~30% slower" in " ".join(capsys.readouterr().out.split())


def test_chat_help_says_questions_can_be_piped(capsys):
    assert exit_code(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    assert "piped on stdin" in out and 'echo "What is 2 + 3?" | python -m kto_lite chat' in out


# ---------------------------------------------------------------------- usage errors
def test_a_misspelt_flag_prints_the_suggestion_then_one_usage_line(capsys):
    assert exit_code(["train", "--learning_rat", "1e-4"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "python -m kto_lite train: error: --learning_rat: did you mean --learning_rate?"
    assert lines[1].startswith("usage: python -m kto_lite train [config] [options]")


def test_the_usage_line_names_the_required_arguments(capsys):
    assert exit_code(["sample", "--model", "m"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert "required: --prompts, --out" in lines[0]
    assert lines[1].startswith("usage: python -m kto_lite sample --prompts PROMPTS --out OUT [options]")
    assert len(lines) == 2


def test_column_is_a_flag_of_train_and_data(capsys):
    for command in ("train", "data"):
        assert exit_code([command, "--help"]) == 0
        assert "--column NAME=CANONICAL" in capsys.readouterr().out


def test_a_commands_own_flag_is_not_taken_for_the_config_field_of_the_same_name():
    """`loop --judge` judges the loop's samples; the config field `judge` turns on a judged evaluation inside
    each training run: the command's flag must not set the field."""
    from kto_lite.commands import cli

    parser = cli.Parser("x", "")
    parser.add_flag("judge")
    parser.add_config_fields()
    args = parser.parse_args(["--judge", "exact", "--beta", "0.2", "--column", "q=prompt"])
    assert cli.config_overrides(args) == {"beta": 0.2, "columns": {"q": "prompt"}}


# ---------------------------------------------------------------------- chat with piped questions
@pytest.mark.slow
def test_chat_answers_piped_questions_and_exits_0():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "kto_lite", "chat", "--temperature", "0"], input="What is 2 + 3?\n",
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2 + 3 = 5.\n"  # the reply alone (the demo model, greedy)
    assert "chatting with" in done.stderr
