"""`python -m kto_lite train ARGS` for torchrun, with mixed precision forced to bf16 on a CPU.

kto_lite refuses bf16 without a CUDA GPU (an emulated bf16 answer is never trusted for a real run), but
torch's CPU autocast computes in bf16 for real: the tests use it to check that every pass of a run (policy,
reference, KL rows) runs under the same autocast (tests/test_fsdp.py). With AUTOCAST_LOG=PREFIX each process
writes, for every forward of the policy module (under FSDP every pass goes through it), whether autocast was
on and whether grad was, one JSON line to PREFIX.rank<N>.
"""

import json
import os
import sys

import torch

import kto_lite.model
import kto_lite.training.recipe
from kto_lite.training.logps import PolicyLogps


def bf16(setting: str = "auto") -> str:
    return "bf16"


def log_autocast(prefix: str) -> None:
    forward = PolicyLogps.forward

    def logged(self, rows, *args, **kwargs):
        with open(f"{prefix}.rank{os.environ.get('RANK', 0)}", "a") as f:
            f.write(json.dumps({"autocast": torch.is_autocast_enabled("cpu"), "grad": torch.is_grad_enabled()}) + "\n")
        return forward(self, rows, *args, **kwargs)

    PolicyLogps.forward = logged


if __name__ == "__main__":
    kto_lite.model.choose_precision = bf16  # load_base: bf16 weights and 4-bit compute dtype
    kto_lite.training.recipe.choose_precision = bf16  # the Accelerator: bf16 autocast
    if os.environ.get("AUTOCAST_LOG"):
        log_autocast(os.environ["AUTOCAST_LOG"])
    from kto_lite.commands import train

    sys.exit(train.main(sys.argv[1:]))
