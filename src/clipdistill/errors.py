"""The one exception type that the CLI turns into a one-line message and exit status 2."""


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
