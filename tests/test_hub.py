"""The Hub without network: a local stand-in answers the endpoints huggingface_hub calls, and records them.

The stand-in (127.0.0.1, a thread) answers create repo, validate-yaml, preupload (every file "regular",
so the contents travel inside the commit) and commit; the test reads back what was sent.
"""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import constants

from kto_lite.errors import ConfigError
from kto_lite.hub import check_hub_access, hub_id, model_card, push_run, write_model_card


class StandIn(BaseHTTPRequestHandler):
    calls: list = []  # (method, path, body) per request, set per server

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, payload: dict, status: int = 200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(("POST", self.path, body, self.headers.get("authorization")))
        host = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            return self._reply({"url": f"{host}/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply({})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply({"commitUrl": f"{host}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        return self._reply({"error": f"unexpected {self.path}"}, 404)


@contextmanager
def stand_in_hub(monkeypatch):
    calls = []
    handler = type("Handler", (StandIn,), {"calls": calls})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode for everything else
    try:
        yield calls
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "20250101-000000-demo"
    run.mkdir()
    (run / "adapter_config.json").write_text('{"r": 8}')
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "tokenizer.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                     "data": str(tmp_path / "rows.jsonl"), "beta": 0.1,
                                                     "load_in_4bit": True, "lora_r": 8}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.5, "rewards/margins": 0.25}\n')
    (run / "data_report.json").write_text(json.dumps({"rows_in": 10, "rows_out": 10, "n_desirable": 6,
                                                      "n_undesirable": 4, "data_format": "prompt_completion"}))
    (run / "feedback.jsonl").write_text("{}\n")
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    return run


def _commit_files(calls) -> dict[str, bytes]:
    """path -> content of the files in the (single) commit the client sent."""
    commits = [body for method, path, body, _ in calls if "/commit/" in path]
    assert len(commits) == 1
    lines = [json.loads(line) for line in commits[0].splitlines() if line]
    return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


def test_model_card_follows_the_hub_conventions(run_dir):
    card = write_model_card(run_dir).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert {"kto", "lora", "kto_lite"} <= set(meta["tags"]) and "datasets" not in meta  # a local file: unknown
    assert "| `beta` | `0.1` |" in card and "| `loss` | 0.5 |" in card and "| `rewards/margins` | 0.25 |" in card
    assert "6 desirable, 4 undesirable" in card
    assert "PeftModel.from_pretrained" in card and "--gguf" in card and "ollama create" in card


def test_card_of_a_local_base_names_no_base_model(run_dir, tmp_path):
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": str(tmp_path), "data": "me/my-feedback"}))
    meta = yaml.safe_load(model_card(run_dir).split("---")[1])
    assert "base_model" not in meta and meta["datasets"] == ["me/my-feedback"]
    assert hub_id("x.gguf") is None and hub_id("org/name") == "org/name"


def test_check_hub_access_without_a_token_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    with pytest.raises(ConfigError, match="HF_TOKEN.*hf auth login"):
        check_hub_access("me/model")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert check_hub_access("me/model") == "hf_x"
    with pytest.raises(ConfigError, match="OWNER/NAME"):
        check_hub_access("not a repo")


def test_push_run_sends_the_adapter_card_and_record_not_checkpoints(run_dir, monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF...")
    write_model_card(run_dir)
    with stand_in_hub(monkeypatch) as calls:
        url = push_run(run_dir, "me/demo-kto", private=True, extra=[gguf])
    assert url.endswith("/me/demo-kto")
    create = json.loads(next(body for _, path, body, _ in calls if path == "/api/repos/create"))
    assert create["name"] == "demo-kto" and create["organization"] == "me" and create["visibility"] == "private"
    assert all(auth == "Bearer hf_test_token" for *_, auth in calls)
    files = _commit_files(calls)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                          "metrics.jsonl", "data_report.json", "README.md", "model.gguf"}
    assert files["adapter_model.safetensors"] == b"weights" and files["model.gguf"] == b"GGUF..."
    assert files["README.md"] == (run_dir / "README.md").read_bytes()


def test_cli_push_checks_the_token_before_anything_else(run_dir, monkeypatch, tmp_path, capsys):
    from kto_lite.commands import export as export_command

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert export_command.main(["--adapter", str(run_dir), "--zip", str(tmp_path / "a.zip"), "--push_to_hub", "me/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and not (tmp_path / "a.zip").exists()
    with stand_in_hub(monkeypatch) as calls:
        assert export_command.main(["--adapter", str(run_dir), "--push_to_hub", "me/x", "--hub_private", "false"]) == 0
    assert json.loads(next(b for _, p, b, _ in calls if p == "/api/repos/create"))["visibility"] == "public"
    assert "README.md" in _commit_files(calls) and "uploaded: http://127.0.0.1" in capsys.readouterr().out


def test_training_with_push_to_hub_checks_first_and_uploads_at_the_end(monkeypatch, tmp_path):
    from tiny_models import learnable_rows, make_model_dir, write_jsonl

    from kto_lite.config import TrainConfig
    from kto_lite.training.recipe import train

    model = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "rows.jsonl", learnable_rows(16, seed=0))
    config = TrainConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "run"), lora_r=4, max_steps=1,
                         batch_size=4, gradient_accumulation_steps=1, max_length=64, push_to_hub="me/tiny-kto")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        train(config, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded
    with stand_in_hub(monkeypatch) as calls:
        out = train(config, show_progress=False)
    files = _commit_files(calls)
    assert {"adapter_model.safetensors", "README.md", "config.yaml", "metrics.jsonl"} <= set(files)
    assert not any(name.startswith("checkpoints/") for name in files)
    assert files["README.md"] == (out / "README.md").read_bytes() and b"library_name: peft" in files["README.md"]
