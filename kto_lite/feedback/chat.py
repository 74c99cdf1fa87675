"""Chat with a base model or a trained adapter, and record thumbs up / down as KTO data.

`ChatModel` loads the base once (4-bit NF4 by default, as in training) with the adapter on top.
Answers with the adapter and with the plain base (adapters disabled) come from the same weights,
which is also how training got its reference model. Replies stream token by token; a stop event
ends generation itself, not just the display.

`append_feedback` writes a rated reply as one prompt/completion/label row (data format 1), or a whole
conversation whose replies carry their own thumbs as one `messages` row (per-turn labels, format 2), so the
feedback file is training data for the next round of KTO (docs/data.md: a file may hold both kinds of row).

`ChatModel.sample` generates several answers to one prompt in one batch (the app's Rate tab).

The terminal chat, `python -m kto_lite chat`, is kto_lite/commands/chat.py.
"""


from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from kto_lite.data import encode_prompt
from kto_lite.data.tokenize import stop_token_ids
from kto_lite.generation import generate_samples
from kto_lite.model import load_adapter, load_tokenizer
from kto_lite.runs import RunBase, check_adapter_dir, run_base, run_settings

# --------------------------------------------------------------------------- the model


class _StopOn(StoppingCriteria):
    """Ends generation at the next token once any of the events is set (checked once per token)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        self.fired |= stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ChatModel:
    """A base model, optionally with a LoRA adapter, loaded once for streaming chat.

    model None + adapter: the adapter's base (config.yaml `model`, else adapter_config.json);
    model None, no adapter: the built-in demo model. load_in_4bit None: the run's setting, else True.
    One reply is generated at a time (a lock): switching adapters off is a model-wide state.
    """

    def __init__(self, model: str | None = None, adapter: str | Path | None = None, *,
                 load_in_4bit: bool | None = None):
        settings, run = {}, RunBase.named(model)
        if adapter is not None:
            adapter = check_adapter_dir(adapter)
            settings, run = run_settings(adapter), run_base(adapter, base=model)  # loaded as training loaded it
        self.model_name = run.model
        self.adapter_dir = adapter
        self.load_in_4bit = load_in_4bit if load_in_4bit is not None else bool(run.options["load_in_4bit"])
        self.use_chat_template = settings.get("use_chat_template")  # as in training: same prompt tokens

        has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
        self.tokenizer = load_tokenizer(str(adapter)) if has_tokenizer else run.tokenizer()
        self.base = run.load(load_in_4bit=self.load_in_4bit)
        self.base.config.use_cache = True  # load_base turns the KV cache off for training
        self.model = load_adapter(self.base, adapter) if adapter is not None else self.base
        self.model.eval()
        self.has_adapter = adapter is not None
        self.last_stats: dict = {}  # of the latest reply: new_tokens, seconds, stopped
        self._lock = threading.Lock()

    # ---- prompt
    def prompt_ids(self, messages: list[dict], system_prompt: str | None = None) -> list[int]:
        """Token ids of the conversation, ending where the assistant's reply begins."""
        prompt, use_chat_template = self._prompt(messages, system_prompt)
        return encode_prompt(prompt, self.tokenizer, use_chat_template=use_chat_template)

    def _prompt(self, messages: list[dict], system_prompt: str | None) -> tuple[str | list[dict], bool | None]:
        """(the prompt as `encode_prompt` takes it, use_chat_template): the messages through the chat
        template, or as plain text for a tokenizer without one (or a run trained without it)."""
        messages = normalize_messages(messages)
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if has_template and self.use_chat_template is not False:
            return messages, None
        return plain_prompt(messages), False

    # ---- generation
    def stream(self, messages: list[dict], *, use_adapter: bool = True, max_new_tokens: int = 256,
               temperature: float = 0.7, top_p: float = 0.9, system_prompt: str | None = None,
               stop_event: threading.Event | None = None, seed: int | None = None) -> Iterator[str]:
        """Yield the reply text so far after each new piece. temperature 0: greedy.

        use_adapter False answers with the adapters disabled (the base model). Setting stop_event, or
        closing this generator, ends generation at the next token.
        """
        ids = torch.tensor([self.prompt_ids(messages, system_prompt)], device=self.base.device)
        sampling = _sampling(temperature, top_p)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()  # set when the consumer goes away: the thread must not run on
        stop_on = _StopOn(stop_event, closed)
        errors: list[BaseException] = []

        def run():
            try:
                with self._lock, self._adapters(use_adapter), torch.inference_mode():
                    if seed is not None:
                        torch.manual_seed(seed)
                    start = time.perf_counter()
                    out = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([stop_on]),
                        eos_token_id=stop_token_ids(self.tokenizer, self.base.generation_config), pad_token_id=self.tokenizer.pad_token_id, **sampling,
                    )
                    self.last_stats = {"new_tokens": out.shape[1] - ids.shape[1],
                                       "seconds": time.perf_counter() - start,
                                       "stopped": stop_on.fired}
            except BaseException as e:  # re-raised in the consumer; end() unblocks it
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, name="kto_lite-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                if not piece:
                    continue
                text += piece
                yield text.lstrip()
        finally:
            closed.set()
            thread.join()
        if errors:
            raise errors[0]

    def sample(self, messages: list[dict], n: int = 1, *, use_adapter: bool = True, max_new_tokens: int = 256,
               temperature: float = 0.7, top_p: float = 1.0, system_prompt: str | None = None, seed: int = 0,
               index: int = 0) -> list[str]:
        """`n` independent replies to one conversation, in one batch (`kto_lite.generation.generate_samples`).

        Reply j draws from its own generator seeded from (seed, index, j), so the replies are those
        `python -m kto_lite sample --seed SEED` gives for a prompt at position `index` of its file.
        temperature 0 is greedy: every reply would be the same, so it needs n = 1.
        """
        if temperature <= 0 and n > 1:
            raise ValueError("temperature 0 is greedy decoding: all n replies would be the same; use n = 1")
        prompt, use_chat_template = self._prompt(messages, system_prompt)
        with self._lock, self._adapters(use_adapter):
            start = time.perf_counter()
            (_, samples), = generate_samples(
                self.model, self.tokenizer, [prompt], n=int(n), temperature=float(temperature), top_p=float(top_p),
                max_new_tokens=int(max_new_tokens), seed=seed, batch_size=n, indices=[index],
                use_chat_template=use_chat_template)
        self.last_stats = {"seconds": time.perf_counter() - start, "stopped": False}
        return [sample.text.lstrip() for sample in samples]  # as `stream` shows them

    def generate(self, messages: list[dict], **kwargs) -> str:
        """The whole reply (the last text `stream` yields)."""
        text = ""
        for text in self.stream(messages, **kwargs):  # noqa: B007 (the last value is the answer)
            pass
        return text

    def _adapters(self, on: bool):
        if self.has_adapter and not on:
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def _sampling(temperature: float, top_p: float) -> dict:
    """generate() arguments: sampling with temperature and top-p, or greedy for temperature 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
    # keep a sampling generation_config from warning about values greedy decoding ignores
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def normalize_messages(messages: list[dict]) -> list[dict]:
    """{"role", "content": str} dicts; content given as a list of parts (Gradio, OpenAI) is joined."""
    out = []
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        elif isinstance(content, dict):
            content = content.get("text", "")
        out.append({"role": m["role"], "content": str(content)})
    return out


def plain_prompt(messages: list[dict]) -> str:
    """A conversation as plain text, for tokenizers without a chat template.

    One user message is its text exactly, as training encodes a plain-text prompt; longer
    conversations become "System: ...\\nUser: ...\\nAssistant:" transcripts.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


