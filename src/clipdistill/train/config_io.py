"""Reading a run config (train/config.py): YAML files merged in order, `key=value` overrides, and the
conversion of the resulting mapping into the typed dataclasses and back.

Two sections are held parsed: `losses` (a `LossConfig`) and `data.augment` (an `AugmentPolicy`), each
parsed once, here, while the config is loaded. Written back (`to_plain`: checkpoints, config.json) they
are the mappings the config wrote, so a recorded config reads as before and old checkpoints compare
equal on --resume.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from clipdistill.data.augment import AugmentPolicy
from clipdistill.errors import UserError, did_you_mean
from clipdistill.losses.config import LossConfig, parse_loss_config
from clipdistill.yaml_file import read_yaml_file


def _augment_policy(value: Any, path: str) -> AugmentPolicy:
    if not isinstance(value, dict):
        raise UserError(f"{path} must be a mapping of augmentation options, got {value!r}")
    return AugmentPolicy.from_dict(value)


# Types whose YAML form is a mapping parsed by a function of the owning module (value, key path).
PARSED: dict[type, typing.Callable[[Any, str], Any]] = {
    LossConfig: lambda value, path: parse_loss_config(value),
    AugmentPolicy: _augment_policy,
}


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """The dataclass `cls` from a mapping; unknown keys and values of the wrong type are a `UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"{path or 'config'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise UserError(
                f"unknown config key '{where}'; {did_you_mean(key, names)}known: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # `str | list[str]`: a YAML list takes the list type, anything else the first other type
        wanted = [a for a in args if (typing.get_origin(a) is list) == isinstance(value, list)]
        return _convert((wanted or args)[0], value, path)
    if tp in PARSED:
        return PARSED[tp](value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is list:
        value = value if isinstance(value, list) else [value]
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path} must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path} = {value!r} must be true or false")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{path} = {value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path} = {value!r} must be a number") from None
        if tp is int:
            if number != int(number):
                raise UserError(f"{path} = {value!r} must be a whole number")
            return int(number)
        return number
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"{path} = {value!r} must be a string")
        return str(value)
    return value


def to_plain(value: Any) -> Any:
    """A config as plain data (like `dataclasses.asdict`), the parsed sections as they were written."""
    if isinstance(value, (LossConfig, AugmentPolicy)):
        return value.as_written()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` overrides (value parsed as YAML) applied to a nested dict (a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not key=value; write e.g. optim.lr=5e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"config '{path}' is a folder; pass a YAML file (e.g. one of configs/*.yaml)")
    if not path.is_file():
        raise UserError(f"config '{path}' does not exist; pass a YAML file (see configs/)")
    data = read_yaml_file(path, "config") or {}
    if not isinstance(data, dict):
        raise UserError(
            f"config '{path}' must be a YAML mapping of sections (student:, teacher:, data:, losses:, ...)"
        )
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive merge; `losses:` is replaced as a whole (a recipe names every term it wants)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "losses":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
