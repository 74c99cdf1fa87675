"""python -m kto_lite train [CONFIG.yaml] [--FIELD VALUE ...]"""

from __future__ import annotations

import sys

from .config import ConfigError, TrainConfig, field_help


def usage() -> str:
    lines = ["usage: python -m kto_lite train [CONFIG.yaml] [--FIELD VALUE ...]", "", "fields:"]
    defaults = TrainConfig().to_dict()
    for name, help in field_help().items():
        lines.append(f"  --{name} (default {defaults[name]!r})\n      {help}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    try:
        config = TrainConfig.load(path, argv[1:] if path else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data import DataError
    from .train import train

    try:
        out = train(config)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    print(f"adapter saved in {out}")
    return 0
