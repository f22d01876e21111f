"""The release's figures for the benchmarks' speed-up column, with `--release-seconds` overrides."""
from __future__ import annotations


def with_overrides(defaults: dict, text: str) -> dict:
    """`defaults` updated from 'name=seconds,name=seconds' (figures timed alongside ours)."""
    out = dict(defaults)
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--release-seconds item {item!r}: expected name=seconds")
        out[name.strip()] = float(value)
    return out
