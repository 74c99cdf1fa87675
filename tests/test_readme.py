"""README tells the truth: the config table matches TrainConfig, the first commands are the real ones."""

from pathlib import Path

from kto_lite.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_table_is_generated_from_trainconfig():
    start = "<!-- config-table: generated from TrainConfig; tests/test_readme.py keeps it in sync -->\n"
    table = README.split(start)[1].split("<!-- /config-table -->")[0].strip()
    assert table == markdown_table(), "regenerate with: python -c 'from kto_lite.config import markdown_table; print(markdown_table())'"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    blocks = README.split("```bash\n")
    app, tests = blocks[1].split("\n```")[0], blocks[2].split("\n```")[0]
    assert app.endswith("python -m ui") and tests.endswith("python -m pytest")
    assert README.index(app) < 400  # at the very top
    assert tests in (ROOT / ".ci" / "run").read_text()
