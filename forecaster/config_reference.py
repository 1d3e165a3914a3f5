"""The configuration reference, generated from the settings model: every key, its type,
default, environment variable and description, as the Markdown table the README carries
(`forecaster config reference`; tests/test_readme.py keeps the two the same). The same
walk of the model names a key and its environment variable in a ConfigError."""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsError

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
from forecaster.errors import ConfigError
from forecaster.log import mask_secrets

__all__ = ["Row", "config_error", "reference_markdown", "reference_sections"]

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


# -- naming a key in an error ------------------------------------------------------------------

_KIND_CLASSES = {k.model_fields["kind"].default: k for k in SOURCE_KINDS}
# Keys whose values are never quoted back in an error: they may hold a credential.
_SECRET_KEY = re.compile(r"(?i)url|token|secret|passw|pwd|key|auth|credential|dsn|address")
_MAX_SHOWN = 60


def _alternatives(annotation: Any) -> list[Any]:
    """What a value of this annotation may be: Annotated unwrapped, a union's members, None
    left out."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _alternatives(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [
            m for a in typing.get_args(annotation) if a is not type(None) for m in _alternatives(a)
        ]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _step(alternatives: list[Any], part: str | int) -> list[Any] | None:
    """What the value one key further down may be, or None when `part` is no key there."""
    for alt in alternatives:
        origin = typing.get_origin(alt)
        if _is_model(alt) and part in alt.model_fields:
            return _alternatives(alt.model_fields[part].annotation)
        if origin is dict and isinstance(part, str):
            return _alternatives(typing.get_args(alt)[1])
        if origin in (list, tuple) and isinstance(part, int):
            return _alternatives(typing.get_args(alt)[0])
    return None


def _field(alternatives: list[Any], part: str | int) -> FieldInfo | None:
    return next(
        (a.model_fields[part] for a in alternatives if _is_model(a) and part in a.model_fields),
        None,
    )


def _key_path(loc: tuple[Any, ...]) -> tuple[tuple[str | int, ...], list[Any]]:
    """The key as a user writes it, from a pydantic error location, which also names union
    members (a source's kind, 'function-after[...]', 'none'), and what its value may be.

    Only a source's kind is dropped where it stands, never a key of the same name: `http.port`
    stayed `port` when every 'http' was taken for the kind."""
    parts: list[str | int] = []
    here: list[Any] = [Settings]
    for part in loc:
        below = _step(here, part)
        if below is not None:
            parts.append(part)
            here = below
        elif part in _KIND_CLASSES and _KIND_CLASSES[part] in here:
            here = [_KIND_CLASSES[part]]
    return tuple(parts), here


def _dotted(parts: tuple[str | int, ...]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return mask_secrets(text) or "(top level)"


def _env_var(parts: tuple[str | int, ...]) -> str | None:
    """The environment variable of a key; None inside a list (only the whole list has one)."""
    if not parts or not all(isinstance(p, str) for p in parts):
        return None
    return ENV_PREFIX + "__".join(str(p).upper() for p in parts)


def _set_in_env(parts: tuple[str | int, ...], *, below: bool) -> list[str]:
    """The environment variables set that give this key its value: its own, one of a table
    above it (as JSON), and with `below` those of the keys inside it."""
    names = {k.upper(): k for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    strings = parts[: next((i for i, p in enumerate(parts) if isinstance(p, int)), len(parts))]
    found = [names[e] for i in range(1, len(strings) + 1) if (e := _env_var(strings[:i])) in names]
    own = _env_var(parts)
    if below and own is not None:
        found += [v for k, v in sorted(names.items()) if k.startswith(own + "__")]
    return found


def _shown(parts: tuple[str | int, ...], value: Any) -> str:
    """' (got ...)' where the value cannot be a secret: a short scalar of a key that does not
    hold credentials, masked all the same; '' otherwise."""
    if not isinstance(value, str | int | float | bool | datetime | timedelta) and value is not None:
        return ""
    name = next((p for p in reversed(parts) if isinstance(p, str)), "")
    text = repr(value)
    if _SECRET_KEY.search(name) or len(text) > _MAX_SHOWN:
        return ""
    return f" (got {mask_secrets(text)})"


def _table(parts: tuple[str | int, ...]) -> str:
    """The table at these keys as the TOML file writes it."""
    if not parts:
        return "the top level"
    if isinstance(parts[-1], int):
        return f"[[{_dotted(parts[:-1])}]] number {parts[-1] + 1}"
    return f"[{_dotted(parts)}]"


def _unknown_key(loc: tuple[Any, ...], path: Path | None) -> tuple[str, str, str]:
    """Its value is never quoted: an unknown key may be anything, `api_key` included."""
    table, here = _key_path(loc[:-1])
    parts = (*table, loc[-1])
    known = [f for alt in here if _is_model(alt) for f in alt.model_fields]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    env = _set_in_env(parts, below=True)
    if env:
        fix = f"Unset the environment variable {env[0]}"
    elif path:
        fix = f"Remove it from {path}" if not table else f"Remove it from {_table(table)} in {path}"
    else:
        fix = "Remove it"
    fix += f", or correct its spelling to {close[0]!r}." if close else "."
    return _dotted(parts), "is not a setting", fix


def _one_problem(err: Any, path: Path | None) -> tuple[str, str, str]:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        return _unknown_key(loc, path)
    parts, here = _key_path(loc)
    if kind == "missing":
        key, env_name = _dotted(parts), _env_var(parts)
        if env_name and _set_in_env(parts[:-1], below=True):
            return key, "is required", f"Set the environment variable {env_name}."
        in_file = f" in {path}" if path else ""
        return key, "is required", f"Add it to {_table(parts[:-1])}{in_file}."
    table: tuple[str | int, ...] | None = None
    if kind.startswith("union_tag"):  # a source's kind: the table is what is wrong
        table, parts = parts, (*parts, "kind")
        kinds = ", ".join(_KIND_CLASSES)
        tag = err.get("ctx", {}).get("tag") if kind == "union_tag_invalid" else None
        problem = f"must be one of {kinds}" + (_shown(parts, tag) if tag else " (it is missing)")
    elif any(_is_model(a) for a in here):  # a check across the keys of one table
        table, problem = parts, mask_secrets(str(err["msg"]).removeprefix("Value error, "))
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
        problem = mask_secrets(msg) + _shown(parts, err.get("input"))
        if kind in ("list_type", "tuple_type"):  # from the environment, where it is JSON
            problem += ', written in JSON as ["a", "b"] in an environment variable'
    if table is not None:
        where = [f"{_table(table)} in {path}"] if path else []
        if env := _set_in_env(table, below=True):
            where.append(f"the environment variable{'s' * (len(env) > 1)} {', '.join(env)}")
        return _dotted(parts), problem, f"Fix {' or '.join(where) or _table(table)}."
    env, env_name = _set_in_env(parts, below=False), _env_var(parts)
    if env:
        fix = f"Fix the environment variable {env[0]}."
    elif path:
        fix = f"Fix it in {path}" + (f" (or override it with {env_name})" if env_name else "") + "."
    else:
        fix = "Fix the value given" + (f", or set {env_name}" if env_name else "") + "."
    return _dotted(parts), problem, fix


def config_error(exc: ValidationError | SettingsError, path: Path | None) -> ConfigError:
    """A ConfigError naming the key (as written in the TOML file), the environment variable
    and the fix, quoting a value only where it cannot be a secret."""
    if isinstance(exc, SettingsError):
        return _unparsable_env(exc)
    problems: dict[str, tuple[str, str]] = {}
    for err in exc.errors():
        key, problem, fix = _one_problem(err, path)
        problems.setdefault(key, (problem, fix))
    (key, (problem, fix)), *others = problems.items()
    if others:
        fix += f" Also wrong: {', '.join(k for k, _ in others)}."
    return ConfigError(key, problem, fix)


def _unparsable_env(exc: SettingsError) -> ConfigError:
    """pydantic-settings names only the top-level field of a list or table setting whose
    environment variable is not JSON: find the variable."""
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts: tuple[str | int, ...] = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        here: list[Any] | None = [Settings]
        field: FieldInfo | None = None
        for part in parts:
            field = _field(here, part) if here is not None else None
            here = _step(here, part) if here is not None else None
        if not here or not any(
            _is_model(a) or typing.get_origin(a) in (list, tuple, dict) for a in here
        ):
            continue
        try:
            json.loads(value)
        except ValueError as err:
            is_list = any(typing.get_origin(a) in (list, tuple) for a in here)
            shape, example = ("list", '["a", "b"]') if is_list else ("table", '{"key": "value"}')
            if is_list and field is not None and _default(field) not in ("required", "none", "[]"):
                example = _default(field)
            one_by_one = "" if is_list else f", or set its keys one by one as {name}__KEY"
            return ConfigError(
                _dotted(parts),
                f"the environment variable {name} is not JSON ({err.args[0].split(':')[0]}), "
                f"which a {shape} setting must be",
                f"Set it to a JSON {shape}, e.g. {name}='{example}'{one_by_one}.",
            )
    field = re.search(r'field "(\w+)"', str(exc))
    key = field.group(1) if field else "(environment)"
    return ConfigError(
        key,
        "an environment variable of it is not JSON, which list and table settings must be",
        f"Fix the {ENV_PREFIX}{key.upper()}... variables.",
    )
