"""The code in a fingerprint (codeworld/code.py), and dvc.yaml's deps covering it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from codeworld import code
from codeworld.code import PACKAGES, ROOT, Code, unit


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def repo(tmp_path):
    return tree(tmp_path, {
        "stages/__init__.py": "",
        "stages/a.py": "from codeworld.config import X\nfrom . import b\n",
        "stages/b.py": "def f():\n    import stages.tool.core  # inside a function: counted too\n",
        "stages/unrelated.py": "import os\n",
        "stages/tool/__init__.py": "",
        "stages/tool/core.py": "from ..c import g\n",
        "stages/tool/by_path.py": "# copied into the sandbox, never imported\n",
        "stages/c.py": "import model.launch\n",
        "codeworld/__init__.py": "",
        "codeworld/config.py": "from codeworld import tracking\n",
        "codeworld/tracking.py": "import stages.unrelated\n",
        "model/__init__.py": "",
        "model/launch.py": "import model.heavy\n",
        "model/heavy.py": "",
    })


def names(code: Code) -> list[str]:
    return [f.relative_to(code.root).as_posix() for f in code.files()]


def test_files_follow_imports_and_take_sub_packages_whole(repo):
    assert names(Code(("stages.a",), root=repo)) == [
        "codeworld/__init__.py", "codeworld/config.py", "model/__init__.py", "model/heavy.py",
        "model/launch.py", "stages/__init__.py", "stages/a.py", "stages/b.py", "stages/c.py",
        "stages/tool/__init__.py", "stages/tool/by_path.py", "stages/tool/core.py"]


def test_skip_neither_hashes_nor_follows(repo):
    files = names(Code(("stages.a",), skip=("model.launch",), root=repo))
    assert "model/launch.py" not in files and "model/heavy.py" not in files
    assert "stages/c.py" in files


def test_version_changes_with_the_code_it_covers_only(repo):
    def version() -> str:
        code._version.cache_clear()     # read once per process: a test edits in between
        return Code(("stages.a",), root=repo).version()

    before = version()
    (repo / "stages/unrelated.py").write_text("import sys\n")     # reached through tracking only
    (repo / "codeworld/tracking.py").write_text("# reporting\n")  # skipped: reports, no outputs
    assert version() == before
    (repo / "stages/tool/by_path.py").write_text("# edited\n")
    assert version() != before


@pytest.mark.parametrize("kind, bad", [("root", Code(("stages.missing",))),
                                       ("root", Code(("stages.tool.missing",))),
                                       ("skip", Code(("stages.a",), skip=("model.lanch",)))])
def test_a_name_that_is_no_module_is_refused(repo, kind, bad):
    name = (bad.roots + bad.skip)[-1]
    with pytest.raises(ValueError, match=f"code {kind} '{name}' is not a module"):
        Code(bad.roots, bad.skip, root=repo).files()


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def cover(files: list[Path]) -> set[str]:
    """dvc.yaml's spelling of `files`: a sub-package by its directory, a module by its file."""
    return {"/".join(f.relative_to(ROOT).parts[:2]) for f in files}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_code_deps_are_the_code_in_the_fingerprint(name):
    """DVC must rerun a stage whenever its outputs' fingerprint would change, or dvc.lock records
    manifests that a fresh clone of the same commit does not reproduce; and a dep outside the
    fingerprint only reruns the stage for nothing. The stage's own module is a dep too."""
    stage = dvc_stages()[name]
    assert stage["cmd"] == f"codeworld stage {name}"
    listed = {d for d in stage["deps"] if d.split("/")[0] in PACKAGES}
    own = unit(ROOT, f"stages.{name}")
    code = cover([*importlib.import_module(f"stages.{name}").CODE.files(),
                  *(own.glob("*.py") if own.is_dir() else [own])])
    assert listed == code, (f"dvc.yaml stage {name!r}: add {sorted(code - listed)} to its deps, "
                            f"remove {sorted(listed - code)}")
    assert all((ROOT / d).exists() for d in stage["deps"] if not d.startswith("data/"))
