"""The `losses:` section of a recipe, parsed and checked before anything is built.

YAML form (configs/*.yaml):

    losses:
      clip: 1.0                       # a number is the weight
      fd: {weight: 2000, form: mse}   # a mapping: optional `weight` (default: the term's) + options
      icl: {faithful: true}
      groups:                         # optional: per-parameter-group optimiser overrides
        distiller: {weight_decay: 0.01}

Unknown term names, negative or non-numeric weights, unknown options, options of the wrong type
and missing required options raise `UserError` naming the valid choices, at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from clipdistill.errors import UserError
from clipdistill.losses.base import TERMS, Term, get_term

GROUP_KEYS = ("lr", "weight_decay")


@dataclass
class LossConfig:
    """Term weights (>= 0), per-term options and per-group optimiser overrides, in config order."""

    weights: dict[str, float]
    options: dict[str, dict] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)

    def to_spec(self) -> dict:
        """The inverse of `parse_loss_config` (a `losses:` mapping)."""
        spec: dict = {name: {"weight": w, **self.options.get(name, {})} for name, w in self.weights.items()}
        if self.groups:
            spec["groups"] = {k: dict(v) for k, v in self.groups.items()}
        return spec


def _import_terms() -> None:
    from clipdistill import losses  # noqa: F401  (importing the package registers the built-in terms)


def _number(value: object, what: str, fix: str) -> float:
    # bool is an int subclass: `clip: true` is a mistake, not a weight of 1.
    if isinstance(value, bool) or value is None:
        raise UserError(f"{what} = {value!r} is not a number; {fix}")
    if isinstance(value, str):
        try:  # PyYAML reads `1e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            raise UserError(f"{what} = {value!r} is not a number; {fix}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UserError(f"{what} = {value!r} is not a finite number; {fix}")
    return float(value)


def _weight(name: str, value: object) -> float:
    weight = _number(value, f"losses.{name} weight", "give a number >= 0")
    if weight < 0:
        raise UserError(
            f"losses.{name} weight = {weight:g} is negative; give a number >= 0 (0 disables the term)"
        )
    return weight


def _check_options(cls: type[Term], opts: dict) -> dict:
    unknown = sorted(set(opts) - set(cls.options))
    if unknown:
        valid = ", ".join(sorted(cls.options)) or "none (only weight)"
        raise UserError(f"term '{cls.name}' has no option '{unknown[0]}'; its options: {valid}")
    for key in cls.required_options:
        if opts.get(key) is None:
            raise UserError(
                f"term '{cls.name}' needs option '{key}'; set losses.{cls.name}.{key} in the config"
            )
    for key, value in opts.items():
        default = cls.options[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"losses.{cls.name}.{key} = {value!r} must be true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            _number(value, f"losses.{cls.name}.{key}", f"give a number (default {default})")
    return dict(opts)


def _groups(value: object) -> dict[str, dict]:
    if not isinstance(value, dict):
        raise UserError(f"losses.groups must map a group name to {{lr: .., weight_decay: ..}}, got {value!r}")
    groups: dict[str, dict] = {}
    for group, settings in value.items():
        if not isinstance(settings, dict) or not settings:
            raise UserError(f"losses.groups.{group} must be a mapping with {' and/or '.join(GROUP_KEYS)}")
        bad = sorted(set(settings) - set(GROUP_KEYS))
        if bad:
            raise UserError(
                f"losses.groups.{group} has no setting '{bad[0]}'; valid: {', '.join(GROUP_KEYS)}"
            )
        groups[str(group)] = {}
        for key, v in settings.items():
            number = _number(v, f"losses.groups.{group}.{key}", "give a number >= 0")
            if number < 0:
                raise UserError(f"losses.groups.{group}.{key} = {number:g} is negative; give a number >= 0")
            groups[str(group)][key] = number
    return groups


def parse_loss_config(spec: dict) -> LossConfig:
    """Parse and validate a recipe's `losses:` mapping (see the module docstring) into a `LossConfig`."""
    _import_terms()
    if not isinstance(spec, dict) or not [k for k in spec if k != "groups"]:
        raise UserError(
            f"losses: must map term names to weights, e.g. {{clip: 1.0}}; known terms: {', '.join(sorted(TERMS))}"
        )
    weights: dict[str, float] = {}
    options: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for name, value in spec.items():
        if name == "groups":
            groups = _groups(value)
            continue
        cls = get_term(str(name))
        if isinstance(value, dict):
            opts = dict(value)
            weight = _weight(cls.name, opts.pop("weight", cls.default_weight))
        else:
            weight, opts = _weight(cls.name, value), {}
        weights[cls.name] = weight
        options[cls.name] = _check_options(cls, opts)
    return LossConfig(weights=weights, options=options, groups=groups)


def load_loss_config(path: str | Path) -> LossConfig:
    """The `losses:` section of a YAML recipe file, parsed."""
    import yaml

    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(
            f"recipe '{path}' is a folder; pass a YAML file with a `losses:` section (see configs/)"
        )
    if not path.is_file():
        raise UserError(
            f"recipe '{path}' does not exist; pass a YAML file with a `losses:` section (see configs/)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(
            f"recipe '{path}' is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read recipe '{path}' ({err.strerror}); check the file") from None
    except yaml.YAMLError as err:
        raise UserError(
            f"recipe '{path}' is not valid YAML ({str(err).splitlines()[0]}); fix the file"
        ) from None
    if not isinstance(data, dict) or "losses" not in data:
        raise UserError(f"recipe '{path}' has no `losses:` section; add one, e.g. losses: {{clip: 1.0}}")
    return parse_loss_config(data["losses"])


def term_table() -> list[dict[str, str]]:
    """One row per registered term: name, default weight, needs, options, faithful quirk, source."""
    _import_terms()
    rows = []
    for name in sorted(TERMS):
        cls = TERMS[name]
        rows.append(
            {
                "term": name,
                "default weight": f"{cls.default_weight:g}",
                "needs": ", ".join(sorted(cls.needs)) or "-",
                "faithful": "yes" if "faithful" in cls.options else "-",
                "options": ", ".join(k for k in cls.options if k != "faithful") or "-",
                "source": cls.source,
            }
        )
    return rows
