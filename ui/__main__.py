"""python -m ui [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS] [--allow-code] [--runs DIR]

On this machine only (the default, --host 127.0.0.1) the app asks for no password. Reachable from other
machines (--share, or any other --host; even 127.0.0.2 counts, as any address but 127.0.0.1, ::1 and
localhost may be forwarded) it always asks for one: --auth's, or a random one printed with the link.
Then, unless --allow-code, what would run code on this machine is refused (python: judges,
trust_remote_code) and paths typed in the browser must lie in the runs folder or the upload folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GENERATED_USER = "kto"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ui", description="The kto_lite app: data, training, chat, rating, export.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                        "with a password)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (with a password)")
    p.add_argument("--auth", metavar="USER:PASS",
                   help="require this user name and password (reachable from other machines without it: a random "
                        "password is printed)")
    p.add_argument("--allow-code", action="store_true",
                   help="reachable from other machines, still let browser users run code here: python: judges, "
                        "trust_remote_code, paths anywhere on this machine (only for people you trust)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of the run folders (default ./runs)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest data file accepted (default 200)")
    args = p.parse_args(argv)
    if args.auth and ":" not in args.auth:
        p.error("--auth expects USER:PASS")
    return args


def is_remote(args: argparse.Namespace) -> bool:
    """Whether people on other machines can reach the app."""
    return args.share or args.host not in LOOPBACK


def launch(args: argparse.Namespace, *, block: bool = True):
    """Start the server (block=False returns at once: tests). Returns Gradio's (app, local url, share url)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import runs

    remote = is_remote(args)
    runs.SETTINGS.runs_dir = Path(args.runs)
    runs.SETTINGS.remote, runs.SETTINGS.allow_code = remote, args.allow_code
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    from .app import CSS, THEME, demo

    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if remote and auth is None:  # never open to other machines without a password
        auth = (GENERATED_USER, secrets.token_urlsafe(12))
    app, local_url, share_url = demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        max_file_size=f"{args.max_upload_mb}mb", theme=THEME, css=CSS, footer_links=["api"],
        show_error=True, prevent_thread_lock=True, quiet=not block,
    )
    if remote:
        print(_remote_notice(args, auth, share_url), flush=True)
    if block:
        demo.block_thread()
    return app, local_url, share_url


def _remote_notice(args: argparse.Namespace, auth: tuple[str, str], share_url: str | None) -> str:
    where = share_url or f"http://{args.host}:{args.port}/"
    login = (f"sign in as {auth[0]} with the password given to --auth" if args.auth else
             f"sign in as {auth[0]} / {auth[1]} (a new random password each start; set one with --auth USER:PASS)")
    code = ("--allow-code: browser users may run code on this machine (python: judges, trust_remote_code) and "
            "read any path" if args.allow_code else
            "code-running settings are off and typed paths stay in the runs folder (--allow-code changes that)")
    return f"The app is reachable from other machines at {where}\n  {login}\n  {code}"


def main(argv: list[str] | None = None) -> int:
    launch(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
