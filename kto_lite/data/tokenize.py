"""Examples -> token ids, with the completion tokens identified exactly, then truncated.

How a row becomes text:
- chat messages (or plain text when the tokenizer has a chat template and use_chat_template is not
  False): prompt = template(prompt messages, add_generation_prompt=True), whole = template(prompt +
  completion messages). The template writes the special tokens (BOS, end-of-turn), so the text is
  tokenized with add_special_tokens=False.
- plain text otherwise: prompt = the prompt text with the tokenizer's special tokens (BOS),
  whole = prompt text + completion text (concatenated as given: put a space or newline at the end of
  the prompt if you want one), and EOS is appended to the completion.

Exact completion tokens: the prompt is tokenized on its own (exactly what `encode_prompt` gives at
generation time) and so is the whole. When the prompt ids are a prefix of the whole ids, the rest is
the completion. When not, the prompt ids are kept and only the completion's text is tokenized and
appended, i.e. the model trains on the same token sequence it would see (and produce) at generation:
- BPE merges across the boundary ("Hello wor" + "ld"): the completion text is the whole text after
  the prompt text;
- templates that render the prompt differently once an answer follows (Mistral moves the system
  message into the last user turn; others drop a generation prompt or rewrite earlier turns): the
  completion text starts right after the prompt's own last characters as they appear before the
  answer in the finished conversation (the longest tail of the prompt text found there), so the
  reply keeps what the template writes between the prompt and the content (Mistral's space before
  the answer, an empty think block). The content's start is found by rendering the conversation once
  more with the content replaced by a marker character and taking the common prefix.
Such rows are counted in `DataReport.prefix_mismatches`.

End of turn: a completion must end with EOS or with the template's end-of-turn token so that the
model learns to stop, and nothing after it counts: generation stops there, so what a template writes
after the turn (ChatML's "\n" after <|im_end|>, Phi-3's "\n<|endoftext|>" after <|end|>) is never
produced and is cut. Of the trailing whitespace and special tokens, the completion keeps those up to
the first end-of-turn (special) token; without one, EOS is appended.

Dates: Llama 3.x templates print "Today Date" into the system turn (3.2: today's date). Every template
is rendered with `date_string` = 26 Jul 2024 (Llama 3.1's own default), so that a row gives the same
tokens on any day: in training, in the reference cache, and at chat time.

Truncation: a prompt longer than max_prompt_length keeps its end (the latest turns), and its first
token if that is BOS. Then, if prompt + completion is longer than max_length, the completion's tail
is cut. A row with no completion token left is dropped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kto_lite.data.examples import Example, TokenizedExample
from kto_lite.data.report import DataReport, length_stats
from kto_lite.errors import DataError

NO_COMPLETION_LEFT = "no completion token left after truncation"
TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}  # see "Dates" above
_MARKER = "\x01"  # stands in for a message's content to find where the content starts in a template


def encode_prompt(
    prompt: str | list[dict], tokenizer: Any, use_chat_template: bool | None = None
) -> list[int]:
    """Token ids of a prompt, ready for the model to continue (add_generation_prompt=True).

    The same ids `tokenize` uses, so generation sees exactly what training saw.
    """
    if _uses_template(tokenizer, use_chat_template, isinstance(prompt, list)):
        try:
            text = _render(tokenizer, _messages(prompt, "user"), generation=True)
        except Exception as e:  # jinja2 errors, raise_exception() in templates ("System role not supported")
            raise DataError(f"the chat template failed ({e})") from e
        return _encode(tokenizer, [text], special=False)[0]
    return _encode(tokenizer, [prompt], special=True)[0]


def tokenize(
    examples: list[Example],
    tokenizer: Any,
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    use_chat_template: bool | None = None,
    report: DataReport | None = None,
) -> list[TokenizedExample]:
    """Tokenize, find the completion tokens exactly, truncate (see the module docstring).

    max_length / max_prompt_length None means no limit. When a report is given, its token statistics
    (measured before truncation), truncation counts, drops, example counts and suggested weights are
    updated to describe the returned list.
    """
    for name, limit in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be at least 1, got {limit}")
    where = f"{report.path}, " if report else ""
    text_chat = _uses_template(tokenizer, use_chat_template, conversational=False)
    chat = [text_chat or isinstance(ex.prompt, list) or isinstance(ex.completion, list) for ex in examples]
    if any(chat):
        _uses_template(tokenizer, use_chat_template, conversational=True)  # raises when there is no template
    texts = [_texts(ex, tokenizer, c, where) for ex, c in zip(examples, chat)]
    prompt_ids = _encode_each(tokenizer, [t[0] for t in texts], chat)
    whole_ids = _encode_each(tokenizer, [t[1] for t in texts], chat)
    stop_ids = set(stop_token_ids(tokenizer))

    out: list[TokenizedExample] = []
    tally = _Tally()
    for ex, is_chat, text_pair, p, whole in zip(examples, chat, texts, prompt_ids, whole_ids):
        c = _completion_ids(tokenizer, ex, text_pair, p, whole, tally)
        c = _with_stop(c, tokenizer, stop_ids) if is_chat else _with_eos(c, tokenizer)
        tally.prompt_lengths.append(len(p))
        tally.completion_lengths.append(len(c))
        p, c = _truncate(p, c, max_length, max_prompt_length, tokenizer.bos_token_id, tally)
        if c:
            out.append(TokenizedExample(p, c, ex.label, ex.row))
        else:
            tally.dropped_rows.append(ex.row)
    if report is not None:
        _update_report(report, out, tally, any(chat), tokenizer, max_length, max_prompt_length)
    return out


@dataclass
class _Tally:  # what tokenize() saw, for the report
    prompt_lengths: list[int] = field(default_factory=list)  # before truncation
    completion_lengths: list[int] = field(default_factory=list)
    mismatches: int = 0
    prompts_cut: int = 0
    completions_cut: int = 0
    dropped_rows: list[int] = field(default_factory=list)


def _completion_ids(
    tokenizer, ex: Example, text_pair: tuple[str, str], p: list[int], whole: list[int], tally
) -> list[int]:
    """The completion's ids: the rest of `whole` when `p` is its prefix, else its text tokenized alone."""
    if whole[: len(p)] == p:
        return whole[len(p) :]
    tally.mismatches += 1
    prompt_text, whole_text = text_pair
    if whole_text.startswith(prompt_text):  # tokens merged across the boundary
        start = len(prompt_text)
    else:  # the template renders the prompt differently once an answer follows
        start = _reply_start(prompt_text, whole_text[: _content_start(tokenizer, ex, whole_text)])
    return _encode(tokenizer, [whole_text[start:]], special=False)[0]


