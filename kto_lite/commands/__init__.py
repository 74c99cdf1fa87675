"""The command line: `python -m kto_lite COMMAND` (or `kto-lite COMMAND` when installed), one module each.

A command parses its flags (cli.py: the shared conventions), calls the library and maps its errors to
exit codes: 0 done, 2 a usage or input error (`kto_lite.errors.UserError`), 1 a failure while running.
The library never imports from here.
"""

from __future__ import annotations

import importlib
import sys

from kto_lite.commands.cli import EXIT_USAGE

USAGE = """usage: python -m kto_lite COMMAND [args]   (python -m kto_lite COMMAND --help for each)

commands:
  train [CONFIG.yaml] [--FIELD VALUE ...]   train LoRA adapters with KTO (any config field can be a flag)
  data FILE [--model M] [--max_length N]    check a data file: format, labels, problems, token lengths
  chat [--model M] [--adapter DIR]          chat with a base model or a trained adapter in the terminal
  sample --model M --prompts FILE --out F   generate answers (optionally judge them into KTO rows)
  evaluate --prompts FILE --judge J ...     sampled accuracy of the base and of adapters, with a judge
  loop CONFIG.yaml --rounds N ...           sample -> judge -> train -> evaluate, one run folder per round
  export --adapter DIR (--zip F | --merge D | --gguf | --gguf_lora | --push_to_hub REPO)
                                            ship an adapter: zip, merged model, GGUF for llama.cpp / Ollama, the Hub
  estimate [CONFIG.yaml] [--FIELD VALUE]    predict peak GPU memory for a config, with a breakdown
"""

COMMANDS = ("train", "data", "chat", "sample", "evaluate", "loop", "export", "estimate")  # kto_lite.commands.<name>


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # imported only when chosen: `--help` stays fast
        return importlib.import_module(f"kto_lite.commands.{argv[0]}").main(argv[1:])
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print(USAGE, file=sys.stdout if asked else sys.stderr)
    if argv and not asked:
        print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
    return 0 if asked else EXIT_USAGE
