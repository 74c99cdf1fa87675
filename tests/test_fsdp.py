"""QLoRA sharded with FSDP across two CPU processes gives the same log-probs and LoRA gradients as one process.

The sharding the trainer does under `fsdp: true` (train.shard: torch's own FSDP, fully_shard, on gloo
here), checked piece by piece: 4-bit weights stored in the compute dtype (bnb_4bit_quant_storage), each
decoder layer, the embeddings, the head and the policy sharded, padded and packed rows; the embeddings
and the head not held whole in backward; and what each process then holds against
`estimate --fsdp true --processes 2`. The whole training run under torchrun is
tests/test_train.py::test_fsdp_trains_what_ddp_trains.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model_dir

from kto_lite.config import TrainConfig
from kto_lite.memory import estimate_memory

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_two_process_qlora_shards_equal_one_process(tmp_path):
    path = make_model_dir(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000),
                           str(REPO / "tests" / "fsdp_worker.py"), str(path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in lines:
        for layout in ("padded", "packed"):
            before_values, before_grads = result["before"][layout]
            after_values, after_grads = result["after"][layout]
            torch.testing.assert_close(torch.tensor(after_values), torch.tensor(before_values), rtol=1e-5, atol=1e-5)
            assert before_grads.keys() == after_grads.keys() and len(before_grads) > 0
            for name, norm in before_grads.items():
                assert norm > 0 and after_grads[name] == pytest.approx(norm, rel=1e-4), (layout, name)
        local_before, local_after = result["local_params"]
        assert local_after < 0.6 * local_before  # each process holds about half of the (4-bit) weights
        assert result["whole_in_backward"] == []  # embeddings and head gathered only while they compute
    # what `python -m kto_lite estimate --fsdp true --processes 2` says one process holds, within 3%
    config = TrainConfig(model=str(path), lora_r=4, lora_alpha=8, fsdp=True, optimizer="adamw_torch")
    predicted = estimate_memory(config, device="cpu", processes=2)
    alone = estimate_memory(config, device="cpu", processes=1)
    for key in ("weights", "lora_weights", "optimizer_state"):
        measured = [result["bytes"][key] for result in lines]
        assert all(abs(m - getattr(predicted, key)) <= 0.03 * m for m in measured), (key, measured, predicted)
        assert getattr(predicted, key) < 0.6 * getattr(alone, key)
    assert predicted.fsdp_gathered > 0 and alone.fsdp_gathered == 0


# ---------------------------------------------------------------------- whole runs under torchrun (2 CPU processes)
def launch(tmp_path, name: str, *args: str, bf16: bool = False, port: int, cache: str = "cache"
           ) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node 2 of `python -m kto_lite train` on the tiny model, fsdp: true, with a fresh
    reference cache (a cache miss: the reference pass runs under FSDP). bf16: CPU autocast, every forward's
    autocast logged to tmp_path/autocast.rank<N> (tests/train_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KTO_LITE_CACHE": str(tmp_path / cache),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "AUTOCAST_LOG": str(tmp_path / "autocast")}
    program = [str(REPO / "tests" / "train_worker.py")] if bf16 else ["-m", "kto_lite", "train"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *program, "--model", str(tmp_path / "model"), "--data",
                           str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / name), "--fsdp", "true",
                           "--batch_size", "4", "--max_length", "64", "--lora_r", "4", "--max_steps", "2", *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.fixture
def small_run(tmp_path):
    from tiny_models import learnable_rows, write_jsonl

    make_model_dir(tmp_path / "model")  # untied embeddings and head: each a unit of its own under FSDP
    write_jsonl(tmp_path / "train.jsonl", learnable_rows(32, seed=0))
    write_jsonl(tmp_path / "eval3.jsonl", learnable_rows(3, seed=1, held_out=True))  # one batch for two processes
    write_jsonl(tmp_path / "eval12.jsonl", learnable_rows(12, seed=2, held_out=True))  # three batches for two
    return tmp_path


FSDP_CASES = {  # name: (flags, eval file) -- each layout decided before sharding, each reference pass a cache miss
    "padded": (("--padding_free", "false"), "eval3.jsonl"),
    "separate_rows": (("--share_prompts", "false"), "eval12.jsonl"),
    "apo_zero_unpaired": (("--loss_type", "apo_zero_unpaired"), "eval3.jsonl"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_runs_train_and_evaluate_every_held_out_example(small_run, case):
    """FSDP with an untied model trains with padded rows, with separate (unshared) rows and with the loss that has
    no KL rows; evaluation with an eval split smaller than one batch per process (or an uneven number of
    batches) neither fails the run at its last step nor leaves an example out of the metrics."""
    flags, eval_file = FSDP_CASES[case]
    port = 29540 + list(FSDP_CASES).index(case)
    result = launch(small_run, case, *flags, "--eval_data", str(small_run / eval_file), "--eval_steps", "1",
                    "--save_steps", "1", port=port)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = small_run / case
    from kto_lite.runs import read_metrics, read_status

    assert read_status(out)["status"] == "finished" and (out / "adapter_model.safetensors").is_file()
    held_out = len((small_run / eval_file).read_text().splitlines())
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["eval_count/chosen"] + row["eval_count/rejected"] == held_out, row
    if case == "padded":  # resumed with a cold reference cache: its pass runs before the checkpoint is loaded
        resumed = launch(small_run, "padded_resumed", *flags, "--resume_from_checkpoint",
                         str(out / "checkpoints" / "checkpoint-1"), port=port + 10, cache="cold_cache")
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        again = read_metrics(small_run / "padded_resumed")
        assert [r["step"] for r in again] == [2] and again[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)


@pytest.mark.multiprocess
def test_fsdp_every_pass_runs_under_the_same_autocast(small_run):
    """bf16 autocast under FSDP: the policy forward runs under the autocast of the reference pass and the KL rows
    (accelerate adds it to a DDP module's forward; FSDP's module has no wrapper), so r and z0 share numerics: at
    the first step (LoRA B = 0: the policy is the reference) the rewards and the KL estimate are exactly 0."""
    result = launch(small_run, "bf16", "--precompute_reference", "false", "--lora_dropout", "0", bf16=True,
                    port=29545)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    from kto_lite.runs import read_metrics

    for rank in (0, 1):
        passes = [json.loads(line) for line in (small_run / f"autocast.rank{rank}").read_text().splitlines()]
        assert any(p["grad"] for p in passes) and any(not p["grad"] for p in passes)  # policy, and no-grad passes
        assert all(p["autocast"] for p in passes), passes
    first = read_metrics(small_run / "bf16")[0]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["kl"] == 0, first
