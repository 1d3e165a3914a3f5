"""The configuration reference, generated from the settings model: every key, its type,
default, environment variable and description, as the Markdown table the README carries
(`forecaster config reference`; tests/test_readme.py keeps the two the same)."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from forecaster.config import (
    ENV_PREFIX,
    FileSource,
    HttpJsonSource,
    PrometheusSource,
    ReplaySource,
    Settings,
    SqlSource,
    format_duration,
)

__all__ = ["Row", "reference_markdown", "reference_sections"]

# The source kinds in the order the reference lists them.
SOURCE_KINDS: tuple[type[BaseModel], ...] = (
    ReplaySource,
    FileSource,
    HttpJsonSource,
    SqlSource,
    PrometheusSource,
)


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    env: str  # "" where no environment variable reaches the key (items of a list)
    description: str


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = " or ".join(_type_name(a) for a in args if a is not type(None))
        return named + (" or none" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    if annotation is timedelta:
        return "duration"
    if annotation is datetime:
        return "datetime"
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, Enum):
        value = value.value
    return json.dumps(value, default=str)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes a field holds directly or as list items."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (list, typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


Section = tuple[str, list[Row]]
_IMPLIED = {"kind": "the source kind these keys belong to"}


def _walk(
    model: type[BaseModel],
    title: str,
    prefix: str,
    env: str | None,
    *,
    skip: set[str] = frozenset(),
) -> Iterator[Section]:
    """A section of the model's own keys, then one per nested table, as a TOML file reads.

    A table that defaults to none (a source's [series] overrides) stays one row; a list of
    tables (TOML's [[...]]) gets its own section, reachable from the file only."""
    rows: list[Row] = []
    nested: list[tuple[str, type[BaseModel], str, str | None]] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        env_name = f"{env}{name.upper()}" if env is not None else None
        models = _models_in(info.annotation)
        is_list = typing.get_origin(info.annotation) is list
        if models and not is_list and info.default is not None:
            for m in models:
                nested.append((f"[{key}]", m, f"{key}.", f"{env_name}__" if env_name else None))
            continue
        if models and is_list:
            for m in models:
                nested.append((f"[[{key}]]", m, f"{key}[].", None))
        rows.append(
            Row(
                key=key,
                type=_type_name(info.annotation),
                default=_default(info),
                env=env_name or "",
                description=(info.description or _IMPLIED.get(name, "")).replace("|", "\\|"),
            )
        )
    if rows:
        yield title, rows
    for sub_title, sub, sub_prefix, sub_env in nested:
        yield from _walk(sub, sub_title, sub_prefix, sub_env)


def reference_sections() -> list[Section]:
    """Every key of the settings: the top level, each table, then the sources: the keys
    every kind has, and each kind's own."""
    sections = list(_walk(Settings, "top level", "", ENV_PREFIX, skip={"sources"}))
    prefix, env = "sources.<name>.", f"{ENV_PREFIX}SOURCES__<NAME>__"
    common = set(SOURCE_KINDS[0].model_fields) & set.intersection(
        *(set(k.model_fields) for k in SOURCE_KINDS)
    ) - {"kind"}
    sections += _walk(
        SOURCE_KINDS[0],
        "[sources.<name>], every kind",
        prefix,
        env,
        skip=set(SOURCE_KINDS[0].model_fields) - common,
    )
    for kind in SOURCE_KINDS:
        name = kind.model_fields["kind"].default
        sections += _walk(kind, f'[sources.<name>] with kind = "{name}"', prefix, env, skip=common)
    return sections


def reference_markdown() -> str:
    """The reference as Markdown: one table per section (the README's, between markers)."""
    out: list[str] = []
    for title, rows in reference_sections():
        out += [f"**{title}**", "", "| key | type | default | environment variable | description |"]
        out.append("|---|---|---|---|---|")
        for r in rows:
            env = f"`{r.env}`" if r.env else "(file only)"
            out.append(f"| `{r.key}` | {r.type} | `{r.default}` | {env} | {r.description} |")
        out.append("")
    return "\n".join(out)
