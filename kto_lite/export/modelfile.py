"""An Ollama Modelfile for an exported GGUF, with the chat template translated to Ollama's Go template.

A chat template is Jinja (transformers, llama.cpp); Ollama wants a Go template. Rather than keeping
a list of known templates, the Jinja template is *measured*: it is rendered with marker messages and
each role's text before and after its content is read off (`turn_pieces`). The pieces become a Go
template, and they are accepted only if they reproduce the Jinja template's output on a test
conversation exactly (`check_pieces`). Templates with logic beyond "prefix + content + suffix per role"
(tool calls, dates, content-dependent branches) fail that check: the Modelfile then says so and leaves
TEMPLATE out (Ollama falls back to the template it recognises in the GGUF, if any).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
_MARK = "\u2063{}\u2063"  # invisible separator around a role name: never in a real template


@dataclass
class TurnPieces:
    """A chat template reduced to text around each message: what Ollama's TEMPLATE can express."""

    start: str  # before the first message (BOS, usually)
    before: dict[str, str]  # role -> text before its content
    after: dict[str, str]  # role -> text after its content
    generation: str  # the assistant's opening, when a reply is asked for
    default_system: str | None  # a system message the template adds when there is none

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.start
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for m in messages:
            if m["role"] not in self.before:
                raise ValueError(f"the template has no {m['role']} turn")
            text += self.before[m["role"]] + m["content"] + self.after[m["role"]]
        return text + (self.generation if add_generation_prompt else "")


def _render(tokenizer, messages, add_generation_prompt) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker):]


def _before(text: str, marker: str) -> str:
    return text[:text.index(marker)]


def turn_pieces(tokenizer) -> TurnPieces | None:
    """Read each role's prefix and suffix off the tokenizer's chat template; None when that fails."""
    try:
        return _turn_pieces(tokenizer)
    except ValueError:  # a marker did not come out as it went in (the template changes contents)
        return None


def _turn_pieces(tokenizer) -> TurnPieces | None:
    """See turn_pieces.

    With marker contents S, U, A, U2 (sys = a system turn the template adds by itself, if any):
      [user U]                  = start + [sys] + before_user + U + after_user
      [user U] + generation     = ...                           U + after_user + generation
      [user U, asst A]          = ... U + after_user + before_assistant + A + after_assistant
      [user U, asst A, user U2] = ... A + after_assistant + before_user + U2 + ...
      [sys S, user U]           = start + before_system + S + after_system + before_user + U + ...
    """
    s, u, a, u2 = (_MARK.format(x) for x in ("system", "user", "assistant", "user2"))
    try:
        user_only = _render(tokenizer, [{"role": "user", "content": u}], False)
        asked = _render(tokenizer, [{"role": "user", "content": u}], True)
        pair = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
        three = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                                    {"role": "user", "content": u2}], False)
    except Exception:  # noqa: BLE001 - a template that cannot render these turns cannot be translated
        return None
    after_user, generation = _after(user_only, u), _after(asked, u)
    between, after_assistant = _after(_before(pair, a), u), _after(pair, a)
    between_turns = _before(_after(three, a), u2)
    if not (generation.startswith(after_user) and between.startswith(after_user)
            and between_turns.startswith(after_assistant)):
        return None
    before = {"user": between_turns[len(after_assistant):], "assistant": between[len(after_user):]}
    after = {"user": after_user, "assistant": after_assistant}
    opening = _before(user_only, u)
    if not opening.endswith(before["user"]):
        return None
    opening = opening[:len(opening) - len(before["user"])]  # start + [sys]
    start, default_system = opening, None
    try:  # the system role is optional: Gemma's template refuses it
        with_system = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], False)
    except Exception:  # noqa: BLE001
        with_system = None
    if with_system is not None:
        head, middle = _before(with_system, s), _before(_after(with_system, s), u)  # start + before_system
        if not middle.endswith(before["user"]):
            return None
        after["system"] = middle[:len(middle) - len(before["user"])]
        if head.startswith(opening):  # no system turn of its own
            before["system"] = head[len(opening):]
        elif opening.startswith(head) and opening.endswith(after["system"]):
            # it adds a default system turn; the system turn then always comes first, so start can be ""
            start, before["system"] = "", head
            default_system = opening[len(head):len(opening) - len(after["system"])]
        else:
            return None
    return TurnPieces(start, before, after, generation[len(after_user):], default_system)


