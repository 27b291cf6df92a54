"""Command-line flags derived from the typed configs: one source of truth per option.

A config field declared with `option(...)` is a flag: its name is `--field-name` (or the Megatron-LM
name given), its type, choices and default come from the field's annotation and default, its help
from the option. `add_flags` puts a dataclass's flags on a parser; `flag_values` reads them back into
that dataclass's field names. Fields without `option` (derived or fixed by EVE) have no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

_KEY = "megatron_eve.flag"


@dataclasses.dataclass(frozen=True)
class Flag:
    help: str
    name: Optional[str]  # the flag; None: --field-name
    required: bool  # at the command line (configs built in code keep the field's default)
    negate: bool  # a store_true flag that sets the field False (--no-pack: pack=False)
    from_preset: bool  # unset means "the preset's value" (model fields), not the field default
    metavar: Optional[str]
    aliases: Tuple[str, ...]  # other spellings Megatron-LM accepts
    cli_default: Any = MISSING  # the flag's default when not the field's (configs built in code keep the field's)


def option(default: Any = MISSING, *, help: str = "", flag: Optional[str] = None,  # noqa: A002
           required: bool = False, negate: bool = False, from_preset: bool = False,
           metavar: Optional[str] = None, aliases: Tuple[str, ...] = (), default_factory: Any = MISSING,
           cli_default: Any = MISSING):
    """A dataclass field that is also a command-line flag."""
    metadata = {_KEY: Flag(help, flag, required, negate, from_preset, metavar, aliases, cli_default)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flagged_fields(cls) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if _KEY in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
    """The field's command-line flag, e.g. --tensor-model-parallel-size."""
    return field.metadata[_KEY].name or "--" + field.name.replace("_", "-")


def flag_names(cls, prefix: str = "") -> Dict[str, str]:
    """Field name (with prefix, e.g. "language.") → its flag, for messages that name flags."""
    return {prefix + f.name: flag_of(f) for f in flagged_fields(cls)}


def _dest(field: dataclasses.Field) -> str:
    return flag_of(field).lstrip("-").replace("-", "_")


def _value_type(annotation):
    """Optional[X] → X."""
    if typing.get_origin(annotation) is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_default(field: dataclasses.Field):
    if field.default_factory is not MISSING:
        return field.default_factory()
    return field.default


def add_flags(parser, cls, only: Optional[Sequence[str]] = None) -> None:
    """Add a flag for every `option` field of dataclass `cls` (or those named in `only`) to `parser`
    (or an argument group)."""
    hints = typing.get_type_hints(cls)
    for field in flagged_fields(cls):
        if only is not None and field.name not in only:
            continue
        meta: Flag = field.metadata[_KEY]
        kind = _value_type(hints[field.name])
        default = None if meta.from_preset else _field_default(field)
        if meta.cli_default is not MISSING:
            default = meta.cli_default
        help_text = meta.help
        if meta.from_preset:  # the field defaults are the eve-7b preset's values
            example = "" if field.default is None else f"; eve-7b: {field.default}"
            help_text = f"{help_text} (default: the preset's{example})".lstrip()
        if not help_text and not meta.required and default is not None and default is not False:
            help_text = "default: %(default)s"  # argparse prints nothing (nor the default) for a flag without help
        kwargs: Dict[str, Any] = {"dest": _dest(field), "help": help_text or None}
        if meta.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if kind is bool:
            if meta.negate:
                kwargs.update(action="store_true", default=False)
            elif default or default is None:  # on by default, or None: chosen where the flags leave it unset
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kwargs.update(type=type(choices[0]), choices=choices)
        elif typing.get_origin(kind) is list:
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kwargs["type"] = kind
        if meta.metavar:
            kwargs["metavar"] = meta.metavar
        parser.add_argument(flag_of(field), *meta.aliases, **kwargs)


def flag_values(cls, args: argparse.Namespace) -> Dict[str, Any]:
    """The `option` fields of `cls` as parsed, by field name; a model field whose flag was not
    given (from_preset) is left out, so the preset's value stays."""
    values = {}
    for field in flagged_fields(cls):
        meta: Flag = field.metadata[_KEY]
        value = getattr(args, _dest(field))
        if meta.negate:
            value = not value
        if meta.from_preset and value is None:
            continue
        values[field.name] = value
    return values


def from_flags(cls, args: argparse.Namespace, **derived):
    """An instance of `cls` from the parsed flags (plus fields that are not flags)."""
    return cls(**flag_values(cls, args), **derived)