def _reply_start(prompt_text: str, before_content: str) -> int:
    """Where the reply starts in `before_content` (the finished conversation up to the answer's
    content): right after the longest tail of `prompt_text` found there, at its last occurrence.

    Every shorter tail of a tail that occurs also occurs, so the longest is found by bisection.
    """
    lo, hi = 0, len(prompt_text)  # a tail of length lo occurs; one of length hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_text[-mid:] in before_content:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:  # nothing of the prompt is left: the reply starts with the content
        return len(before_content)
    return before_content.rfind(prompt_text[-lo:]) + lo


def _truncate(p, c, max_length, max_prompt_length, bos, tally: _Tally) -> tuple[list[int], list[int]]:
    """Keep the end of a long prompt (and BOS), then cut the completion's tail to fit max_length."""
    if max_prompt_length is not None and len(p) > max_prompt_length:
        tally.prompts_cut += 1
        p = _keep_end(p, max_prompt_length, bos)
    if max_length is not None and len(p) + len(c) > max_length:
        c = c[: max(0, max_length - len(p))]
        tally.completions_cut += bool(c)  # an emptied completion counts as dropped instead
    return p, c


def _update_report(
    report: DataReport, out, tally: _Tally, chat: bool, tokenizer, max_length, max_prompt_length
) -> None:
    report.tokenized, report.chat_template = True, chat
    report.max_length, report.max_prompt_length = max_length, max_prompt_length
    report.prompt_tokens = length_stats(tally.prompt_lengths)
    report.completion_tokens = length_stats(tally.completion_lengths)
    report.truncated_prompts = tally.prompts_cut
    report.truncated_completions = tally.completions_cut
    report.dropped_no_completion = len(tally.dropped_rows)
    report.prefix_mismatches = tally.mismatches
    report.missing_eos = tokenizer.eos_token_id is None
    report.dropped.pop(NO_COMPLETION_LEFT, None)  # tokenize() may be called again with other limits
    for row in tally.dropped_rows:
        report.drop(NO_COMPLETION_LEFT, row)
    report.set_counts([t.label for t in out])


