"""`python -m kto_lite train [CONFIG.yaml] [--FIELD VALUE ...]`: train LoRA adapters with KTO.

A training step, from the command line to the loss: this file (flags -> TrainConfig) ->
kto_lite/training/recipe.py (`train`: setup, `Recipe.train_step`, the loop) -> kto_lite/training/loss.py
(`kto_loss`).
"""

from __future__ import annotations

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.training.recipe import train


def train_parser() -> cli.Parser:
    parser = cli.Parser("train", "Train LoRA adapters with KTO. Every config field is also a flag; flags "
                        "override the YAML file. With nothing given: the built-in demo model on its sample data.")
    parser.add_argument("config", nargs="?", help="a YAML file of config fields (recipes/*.yaml)")
    parser.add_config_fields()
    return parser


def train_config(argv: list[str]) -> TrainConfig:
    """`train`'s arguments -> TrainConfig: a YAML file (optional), then any config field as a flag on top."""
    args = train_parser().parse_args(argv)
    return TrainConfig.load(args.config, cli.config_overrides(args))


def main(argv: list[str]) -> int:
    def body() -> int:
        train(train_config(argv))
        return 0

    return cli.run(body)
