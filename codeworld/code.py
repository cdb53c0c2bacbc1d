"""Which code made an output: the first-party files a stage reaches through its imports, hashed.

A manifest's fingerprint carries this hash, so a finished output is reused (or a killed run
resumed) only by the code that made it. It covers the files the stage's entry modules import,
transitively (read from the source with `ast`, so imports inside functions count too), not the
whole repository: the hash changes exactly when one of those files does. `dvc.yaml` lists the
same files among the stage's deps (tests/test_code.py checks every stage), so DVC reruns a stage
whenever its fingerprint would change, and the hashes in `dvc.lock` are what a fresh clone of
the same commit produces.

Granularity: a module of a top-level package (codeworld, stages, model) is its one file, with
the package's `__init__.py`; a sub-package (codeworld/sandbox, stages/tracer, ...) is its whole
directory, because sub-packages also hold code that runs by path rather than by import (the
sandbox's server, the tracer and the runners copied into the sandbox).

Modules that only report (MLflow, progress lines) never change an output's bytes: they are
neither hashed nor followed, so editing them reruns nothing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("codeworld", "stages", "model")
REPORTING = ("codeworld.tracking", "codeworld.progress")


@dataclass(frozen=True)
class Code:
    """The code of one output: `roots`, the modules it runs (its stage, and what that stage
    launches as a separate process), and everything they import; `skip` names modules whose
    edits do not change the output (neither hashed nor followed)."""

    roots: tuple[str, ...]
    skip: tuple[str, ...] = ()
    root: Path = ROOT          # the repository (tests use a small one of their own)

    def files(self) -> list[Path]:
        return list(_closure(self.root, self.roots, self.skip))

    def version(self) -> str:
        """sha256 of the files, each with its path relative to the repository; read once per
        process, so an edit made while a stage runs cannot split its outputs' fingerprints."""
        return _version(self)


def unit(root: Path, module: str) -> Path | None:
    """The file or sub-package directory that holds first-party `module`; None for other
    modules and for names that are not modules (`from codeworld.config import Params`)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if len(parts) > 1 and (root / parts[0] / parts[1] / "__init__.py").is_file():
        return root / parts[0] / parts[1]          # a sub-package: the whole directory
    path = root.joinpath(*parts)
    if len(parts) == 1:
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _is_module(root: Path, module: str) -> bool:
    path = root.joinpath(*module.split("."))
    return module.split(".")[0] in PACKAGES and (
        path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def _sources(u: Path) -> list[Path]:
    return sorted(u.rglob("*.py")) if u.is_dir() else [u]


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(root: Path, path: Path) -> set[str]:
    """Every module `path` may import: absolute and relative, at any depth of the code."""
    name = _module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import module`
    return found


@functools.lru_cache(maxsize=None)
def _closure(root: Path, roots: tuple[str, ...], skip: tuple[str, ...]) -> tuple[Path, ...]:
    for kind, names in (("root", roots), ("skip", skip)):
        for name in names:      # a misspelt name would silently hash too little or too much
            if not _is_module(root, name):
                raise ValueError(f"code {kind} {name!r} is not a module of {', '.join(PACKAGES)}")
    skipped = {unit(root, m) for m in (*REPORTING, *skip)}
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        top = module.split(".")[0]
        # importing a.b.c runs a/__init__.py first (and a/b/__init__.py, inside the unit)
        for u in (unit(root, top), unit(root, module)):
            if u is None or u in seen or u in skipped:
                continue
            seen.add(u)
            for src in _sources(u):
                todo.extend(_imports(root, src))
    return tuple(sorted(f for u in seen for f in _sources(u)))


def hash_files(root: Path, files: Iterable[Path]) -> str:
    """sha256 of `files`, in the order given, each with its path relative to `root` (so a
    checkout hashes the same wherever it lies)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _version(code: Code) -> str:
    return hash_files(code.root, code.files())
