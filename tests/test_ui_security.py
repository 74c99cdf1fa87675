"""Who may use the app, and what for: through gradio_client, against the app as `python -m ui` launches it.

Reachable from other machines (here --host 127.0.0.2: any address but 127.0.0.1, ::1 and localhost
counts as such) the app asks for a password (--auth's, or a random one it prints), refuses what would
run code on this machine (python: judges, trust_remote_code) and paths typed in the browser outside
the runs folder and the uploads, unless started with --allow-code. On 127.0.0.1 (the default) nothing
of that changes. Uploads larger than --max-upload-mb are refused by every launch.
"""

from __future__ import annotations

import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from test_ui_e2e import free_port

from ui import runs as ui_runs
from ui.tabs import train

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
REMOTE_HOST = "127.0.0.2"


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _can_bind(REMOTE_HOST), reason=f"cannot listen on {REMOTE_HOST} here")


@contextmanager
def app(tmp_path, monkeypatch, *argv: str, host: str = REMOTE_HOST):
    """`python -m ui --host HOST --runs DIR ARGV...` in this process; yields (url, runs folder)."""
    from ui.__main__ import launch, parse_args
    from ui.app import demo

    for name in ("runs_dir", "remote", "allow_code"):  # launch sets them: put them back afterwards
        monkeypatch.setattr(ui_runs.SETTINGS, name, getattr(ui_runs.SETTINGS, name))
    runs = tmp_path / "runs"
    port = free_port()
    launch(parse_args(["--host", host, "--port", str(port), "--runs", str(runs), *argv]), block=False)
    try:
        yield f"http://{host}:{port}/", runs
    finally:
        demo.close()


def form(**settings) -> list:
    return [settings.get(s.name, s.default) for s in train.SPECS]


def sample_name() -> str:
    return next(k for k in ui_runs.sample_files() if k.startswith("smollm2_addition"))


# ---------------------------------------------------------------------- a password
def test_reachable_from_elsewhere_without_auth_a_password_is_made_and_printed(tmp_path, monkeypatch, capsys):
    from gradio_client import Client

    with app(tmp_path, monkeypatch) as (url, _):
        printed = capsys.readouterr().out
        found = re.search(r"sign in as (\S+) / (\S+)", printed)
        assert found and url in printed, printed
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises several kinds on a 401)
            Client(url, verbose=False)
        client = Client(url, auth=(found.group(1), found.group(2)), verbose=False)
        assert "examples" in client.predict(sample_name(), api_name="/sample")[0]


def test_the_password_given_with_auth_is_the_one_asked(tmp_path, monkeypatch, capsys):
    from gradio_client import Client

    with app(tmp_path, monkeypatch, "--auth", "me:a-long-password") as (url, _):
        assert "a-long-password" not in capsys.readouterr().out  # never printed
        Client(url, auth=("me", "a-long-password"), verbose=False)


# ---------------------------------------------------------------------- what a browser user may ask for
@pytest.fixture
def remote(tmp_path, monkeypatch, capsys):
    """A client of the app on 127.0.0.2 with its printed password, and the runs folder."""
    from gradio_client import Client

    with app(tmp_path, monkeypatch) as (url, runs):
        user, password = re.search(r"sign in as (\S+) / (\S+)", capsys.readouterr().out).groups()
        client = Client(url, auth=(user, password), verbose=False)
        client.predict(sample_name(), api_name="/sample")  # training data chosen (a session state)
        yield client, runs


@pytest.mark.parametrize("field, value, why", [
    ("model", "/etc", "model: '/etc' is refused: the app is reachable from other machines"),
    ("model", "~/.ssh", "must lie in the runs folder"),
    ("eval_data", "/etc/passwd", "eval_data: '/etc/passwd' is refused"),
    ("init_adapter", "../elsewhere", "init_adapter: '../elsewhere' is refused"),
    ("trust_remote_code", True, "trust_remote_code runs code from the model's repository: refused"),
])
def test_a_remote_start_refuses_outside_paths_and_code(remote, field, value, why):
    client, runs = remote
    message, *_ = client.predict("", *form(**{field: value}), api_name="/start")
    assert message.startswith("**Refused:**") and why in message.replace("\\", ""), message
    assert not [p for p in runs.iterdir() if p.name[0] not in "._"]  # no run folder: nothing started


