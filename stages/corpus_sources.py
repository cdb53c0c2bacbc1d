"""Listing and reading the corpus stage's sources: folders, the stdlib, git commits, S3, JSONL,
existing shards. Listing is cheap and deterministic (sorted paths); reading happens in workers.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from codeworld.config import (CorpusConfig, DirSource, GitSource, JsonlSource,
                              S3Source, ShardsSource, Source, StdlibSource)
from codeworld.jsonl import read_jsonl
from codeworld.shards import Dataset
from codeworld.storage import filesystem

LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt")
# Ordered: the first phrase found names the license (LGPL before GPL, PSF before BSD-like text).
LICENSE_PHRASES = (
    ("PYTHON SOFTWARE FOUNDATION LICENSE", "PSF-2.0"),
    ("Apache License", "Apache-2.0"),
    ("GNU LESSER GENERAL PUBLIC LICENSE", "LGPL"),
    ("GNU AFFERO GENERAL PUBLIC LICENSE", "AGPL"),
    ("GNU GENERAL PUBLIC LICENSE", "GPL"),
    ("Mozilla Public License", "MPL-2.0"),
    ("Permission is hereby granted, free of charge", "MIT"),
    ("Redistribution and use in source and binary forms", "BSD"),
)


class SourceError(ValueError):
    """A source listed in params that cannot be used at all (missing path, bad commit...)."""


@dataclass(frozen=True)
class Candidate:
    """One file (or record) to ingest. `text` is set for record sources (JSONL, shards)."""

    source: str
    kind: str
    locator: str  # file path, s3 url, or git blob sha
    path: str  # path relative to the source, POSIX style
    size: int
    license: str | None
    text: str | None = None
    extra: tuple = ()


def source_name(src: Source) -> str:
    if src.name:
        return src.name
    where = getattr(src, "path", None) or getattr(src, "url", "")
    return PurePosixPath(where.rstrip("/")).name.split(".")[0] or src.kind


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def identity(c: Candidate) -> str:
    """Where a candidate's bytes come from, as the dataset's fingerprint names it: its locator,
    which derives from params (a folder's, repository's or bucket's path as written there),
    except for the stdlib, whose folder is wherever this machine installed its interpreter:
    it is named by the interpreter's version, so the same stdlib gives the same fingerprint
    (and manifest bytes) on every machine."""
    if c.kind == "stdlib":
        return f"{platform.python_implementation()} {platform.python_version()}"
    return c.locator


def classify_license(text: str) -> str:
    for phrase, spdx in LICENSE_PHRASES:
        if phrase.lower() in text.lower():
            return spdx
    return "unknown"


def _dist_info_license(site: Path, top: str) -> str | None:
    norm = top.lower().replace("-", "_")
    for info in sorted(site.glob("*.dist-info")):
        if info.name.split("-")[0].lower().replace("-", "_") != norm:
            continue
        files = sorted(p for p in info.rglob("*") if p.is_file() and
                       p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
        if files:
            return classify_license(files[0].read_text(errors="replace")[:20000])
    return None


def _wanted(rel: str, cfg: CorpusConfig) -> bool:
    if PurePosixPath(rel).suffix not in cfg.extensions:
        return False
    return not any(fnmatch.fnmatch(rel, pat) for pat in cfg.exclude)


def _list_dir(root: Path, name: str, kind: str, cfg: CorpusConfig) -> list[Candidate]:
    if not root.is_dir():
        raise SourceError(f"source {name!r}: {root} is not a directory")
    licenses: dict[Path, str | None] = {}

    def license_for(d: Path) -> str | None:
        # Nearest LICENSE file from the file's folder up to the source root; an installed
        # package's license lives in its .dist-info, and a site-packages folder is a boundary
        # (the interpreter's own license does not cover third-party packages).
        if d not in licenses:
            found = next((d / n for n in LICENSE_NAMES if (d / n).is_file()), None)
            if found is not None:
                licenses[d] = classify_license(found.read_text(errors="replace")[:20000])
            elif d.parent.name == "site-packages":
                licenses[d] = _dist_info_license(d.parent, d.name)
            elif d == root or d.name == "site-packages":
                licenses[d] = None
            else:
                licenses[d] = license_for(d.parent)
        return licenses[d]

    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            if not _wanted(rel, cfg) or full.is_symlink():
                continue
            try:
                size = full.stat().st_size
            except OSError:
                size = -1  # counted as unreadable when a worker tries it
            out.append(Candidate(name, kind, str(full), rel, size, license_for(full.parent)))
    return sorted(out, key=lambda c: c.path)


def _git(repo: str, *args: str, input: bytes | None = None) -> bytes:
    res = subprocess.run(["git", "-C", repo, *args], input=input, capture_output=True)
    if res.returncode != 0:
        raise SourceError(f"git source {repo}: git {' '.join(args[:2])} failed: "
                          f"{res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def _list_git(src: GitSource, name: str, cfg: CorpusConfig) -> list[Candidate]:
    if not Path(src.path).exists():
        raise SourceError(f"source {name!r}: {src.path} does not exist")
    _git(src.path, "cat-file", "-e", f"{src.commit}^{{commit}}")
    listing = _git(src.path, "ls-tree", "-r", "-l", "-z", src.commit)
    entries = []
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, path = item.split(b"\t", 1)
        mode, typ, sha, size = meta.split()
        if typ == b"blob" and mode != b"120000":  # skip symlinks
            entries.append((path.decode(errors="surrogateescape"), sha.decode(), int(size)))
    license = None
    for rel, sha, _ in entries:
        if rel in LICENSE_NAMES:
            license = classify_license(_git(src.path, "cat-file", "blob", sha)[:20000].decode(errors="replace"))
            break
    return sorted((Candidate(name, "git", f"{src.path}\0{sha}", rel, size, license)
                   for rel, sha, size in entries if _wanted(rel, cfg)), key=lambda c: c.path)


def _list_s3(src: S3Source, name: str, cfg: CorpusConfig, endpoint: str | None) -> list[Candidate]:
    fs = filesystem(src.url, endpoint)
    base = src.url[len("s3://"):].rstrip("/")
    found = fs.find(base, detail=True)
    out = []
    for key, info in found.items():
        rel = key[len(base):].lstrip("/")
        if _wanted(rel, cfg):
            out.append(Candidate(name, "s3", f"s3://{key}", rel, int(info.get("size", -1)), None))
    return sorted(out, key=lambda c: c.path)


def _record_candidate(name: str, kind: str, rec: dict, where: str) -> Candidate:
    text = rec.get("text")
    rid = rec.get("id")
    if not isinstance(text, str) or rid is None:
        raise ValueError(f"{where}: needs string fields 'id' and 'text'")
    path = str(rec.get("path") or rid)
    extra = tuple(sorted((k, rec[k]) for k in ("language", "license") if rec.get(k) is not None))
    return Candidate(name, kind, where, path, len(text.encode("utf-8", "surrogatepass")),
                     rec.get("license"), text, extra)


def _list_records(src: JsonlSource | ShardsSource, name: str, cfg: CorpusConfig,
                  endpoint: str | None, bad: list[str]) -> list[Candidate]:
    out = []
    if isinstance(src, JsonlSource):
        fs = filesystem(src.path, endpoint)
        if not fs.exists(src.path):
            raise SourceError(f"source {name!r}: {src.path} does not exist")
        for where, rec, problem in read_jsonl(src.path, endpoint):
            try:
                if problem:
                    raise ValueError(problem)
                out.append(_record_candidate(name, "jsonl", rec, where))
            except ValueError as err:
                bad.append(f"{where}: {err}"[:300])
    else:
        for i, rec in enumerate(Dataset.open(src.path, endpoint)):
            out.append(_record_candidate(name, "shards", rec, f"{src.path}#{i}"))
    return out  # language is checked per record by the ingesting worker (and counted)


def list_candidates(cfg: CorpusConfig, endpoint: str | None = None) -> tuple[list[Candidate], list[str]]:
    """All candidates of all sources in params order; also the bad records met while listing."""
    out: list[Candidate] = []
    bad: list[str] = []
    for src in cfg.sources:
        name = source_name(src)
        if isinstance(src, StdlibSource):
            out += _list_dir(stdlib_dir(), name, "stdlib", cfg)
        elif isinstance(src, DirSource):
            out += _list_dir(Path(src.path), name, "dir", cfg)
        elif isinstance(src, GitSource):
            out += _list_git(src, name, cfg)
        elif isinstance(src, S3Source):
            out += _list_s3(src, name, cfg, endpoint)
        else:
            out += _list_records(src, name, cfg, endpoint, bad)
    return out, bad


class GitReader:
    """Reads blobs through one `git cat-file --batch` process per repository."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def read(self, repo: str, sha: str) -> bytes:
        proc = self.procs.get(repo)
        if proc is None:
            proc = subprocess.Popen(["git", "-C", repo, "cat-file", "--batch"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.procs[repo] = proc
        proc.stdin.write(sha.encode() + b"\n")
        proc.stdin.flush()
        header = proc.stdout.readline().split()
        if len(header) < 3:
            raise OSError(f"git cat-file: {b' '.join(header).decode()}")
        data = proc.stdout.read(int(header[2]))
        proc.stdout.read(1)  # the newline after the object
        return data

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait()


def read_bytes(c: Candidate, git: GitReader, endpoint: str | None) -> bytes:
    if c.kind == "git":
        repo, sha = c.locator.split("\0")
        return git.read(repo, sha)
    if c.kind == "s3":
        return filesystem(c.locator, endpoint).cat_file(c.locator)
    with open(c.locator, "rb") as fh:
        return fh.read()
