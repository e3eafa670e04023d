"""`clipdistill` entry point. Each command group lives in its own module with a `register(subparsers)`
function that adds its subcommands; a subcommand's handler receives the parsed namespace and returns
an exit code. `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipdistill import __version__
from clipdistill.errors import UserError

# Command-group modules under clipdistill.cli (add yours here).
COMMANDS = [
    "losses",
    "teacher",
    "students",
    "curate",
    "train",
    "eval",
    "data",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdistill",
        description="Distil large CLIP models into small, fast students.",
    )
    parser.add_argument("--version", action="version", version=f"clipdistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"clipdistill.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may stand on both sides of an option (`distill a=1 --config x.yaml b=2`)
        if getattr(args, "overrides", None) is not None and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"clipdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
