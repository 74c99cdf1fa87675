"""`python -m kto_lite chat`: a terminal chat with a base model or a trained adapter (feedback/chat.py's ChatModel).

    python -m kto_lite chat [--model M] [--adapter DIR] [--base] [--system TEXT] [--temperature T]
    echo "What is 2 + 3?" | python -m kto_lite chat     # questions piped on stdin: only the replies are printed
"""

from __future__ import annotations

import argparse
import sys
import threading

from kto_lite.commands import cli
from kto_lite.errors import UsageError
from kto_lite.feedback.chat import ChatModel
from kto_lite.runs import check_adapter_dir

HELP = "commands: /reset clears the conversation, /quit (or Ctrl-D) exits; Ctrl-C stops a reply, twice exits"
PIPED = """questions can also be piped on stdin, one per line, each a turn of the same conversation; only the
replies are printed then, one per question (the model's name goes to stderr):
  echo "What is 2 + 3?" | python -m kto_lite chat
  python -m kto_lite chat --adapter runs/demo < questions.txt > answers.txt
"""


def build_parser() -> cli.Parser:
    p = cli.Parser("chat", f"Chat with a base model or an adapter in the terminal.\n\n{HELP}\n{PIPED}")
    p.add_flag("model", metavar="M",
               help="base model (hub id or path); default: the adapter's base, else the built-in demo model")
    p.add_flag("adapter", metavar="DIR", help="a training run's output_dir (or any PEFT adapter folder)")
    p.add_flag("load_in_4bit", type=cli.yaml_value, default=None, metavar="BOOL",
               help="false: load the base unquantized (default: as the run was trained, else true)")
    p.add_argument("--no-4bit", dest="load_in_4bit", action="store_const", const=False,
                   help=argparse.SUPPRESS)  # the flag before round 2; same as --load_in_4bit false
    p.add_flag("system", metavar="TEXT", help="system prompt, put before the conversation")
    p.add_flag("temperature", type=float, default=0.7, metavar="T", help="0: greedy (deterministic); default 0.7")
    p.add_flag("top_p", type=float, default=0.9, metavar="P", help="nucleus sampling; default 0.9")
    p.add_flag("max_new_tokens", type=int, default=256, metavar="N", help="longest reply in tokens; default 256")
    p.add_flag("base", action="store_true", help="answer with the adapter disabled (the base model)")
    return p


def main(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 a usage or input error (a bad flag, a folder without an adapter), 1 a failure."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): argparse has printed it
        return int(e.code or 0)
    return cli.run(lambda: _chat(args))


def _chat(args) -> int:
    if args.load_in_4bit not in (None, True, False):
        raise UsageError(f"--load_in_4bit takes true or false, not {args.load_in_4bit!r}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise UsageError("--temperature must be at least 0, --top_p in (0, 1], --max_new_tokens at least 1")
    if args.adapter is not None:
        check_adapter_dir(args.adapter)  # FileNotFoundError: an input error (exit 2), before loading anything
    chat = ChatModel(args.model, args.adapter, load_in_4bit=args.load_in_4bit)
    who = chat.model_name
    if chat.has_adapter:
        who += f" + adapter {chat.adapter_dir}" + (" (disabled: --base)" if args.base else "")
    interactive = sys.stdin.isatty()  # piped questions: stdout gets the replies alone
    banner = f"chatting with {who}, {'4-bit' if chat.load_in_4bit else 'unquantized'}"
    print(f"{banner}\n{HELP}" if interactive else banner, file=sys.stdout if interactive else sys.stderr, flush=True)
    options = dict(use_adapter=not args.base, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, system_prompt=args.system)
    history: list[dict] = []
    while True:
        try:
            user = input("\nyou> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(end="\n" if interactive else "")  # a terminal's prompt line ends; piped output stays the replies
            return 0
        if user.strip() in ("/quit", "/exit"):
            return 0
        if user.strip() == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        try:
            reply = _print_reply(chat, history, options, prefix="bot> " if interactive else "")
        except KeyboardInterrupt:  # a second Ctrl-C while the first one was stopping the reply
            print()
            return 0
        history.append({"role": "assistant", "content": reply})


def _print_reply(chat: ChatModel, history: list[dict], options: dict, prefix: str) -> str:
    """Stream one reply to stdout; Ctrl-C stops it (the text so far is kept). Returns the reply."""
    print(prefix, end="", flush=True)
    stop, shown = threading.Event(), ""
    replies = chat.stream(history, stop_event=stop, **options)
    try:
        for shown_next in replies:
            print(shown_next[len(shown):], end="", flush=True)
            shown = shown_next
    except KeyboardInterrupt:
        stop.set()
        replies.close()  # joins the generation thread, which stops at its next token
        print(" [stopped]", end="")
    print(flush=True)
    return shown
