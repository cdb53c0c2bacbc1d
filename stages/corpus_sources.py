"""Listing and reading the corpus stage's sources: folders, the stdlib, git commits, S3, JSONL,
existing shards. Listing is cheap and deterministic (sorted paths); reading happens in workers.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import stat
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from codeworld.config import (CorpusConfig, DirSource, GitSource, JsonlSource,
                              S3Source, ShardsSource, Source, StdlibSource)
from codeworld.jsonl import read_jsonl
from codeworld.shards import Dataset, dumps
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


def printable(s: str) -> str:
    """`s` with the bytes of an undecodable file name (decoded with surrogateescape) written as
    \\xNN and other lone surrogates as \\uNNNN: reports can name the entry as UTF-8 JSON."""
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _writable(value: object) -> bool:
    """Whether `value` can go into the UTF-8 JSON the stage writes (records, fingerprint):
    a lone surrogate (a non-UTF-8 file name, a "\\ud800" escape in JSONL) cannot."""
    try:
        dumps(value)
    except UnicodeEncodeError:
        return False
    return True


def skipped_entry(reason: str, source: str, path: str, detail: str = "") -> dict:
    """An entry rejected while listing, shaped like the stage's skip examples."""
    return {"reason": reason, "source": source, "path": printable(path), "detail": detail}


_FILE_TYPES = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device"}


def _link_detail(full: Path) -> str:
    # strerror, not str(err): the message stays free of this machine's paths (stdlib manifests).
    try:
        full.stat()
    except OSError as err:
        return f"symlink, not followed: {err.strerror}"
    return "symlink, not followed"


def _wanted(rel: str, cfg: CorpusConfig) -> bool:
    if PurePosixPath(rel).suffix not in cfg.extensions:
        return False
    return not any(fnmatch.fnmatch(rel, pat) for pat in cfg.exclude)


def _list_dir(root: Path, name: str, kind: str, cfg: CorpusConfig,
              skipped: list[dict]) -> list[Candidate]:
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

    def unlistable(err: OSError) -> None:
        # os.walk passes over a folder it cannot list; silently, that would drop its files
        # from the corpus without a word. The source root itself is fatal: nothing of it is read.
        if Path(err.filename) == root:
            raise SourceError(f"source {name!r}: cannot list {root}: {err.strerror}")
        rel = Path(err.filename).relative_to(root).as_posix()
        skipped.append(skipped_entry("unlistable_dir", name, rel, err.strerror or str(err)))

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            if not _wanted(rel, cfg):
                continue
            try:
                st = full.lstat()  # lstat: a fifo or device is never opened, a link not followed
            except OSError:
                st = None  # gone since the walk: counted as unreadable when a worker tries it
            if st is not None and stat.S_ISLNK(st.st_mode):
                # Links are never followed (as in git sources): the bytes they reach are not
                # pinned by the source's path (they may lie anywhere on this machine), a link
                # within the tree duplicates a file ingested anyway, and reading them would
                # change the datasets of trees ingested before. Dangling links and loops too.
                skipped.append(skipped_entry("symlink", name, rel, _link_detail(full)))
            elif st is not None and not stat.S_ISREG(st.st_mode):
                # A fifo would block the reading worker forever; sockets and devices are no code.
                what = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "not a regular file")
                skipped.append(skipped_entry("not_regular", name, rel, what))
            else:
                out.append(Candidate(name, kind, str(full), rel, st.st_size if st else -1,
                                     license_for(full.parent)))
    return sorted(out, key=lambda c: c.path)


def _git(repo: str, *args: str, input: bytes | None = None) -> bytes:
    res = subprocess.run(["git", "-C", repo, *args], input=input, capture_output=True)
    if res.returncode != 0:
        raise SourceError(f"git source {repo}: git {' '.join(args[:2])} failed: "
                          f"{res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def _list_git(src: GitSource, name: str, cfg: CorpusConfig, skipped: list[dict]) -> list[Candidate]:
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
        if typ != b"blob":
            continue
        rel = path.decode(errors="surrogateescape")  # a non-UTF-8 name is skipped by list_candidates
        if mode == b"120000":  # symlinks are not followed (see _list_dir), only counted
            if _wanted(rel, cfg):
                skipped.append(skipped_entry("symlink", name, rel, "symlink, not followed"))
            continue
        entries.append((rel, sha.decode(), int(size)))
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
    """The candidate of one record; ValueError says what is wrong with it (the caller names
    the record)."""
    text = rec.get("text")
    rid = rec.get("id")
    if not isinstance(text, str) or rid is None:
        raise ValueError("needs string fields 'id' and 'text'")
    language = rec.get("language")
    if language is not None and not isinstance(language, str):  # a list would kill the worker
        raise ValueError(f"field 'language' must be a string, not {type(language).__name__}")
    for key in ("language", "license"):  # copied into the record: must be writable as UTF-8
        if not _writable(rec.get(key)):
            raise ValueError(f"field {key!r} is not valid UTF-8 (a lone surrogate)")
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
            where = f"{src.path}#{i}"
            try:
                out.append(_record_candidate(name, "shards", rec, where))
            except ValueError as err:  # a dataset of another kind: fatal, naming the record
                raise SourceError(f"source {name!r}: {where}: {err}") from err
    return out  # language is checked per record by the ingesting worker (and counted)


def list_candidates(cfg: CorpusConfig, endpoint: str | None = None
                    ) -> tuple[list[Candidate], list[str], list[dict]]:
    """All candidates of all sources in params order; also the bad records met while listing,
    and the entries skipped while listing (as `skipped_entry`: links, fifos, bad names)."""
    out: list[Candidate] = []
    bad: list[str] = []
    skipped: list[dict] = []
    for src in cfg.sources:
        name = source_name(src)
        if isinstance(src, StdlibSource):
            listed = _list_dir(stdlib_dir(), name, "stdlib", cfg, skipped)
        elif isinstance(src, DirSource):
            listed = _list_dir(Path(src.path), name, "dir", cfg, skipped)
        elif isinstance(src, GitSource):
            listed = _list_git(src, name, cfg, skipped)
        elif isinstance(src, S3Source):
            listed = _list_s3(src, name, cfg, endpoint)
        else:
            listed = _list_records(src, name, cfg, endpoint, bad)
        for c in listed:
            # A path the records and the fingerprint cannot hold (a non-UTF-8 file name, a
            # lone surrogate in a JSONL path) would kill the stage: skip that one entry.
            if _writable(c.path):
                out.append(c)
            else:
                where = f"{c.locator}: " if c.text is not None else ""  # a record: name its line
                skipped.append(skipped_entry("bad_name", name, c.path, f"{where}path is not valid UTF-8"))
    return out, bad, skipped


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
