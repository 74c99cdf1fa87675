"""One QLoRA KTO-style step under accelerate's FSDP plugin (recipes/fsdp_qlora.yaml); run by gpu_check.py:

    accelerate launch --config_file recipes/fsdp_qlora.yaml --num_processes N benchmarks/gpu_fsdp_step.py MODEL OUT.json

This is what train.py has to do for FSDP (the lead's trainer; see docs/multi_gpu.md):
1. load the 4-bit base with bnb_4bit_quant_storage = the compute dtype (FSDP shards float tensors only)
   and dtype = the same, without a device_map (accelerate places the shards);
2. decide packing and check the output head (logps.supports_packing, head.output_head) on the whole
   model, before accelerator.prepare;
3. set the plugin's auto_wrap_policy to peft's fsdp_auto_wrap_policy(model) (the fp32 LoRA weights in
   their own FSDP units), prepare the PolicyLogps module first, then build the optimizer from the
   prepared module's trainable parameters and prepare it;
4. run every forward (policy, KL, reference) through the prepared module, so that FSDP gathers the
   embedding / head weights, with the reference_mode / no_grad_policy contexts around the call;
5. clip with accelerator.clip_grad_norm_(prepared.parameters(), ...).
Writes (main process) the sharded log-probs against the same model unsharded on each process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kto_lite.batching import collate
from kto_lite.config import TrainConfig
from kto_lite.head import output_head
from kto_lite.logps import PolicyLogps, supports_packing
from kto_lite.model import add_lora


def main(model_dir: str, out_path: str) -> None:
    accelerator = Accelerator()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    storage = torch.float32 if dtype == torch.float16 else dtype  # fp16 AMP wants fp32 storage (peft docs)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=storage, quantization_config=quantization)
    base.to(accelerator.device)
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    model = add_lora(base, TrainConfig(model=model_dir, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                       gradient_checkpointing=True).resolved())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(p, 1e-3)
    output_head(model)
    packed = supports_packing(model)
    rows = collate([[1, 5, 6, 7, 8], [1, 9, 10]], [[11, 12, 13], [14, 2]], 0, packed=packed).to(accelerator.device)
    weights = torch.tensor([1.0, -2.0], device=accelerator.device)
    policy = PolicyLogps(model).train()
    with torch.autocast("cuda", dtype=dtype):
        single = policy(rows)
    (single.float() * weights).sum().backward()
    single_norm = torch.norm(torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)

    plugin = accelerator.state.fsdp_plugin
    if plugin is not None:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    prepared = accelerator.prepare(policy)
    optimizer = accelerator.prepare(torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-4))
    torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    with accelerator.autocast():
        sharded = prepared(rows)
    accelerator.backward((sharded.float() * weights).sum())
    norm = accelerator.clip_grad_norm_(prepared.parameters(), float("inf"))
    optimizer.step()
    optimizer.zero_grad()
    if accelerator.is_main_process:
        Path(out_path).write_text(json.dumps({
            "processes": accelerator.num_processes, "packed": packed,
            "logps_rel_diff": ((sharded - single).abs().max() / single.abs().max()).item(),
            "grad_norm": float(norm), "grad_norm_single": float(single_norm),
            "finite": bool(torch.isfinite(norm)), "seconds": time.perf_counter() - begin,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
