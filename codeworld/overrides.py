"""`SECTION.KEY=VALUE` overrides of params.yaml (like `dvc exp run -S`), validated like the
file itself: VALUE is JSON (numbers, booleans, lists, objects) or else a plain string. The flow
then writes the validated values into params.yaml (write_overrides) for the stages to read."""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel

from codeworld.config import ConfigError, Params, parse_params
from codeworld.storage import write_file_atomic


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


# --- writing validated overrides into params.yaml --------------------------------------------
# The stage reads params.yaml again (PyYAML, YAML 1.1) and DVC records it (ruamel, YAML 1.2), so
# what is written must be the value validated above, in a form both read as that value: writing
# the override's own JSON reading instead turned `experiment=2024` into a number, `=no` into a
# boolean, and a section missing from the file into only the overridden key, without the
# defaults the validation had filled in.

class _Text(str):
    """Text written double-quoted: `"2024"`, `"no"` and `"1.10"` stay text for every reader."""


class _Float(float):
    """A float written so YAML 1.1 reads it as one too (`1.0e-05`, not `1e-05`, a string there)."""


def _float_text(value: float) -> str:
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _yaml_value(value):
    """A validated value (model_dump in JSON mode) as something ruamel writes unambiguously."""
    if isinstance(value, dict):
        return {_yaml_key(k): _yaml_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    if isinstance(value, str):
        return _Text(value)
    if isinstance(value, float):
        return _Float(value)
    return value   # int, bool, None: written the same way by every YAML reader


def _yaml_key(key: str) -> str:
    """A mapping key quoted only where YAML 1.1 would read it as no text (`on`, `1`), so an
    inserted section looks like the rest of the file."""
    import yaml

    plain = yaml.resolver.Resolver().resolve(yaml.ScalarNode, key, (True, False))
    return key if plain == "tag:yaml.org,2002:str" else _Text(key)


def _yaml_writer():
    from ruamel.yaml import YAML  # DVC's own YAML library (round trip keeps the comments)

    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(
        _Text, lambda r, v: r.represent_scalar("tag:yaml.org,2002:str", str(v), style='"'))
    rt.representer.add_representer(
        _Float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _float_text(v)))
    return rt


def write_overrides(text: str, validated: Params, items: list[str]) -> str:
    """params.yaml's `text` (comments and order kept) with each overridden key set to its value
    in `validated` (apply_overrides' result). Where the file lacks a section or field on the
    key's path, the validated subtree goes there whole (a section left out: its defaults too,
    as validated), so the stage reads what was validated."""
    import io

    rt = _yaml_writer()
    data = rt.load(text)
    if data is None:
        data = {}
    dumped = validated.model_dump(mode="json")
    for item in items:
        key, _ = split_assignment(item)
        node, value = data, dumped
        parts = key.split(".")
        for i, part in enumerate(parts):
            value = value[part]
            if i == len(parts) - 1 or not isinstance(node.get(part), dict):
                node[part] = _yaml_value(value)
                break
            node = node[part]
    buf = io.StringIO()
    rt.dump(data, buf)
    return buf.getvalue()


# --- a flow's overrides in params.yaml, and the record that undoes them (flows/pipeline) ------

def flow_lock_path(root: Path) -> Path:
    """The file a flow holds locked (flows.pipeline.workspace_lock) while it runs in `root`."""
    return root / ".dvc" / "tmp" / "codeworld-flow.lock"


def overrides_journal(params_file: Path) -> Path:
    """Where a flow records params.yaml as it was before its overrides, and as it wrote it,
    while the overrides are in the file: a flow killed meanwhile (SIGKILL, OOM, power loss)
    never runs its `finally`, and the next run puts the file back from this record."""
    return params_file.with_name(f".{params_file.name}.overrides.json")


def undo_killed_overrides(params_file: Path) -> None:
    """Put back params.yaml as it was before the overrides of a flow that was killed while they
    were in it (its journal, see overrides_journal), so the stages do not run with values nobody
    asked for. A file edited since is left as it is, and the overrides it may still hold are
    named. Call it only under the workspace lock: a running flow's journal is live."""
    journal = overrides_journal(params_file)
    try:
        record = json.loads(journal.read_text())
        original, written, items = record["original"], record["written"], record["overrides"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"warning: {journal}: unreadable record of an earlier run's overrides "
              f"({type(err).__name__}: {err}); removed, {params_file} left as it is")
        journal.unlink(missing_ok=True)
        return
    current = params_file.read_text()
    if current == written:
        write_file_atomic(params_file, original.encode())
        print(f"warning: {params_file} still held the overrides {items} of a flow run that was "
              f"killed; put back as it was before them")
    elif current != original:
        print(f"warning: {params_file} was edited after a flow run with the overrides {items} "
              f"was killed, so it is left as it is: check that it holds none of them")
    journal.unlink()


def killed_overrides(params_file: Path) -> list[str] | None:
    """The overrides a killed flow left in `params_file` (its journal is there and the file is
    as that flow wrote it), when no flow holds the workspace: a live flow's journal is its
    own, and its stages read the overrides as meant. Else None."""
    journal = overrides_journal(params_file)
    try:
        record = json.loads(journal.read_text())
        written, items = record["written"], record["overrides"]
        held = params_file.read_text() == written
    except (OSError, ValueError, KeyError, TypeError):
        return None   # no record, or none to read (the next flow removes it, said)
    if not held:
        return None   # put back, or edited by hand since: the user's file
    with _flow_lock(params_file) as free:
        return list(items) if free else None


def refuse_killed_overrides(params_file: Path) -> None:
    """ConfigError naming the overrides and their record when a killed flow left them in
    `params_file` (killed_overrides): what `codeworld stage` (so `dvc repro`) and
    `codeworld check-params` would read are values nobody asked for this run."""
    items = killed_overrides(params_file)
    if items is not None:
        raise ConfigError(
            f"{params_file} still holds the overrides {items} of a flow run that was killed "
            f"(its record: {overrides_journal(params_file)}); put it back as it was with "
            f"`codeworld check-params --undo-killed-overrides --params {params_file}` "
            "(the next `codeworld pipeline` does so too), or edit it")


def undo_overrides_outside_a_flow(params_file: Path) -> None:
    """undo_killed_overrides with the workspace's flow lock held, so that no flow starts or
    runs meanwhile; ConfigError naming the lock when a flow holds it (its overrides are its
    own, put back when it ends)."""
    with _flow_lock(params_file) as free:
        if not free:
            raise ConfigError(f"a flow holds {flow_lock_path(params_file.resolve().parent)}: "
                              f"the overrides in {params_file} are its own, put back when it ends")
        undo_killed_overrides(params_file)


@contextmanager
def _flow_lock(params_file: Path):
    """The flow lock of the workspace of `params_file`, held for the `with` when free; yields
    whether it was (False: a flow, maybe this process's own, holds it)."""
    lock = flow_lock_path(params_file.resolve().parent)
    if not lock.parent.is_dir():   # no flow ever ran here, so none runs: nothing to lock
        yield True
        return
    with open(lock, "a+") as fh:   # (not "w": that would wipe the holder's record)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
