"""End to end through the app's API with gradio_client: upload -> train -> follow -> chat -> feedback -> merge.

The app runs in this process (a server thread); training runs as the `python -m kto_lite train`
subprocess the Start button launches, on the built-in demo model (or, before it exists, a tiny
local model) for three steps.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Small enough for a CPU: a few seconds of training after the process has imported torch.
SMALL = dict(max_steps=3, batch_size=2, gradient_accumulation_steps=1, max_length=64, max_prompt_length=32,
             logging_steps=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_data(tmp: Path) -> tuple[str, Path]:
    """("" = the built-in demo model, its sample file), or a tiny local model and learnable rows."""
    from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SAMPLES

    sample = DEMO_SAMPLES.get("kto")
    if (Path(DEMO_MODEL_DIR) / "config.json").is_file() and sample is not None and sample.is_file():
        return "", sample
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import learnable_rows, make_model_dir

    model = make_model_dir(tmp / "tiny-model")
    data = tmp / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(24, seed=0)))
    return str(model), data


def form_values(**settings) -> list:
    """The train form's values in order: defaults, with `settings` on top."""
    from ui.tabs.train import SPECS

    return [settings.get(s.name, s.default) for s in SPECS]


@contextmanager
def running_app(runs_dir: Path):
    """The app on a free localhost port, as `python -m ui --runs DIR` starts it; yields its URL."""
    from ui.__main__ import launch, parse_args
    from ui.app import demo
    from ui.jobs import JOBS

    port = free_port()
    launch(parse_args(["--port", str(port), "--runs", str(runs_dir)]), block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        if JOBS.proc is not None and JOBS.proc.poll() is None:
            JOBS.proc.kill()
            JOBS.proc.wait()
        demo.close()


def wait_for_state(client, states: tuple[str, ...], timeout: float = 150) -> str:
    """Poll the Train tab's progress endpoint until the status shows one of `states`; returns the HTML."""
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        out = client.predict("__latest__", api_name="/train_progress")
        status = out[0] or status
        if any(f"kto-{s}'" in status for s in states):
            return status
        time.sleep(1.5)
    raise AssertionError(f"no {states} within {timeout} s; last status: {status}")


@pytest.mark.slow
def test_upload_train_follow_chat_feedback(tmp_path):
    from gradio_client import Client, handle_file

    model, data = model_and_data(tmp_path)
    runs = tmp_path / "runs"
    with running_app(runs) as url:
        client = Client(url, verbose=False)

        summary, *_ = client.predict(handle_file(str(data)), api_name="/upload")
        assert "examples" in summary and "desirable" in summary

        message, *_ = client.predict("e2e", *form_values(model=model, **SMALL), api_name="/start")
        assert "Started" in message, message
        status = wait_for_state(client, ("finished", "failed"))
        run = next(p for p in runs.iterdir() if p.name.endswith("-e2e"))
        assert "kto-finished'" in status, (status, (run / "train.log").read_text()[-2000:])
        assert "step 3 / 3" in status
        assert (run / "adapter_model.safetensors").is_file()
        assert (run / "train.log").is_file() and not list((runs / ".logs").glob("*.log"))
        loss_plot = client.predict("__latest__", api_name="/train_progress")[2]
        loss_plot = loss_plot.get("value", loss_plot)  # shown from two logged steps on: an update with its value
        assert [row[0] for row in loss_plot["data"] if row[1] is not None] == [1, 2, 3]

        _, tuned, _, chat_status = client.predict("Hello", [], [], str(run), "", False, "", 0, 0.9, 8,
                                                  api_name="/chat")
        reply = tuned[-1]
        assert reply["role"] == "assistant" and "tokens in" in chat_status
        text = "".join(part["text"] for part in reply["content"])

        counts = client.predict(str(run), "", "Hello", text, True, api_name="/record_feedback")
        assert "1 liked / 0 disliked" in counts
        rows = [json.loads(line) for line in (run / "feedback.jsonl").read_text().splitlines()]
        assert rows == [{"prompt": "Hello", "completion": text, "label": True}]

        log, snippet = client.predict(str(run), api_name="/merge")  # `python -m kto_lite export --merge`
        assert (run / "merged" / "config.json").is_file(), log
        assert "AutoModelForCausalLM.from_pretrained" in snippet


@pytest.mark.parametrize("argv", [[], ["--host", "0.0.0.0", "--auth", "me:secret"]])
def test_command_line_defaults_to_localhost(argv):
    from ui.__main__ import parse_args

    args = parse_args(argv)
    assert args.host == (argv[1] if argv else "127.0.0.1")
    assert args.port == 7860 and args.runs == "runs" and args.max_upload_mb > 0
