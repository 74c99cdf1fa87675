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
