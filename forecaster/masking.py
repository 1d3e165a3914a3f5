"""Masking secrets in text: a URL's password and credential parameters, password=...
assignments, and every secret this process was told of (remember_secrets).

Kept apart from forecaster.log so that forecaster.errors, which masks every message it
builds, loads no logging library: each command's start pays for what it imports."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

# Query parameters that carry a credential: libpq's password and sslpassword, API keys.
_SECRET_NAMES = r"password|passwd|pwd|sslpassword|token|access_token|api_key|apikey|secret"
_SECRET_PARAM = re.compile(rf"(?i)([?&](?:{_SECRET_NAMES}|client_secret)=)[^&#]*")
# libpq's keyword form ("host=h password=pw") and the like, outside a URL.
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?<![\w-])((?:{_SECRET_NAMES})=)[^\s&#'\",;)]+")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# Shorter values would mask ordinary words; a URL's password is masked by position anyway.
_MIN_SECRET = 4
# A parser that splits a URL at its delimiters quotes a piece of the password in its error
# ("invalid literal for int(): 'word@h'" for 'u:p@ss:word@h'): such pieces are masked too.
_MIN_PIECE = 6

_known: set[str] = set()
_known_pattern: tuple[int, re.Pattern[str] | None] = (0, None)


def _url_password(url: str) -> tuple[str, str, str] | None:
    """(what precedes the password, the password, what follows it), or None without one.

    The password runs to the URL's last '@': SQLAlchemy reads 'postgresql://u:pa/ss@h/db'
    with '/', '?', '#' or '@' unescaped in the password, and such a password in an http URL
    is what a user meant even if no client reads it so. The one exception is an http(s)
    URL whose '@' lies only in the query after a port ('http://h:8080/x?to=a@b'); showing a
    bit too little beats showing a password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    user, colon, after = rest[: max(at, 0)].partition(":")
    port_then_query = (
        scheme.lower() in ("http", "https")
        and re.fullmatch(r"\d*(/[^@?#]*)?[?#].*", after) is not None
    )
    if at < 0 or not colon or any(c in user for c in "/?#") or port_then_query:
        return None
    return f"{scheme}{sep}{user}:", rest[len(user) + 1 : at], rest[at:]


def mask_url(url: str) -> str:
    """A URL with its secrets replaced by ***: the password of its user:password@ part and
    the values of credential query parameters (?password=...)."""
    parts = _url_password(url)
    if parts is not None:
        url = f"{parts[0]}***{parts[2]}"
    return _SECRET_PARAM.sub(r"\1***", url)


class SecretUrl(str):
    """A URL that may hold a password: the whole text as a str (to connect with), its secrets
    masked in repr(), so a settings repr, a traceback's locals or a debugger never show them.
    (str() and f-strings give the whole URL: messages go through mask_url.)"""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_url(str(self)))


def url_secrets(url: str) -> list[str]:
    """The values mask_url hides in this URL."""
    parts = _url_password(url)
    found = [parts[1]] if parts is not None else []
    return found + [m.group(0)[len(m.group(1)) :] for m in _SECRET_PARAM.finditer(url)]


def remember_secrets(values: Iterable[str]) -> None:
    """Mask these values wherever mask_secrets sees them from now on, in this process."""
    found: set[str] = set()
    for secret in values:
        found |= {secret, unquote(secret)}
        found |= {p for p in re.split(r"[@:/?#&=;]", secret) if len(p) >= _MIN_PIECE}
    _known.update(s for s in found if len(s) >= _MIN_SECRET and s.strip("*"))


def mask_secrets(text: str) -> str:
    """Text with every remembered secret replaced by ***, and every URL's password,
    credential query parameters and password=... assignments masked."""
    global _known_pattern
    count, pattern = _known_pattern
    if count != len(_known):
        # Longest first, so a secret containing another is masked whole.
        ordered = sorted(_known, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        _known_pattern = (len(ordered), pattern)
    if pattern is not None:
        text = pattern.sub("***", text)
    text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)
