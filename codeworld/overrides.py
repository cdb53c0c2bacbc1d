"""`SECTION.KEY=VALUE` overrides of params.yaml (like `dvc exp run -S`), validated like the
file itself: VALUE is JSON (numbers, booleans, lists, objects) or else a plain string."""

from __future__ import annotations

import json

from codeworld.config import ConfigError, Params, parse_params


def split_assignment(item: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (KEY, VALUE read as JSON, or the plain string when it is not JSON);
    ValueError when there is no `KEY=`."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(item)
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def apply_overrides(params: Params, items: list[str]) -> Params:
    data = params.model_dump()
    for item in items:
        try:
            key, value = split_assignment(item)
        except ValueError:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return parse_params(data, "overrides")
