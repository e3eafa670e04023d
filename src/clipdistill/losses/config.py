"""The `losses:` section of a recipe, parsed and checked before anything is built.

YAML form (configs/*.yaml):

    losses:
      clip: 1.0                       # a number is the weight
      fd: {weight: 2000, form: mse}   # a mapping: optional `weight` (default: the term's) + options
      icl: {faithful: true}

Unknown term names, negative or non-numeric weights, unknown options, options of the wrong type
and missing required options raise `UserError` naming the valid choices, at load time.
Optimiser-group overrides (a learning rate for the terms' parameters) are optimiser settings:
`optim.groups` of the run config (train/config.py), no longer `losses.groups`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from clipdistill.errors import UserError
from clipdistill.losses.base import DEFAULT_GROUP, TERMS, Term, get_term
from clipdistill.yaml_file import read_yaml_file

log = logging.getLogger(__name__)

MOVED_GROUPS = (
    "optimiser-group overrides moved from losses.groups to optim.groups: write "
    "`optim: {groups: {GROUP: {lr: .., weight_decay: ..}}}` instead"
)


@dataclass
class LossConfig:
    """Term weights (>= 0) and per-term options, in config order.

    `written`: the `losses:` mapping it was parsed from, recorded as written (checkpoints compare it on
    --resume, config.json shows it); None for a config built in code.
    """

    weights: dict[str, float]
    options: dict[str, dict] = field(default_factory=dict)
    written: dict | None = field(default=None, compare=False, repr=False)

    def to_spec(self) -> dict:
        """The inverse of `parse_loss_config` (a `losses:` mapping)."""
        return {name: {"weight": w, **self.options.get(name, {})} for name, w in self.weights.items()}

    def as_written(self) -> dict:
        """The `losses:` mapping as the config wrote it (`to_spec()` for a config built in code)."""
        return copy.deepcopy(self.written) if self.written is not None else self.to_spec()

    def group_names(self) -> list[str]:
        """The optimiser groups of the Distiller of these terms: "distiller" (shared projectors), then
        each term's own group (`Term.group`), in config order; some may hold no parameter."""
        names = [DEFAULT_GROUP]
        for name in self.weights:
            group = get_term(name).group
            if group not in names:
                names.append(group)
        return names


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


def parse_loss_config(spec: dict) -> LossConfig:
    """Parse and validate a recipe's `losses:` mapping (see the module docstring) into a `LossConfig`."""
    _import_terms()
    if not isinstance(spec, dict) or not [k for k in spec if k != "groups"]:
        raise UserError(
            f"losses: must map term names to weights, e.g. {{clip: 1.0}}; known terms: {', '.join(sorted(TERMS))}"
        )
    if "groups" in spec:
        raise UserError(MOVED_GROUPS)
    weights: dict[str, float] = {}
    options: dict[str, dict] = {}
    for name, value in spec.items():
        cls = get_term(str(name))
        if isinstance(value, dict):
            opts = dict(value)
            weight = _weight(cls.name, opts.pop("weight", cls.default_weight))
        else:
            weight, opts = _weight(cls.name, value), {}
        weights[cls.name] = weight
        options[cls.name] = _check_options(cls, opts)
    return LossConfig(weights=weights, options=options, written=copy.deepcopy(spec))


def split_moved_groups(spec: object, *, warn: bool = True) -> tuple[object, object]:
    """A `losses:` mapping without the `groups` entry of older recipes, and that entry (None when absent).

    Recipes written before optim.groups kept optimiser-group overrides under losses.groups; they are still
    read, with a warning naming the new key (warn=False: a checkpoint's recorded config)."""
    if not isinstance(spec, dict) or "groups" not in spec:
        return spec, None
    if warn:
        log.warning("losses.groups is deprecated: %s", MOVED_GROUPS)
    rest = {k: v for k, v in spec.items() if k != "groups"}
    return rest, spec["groups"]


def load_loss_config(path: str | Path) -> LossConfig:
    """The `losses:` section of a YAML recipe file, parsed."""

    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(
            f"recipe '{path}' is a folder; pass a YAML file with a `losses:` section (see configs/)"
        )
    if not path.is_file():
        raise UserError(
            f"recipe '{path}' does not exist; pass a YAML file with a `losses:` section (see configs/)"
        )
    data = read_yaml_file(path, "recipe")
    if not isinstance(data, dict) or "losses" not in data:
        raise UserError(f"recipe '{path}' has no `losses:` section; add one, e.g. losses: {{clip: 1.0}}")
    return parse_loss_config(split_moved_groups(data["losses"])[0])


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
