"""``--plugin NAME:KEY=VALUE,...``: a plugin and its options, as written on a command line.

    --plugin respawn:max_restarts=5,min_delay=0.5
    --plugin reload:wait_for=ready --plugin respawn:stop_exit_codes=[0,3]
    --plugin mypkg-metrics:path="/metrics",labels={"team":"web"}

A value is read as JSON (numbers, ``true``/``false``/``null``, ``"strings"``, lists,
objects; Python's ``True``/``False``/``None`` too); anything else is a plain string
(``level=DEBUG``). Commas inside brackets, braces or quotes do not split options.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._errors import SettingsError

__all__ = ["parse_plugin_spec", "parse_value"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PYTHON = {"True": True, "False": False, "None": None}
_OPEN = {"[": "]", "{": "}"}


def parse_value(text: str, where: str) -> Any:
    """Read one option value (see the module docstring).

    Raises:
        SettingsError: *text* starts like JSON (a bracket, brace or quote, or a digit)
            but is not valid JSON; the message quotes it and says where.
    """
    if text in _PYTHON:
        return _PYTHON[text]
    try:
        return json.loads(text)
    except ValueError as exc:
        if text[:1] in '[{"' or re.match(r"^[-+]?\.?\d", text):
            msg = f"{where}: {text!r} is not a valid value ({exc}); quote text as \"...\""
            raise SettingsError(msg) from None
    return text


def _split(text: str, where: str) -> list[str]:
    """Split *text* on commas outside brackets, braces and double quotes."""
    parts: list[str] = []
    closing: list[str] = []
    quoted = escaped = False
    start = 0
    for i, char in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in _OPEN:
            closing.append(_OPEN[char])
        elif closing and char == closing[-1]:
            closing.pop()
        elif char == "," and not closing:
            parts.append(text[start:i])
            start = i + 1
    if quoted or closing:
        msg = f"{where}: unbalanced {'quote' if quoted else repr(closing[-1])} in {text!r}"
        raise SettingsError(msg)
    parts.append(text[start:])
    return parts


def parse_plugin_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` into the name and its options.

    Raises:
        SettingsError: no name, an option that is not ``KEY=VALUE`` with a Python
            identifier as KEY, a key given twice, or a bad value; the message quotes it.
    """
    name, sep, rest = spec.partition(":")
    where = f"--plugin {spec!r}"
    if not _NAME.match(name):
        msg = (
            f"{where}: {name!r} is not a plugin name; write NAME or NAME:KEY=VALUE,..., "
            "e.g. 'respawn:max_restarts=5,min_delay=0.5'"
        )
        raise SettingsError(msg)
    options: dict[str, Any] = {}
    if not sep:
        return name, options
    for item in _split(rest, where):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            msg = (
                f"{where}: {item!r} is not KEY=VALUE (KEY a Python name), e.g. "
                f"'{name}:max_restarts=5'"
            )
            raise SettingsError(msg)
        if key in options:
            msg = f"{where}: option {key!r} is given twice"
            raise SettingsError(msg)
        options[key] = parse_value(value.strip(), f"{where}, option {key!r}")
    return name, options
