"""Seeded, batched sampling: prompts in, n completions per prompt out, the same for any batch size.

Used by `python -m kto_lite sample`, `evaluate` and `loop`. Three pieces:
- `read_prompts`: a prompt file in any of the project's formats (a `prompt` column, text or messages,
  or `messages`), with the rest of each row kept for the judges (the reference answer).
- `model_spec` / `load_models`: one base, loaded as training loads it, with any number of adapters on top; `use(name)`
  switches between them (None: adapters off, the base). The weights exist once in memory.
- `generate_samples`: left-padded batches through `model.generate`, with prompts encoded exactly as
  training encodes them (`kto_lite.data.encode_prompt`: the chat template with its generation prompt)
  and chat's stop tokens.

Why the samples do not depend on the batch size or on resuming: sample j of prompt i draws its random
numbers from its own generator, seeded from (seed, i, j) (`row_seed`). `_SeededSampling` does the draw
inside `generate` (which then runs greedily on a one-hot result): temperature, then top-p (nucleus),
then one uniform number per row and step, turned into a token by the inverse CDF. A row therefore sees
the same random numbers whichever rows share its batch. Exactness needs the logits to be the same too:
on CPU in fp32 they differ between batch shapes by rounding only (~1e-7), which changes a token only
when a uniform lands that close to a CDF boundary; in bf16 on a GPU a rare token can differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from kto_lite.config import TrainConfig
from kto_lite.data.load import read_content
from kto_lite.data.read import read_rows
from kto_lite.data.tokenize import encode_prompt, stop_token_ids
from kto_lite.errors import DataError
from kto_lite.model import eval_mode, load_adapter, load_base, load_tokenizer, resolve_model
from kto_lite.runs import check_adapter_dir, run_base, run_settings

Content = str | list[dict[str, str]]


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptRow:
    prompt: Content  # text, or the chat messages before the answer
    row: dict[str, Any]  # the file's row as read (holds the reference answer, if any)
    where: str  # "line 7": where the row is in the file, for messages


@dataclass
class Prompts:
    path: str
    columns: list[str]
    rows: list[PromptRow] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 of the prompts and rows: a changed prompt file is a different job."""
        text = json.dumps([[r.prompt, r.row] for r in self.rows], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def read_prompts(path: str | Path) -> Prompts:
    """Rows with a `prompt` column (text or messages) or a `messages` column.

    A `messages` conversation that ends with an assistant message (a KTO data row) is the prompt
    without that message. DataError (naming the file, row and value) for anything else.
    """
    raw = read_rows(path)
    out = Prompts(raw.path, raw.columns)
    for row in raw.rows:
        where = raw.where(row)
        data = row.data

        def error(message: str, value: Any, where=where, row=row) -> DataError:
            return DataError(f"{raw.path}, {where}: {message}", path=raw.path, row=row.row, value=value)

        if "prompt" in data and data["prompt"] is not None:
            prompt = read_content(data["prompt"], "prompt", error)
        elif "messages" in data and data["messages"] is not None:
            prompt = read_content(data["messages"], "messages", error)
            if isinstance(prompt, str):
                raise DataError(f"{raw.path}, {where}: 'messages' must be a list of messages", path=raw.path,
                                row=row.row, value=prompt)
            if prompt and prompt[-1]["role"] == "assistant":
                prompt = prompt[:-1]
            if not prompt:
                raise DataError(f"{raw.path}, {where}: 'messages' holds no message before the answer",
                                path=raw.path, row=row.row)
        else:
            raise DataError(
                f"{raw.path}, {where}: no prompt: a prompt file needs a 'prompt' column (text or chat messages) "
                f"or a 'messages' column (the row's columns: {', '.join(data) or 'none'})",
                path=raw.path, row=row.row)
        out.rows.append(PromptRow(prompt, data, where))
    return out


# --------------------------------------------------------------------------- models


LOAD_OPTIONS = ("load_in_4bit", "mixed_precision", "revision", "trust_remote_code", "attn_implementation")


@dataclass
class ModelSpec:
    """What `load_models` will load, known before loading anything (for checks that should fail fast)."""

    model_name: str
    adapters: list[str]  # run folders
    options: dict[str, Any]  # LOAD_OPTIONS, as training loads the base
    use_chat_template: bool | None  # as the adapters' runs were trained (None: the tokenizer decides)

    @property
    def load_in_4bit(self) -> bool:
        return bool(self.options["load_in_4bit"])


def model_spec(model: str | None, adapters: list[str] | tuple[str, ...] = (), **options) -> ModelSpec:
    """model None: the first adapter's base, else the built-in demo model. An option left None (or
    not given): as the first adapter's run set it (its config.yaml), else TrainConfig's default."""

    folders = [str(check_adapter_dir(a)) for a in adapters]
    settings = run_settings(folders[0]) if folders else {}
    runs = [run_base(f, base=model) for f in folders]  # each run's base as training loaded it (its revision, ...)
    bases = {r.model for r in runs}
    if model is None and len(bases) > 1:
        raise ValueError(f"the adapters were trained on different bases ({', '.join(sorted(bases))}); "
                         "evaluate them separately, or name the base with --model")
    defaults = TrainConfig().to_dict()
    chosen = {name: next((v for v in (options.get(name), runs[0].options[name] if runs else None) if v is not None),
                         defaults[name]) for name in LOAD_OPTIONS}
    model_name = model or (runs[0].model if runs else resolve_model(None))
    return ModelSpec(model_name, folders, chosen, settings.get("use_chat_template"))


@dataclass
class Loaded:
    """A tokenizer, one base and its adapters (PeftModel when there are any). See `load_models`."""

    tokenizer: Any
    model: Any  # the PeftModel with every adapter loaded, or the base
    spec: ModelSpec
    adapters: dict[str, str]  # adapter name in the PeftModel -> its folder

    @property
    def use_chat_template(self) -> bool | None:
        return self.spec.use_chat_template

    @contextlib.contextmanager
    def use(self, adapter: str | None):
        """Generate with one adapter (its name, or its folder), or with none (None: the base)."""
        if adapter is None:
            with self.model.disable_adapter() if self.adapters else contextlib.nullcontext():
                yield self.model
            return
        names = {str(Path(folder)): name for name, folder in self.adapters.items()}
        self.model.set_adapter(names.get(str(Path(adapter)), adapter))
        yield self.model


def load_models(spec: ModelSpec) -> Loaded:
    """Load the base once, as training loads it, with the spec's adapters on top (see `model_spec`)."""

    o = spec.options
    tokenizer = load_tokenizer(spec.model_name, revision=o["revision"], trust_remote_code=o["trust_remote_code"])
    base = load_base(spec.model_name, load_in_4bit=o["load_in_4bit"], precision=o["mixed_precision"],
                     revision=o["revision"], trust_remote_code=o["trust_remote_code"],
                     attn_implementation=o["attn_implementation"])
    base.config.use_cache = True  # load_base turns the KV cache off for training; generation needs it
    names: dict[str, str] = {}
    peft_model = base
    for i, folder in enumerate(spec.adapters):
        name = "default" if i == 0 else f"adapter_{i}"  # peft names the first adapter "default"
        if i == 0:
            peft_model = load_adapter(base, folder)
        else:
            peft_model.load_adapter(folder, adapter_name=name)
        names[name] = folder
    peft_model.eval()
    return Loaded(tokenizer, peft_model, spec, names)


# --------------------------------------------------------------------------- seeded generation


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, the same whatever else is generated with it."""
    digest = hashlib.sha256(f"kto_lite-sample/{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _SeededSampling(LogitsProcessor):
    """Temperature, top-p, then one draw per row from that row's own generator; returns a one-hot
    score (0 for the drawn token, -inf elsewhere), so that `generate` in greedy mode picks it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: same draws on any device
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()  # (B, V)
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)  # (B, V), float64: no drift at the end
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])  # (B,)
        u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
        # the first token whose CDF exceeds u; tokens removed by top-p have zero mass and are never chosen
        token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