def test_a_remote_start_refuses_a_python_judge(remote):
    if "judge" not in train.NAMES:
        pytest.skip("TrainConfig has no judge field")
    client, _ = remote
    message, *_ = client.predict("", *form(judge="python:os:system"), api_name="/start")
    assert "judge 'python:os:system' runs a Python function" in message


def test_the_rate_tab_refuses_python_judges_remotely(remote):
    client, _ = remote
    _, text = client.predict("python:recipes/demo_task.py:judge", "", "", api_name="/rate_judge")
    assert "runs a Python function: refused" in text.replace("\\", "") and "--allow-code" in text


def test_the_chat_refuses_a_base_model_path_outside_the_runs_folder(remote):
    client, _ = remote
    *_, status = client.predict("Hi", [], [], ui_runs.BASE, "/etc", False, "", 0, 0.9, 8, api_name="/chat")
    assert "could not load the model: base model: '/etc' is refused" in status


def test_what_lies_in_the_runs_folder_and_hub_ids_stay_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(ui_runs.SETTINGS, "runs_dir", tmp_path / "runs")
    monkeypatch.setattr(ui_runs.SETTINGS, "remote", True)
    (tmp_path / "runs" / "20250101-000000-a" / "merged").mkdir(parents=True)
    assert train.refusal(form(model="Qwen/Qwen2.5-0.5B-Instruct")) == ""
    assert train.refusal(form(model=str(tmp_path / "runs" / "20250101-000000-a" / "merged"))) == ""
    (tmp_path / "runs" / "escape").symlink_to("/etc")
    assert "is refused" in train.refusal(form(model=str(tmp_path / "runs" / "escape")))  # a link out: its target
    monkeypatch.setattr(ui_runs.SETTINGS, "allow_code", True)
    assert train.refusal(form(model="/etc", trust_remote_code=True)) == ""  # --allow-code: the owner said so


def test_allow_code_lets_a_remote_app_run_python_judges(tmp_path, monkeypatch, capsys):
    from gradio_client import Client

    with app(tmp_path, monkeypatch, "--auth", "me:pw", "--allow-code") as (url, _):
        assert "browser users may run code" in capsys.readouterr().out
        client = Client(url, auth=("me", "pw"), verbose=False)
        _, text = client.predict("python:recipes/demo_task.py:judge", "", "", api_name="/rate_judge")
        assert text == "Generate some answers first."  # not refused


# ---------------------------------------------------------------------- the default: this machine only
def test_on_loopback_nothing_changes(tmp_path, monkeypatch, capsys):
    from gradio_client import Client

    with app(tmp_path, monkeypatch, host="127.0.0.1") as (url, _):
        assert "sign in" not in capsys.readouterr().out
        client = Client(url, verbose=False)  # no password
        _, text = client.predict("python:recipes/demo_task.py:judge", "", "", api_name="/rate_judge")
        assert text == "Generate some answers first."
        *_, status = client.predict("Hi", [], [], ui_runs.BASE, str(tmp_path / "no-model"), False, "", 0, 0.9, 8,
                                    api_name="/chat")
        assert "could not load the model" in status and "refused" not in status  # tried, not refused
        assert ui_runs.SETTINGS.code_allowed


# ---------------------------------------------------------------------- uploads
def test_an_upload_over_the_cap_is_refused_and_not_kept(tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    big = tmp_path / "big.jsonl"
    row = '{"prompt": "p", "completion": "' + "x" * 1000 + '", "label": true}\n'
    big.write_text(row * 1100)  # ~1.1 MB
    with app(tmp_path, monkeypatch, "--max-upload-mb", "1", host="127.0.0.1") as (url, runs):
        client = Client(url, verbose=False)
        with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
            client.predict(handle_file(str(big)), api_name="/upload")  # a client that asks first is told
        with big.open("rb") as f:  # one that sends anyway: the server stops reading at the cap
            answer = httpx.post(url + "gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=60)
        assert answer.status_code == 413 and "maximum allowed size" in answer.text
        assert not (runs / "_data").exists()  # nothing staged
        from gradio.utils import get_upload_folder

        assert list(Path(get_upload_folder()).rglob("big.jsonl")) == []  # the part read so far is deleted
        small = tmp_path / "small.jsonl"
        small.write_text(row * 10)
        assert "examples" in client.predict(handle_file(str(small)), api_name="/upload")[0]  # under the cap: taken
        assert list(Path(get_upload_folder()).rglob("small.jsonl"))  # where an accepted upload is kept
