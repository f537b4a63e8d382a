"""Command-line options derived from config dataclasses, so Python and CLI agree by construction.

:func:`add_config` turns each field of a frozen config dataclass into an option: the name into
``--flag`` (underscores become dashes), the type into the parser, the default into the default
(shown in ``--help``), and the field's docstring into the help. :func:`config_from_args` builds the
config back from the parsed namespace. Supported field types:

- ``bool``: ``--flag`` / ``--no-flag``;
- ``int``, ``float``, ``str``, ``Path`` and ``X | None`` of those;
- ``Literal[...]``: the choices;
- ``tuple[X, ...]``: a comma-separated list (``--strengths -1,0.5,2``); as a positional, one or
  more values (``PATH [PATH ...]``);
- any class with a ``parse(str)`` classmethod (``LayerSpec``, ``PositionSpec``).

A field's ``metadata`` may hold ``flag`` (another option name), ``metavar``, ``positional`` (the
field is a positional argument), ``repeat=True`` (a ``tuple[X, ...]`` option that may be given
several times, each a comma list, the items joined in order) or ``cli=False`` (not on the command
line; say why in its doc).

A doc that says ``bundled set[:split]`` (a prompt SPEC) gets the names of the bundled prompt sets
in its help, from :data:`safegeom.prompts.BUNDLED`, so the help lists every set the data holds.

Example:
    >>> import argparse
    >>> from safegeom.models import LoadConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_config(parser, LoadConfig)
    >>> config_from_args(LoadConfig, parser.parse_args(["--dtype", "float32"])).dtype
    'float32'
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from safegeom.config import field_docs, flag
from safegeom.prompts import BUNDLED

__all__ = ["PROMPT_SPEC_HELP", "add_config", "config_from_args", "configs_of", "option_dest"]

_BUNDLED_PHRASE = "bundled set[:split]"
PROMPT_SPEC_HELP = f"bundled set[:train|val|test] ({', '.join(BUNDLED)})"
"""What a prompt SPEC's bundled name may be: replaces ``bundled set[:split]`` in an option's help."""

_CONFIGS = "_safegeom_configs"


def option_dest(cls: type, name: str) -> str:
    """The namespace attribute that holds field ``name`` of ``cls``."""
    return f"{cls.__name__}.{name}"


def configs_of(parser: argparse.ArgumentParser) -> tuple[type, ...]:
    """The config classes registered on ``parser`` with :func:`add_config`, in order."""
    return tuple(parser.get_default(_CONFIGS) or ())


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(type the command line parses, whether None is allowed)``: a union that holds ``str``
    is text on the command line, one that holds a ``Literal`` its choices (its other types are for
    Python callers)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 1:
            return args[0], optional
        if str in args:
            return str, optional
        literals = [a for a in args if get_origin(a) is Literal]
        if len(literals) == 1:
            return literals[0], optional
    return tp, False


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _scalar_parser(tp: Any) -> Any:
    if tp is bool:
        raise TypeError("bool inside a container is not supported")
    if tp is int:
        return _int
    if tp is float:
        return _finite_float
    if tp in (str, Path):
        return tp
    parse = getattr(tp, "parse", None)
    if callable(parse):

        def parse_value(text: str) -> Any:
            try:
                return parse(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None

        parse_value.__name__ = tp.__name__
        return parse_value
    raise TypeError(f"no command-line parser for type {tp!r}")


def _tuple_parser(item: Any) -> Any:
    one = _scalar_parser(item)

    def parse_list(text: str) -> tuple[Any, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list (empty item)")
        return tuple(one(p) for p in parts)

    parse_list.__name__ = "list"
    return parse_list


def _expand(doc: str) -> str:
    """Return ``doc`` with ``bundled set[:split]`` spelled out as :data:`PROMPT_SPEC_HELP`."""
    return doc.replace(_BUNDLED_PHRASE, PROMPT_SPEC_HELP)


def _help(doc: str, default: Any) -> str:
    text = _expand(doc).replace("%", "%%") if doc else ""
    if default is dataclasses.MISSING or default is None:
        return text
    if isinstance(default, tuple):
        shown = ",".join(str(getattr(v, "spec", v)) for v in default) or "(none)"
    else:
        shown = str(getattr(default, "spec", default))
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Add one option (or positional) per field of config dataclass ``cls`` to ``parser``.

    ``skip`` names fields left off the command line (their default is used).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli", True) is False or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = _default(f)
        kwargs: dict[str, Any] = {
            "dest": option_dest(cls, f.name),
            "help": _help(docs.get(f.name, ""), default),
        }
        kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            kwargs["help"] = _expand(docs.get(f.name, ""))
            if get_origin(tp) is tuple:  # PATH [PATH ...]
                kwargs["type"] = _scalar_parser(get_args(tp)[0])
                kwargs["nargs"] = "+" if default is dataclasses.MISSING else "*"
                if default is not dataclasses.MISSING:
                    kwargs["default"] = default
            elif default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=default)
            parser.add_argument(option_dest(cls, f.name), **kwargs)
            _fix_positional_name(parser, cls, f)
            continue
        name = f.metadata.get("flag", flag(f.name))
        if tp is bool:
            kwargs.pop("metavar")
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = bool(default) if default is not dataclasses.MISSING else False
        else:
            if get_origin(tp) is Literal:
                kwargs.pop("metavar")
                kwargs["choices"] = list(get_args(tp))
                kwargs["type"] = type(get_args(tp)[0])
            elif get_origin(tp) is tuple:
                item = get_args(tp)[0]
                kwargs["type"] = _tuple_parser(item)
                if f.metadata.get("repeat"):
                    kwargs["action"] = "extend"
                kwargs["metavar"] = f.metadata.get("metavar", f"{f.name.upper()},...")
            else:
                kwargs["type"] = _scalar_parser(tp)
            if default is dataclasses.MISSING and not optional:
                kwargs["required"] = True
            elif kwargs.get("action") == "extend":
                kwargs["default"] = None  # argparse extends a default in place: fill it in later
            else:
                kwargs["default"] = None if default is dataclasses.MISSING else default
        group.add_argument(name, **kwargs)
    parser.set_defaults(**{_CONFIGS: (*configs_of(parser), cls)})


def _fix_positional_name(parser: argparse.ArgumentParser, cls: type, f: dataclasses.Field) -> None:
    action = parser._actions[-1]
    action.metavar = f.metadata.get("metavar", f.name.upper())


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build config ``cls`` from a namespace parsed by a parser that :func:`add_config` filled.

    Fields that were skipped keep their defaults; ``overrides`` replace parsed values.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = option_dest(cls, f.name)
        if hasattr(args, dest):
            value = getattr(args, dest)
            if f.metadata.get("repeat"):
                value = _default(f) if value is None else tuple(value)
            elif isinstance(value, list):  # a positional list
                value = tuple(value)
            values[f.name] = value
    values.update(overrides)
    return cls(**values)
