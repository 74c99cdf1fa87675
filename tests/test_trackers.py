"""report_to: the same metric names and values as metrics.jsonl, in TensorBoard and (offline) W&B."""

import json

import pytest
from tiny_models import make_training_dir

from kto_lite.config import TrainConfig
from kto_lite.runs import read_metrics
from kto_lite.training.recipe import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_training_dir(tmp_path_factory.mktemp("trackers"))


def run(workdir, name, **kw):
    return train(TrainConfig(model=str(workdir / "model"), data=str(workdir / "train.jsonl"),
                             output_dir=str(workdir / name), lora_r=4, batch_size=4, gradient_accumulation_steps=1,
                             max_length=64, max_steps=3, save_steps=0, learning_rate=1e-3, **kw), show_progress=False)


def test_tensorboard_event_files_hold_the_logged_metrics(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(workdir, "tb", report_to="tensorboard")
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    rows = read_metrics(out)
    for key in ("loss", "kl", "rewards/chosen", "rewards/margins", "learning_rate", "grad_norm"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-5, abs=1e-7)) for r in rows], key


def wandb_history(path) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (32 KiB blocks of chunks with a
    7-byte header: crc32c, length, type) of wandb's `Record` protobufs, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, pending, pos = path.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_metrics(workdir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workdir / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (workdir / "wandb").mkdir()
    out = run(workdir, "wb", report_to="wandb")
    files = list((workdir / "wandb").rglob("run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    rows = read_metrics(out)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        for key in ("loss", "kl", "rewards/margins", "learning_rate", "tokens_per_second"):
            assert h[key] == pytest.approx(r[key], rel=1e-6), key
