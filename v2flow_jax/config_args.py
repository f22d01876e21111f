"""The argument after a config file's colon: `--config=configs/tok256.py:res=512,novocab`.

Comma-separated `key=value` pairs, or a bare `key` for a flag (True). Each config file names the keys it
takes with their defaults; a value is converted to its default's type, and an unknown key or a value
of the wrong type is an error that lists what the file accepts.
"""
from __future__ import annotations

import ml_collections


def _convert(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on", ""):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config argument {key}={text!r}: expected true or false.")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"config argument {key}={text!r}: expected {type(default).__name__}.") from None


def parse(arg: str, **defaults) -> ml_collections.ConfigDict:
    """'res=512,novocab' with defaults res=256, novocab=False -> {res: 512, novocab: True}."""
    out = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            accepted = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise ValueError(f"unknown config argument {key!r}; this config accepts: {accepted}.")
        if not sep and not isinstance(defaults[key], bool):
            raise ValueError(f"config argument {key!r} needs a value, e.g. {key}={defaults[key]!r}.")
        out[key] = _convert(key, text.strip(), defaults[key])
    return ml_collections.ConfigDict(out)
