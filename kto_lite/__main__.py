"""python -m kto_lite {train,data,chat,export,estimate,sample,evaluate,loop} ... (see README)."""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: python -m kto_lite COMMAND [args]

commands:
  train [CONFIG.yaml] [--FIELD VALUE ...]   train LoRA adapters with KTO (any config field can be a flag)
  data FILE [--model PATH]                  check a data file: format, labels, problems, token lengths
  chat [--model M] [--adapter DIR]          chat with a base model or a trained adapter in the terminal
  export --adapter DIR [--zip | --merge]    package an adapter, or merge it into a full-precision base
  estimate [CONFIG.yaml] [--FIELD VALUE]    predict peak GPU memory for a config, with a breakdown
  sample --prompts FILE --out F.jsonl       generate answers (resumable, seeded); --judge labels them as KTO rows
  evaluate --prompts FILE --judge SPEC      sampled accuracy of the base and each --adapter, with a 95% interval
  loop CONFIG.yaml --rounds N ...           rounds of sample -> judge -> train -> evaluate, one run folder each
"""

COMMANDS = {  # command -> module with main(argv) -> exit code
    "train": "kto_lite.cli_train",
    "data": "kto_lite.cli_data",
    "chat": "kto_lite.chat",
    "export": "kto_lite.export",
    "estimate": "kto_lite.memory",
    "sample": "kto_lite.sample",
    "evaluate": "kto_lite.evaluate",
    "loop": "kto_lite.loop",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
