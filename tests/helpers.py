"""Small builders shared by tests: a realistic little source tree and params files."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import yaml

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_tree(root: Path) -> Path:
    """Real stdlib code plus the awkward cases: exact and near duplicates, empty files,
    non-UTF-8, binary, too large, wrong extension."""
    src = root / "tree"
    shutil.copytree(STDLIB / "json", src / "json", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(STDLIB / "email", src / "email", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, ...\n")
    (src / "copies").mkdir()
    shutil.copy(src / "json" / "decoder.py", src / "copies" / "decoder_copy.py")  # exact
    text = (src / "json" / "encoder.py").read_text()
    (src / "copies" / "encoder_edit.py").write_text(text.replace("Encoder", "Codec", 2) + "\n# edited\n")
    (src / "copies" / "encoder_crlf.py").write_text(text.replace("\n", "\r\n"))  # exact after normalising
    (src / "copies" / "__init__.py").write_text("")
    (src / "bad").mkdir()
    (src / "bad" / "latin1.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1"))
    (src / "bad" / "blob.py").write_bytes(b"\x00\x01\x02binary")
    (src / "bad" / "huge.py").write_text("x = 1\n" * 50_000)  # 300 kB > max_bytes below
    (src / "bad" / "notes.txt").write_text("not python")
    return src


def write_params(path: Path, root: Path, sources: list[dict], **overrides) -> Path:
    params = {
        "storage": {"root": str(root)},
        "corpus": {"sources": sources, "max_bytes": 200_000, "shard_files": 20, "workers": 1},
        "dedup": {"workers": 1},
    }
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path