@dataclass
class Sample:
    text: str
    truncated: bool  # stopped by max_new_tokens, not by a stop token


@torch.inference_mode()
def generate_samples(model, tokenizer, prompts: list[Content], *, n: int = 1, temperature: float = 0.7,
                     top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 32,
                     indices: list[int] | None = None, use_chat_template: bool | None = None,
                     progress=None) -> Iterator[tuple[int, list[Sample]]]:
    """Yield (k, the n samples of prompts[k]) in order of k, as soon as a prompt's samples are done.

    `indices[k]` is prompt k's index for seeding (default k): pass a prompt's index in its file so
    that a resumed run draws what an uninterrupted one would. temperature 0: greedy. `progress`: a
    tqdm bar, advanced by one per finished sample.
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    indices = list(range(len(prompts))) if indices is None else indices
    encoded = [encode_prompt(p, tokenizer, use_chat_template) for p in prompts]
    jobs = [(k, j) for k in range(len(prompts)) for j in range(n)]  # prompt k's samples are adjacent
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    done: dict[int, list[Sample]] = {}
    next_k = 0
    with eval_mode(model):  # LoRA dropout off
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            width = max(len(encoded[k]) for k, _ in batch)
            # Left padding: every row's last prompt token sits in the same column, where generation starts.
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[k])) + encoded[k] for k, _ in batch],
                                     device=device)  # (B, T)
            attention_mask = torch.tensor([[0] * (width - len(encoded[k])) + [1] * len(encoded[k])
                                           for k, _ in batch], device=device)  # (B, T)
            sampling: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            if temperature > 0:
                seeds = [row_seed(seed, indices[k], j) for k, j in batch]
                sampling["logits_processor"] = LogitsProcessorList([_SeededSampling(seeds, temperature, top_p)])
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                    use_cache=True, **sampling)  # (B, T + new)
            for (k, _), new_ids in zip(batch, output[:, width:].tolist()):
                done.setdefault(k, []).append(_decode(new_ids, stop_ids, tokenizer))
            if progress is not None:
                progress.update(len(batch))
            while next_k in done and len(done[next_k]) == n:
                yield next_k, done.pop(next_k)
                next_k += 1


def _decode(ids: list[int], stop_ids: list[int], tokenizer) -> Sample:
    """The text up to the first stop token (what follows is padding)."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    text = tokenizer.decode(ids[:end] if end is not None else ids, skip_special_tokens=True)
    return Sample(text, truncated=end is None)