# --------------------------------------------------------------------------- feedback as KTO data

_feedback_lock = threading.Lock()  # appends from threads of this process; flock covers other processes


def append_feedback(path: str | Path, prompt: str | list[dict], completion: str | None = None,
                    label: bool | None = None) -> dict:
    """Append one row to a JSON-lines feedback file; return the file's counts (`feedback_counts`).

    With a completion and a label: one prompt/completion/label row (data format 1); a conversation that is a
    single user message is stored as its text, longer ones as messages. Without them: `prompt` is a whole
    conversation whose assistant messages carry their own thumbs ({"role": "assistant", "content": ...,
    "label": True}; None or no key: not rated), stored as one `messages` row with per-turn labels (format 2).
    """
    if completion is None and label is None:
        line = json.dumps({"messages": _rated_conversation(prompt)}, ensure_ascii=False)
    elif completion is None or label is None:
        raise ValueError("a rated reply needs both its completion and its label")
    else:
        if isinstance(prompt, list):
            prompt = normalize_messages(prompt)
            if len(prompt) == 1 and prompt[0]["role"] == "user":
                prompt = prompt[0]["content"]
        line = json.dumps({"prompt": prompt, "completion": completion, "label": bool(label)}, ensure_ascii=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _feedback_lock, open(path, "a+", encoding="utf-8") as f, _file_lock(f):
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a previous writer died mid-line: start on a fresh line
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                line = "\n" + line
        f.write(line + "\n")
        f.flush()
        f.seek(0)
        return _count(f.read())


def _rated_conversation(messages) -> list[dict]:
    """The conversation as stored: {"role", "content"} messages, plus "label" (a bool) on the rated replies."""
    if not isinstance(messages, list):
        raise ValueError("a conversation with per-turn labels is a list of messages")
    out = []
    for m, plain in zip(messages, normalize_messages(messages)):
        label = m.get("label")
        if label is not None and plain["role"] != "assistant":
            raise ValueError(f"only assistant replies carry a label, not a {plain['role']!r} message")
        out.append(plain | ({"label": bool(label)} if label is not None else {}))
    if not any("label" in m for m in out):
        raise ValueError("the conversation has no rated reply (no assistant message with a label)")
    return out


def feedback_counts(path: str | Path) -> dict:
    """{"rows", "desirable", "undesirable"} of a feedback file, counting rated replies (a conversation row counts
    each of its rated replies); 0s when it does not exist."""
    try:
        return _count(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _count("")


def _count(text: str) -> dict:
    labels = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError, KeyError):
            row = json.loads(line)
            if "messages" in row and "label" not in row:  # per-turn labels
                labels += [bool(m["label"]) for m in row["messages"] if m.get("label") is not None]
            else:
                labels.append(bool(row["label"]))
    return {"rows": len(labels), "desirable": sum(labels), "undesirable": len(labels) - sum(labels)}


@contextlib.contextmanager
def _file_lock(f):
    try:
        import fcntl
    except ImportError:  # Windows: the in-process lock is all there is
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