TEST_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks"},
]


def check_pieces(tokenizer, pieces: TurnPieces) -> bool:
    """Do the pieces reproduce the Jinja template exactly (with and without a system message, with and
    without a generation prompt)?"""
    convos = [TEST_CONVERSATION[1:]] + ([TEST_CONVERSATION] if "system" in pieces.before else [])
    for messages in convos:
        for gen in (True, False):
            convo = messages if gen else messages[:-1] + [{"role": "assistant", "content": "Bye"}]
            try:
                if pieces.render(convo, gen) != _render(tokenizer, convo, gen):
                    return False
            except Exception:  # noqa: BLE001 - e.g. a role the pieces do not have
                return False
    return True


def _go_text(text: str) -> str:
    """Literal text inside a Go template (a "{{" would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: TurnPieces, *, drop_start: bool = False) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) that renders what the pieces render.

    drop_start: leave the conversation start (BOS) to the runtime, which adds it itself (add_bos).
    """
    branches = []
    for role in ROLES:
        if role not in pieces.before:
            continue
        after = pieces.after[role]
        tail = f"{{{{ if not $last }}}}{_go_text(after)}{{{{ end }}}}" if role == "assistant" else _go_text(after)
        keyword = "if" if not branches else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(pieces.before[role])}{{{{ .Content }}}}{tail}')
    return ("" if drop_start else _go_text(pieces.start)) + (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + "".join(branches) + "{{ end }}"
        + f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(pieces.generation)}{{{{ end }}}}'
        + "{{ end }}")


def stop_tokens(tokenizer, pieces: TurnPieces | None) -> list[str]:
    """Texts that end a reply: special tokens closing the assistant's turn, and EOS."""
    closing = (pieces.after["assistant"] + pieces.before["user"]) if pieces else ""
    found = [t for t in tokenizer.all_special_tokens if t and t in closing]
    eos = tokenizer.eos_token
    return list(dict.fromkeys(found + ([eos] if eos else [])))


def _quoted(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def modelfile(from_file: str, tokenizer, *, adapter_file: str | None = None, add_bos: bool = False,
              header: str = "") -> tuple[str, bool]:
    """(the Modelfile's text, whether TEMPLATE could be written). Paths are as given (relative to the
    Modelfile's folder works: Ollama resolves them from there)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append(f"FROM {from_file}")
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    pieces = turn_pieces(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    ok = pieces is not None and check_pieces(tokenizer, pieces)
    if ok:
        drop = add_bos and bool(tokenizer.bos_token) and pieces.start == tokenizer.bos_token
        template = _quoted(go_template(pieces, drop_start=drop))
        ok = template is not None
    if ok:
        lines.append(f"TEMPLATE {template}")
        if pieces.default_system and _quoted(pieces.default_system):
            lines.append(f"SYSTEM {_quoted(pieces.default_system)}")
    else:
        lines.append("# TEMPLATE left out: the chat template has logic that Ollama's TEMPLATE cannot be made to "
                     "reproduce exactly here;\n# Ollama then uses the chat template stored in the GGUF if it "
                     "recognises it. Check replies with `ollama run`.")
    for stop in stop_tokens(tokenizer, pieces if ok else None):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", ok


def write_modelfile(folder: str | Path, text: str, name: str = "Modelfile") -> Path:
    path = Path(folder) / name
    path.write_text(text, encoding="utf-8")
    return path
