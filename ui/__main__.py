"""python -m ui [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS] [--runs DIR]"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ui", description="The kto_lite app: data, training, chat, rating, export.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (use with --auth)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of the run folders (default ./runs)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest data file accepted (default 200)")
    args = p.parse_args(argv)
    if args.auth and ":" not in args.auth:
        p.error("--auth expects USER:PASS")
    return args


def launch(args: argparse.Namespace, *, block: bool = True):
    """Start the server (block=False returns at once: tests). Returns Gradio's (app, local url, share url)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import handlers

    handlers.SETTINGS.runs_dir = Path(args.runs)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    from .app import CSS, THEME, demo

    if (args.share or args.host not in ("127.0.0.1", "localhost")) and not args.auth:
        print("warning: the app is reachable from other machines without --auth", file=sys.stderr)
    return demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        max_file_size=f"{args.max_upload_mb}mb", theme=THEME, css=CSS, footer_links=["api"],
        show_error=True, prevent_thread_lock=not block, quiet=not block,
    )


def main(argv: list[str] | None = None) -> int:
    launch(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
