"""Reading a YAML file a user names (a run config, a loss recipe): every failure is one `UserError` line."""

from __future__ import annotations

from pathlib import Path

from clipdistill.errors import UserError


def read_yaml_file(path: Path, what: str) -> object:
    """The parsed contents of `path`; `what` names the file in errors ("config", "recipe")."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what} '{path}' is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {what} '{path}' ({err.strerror}); check the file") from None
    except yaml.YAMLError as err:
        raise UserError(
            f"{what} '{path}' is not valid YAML ({str(err).splitlines()[0]}); fix the file"
        ) from None
