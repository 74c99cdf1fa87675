"""python -m kto_lite COMMAND ...: the `train` command is here; the others live with what they do.

    python -m kto_lite train [CONFIG.yaml] [--FIELD VALUE ...]

A training step, from the command line to the loss: this file (flags -> TrainConfig) ->
kto_lite/train.py (`train`: setup, `Recipe.train_step`, the loop) -> kto_lite/loss.py (`kto_loss`).
"""

from __future__ import annotations

import importlib
import sys

from . import cli

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

COMMANDS = {  # command -> module with main(argv) -> exit code ("train" is `train_main` below)
    "train": __name__,
    "data": "kto_lite.cli_data",
    "chat": "kto_lite.chat",
    "sample": "kto_lite.sample",
    "evaluate": "kto_lite.evaluate",
    "loop": "kto_lite.loop",
    "export": "kto_lite.export",
    "estimate": "kto_lite.memory",
}


def train_parser() -> cli.Parser:
    parser = cli.Parser("train", "Train LoRA adapters with KTO. Every config field is also a flag; flags "
                        "override the YAML file. With nothing given: the built-in demo model on its sample data.")
    parser.add_argument("config", nargs="?", help="a YAML file of config fields (recipes/*.yaml)")
    parser.add_config_fields()
    return parser


def train_config(argv: list[str]):
    """`train`'s arguments -> TrainConfig: a YAML file (optional), then any config field as a flag on top."""
    from .config import TrainConfig

    args = train_parser().parse_args(argv)
    return TrainConfig.load(args.config, cli.config_overrides(args))


def train_main(argv: list[str]) -> int:
    def body() -> int:
        from .train import train

        train(train_config(argv))
        return 0

    return cli.run(body)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else cli.EXIT_USAGE
    if argv[0] == "train":
        return train_main(argv[1:])
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
