"""CLI flags generated from a config dataclass: one flag per field, its help text taken from the field's comment."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from typing import Any, Mapping, get_type_hints


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the one ending its line, else the comment lines just above it ("" when none); a
    subclass's own comment wins over its base dataclasses'."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update({k: v for k, v in _own_field_comments(klass).items() if v or k not in comments})
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            trailing[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        text = trailing.get(node.lineno, "") if not lines[node.lineno - 1].lstrip().startswith("#") else ""
        above, row = [], node.lineno - 1
        while not text and row >= 1 and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, lines[row - 1].lstrip().lstrip("#").strip())
            row -= 1
        comments[node.target.id] = text or " ".join(above)
    return comments


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, choices: Mapping[str, tuple] = {},
                            skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` but `skip` (--batch-size for batch_size); defaults None (the config decides)."""
    hints, comments = get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        help_text = comments.get(f.name, "")
        help_text = f"{help_text}{'; ' if help_text else ''}default {json.dumps(_default(f))}".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=choices.get(f.name), help=help_text,
                                metavar=None if f.name in choices else f.name.upper())


def default_of(function: Any, parameter: str) -> Any:
    """The default a library function declares for `parameter`, so a CLI flag never types it a second time."""
    return inspect.signature(function).parameters[parameter].default
