"""The one exception type that the CLI turns into a one-line message and exit status 2."""

import re


class UserError(Exception):
    """Bad input from the user: unknown name, missing file, impossible config.

    The message must name the problem and the fix in one line.
    """


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """A hint such as "did you mean 'crd'? " for a misspelt registry name ('' when nothing is close)."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UserError:
    known = sorted(known)
    return UserError(f"unknown {kind} '{name}'; {did_you_mean(name, known)}known: {', '.join(known)}")


def error_summary(err: BaseException, limit: int = 200) -> str:
    """An exception's message for a one-line error: lines joined, no terminal colour codes, cut at a word."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err)).split()) or type(err).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text
