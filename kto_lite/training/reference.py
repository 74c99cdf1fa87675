"""Reference log-probs, computed once (adapters off, no grad, large batches) and cached on disk.

A cache entry holds log pi_ref(completion | prompt) for a list of (prompt_ids, completion_ids)
sequences. Its key hashes everything the numbers depend on: the model (config, quantization,
dtype and a sample of every weight tensor) and the exact token ids of every sequence, which
already encode the data, the chat template, truncation lengths and, for KL rows, the pairing. The
per-epoch reshuffle changes only the order in which cached values are read, never the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kto_lite.files import DiskFullError, atomic_path
from kto_lite.model import base_model, has_reference_adapter, reference_mode
from kto_lite.training.batching import collate, collate_shared
from kto_lite.training.logps import attention_implementation, completion_logps, supports_packing

REFERENCE_BATCH_MULTIPLIER = 2  # no-grad batches of 2 x batch_size: faster, and below the training peak


def default_cache_dir() -> Path:
    return Path(os.environ.get("KTO_LITE_CACHE", Path.home() / ".cache" / "kto_lite"))


def model_fingerprint(model, revision: str | None = None) -> str:
    """Hash of what the reference numbers depend on besides the tokens: the base model's config (incl.
    quantization and dtype), its weight files (name, size, mtime; for a Hub id the commit they came from:
    `revision` resolved in the local Hub cache), the attention kernel, and the versions of the libraries that
    compute them (torch, transformers, bitsandbytes: an upgrade may change a kernel's rounding).

    The weights on disk, not in memory: bitsandbytes repacks 4-bit weights on their first CPU forward,
    and a hash of tensors would change under our feet. Adapters are not part of the reference.
    """
    import bitsandbytes
    import transformers

    h = hashlib.sha256()
    base = base_model(model)
    h.update(base.config.to_json_string(use_diff=False).encode())
    h.update(f"torch {torch.__version__} transformers {transformers.__version__} bitsandbytes "
             f"{bitsandbytes.__version__} attention {attention_implementation(base)}".encode())
    source = Path(base.config._name_or_path or "")
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"):
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:  # a Hub id: the commit identifies the weights
        h.update(f"{source}@{hub_commit(str(source), revision)}".encode())
    if has_reference_adapter(model):  # reference: init_adapter -- the frozen adapter is part of the reference
        for name, tensor in sorted(model.state_dict().items()):
            if ".reference." in name:
                h.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a Hub id's `revision` (None: the default branch) names in the local Hub cache, where
    from_pretrained just put it; the revision itself when it is not found there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id (e.g. a path that no longer exists)
        config = None
    return Path(config).parent.name if isinstance(config, str) else str(revision)


def sequences_fingerprint(sequences: Sequence[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for prompt, completion in sequences:
        h.update(json.dumps([prompt, completion]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model, sequences: Sequence[tuple[list[int], list[int]]], *, pad_token_id: int, batch_size: int,
    desc: str = "reference log-probs", show_progress: bool = True, shared: bool = False, packed: bool | None = None,
    score=None,
) -> torch.Tensor:
    """log pi_ref for each (prompt, completion) pair, (N,) float32 on CPU.

    score: rows -> log-probs, the module that runs the model (the trainer's policy module: under FSDP
    only its forward gathers the sharded weights); default `completion_logps` on `model`.

    Sorted by length. With padding-free rows (`packed`: the run's layout.RowLayout; None: where
    logps.supports_packing), each pass packs consecutive sequences up to batch_size x the longest
    sequence's tokens: never more tokens than the padded worst case (what memory.py budgets), and many
    short rows share one pass, so there are fewer passes (each 4-bit layer dequantizes its weights once
    per pass). Otherwise padded batches of batch_size rows.

    shared=True (a model where logps.supports_shared_prompts): each sequence is (prompt, [completion,
    ...]), all with the same number K of completions, scored after one copy of the prompt
    (batching.collate_shared); the result is (N, K).
    """
    device = next(model.parameters()).device
    lengths = [len(p) + (sum(map(len, c)) if shared else len(c)) for p, c in sequences]
    order = sorted(range(len(sequences)), key=lambda i: lengths[i])
    if packed is None:
        packed = shared or (bool(sequences) and supports_packing(model))
    # as many tokens as batch_size of the longest prompt+completion (shared: a prompt's trees pack to that too)
    budget = batch_size * max((len(p) + max(map(len, c), default=0) if shared else n
                               for (p, c), n in zip(sequences, lengths)), default=0)
    batches, batch, tokens = [], [], 0
    for i in order:
        if batch and (len(batch) == batch_size if not packed else tokens + lengths[i] > budget):
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += lengths[i]
    batches += [batch] if batch else []
    k = len(sequences[0][1]) if shared and sequences else 1
    out = torch.zeros((len(sequences), k) if shared else len(sequences), dtype=torch.float32)
    score = score or (lambda rows: completion_logps(model, rows))
    with reference_mode(model):
        for idx in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            prompts = [sequences[i][0] for i in idx]
            if shared:
                rows = collate_shared(prompts, [[sequences[i][1][j] for i in idx] for j in range(k)])
                out[idx] = score(rows.to(device)).float().cpu().view(k, len(idx)).T
            else:
                rows = collate(prompts, [sequences[i][1] for i in idx], pad_token_id, packed=packed)
                out[idx] = score(rows.to(device)).float().cpu()
    return out


def cached_reference_logps(
    model, sequences, *, pad_token_id: int, batch_size: int, cache_dir: Path | None, fingerprint: str,
    desc: str = "reference log-probs", show_progress: bool = True, world: int = 1, rank: int = 0,
    shared: bool = False, packed: bool | None = None, score=None, split: bool = True,
) -> torch.Tensor:
    """compute_reference_logps, read from / written to `cache_dir` (None: no caching).

    With several processes (world > 1) each computes every world-th sequence and the pieces are
    gathered, so the pass costs 1/world of the single-process time; every process gets all values.
    split=False (FSDP, where every forward is a collective): every process computes every sequence.
    """
    key = hashlib.sha256((fingerprint + sequences_fingerprint(sequences)).encode()).hexdigest()[:32]
    path = Path(cache_dir) / "reference" / f"{key}.pt" if cache_dir is not None else None
    hit = path is not None and path.is_file()
    if world > 1:  # every process must take the same branch (the file may appear while they check)
        hit = _all_processes(hit)
    shape = (len(sequences), len(sequences[0][1])) if shared and sequences else (len(sequences),)
    if hit:
        values, damage = _read_cache(path, shape)
        if world > 1:  # every process takes the same branch
            damage = None if _all_processes(damage is None) else damage or "damaged on another process"
        if damage is None:
            return values
        if rank == 0:
            print(f"reference cache {path} is damaged ({damage}): recomputing it", file=sys.stderr, flush=True)
    mine = list(range(rank, len(sequences), world)) if split else list(range(len(sequences)))
    values = torch.zeros(shape, dtype=torch.float32)
    values[mine] = compute_reference_logps(model, [sequences[i] for i in mine], pad_token_id=pad_token_id,
                                           batch_size=batch_size, desc=desc, show_progress=show_progress,
                                           shared=shared, packed=packed, score=score)
    if world > 1 and split:
        import torch.distributed as dist

        device = next(model.parameters()).device
        values = values.to(device)
        dist.all_reduce(values)  # each position is non-zero on exactly one process
        values = values.cpu()
    if path is not None and rank == 0:
        _write_cache(path, values)
    return values


def _checksum(values: torch.Tensor) -> str:
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()


def _read_cache(path: Path, shape: tuple) -> tuple[torch.Tensor | None, str | None]:
    """(values, None), or (None, what is wrong): a file cut short, not a cache, or values that are not the ones
    its checksum was taken of (a disk or a copy that changed them)."""
    try:
        saved = torch.load(path, weights_only=True)
        values = saved["values"]
        if tuple(values.shape) != shape:
            return None, f"{tuple(values.shape)} values where {shape} are expected"
        if _checksum(values) != saved["sha256"]:
            return None, "its checksum does not match"
        return values, None
    except Exception as e:  # noqa: BLE001 - whatever torch makes of a damaged file, the answer is to recompute
        return None, f"unreadable: {type(e).__name__}"


def _write_cache(path: Path, values: torch.Tensor) -> None:
    """Written whole or not at all; a full disk costs the cache, not the run (the values are computed)."""
    try:
        with atomic_path(path, needed=values.numel() * 4 + 1024) as tmp:  # a concurrent reader never sees half
            torch.save({"values": values, "sha256": _checksum(values)}, tmp)
    except DiskFullError as e:
        print(f"warning: {e} The run goes on without this reference cache (the next run computes it again).",
              file=sys.stderr, flush=True)


def _all_processes(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
