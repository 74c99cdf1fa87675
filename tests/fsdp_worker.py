"""Worker of tests/test_fsdp.py, one per process (torchrun --nproc_per_node 2, gloo on CPU).

The QLoRA model exactly as FSDP needs it: 4-bit weights stored in the compute dtype
(bnb_4bit_quant_storage), sharded as the trainer shards it (train.shard: torch's fully_shard on every
decoder layer, the untied embeddings and head, then the whole policy). Writes one JSON file per
process: log-probs and LoRA gradients (norms) before and after sharding, for padded and packed rows,
whether the embeddings or the head stayed whole into backward, and the bytes the process holds once
sharded.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kto_lite.config import TrainConfig
from kto_lite.training.batching import collate
from kto_lite.training.fsdp import shard
from kto_lite.training.logps import PolicyLogps


def main(path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quantization)
    from kto_lite.model import add_lora

    torch.manual_seed(0)  # the same LoRA initialisation in every process
    model = add_lora(model, TrainConfig(model=path, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                        gradient_checkpointing=True).resolved())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(p, 0.01)
    model.train()
    policy = PolicyLogps(model)
    layouts = {name: collate([[1, 5, 6, 7], [1, 8, 9]], [[10, 11, 12], [13, 2]], 0, packed=name == "packed")
               for name in ("padded", "packed")}
    weights = torch.tensor([1.0, -2.0])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    base = model.get_base_model()
    whole_in_backward = set()  # weights of the embeddings and the head held unsharded while backward runs

    def step(rows):
        values = policy(rows)
        for name, module in (("embeddings", base.get_input_embeddings()), ("head", base.get_output_embeddings())):
            if isinstance(module.weight, DTensor) != sharded:
                whole_in_backward.add(name)
        (values * weights).sum().backward()
        params = dict(policy.named_parameters())
        grads = {}
        for name in trainable:
            grad = params["model." + name].grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).norm().item()
        policy.zero_grad()
        return values.tolist(), grads

    sharded = False
    before = {name: step(rows) for name, rows in layouts.items()}
    local_before = sum(p.numel() for p in policy.parameters())
    sharded = shard(policy, model, "no") < 1
    whole_in_backward.clear()
    local_after = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in policy.parameters())
    after = {name: step(rows) for name, rows in layouts.items()}
    result = {"rank": dist.get_rank(), "before": before, "after": after, "local_params": [local_before, local_after],
              "whole_in_backward": sorted(whole_in_backward), "bytes": held_bytes(policy, layouts["packed"])}
    # one file per process: two processes printing to one pipe can interleave their lines
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def held_bytes(policy, rows) -> dict:
    """What this process holds between steps, in bytes (for memory.estimate_memory's FSDP figures): its shards
    of the weights with bitsandbytes' quantization constants (whole in every process), of the LoRA weights,
    and of AdamW's state after one step."""
    def local(p):
        t = p.to_local() if hasattr(p, "to_local") else p
        return t.untyped_storage().nbytes()

    constants = 0
    for module in policy.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            tensors = (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)
            constants += sum(t.untyped_storage().nbytes() for t in tensors)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    policy(rows).sum().backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": sum(local(p) for p in policy.parameters() if not p.requires_grad) + constants,
            "lora_weights": sum(local(p) for p in trainable), "optimizer_state": sum(local(v) for v in state)}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
