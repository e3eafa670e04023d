"""`clipdistill losses`: list the registered loss terms, or check a recipe's `losses:` section."""

from __future__ import annotations

import argparse

COLUMNS = ("term", "default weight", "needs", "faithful", "source")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="list every registered loss term (default weight, needs, source)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--options", action="store_true", help="add a column with each term's options")
    p.add_argument(
        "--check", metavar="RECIPE", help="validate the `losses:` section of a YAML recipe instead"
    )
    p.set_defaults(handler=_handle)


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[c]) for row in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(row[c].ljust(w) for c, w in zip(columns, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _handle(args: argparse.Namespace) -> int:
    from clipdistill.losses.config import load_loss_config, term_table

    if args.check:
        cfg = load_loss_config(args.check)
        terms = ", ".join(f"{name} x {w:g}" for name, w in cfg.weights.items())
        print(f"{args.check}: ok: {terms}")
        return 0
    columns = COLUMNS[:-1] + ("options", COLUMNS[-1]) if args.options else COLUMNS
    print(format_table(term_table(), columns, args.markdown))
    return 0
