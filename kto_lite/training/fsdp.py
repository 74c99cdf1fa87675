"""How the processes of a launch hold the model: the one seam for multi-process training.

    Replicated   every process holds the whole 4-bit model (one process, or DDP through accelerate:
                 `accelerate launch` / `torchrun`); gradients are averaged by DDP
    Sharded      fsdp: true: the 4-bit base, the LoRA weights, their gradients and the optimizer state are
                 split across the processes (torch's fully_shard, FSDP2), for a model larger than one GPU

The recipe (recipe.py) asks its `Parallel` what differs and never branches on fsdp itself: how the policy
module and optimizer are prepared, which module runs the no-grad passes, whether the reference pass is
split between processes, and what a checkpoint and the final adapter hold (docs/multi_gpu.md).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError
from kto_lite.training.batching import Rows, collate
from kto_lite.training.head import output_head
from kto_lite.training.logps import PolicyLogps, completion_logps


def check_launch(config: TrainConfig, accelerator: Accelerator, precision: str) -> None:
    """Refuse a launch that cannot run as configured, before anything loads."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("launch without accelerate's FSDP plugin and set fsdp: true in the training config: "
                          "kto_lite shards the 4-bit model itself (docs/multi_gpu.md)")
    if config.fsdp and accelerator.num_processes == 1:
        raise ConfigError("fsdp shards the model across the processes of a multi-process launch; start it with "
                          "torchrun --nproc_per_node N -m kto_lite train ... (N >= 2), or leave fsdp off")
    if config.fsdp and precision == "fp16":
        raise ConfigError("fsdp needs bf16 or fp32 compute (mixed_precision: bf16, or no); this GPU computes in "
                          "fp16 (no bf16 before compute capability 8.0): train without fsdp")


def parallel(config: TrainConfig, accelerator: Accelerator) -> Replicated:
    return Sharded(accelerator) if config.fsdp else Replicated(accelerator)


class Replicated:
    """One whole copy of the model per process; accelerate prepares DDP and the fp16 loss scaler."""

    split_reference = True  # each process computes a share of the reference pass, then they are gathered

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def shard(self, policy: PolicyLogps, model, precision: str) -> None:
        """Before the optimizer is built (it must hold what each process trains): nothing to split here."""

    def prepare(self, policy: PolicyLogps, optimizer):
        return self.accelerator.prepare(policy, optimizer)  # DDP under a multi-process launch; the loss scaler

    def score(self, policy, model, rows: Rows) -> torch.Tensor:
        """(n_sequences,) log-probs for a no-grad pass: the model itself (no DDP bookkeeping)."""
        return completion_logps(model, rows)

    def gathered_training_state(self, model, optimizer) -> dict | None:
        """What a checkpoint needs beyond what the main process holds: nothing (it holds everything)."""
        return None

    def gathered_adapter(self, model) -> dict | None:
        return None

    def load_training_state(self, model, optimizer, folder, state: dict) -> None:
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])

    def timing(self) -> dict:
        return {}


class Sharded(Replicated):
    """FSDP: each process holds 1/N of the weights; every forward is a collective that all processes join."""

    split_reference = False  # every process runs every reference forward (each gathers the others' shards)

    def shard(self, policy: PolicyLogps, model, precision: str) -> None:
        self.fraction, self.root = shard(policy, model, precision), policy
        # FSDP fixes its mixed-precision dtypes at the first forward, from the weights that require grad then. That
        # must not be the reference pass (adapters off: peft freezes the LoRA weights meanwhile), or bf16 gradients
        # would be reduced as bf16 and refused by the fp32 LoRA weights: one tiny forward now, as every pass runs.
        with self.accelerator.autocast(), torch.no_grad():
            policy(collate([[0]], [[0]], 0).to(self.accelerator.device))
        reshard(policy)  # the root keeps its weights gathered after a forward: back to shards, as before it

    def prepare(self, policy: PolicyLogps, optimizer):
        return policy, optimizer  # torch's AdamW on the shards; no DDP wrapper

    def score(self, policy, model, rows: Rows) -> torch.Tensor:
        return policy(rows)  # the sharded root module: only its forward gathers the embeddings and the head

    def gathered_training_state(self, model, optimizer) -> dict | None:
        return gathered_training_state(model, optimizer)  # a collective: every process calls it

    def gathered_adapter(self, model) -> dict | None:
        return gathered_adapter(model)

    def load_training_state(self, model, optimizer, folder, state: dict) -> None:
        reshard(self.root)  # a forward (the reference pass) may have left the root's weights gathered
        load_gathered_training_state(model, optimizer, state)

    def timing(self) -> dict:
        return {"fsdp_weights_per_process": round(self.fraction, 4)}


def shard(policy: PolicyLogps, model, precision: str) -> float:
    """FSDP (torch's fully_shard, FSDP2): each decoder layer is one unit, gathered for its forward and backward
    only. Untied, frozen embeddings and head are a unit each, gathered only while they compute: neither
    backward needs their weights (head.py saves the head's gradient in forward and gathers the head
    itself). The rest (final norm; tied embeddings and head) belongs to the policy module, the root. The
    4-bit weights are stored in the compute dtype (load_base(fsdp=True)); bf16 compute gathers everything
    in bf16 and reduces gradients in fp32."""
    options = {}
    if precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = model.get_base_model()
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    frozen = not any(p.requires_grad for p in embeddings.parameters()) and output_head(model).frozen_linear
    for layer in base.get_decoder().layers:
        fully_shard(layer, **options)
    if frozen and head.weight is not embeddings.weight:  # (LoRA on either: they stay in the root)
        for module in (embeddings, head):
            fully_shard(module, **options)
            module.set_unshard_in_backward(False)
    fully_shard(policy, **options)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in policy.parameters())
    return local / sum(p.numel() for p in policy.parameters())  # the share of the weights this process holds


def reshard(policy) -> None:
    """Every FSDP unit of the policy back to its shards (torch's reshard is per unit): the state a checkpoint's
    weights are loaded into (set_state_dict cannot copy into a weight left gathered by a forward)."""
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gathered_adapter(model) -> dict[str, torch.Tensor]:
    """The trained adapter's weights, whole, from their FSDP shards (a collective: every process calls it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for name, p in model.named_parameters() if "lora_" in name and ".default." in name}


def gathered_training_state(model, optimizer) -> dict:
    """{"adapter", "optimizer"}: the trained weights by parameter name and their optimizer state, whole, from
    the FSDP shards, for a checkpoint (a collective: every process calls it; only the main one gets the
    optimizer state)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"adapter": gathered_adapter(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def load_gathered_training_state(model, optimizer, state: dict) -> None:
    """The inverse of `gathered_training_state` on a sharded model: each process keeps its shards of the whole
    tensors (every process reads the checkpoint)."""
    set_state_dict(model, optimizer, model_state_dict=state["adapter"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