# --- text ---


def _uses_template(tokenizer: Any, use_chat_template: bool | None, conversational: bool) -> bool:
    """Chat messages always need the template; use_chat_template only decides for plain text."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if conversational and not has:
        raise DataError(
            "the data is chat messages but the tokenizer has no chat template; use a chat model's "
            "tokenizer, or give prompt and completion as plain text"
        )
    if conversational:
        return True
    if use_chat_template and not has:
        raise DataError("use_chat_template is on but the tokenizer has no chat template")
    return has if use_chat_template is None else bool(use_chat_template)


def _messages(content: str | list[dict], role: str) -> list[dict]:
    return content if isinstance(content, list) else [{"role": role, "content": content}]


def _render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    if not messages and generation:
        # transformers refuses an empty conversation: render one assistant turn and keep what precedes it
        probe = tokenizer.apply_chat_template([{"role": "assistant", "content": _MARKER}], tokenize=False,
                                              **TEMPLATE_VARIABLES)
        return probe[: probe.index(_MARKER)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                         **TEMPLATE_VARIABLES)


def _texts(ex: Example, tokenizer: Any, chat: bool, where: str) -> tuple[str, str]:
    """(prompt text, whole text) of one example."""
    if not chat:
        return ex.prompt, ex.prompt + ex.completion
    prompt, completion = _messages(ex.prompt, "user"), _messages(ex.completion, "assistant")
    try:
        return _render(tokenizer, prompt, generation=True), _render(
            tokenizer, prompt + completion, generation=False
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise DataError(f"{where}row {ex.row}: the chat template failed ({e})", row=ex.row) from e


def _content_start(tokenizer: Any, ex: Example, whole_text: str) -> int:
    """Where the completion content starts in whole_text: render a marker there, take the common prefix."""
    prompt, completion = _messages(ex.prompt, "user"), _messages(ex.completion, "assistant")
    marker = "\x02" if completion[0]["content"].startswith(_MARKER) else _MARKER
    probe = _render(
        tokenizer, prompt + [{**completion[0], "content": marker}] + completion[1:], generation=False
    )
    return len(os.path.commonprefix([whole_text, probe]))


# --- ids ---


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def _encode_each(tokenizer: Any, texts: list[str], chat: list[bool]) -> list[list[int]]:
    """Batch-encode (fast tokenizers run batches in parallel); templated text has its specials already."""
    out: list[list[int]] = [[] for _ in texts]
    for templated in (True, False):
        index = [i for i, c in enumerate(chat) if c == templated]
        for i, ids in zip(index, _encode(tokenizer, [texts[i] for i in index], special=not templated)):
            out[i] = ids
    return out


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The tokens that end an assistant turn: EOS, the special tokens a template may end a turn with
    (<|im_end|>, <|eot_id|>, ...) and the model's own generation EOS (`generation_config`, where given).

    The one rule for training and generation: a trained completion ends at the first of them, and
    generation stops at them (a GGUF's config may name only <|endoftext|> as EOS while the template
    ends turns with <|end|>)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = {i for i, token in decoder.items() if getattr(token, "special", False)} | set(
        tokenizer.all_special_ids
    )
    ids -= {tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}  # they end nothing
    eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list | tuple) else {eos}
    return sorted((ids | {tokenizer.eos_token_id}) - {None})


def _with_stop(ids: list[int], tokenizer: Any, stop_ids: set[int]) -> list[int]:
    """End at the end-of-turn: of the trailing whitespace and special tokens ("<|im_end|>" "\\n",
    "<|end|>" "\\n" "<|endoftext|>"), keep those up to the first special one; without one, append EOS."""
    tail = len(ids)
    while tail and (ids[tail - 1] in stop_ids or not tokenizer.decode([ids[tail - 1]]).strip()):
        tail -= 1
    for i in range(tail, len(ids)):
        if ids[i] in stop_ids:
            return ids[: i + 1]  # what follows is never generated: generation stops here
    return _with_eos(ids, tokenizer)


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _keep_end(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """The last `limit` ids; BOS stays in front when the prompt starts with it."""
    if bos is not None and ids[0] == bos and limit > 1:
        return ids[:1] + ids[-(limit - 1) :]
    return ids[-limit:]
