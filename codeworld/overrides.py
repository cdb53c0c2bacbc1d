"""`SECTION.KEY=VALUE` overrides of params.yaml (like `dvc exp run -S`), validated like the
file itself: VALUE is JSON (numbers, booleans, lists, objects) or else a plain string."""

from __future__ import annotations

import json
from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel

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


def _field(model: type[BaseModel] | None, name: str):
    """The annotation of `model`'s field `name` (None when `model` is no pydantic model or
    has no such field: a dict section, say)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    info = model.model_fields.get(name)
    return info.annotation if info is not None else None


def _section_model(annotation) -> type[BaseModel] | None:
    """The section model an annotation names (`PhaseConfig | None` -> PhaseConfig), else None."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _wants_text(annotation) -> bool:
    """A field typed str (or str | None): `experiment=2024` means the text "2024"."""
    return annotation is str or (get_origin(annotation) in (Union, UnionType)
                                 and str in get_args(annotation))


def apply_overrides(params: Params, items: list[str]) -> Params:
    data = params.model_dump()
    for item in items:
        try:
            key, value = split_assignment(item)
        except ValueError:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE") from None
        node, model = data, type(params)
        parts = key.split(".")
        for p in parts[:-1]:
            section = _section_model(_field(model, p))
            if node.get(p) is None and section is not None:
                node[p] = {}   # an optional section left out (midtrain: None): its defaults
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node, model = node[p], section
        if _wants_text(_field(model, parts[-1])) and not isinstance(value, str):
            value = item.partition("=")[2]   # the text as written, not its JSON reading
        node[parts[-1]] = value
    return parse_params(data, "overrides")
