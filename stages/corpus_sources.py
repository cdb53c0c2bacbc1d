"""Listing and reading the corpus stage's sources: folders, the stdlib, git commits, S3, JSONL,
existing shards. Listing is cheap and deterministic (sorted paths); reading happens in workers.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import hashlib
import io
import json
import logging
import os
import platform
import posixpath
import re
import stat
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Iterator

from codeworld.config import (LANGUAGES, CorpusConfig, DirSource, GitSource, JsonlSource,
                              S3Source, ShardsSource, StdlibSource, source_name)
from codeworld.jsonl import read_jsonl
from codeworld.shards import Dataset, dumps
from codeworld.storage import (UNREADABLE, Storage, StorageError, filesystem, is_transient, read_url,
                               transport_errors)

log = logging.getLogger(__name__)

# A folder's license files: every name is_license_file takes (LICENSE, COPYING.LESSER,
# LICENSE-MIT, license.txt...), their labels combined (combine_licenses).
_LICENSE_FILE = re.compile(r"(?:licen[cs]es?|copying)(?:[-_.][\w.+-]*)?", re.I)
# A license file of code the folder bundles (numpy's LICENSES_bundled.txt, THIRD-PARTY-LICENSES):
# not the folder's own license while it has another license file.
_BUNDLED = re.compile(r"bundled|third[-_. ]?party|vendor", re.I)
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
# The labels a record's license takes: one of LICENSE_RULES' below, or a choice of them
# ("Apache-2.0 OR MIT", see _CHOICE); "unknown" for a license file none of them recognises; "unreadable" for one that could not be read (counted as a
# `unreadable_license` entry skipped while listing); None where no license file applies.
UNKNOWN_LICENSE, UNREADABLE_LICENSE = "unknown", "unreadable"
LICENSE_BYTES = 20_000  # a license names itself near its start; bundled ones follow it


def _words(phrase: str) -> str:
    """A regex of `phrase`'s words, whatever whitespace (line breaks too) lies between them."""
    return r"\s+".join(re.escape(w) for w in phrase.split())


def _title(pattern: str) -> re.Pattern:
    """A line that is a license's title and nothing else (an optional version after it)."""
    return re.compile(rf"^[ \t]*(?:the[ \t]+)?{pattern}"
                      r"(?:,?[ \t]+(?:version|v\.?)[ \t]*\d[\d.]*)?[ \t]*$", re.M | re.I)


def _phrase(phrase: str) -> re.Pattern:
    return re.compile(_words(phrase), re.I)


_GNU = r"GNU[ \t]+{}GENERAL[ \t]+PUBLIC[ \t]+LICENSE"
# Each license by its own identifying text. A bare mention is no evidence: the MPL-2.0 names
# the GNU GPL among its "Secondary Licenses", and the BSD license files of numpy and scipy
# append the GPL texts of libraries their wheels bundle. Text (True): a title as a line of its
# own, or words of the license's body no mention quotes; the earliest decides (a file's own
# license comes before those of code it bundles). Notice (False): "licensed under ...", which
# may describe a part of the code, so it decides only where no text is found (a file holding
# just a notice). Most specific first: the order breaks a tie at one position.
LICENSE_RULES: tuple[tuple[str, re.Pattern, bool], ...] = (   # (label, pattern, is text)
    ("LGPL", _title(_GNU.format(r"(?:LESSER|LIBRARY)[ \t]+")), True),
    ("LGPL", _phrase("GNU Lesser General Public License as published by"), False),
    ("LGPL", _phrase("GNU Library General Public License as published by"), False),
    ("AGPL", _title(_GNU.format(r"AFFERO[ \t]+")), True),
    ("AGPL", _phrase("GNU Affero General Public License as published by"), False),
    ("GPL", _title(_GNU.format("")), True),
    ("GPL", _phrase("GNU General Public License as published by"), False),
    ("MPL-2.0", _title(r"Mozilla[ \t]+Public[ \t]+License,?[ \t]+(?:version|v\.?)[ \t]*2\.0"), True),
    # A term the MPL-2.0 defines (1.5) before its "Secondary License" (1.12), which means
    # "either the GNU General Public License, ..., or" and is no choice of those.
    ("MPL-2.0", _phrase("Incompatible With Secondary Licenses"), True),
    ("MPL-2.0", _phrase("Mozilla Public License, v. 2.0"), False),
    ("MPL-2.0", _phrase("under the Mozilla Public License"), False),
    # Apache's title is two lines: "Apache License" above "Version 2.0, January 2004".
    ("Apache-2.0", re.compile(r"^[ \t]*Apache[ \t]+License,?\s+Version[ \t]+2\.0\b", re.M | re.I), True),
    ("Apache-2.0", _phrase("Licensed under the Apache License"), False),
    ("PSF-2.0", _title(r"PYTHON[ \t]+SOFTWARE[ \t]+FOUNDATION[ \t]+LICENSE(?:[ \t]+AGREEMENT)?"), True),
    ("PSF-2.0", _phrase("PSF LICENSE AGREEMENT FOR PYTHON"), True),
    ("PSF-2.0", _phrase("licensed under the Python Software Foundation License"), False),
    ("MIT", _title(r"MIT[ \t]+License(?:[ \t]+\(MIT\))?"), True),
    ("MIT", _phrase("Permission is hereby granted, free of charge"), True),
    ("BSD", _title(r"(?:(?:new|simplified|modified|revised)[ \t]+)?BSD(?:[ -][0-9]-clause)?[ \t]+License"),
     True),
    ("BSD", _phrase("Redistribution and use in source and binary forms"), True),
)

# A choice between licenses (a dual license): "either A or B" up to the sentence's end or "at
# your option" (PyPA's "either of the licenses found in LICENSE.APACHE or LICENSE.BSD", Rust's
# "Licensed under either of" list), "dual-licensed under A or B", or an SPDX expression line
# "A OR B". Without "or" it is no choice: "both MIT and PSF" (parso) covers some files under
# two at once. Its options are named by mentions (names, file names), so a text need not follow.
_CHOICE = re.compile(
    r"\b(?:either|dual[- ]licen[cs]ed)\b((?:(?!at\s+your\s+option|\.\s)[\s\S]){1,400})"
    r"|^[ \t]*(?:SPDX-License-Identifier:[ \t]*)?(\(?[\w.+-]+(?:[ \t]+OR[ \t]+\(?[\w.+-]+\)?)+)[ \t]*$",
    re.I | re.M)
_OR = re.compile(r"\bor\b", re.I)
_OPTIONS: tuple[tuple[str, re.Pattern], ...] = tuple((label, re.compile(p)) for label, p in (
    ("LGPL", r"\bLGPL|(?i:lesser\s+general\s+public|library\s+general\s+public)"),
    ("AGPL", r"\bAGPL|(?i:affero)"),
    ("GPL", r"\bGPL|(?i:gnu\s+general\s+public)"),
    ("MPL-2.0", r"\bMPL\b|(?i:mozilla)"),
    ("Apache-2.0", r"(?i:apache)"),
    ("PSF-2.0", r"\bPSF\b|(?i:python\s+software\s+foundation)"),
    ("MIT", r"\bMIT\b"),
    ("BSD", r"\bBSD\b"),
))


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
    # What the bytes are, the same on every machine: a sha256 of the file (folders, stdlib),
    # the git blob sha, the S3 ETag, a sha256 of a record's text, id and fields. A marker instead
    # for a file never read while listing ("too large", "unreadable: ...").
    content: str = ""
    # A record's own id (JSONL, shards): the output record's id is SOURCE/ID (a file's is
    # SOURCE/PATH). None for files.
    record_id: str | None = None


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def identity(c: Candidate) -> str:
    """A candidate's bytes as the dataset's fingerprint names them: their content identity
    (an edit that keeps the size still makes a new dataset), never where this machine keeps
    them (a locator may be a machine path), so the same inputs give the same fingerprint and
    manifest bytes on every machine. The stdlib's also names its interpreter's version."""
    if c.kind == "stdlib":
        return f"{platform.python_implementation()} {platform.python_version()} {c.content}"
    return c.content


class FileHashes:
    """sha256 of local files, remembered between runs by (path, size, mtime_ns, inode,
    ctime_ns), as DVC's state db does: a rerun re-reads only the files that changed. An entry
    is used only when all of these match, so the cache saves time and never changes a result:
    ctime changes on every write, even one that restores the mtime (`cp -p`, `touch -r`), and
    a file changed in the last seconds is not remembered (a second write within one tick of
    the file system's clock would keep every stamp). It is kept in the storage's work area,
    written atomically; an unreadable cache is started afresh."""

    FORMAT = "codeworld-file-hashes/1"
    RECENT_NS = 2_000_000_000

    def __init__(self, store: Storage | None = None, rel: str = "", known: dict | None = None):
        self.store, self.rel = store, rel
        self.known: dict[str, list] = known or {}
        self.used: dict[str, list] = {}   # what this listing met: the next cache, no stale path

    @classmethod
    def load(cls, store: Storage, rel: str) -> "FileHashes":
        try:
            data = json.loads(store.read_bytes(rel))
            if data.get("format") != cls.FORMAT or not isinstance(data.get("files"), dict):
                raise ValueError(f"format {data.get('format')!r}, expected {cls.FORMAT!r}")
            return cls(store, rel, data["files"])
        except FileNotFoundError:
            return cls(store, rel)
        except (OSError, ValueError, AttributeError, RecursionError) as err:
            log.warning("corpus: file hash cache %s unusable (%s): rehashing every file",
                        store.path(rel), err)
            return cls(store, rel)

    def sha256(self, path: str, st: os.stat_result) -> str:
        """sha256 of the local file `path`, whose stat is `st` (OSError when it cannot be
        read)."""
        entry = self.known.get(path)
        if entry is not None and entry[:-1] == self._key(st):
            self.used[path] = entry
            return entry[-1]
        with open(path, "rb") as fh:
            key = self._key(os.fstat(fh.fileno()))   # of the bytes read, not of the listing's
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
            # Changed while being read, or so recently that a next write may keep its stamps:
            # the digest is right for this run, but not remembered.
            if self._key(os.fstat(fh.fileno())) == key and not self._recent(key):
                self.used[path] = [*key, digest]
        return digest

    @staticmethod
    def _key(st: os.stat_result) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def _recent(self, key: list) -> bool:
        return time.time_ns() - max(key[1], key[3]) < self.RECENT_NS

    def save(self) -> None:
        if self.store is None or self.used == self.known:
            return
        body = json.dumps({"format": self.FORMAT, "files": self.used}, sort_keys=True)
        try:
            self.store.write_bytes(self.rel, body.encode("utf-8", "surrogatepass"))
        except OSError as err:   # only a cache: the next run rehashes
            log.warning("corpus: cannot save the file hash cache: %s", err)


def classify_license(text: str) -> str:
    """The label of a license file's text (see LICENSE_RULES): its earliest license text or
    choice of licenses, else its earliest notice; "unknown" when it has none."""
    text = text[:LICENSE_BYTES]
    best: tuple | None = None
    choice = _choice(text)
    if choice is not None:   # the file's own statement, as a text is: a tie goes to it
        best = (False, choice[0], -1, choice[1])
    for rank, (label, pattern, is_text) in enumerate(LICENSE_RULES):
        m = pattern.search(text)
        if m is not None:
            key = (not is_text, m.start(), rank, label)
            best = key if best is None else min(best, key)
    return best[-1] if best is not None else UNKNOWN_LICENSE


def _choice(text: str) -> tuple[int, str] | None:
    """The position and expression ("Apache-2.0 OR MIT": the options in one order, whatever
    the text's) of the earliest choice (_CHOICE) naming two licenses LICENSE_RULES know; an
    option they do not know (ISC) is left out of it."""
    for m in _CHOICE.finditer(text):
        prose, spdx = m.groups()
        if prose is not None and not _OR.search(prose):
            continue
        options = sorted({label for label, p in _OPTIONS if p.search(prose or spdx)})
        if len(options) >= 2:
            return m.start(), " OR ".join(options)
    return None


def combine_licenses(files: list[tuple[str, str]]) -> str:
    """The license of a folder holding several license files, from their (name, label)s:
    - a bundled code's file (_BUNDLED) counts only when the folder has no other;
    - one file's choice ("Apache-2.0 OR MIT") takes in the files of its options (PyPA's LICENSE
      beside LICENSE.APACHE and LICENSE.BSD is "Apache-2.0 OR BSD"): they are its texts;
    - COPYING (GPL) beside COPYING.LESSER (LGPL) is the LGPL, which is the GPL's text plus
      permissions and ships it (the GNU convention for LGPL-3.0 projects);
    - files that are each named for their license (LICENSE-MIT, LICENSE.APACHE2) and each
      recognised, without a file of the plain name, are a choice (the Rust and Python
      convention of dual licensing: orjson declares its LICENSE-APACHE and LICENSE-MIT
      `Apache-2.0 OR MIT`);
    - otherwise every label applies ("BSD AND GPL", a choice in parentheses): a file none of the
      rules recognises stays as "unknown", so no part of the terms is lost.
    One label: that label. Order-independent: the same files give the same label."""
    own = [(n, label) for n, label in files if not _BUNDLED.search(n)] or files
    labels = sorted({label for _, label in own})
    if len(labels) == 1:
        return labels[0]
    if UNREADABLE_LICENSE in labels:   # terms that could not be read: no combination is known
        return UNREADABLE_LICENSE
    # A choice's options' own files (LICENSE.APACHE beside the choice naming it) are its texts,
    # not terms of their own.
    options = {o for label in labels if " OR " in label for o in label.split(" OR ")}
    labels = [label for label in labels if " OR " in label or label not in options]
    if len(labels) == 1:
        return labels[0]
    if labels == ["GPL", "LGPL"]:
        return "LGPL"
    if all(_names_a_license(n) for n, _ in own) and UNKNOWN_LICENSE not in labels \
            and not any(" OR " in label for label in labels):
        return " OR ".join(labels)
    return " AND ".join(f"({lb})" if " OR " in lb else lb for lb in labels)


NO_LICENSE = "none"   # a license filter's name for a file under no license file (label None)


def license_filter(allowed: list[str]) -> frozenset[str]:
    """The labels of params corpus.licenses, checked: each must be one the stage gives (a
    misspelt "GPL-3.0" would silently admit nothing)."""
    known = {label for label, _, _ in LICENSE_RULES} | {UNKNOWN_LICENSE, UNREADABLE_LICENSE, NO_LICENSE}
    for label in allowed:
        if label not in known:
            raise SourceError(f"corpus.licenses: {label!r} is no license label (known: {sorted(known)}; "
                              "a choice or combination is admitted through its parts)")
    return frozenset(allowed)


def license_admitted(label: str | None, allowed: frozenset[str]) -> bool:
    """Whether a file of license `label` (combine_licenses' expression) is usable under the
    `allowed` labels alone: every part of a combination ("A AND (B OR C)"), each through at
    least one of its options."""
    if label is None:
        return NO_LICENSE in allowed
    return all(any(option.strip("()") in allowed for option in part.split(" OR "))
               for part in label.split(" AND "))


def _names_a_license(name: str) -> bool:
    """Whether a license file's name says which license it holds (LICENSE-MIT, LICENSE.APACHE2,
    LICENSE-BSD.txt), not only that it is one (LICENSE, COPYING.md)."""
    path = PurePosixPath(name)
    base = path.stem if path.suffix.lower() in _TEXT_SUFFIXES else name
    base = base.lower()   # COPYING.LESSER names a variant of the COPYING beside it: no choice
    return base.startswith("licen") and base not in ("license", "licence", "licenses", "licences")


def is_license_file(name: str) -> bool:
    """Whether a file name is a license file's: LICENSE, LICENCE or COPYING in any case, bare
    or with a suffix naming its format or license (LICENSE.rst, LICENSE-MIT, COPYING.LESSER).
    A module named license.py is code (a suffix of a code language other than text)."""
    suffix = PurePosixPath(name).suffix.lower()
    return (_LICENSE_FILE.fullmatch(name) is not None
            and (suffix in _TEXT_SUFFIXES or suffix not in LANGUAGES))


def _import_names(record: bytes) -> set[str]:
    """The top-level import names a wheel's RECORD installs: a package folder (`yaml/...`),
    a module (`six.py`, `_cffi_backend.cpython-311-x86_64-linux-gnu.so`)."""
    names = set()
    for row in csv.reader(io.StringIO(record.decode("utf-8", "replace"))):
        parts = PurePosixPath(row[0]).parts if row else ()
        if not parts or parts[0] in ("..", "/", "__pycache__") or parts[0].endswith((".dist-info", ".data")):
            continue   # scripts installed elsewhere, the metadata itself
        names.add(parts[0] if len(parts) > 1 else parts[0].split(".")[0])
    return names


def _norm(name: str) -> str:
    """A distribution or import name as they are compared (PyYAML, python-dateutil...)."""
    return name.lower().replace("-", "_").replace(".", "_")


# A license file (or package metadata) that is a link is read as the file it names only within
# the source: the bytes it reaches elsewhere are this machine's, no part of the source (another
# machine holds others, or none). Refused, its files' license is "unreadable" (counted).
OUTSIDE_LINK = "symlink to a file outside the source, not followed"
MAX_LINKS = 40   # links followed in a row, as the kernel's ELOOP


class _LocalTree:
    """A folder source's files, as `_Licenses` looks them up (absolute paths)."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = os.path.realpath(root)

    def is_file(self, p: Path) -> bool:
        return p.is_file() or p.is_symlink()   # a dangling link too: unreadable, not absent

    def read(self, p: Path, limit: int = -1) -> bytes:
        real = Path(os.path.realpath(p))
        if os.path.commonpath([real, self.real_root]) != self.real_root:
            raise OSError(OUTSIDE_LINK)
        with real.open("rb") as fh:   # the path checked, not the link: it may change since
            return fh.read(limit)

    def dist_infos(self, site: Path) -> list[Path]:
        return sorted(site.glob("*.dist-info"), key=str)

    def files(self, folder: Path) -> list[Path]:
        return sorted((p for p in folder.rglob("*") if self.is_file(p)), key=str)

    def names(self, folder: Path) -> list[str]:
        """The names of the files directly in `folder` (none when it cannot be listed: the
        walk reports that folder)."""
        try:
            return sorted(n for n in os.listdir(folder) if self.is_file(folder / n))
        except OSError:
            return []

    def rel(self, p: Path) -> str:
        return Path(os.path.relpath(p, self.root)).as_posix()   # may lead above the root


class _GitTree:
    """A commit's files from its `ls-tree` listing (blob sha by relative path; links apart, by
    the sha of the path they hold), as `_Licenses` looks them up: the same answers as
    `_LocalTree` gives for a checkout of that commit."""

    def __init__(self, repo: str, blobs: dict[PurePosixPath, str], links: dict[PurePosixPath, str]):
        self.repo, self.blobs, self.links = repo, blobs, links
        self.by_folder: dict[PurePosixPath, list[str]] = {}
        for p in sorted((*blobs, *links)):
            self.by_folder.setdefault(p.parent, []).append(p.name)

    def is_file(self, p: PurePosixPath) -> bool:
        return p in self.blobs or p in self.links

    def read(self, p: PurePosixPath, limit: int = -1) -> bytes:
        sha = self.blobs.get(self._resolve(p))
        if sha is None:   # a dangling link, or one to a folder
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        data = self._cat(sha)
        return data if limit < 0 else data[:limit]

    def _resolve(self, p: PurePosixPath) -> PurePosixPath:
        """The path a link leads to within the commit (`p` itself when no link); a link whose
        path is absolute or climbs above the tree's root leads outside it (OUTSIDE_LINK)."""
        for _ in range(MAX_LINKS):
            if p not in self.links:
                return p
            target = self._cat(self.links[p]).decode("utf-8", "surrogateescape")
            path = posixpath.normpath(posixpath.join(p.parent.as_posix(), target))
            if posixpath.isabs(target) or path == ".." or path.startswith("../"):
                raise OSError(OUTSIDE_LINK)
            p = PurePosixPath(path)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))

    def _cat(self, sha: str) -> bytes:
        try:
            return _git(self.repo, "cat-file", "blob", sha)
        except SourceError as err:   # a missing object: unreadable, as GitReader counts it
            raise FileNotFoundError(errno.ENOENT, str(err)) from err

    def dist_infos(self, site: PurePosixPath) -> list[PurePosixPath]:
        found = {site / p.relative_to(site).parts[0] for p in self.blobs if site in p.parents}
        return sorted((d for d in found if d.name.endswith(".dist-info")), key=str)

    def files(self, folder: PurePosixPath) -> list[PurePosixPath]:
        return sorted((p for p in (*self.blobs, *self.links) if folder in p.parents), key=str)

    def names(self, folder: PurePosixPath) -> list[str]:
        return sorted(self.by_folder.get(folder, ()))

    def rel(self, p: PurePosixPath) -> str:
        return p.as_posix()


class _Licenses:
    """The license of each file of one source: that of the nearest folder holding license files
    (is_license_file; several are combined: combine_licenses), from the file's folder up to the
    source root. An installed package's license lives in its
    .dist-info, found through the import names the distribution installs (yaml is PyYAML's,
    six.py six's); a site-packages folder is a boundary (the interpreter's own license does
    not cover third-party packages). Folder and git sources share it, so one tree gives the
    same licenses either way. A license file that cannot be read (or is a link leading out of
    the source: OUTSIDE_LINK) is labelled "unreadable" and counted in `skipped`, never fatal:
    it changes no file's text."""

    def __init__(self, tree: _LocalTree | _GitTree, root: PurePath, source: str, skipped: list[dict]):
        self.tree, self.root, self.source, self.skipped = tree, root, source, skipped
        self.folders: dict[PurePath, str | None] = {}
        self.labels: dict[PurePath, str] = {}
        self.sites: dict[PurePath, dict[str, PurePath]] = {}

    def of(self, path: PurePath) -> str | None:
        if path.parent.name == "site-packages":
            return self._installed(path.parent, path.name.split(".")[0])   # six.py
        return self._folder(path.parent)

    def _folder(self, d: PurePath) -> str | None:
        if d not in self.folders:
            found = [d / n for n in self.tree.names(d) if is_license_file(n)]
            if found:
                self.folders[d] = self._license(found)
            elif d.parent.name == "site-packages":
                self.folders[d] = self._installed(d.parent, d.name)
            elif d == self.root or d.name == "site-packages":
                self.folders[d] = None
            else:
                self.folders[d] = self._folder(d.parent)
        return self.folders[d]

    def _license(self, files: list[PurePath]) -> str | None:
        """The combined label (combine_licenses) of a folder's license files; None for none."""
        if not files:
            return None
        return combine_licenses([(f.name, self._classify(f)) for f in files])

    def _classify(self, p: PurePath) -> str:
        if p not in self.labels:
            try:
                text = self.tree.read(p, LICENSE_BYTES).decode("utf-8", "replace")
                self.labels[p] = classify_license(text)
            except OSError as err:
                self.labels[p] = UNREADABLE_LICENSE
                self.skipped.append(skipped_entry("unreadable_license", self.source, self.tree.rel(p),
                                                  err.strerror or str(err)))
        return self.labels[p]

    def _installed(self, site: PurePath, name: str) -> str | None:
        info = self._site(site).get(_norm(name))
        if info is None:
            return None
        files = [p for p in self.tree.files(info) if is_license_file(p.name)]
        # The shallowest are the distribution's own (PEP 639's licenses/LICENSE); deeper ones
        # are those of code it bundles, at its path (numpy's licenses/numpy/ma/LICENSE).
        top = min((len(p.parts) for p in files), default=0)
        return self._license([p for p in files if len(p.parts) == top])

    def _site(self, site: PurePath) -> dict[str, PurePath]:
        """Import name -> its distribution's .dist-info: the names its top_level.txt and RECORD
        declare, then (for metadata without either) the distribution's own name. The first
        distribution in name order wins a name two declare (a namespace package)."""
        if site not in self.sites:
            index: dict[str, PurePath] = {}
            infos = self.tree.dist_infos(site)
            for info in infos:
                for name in sorted(self._declared(info)):
                    index.setdefault(_norm(name), info)
            for info in infos:
                index.setdefault(_norm(info.name.split("-")[0]), info)
            self.sites[site] = index
        return self.sites[site]

    def _declared(self, info: PurePath) -> set[str]:
        names: set[str] = set()
        try:
            if self.tree.is_file(info / "top_level.txt"):
                top = self.tree.read(info / "top_level.txt").decode("utf-8", "replace")
                names.update(line.strip().split("/")[0] for line in top.splitlines() if line.strip())
            if self.tree.is_file(info / "RECORD"):
                names |= _import_names(self.tree.read(info / "RECORD"))
        except OSError as err:   # only a lookup aid: the distribution's name still maps
            log.warning("corpus: cannot read %s's metadata: %s", self.tree.rel(info),
                        err.strerror or err)
        return names


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


def _file_content(full: Path, st: os.stat_result, cfg: CorpusConfig, hashes: FileHashes) -> str:
    """The content identity of a listed file: its sha256; a file the stage will not read (too
    large, unreadable) is named by that, and its worker counts it so."""
    if st.st_size > cfg.max_bytes:
        return "too large"   # skipped unread, whatever its bytes (its size is fingerprinted)
    try:
        return hashes.sha256(str(full), st)
    except UNREADABLE as err:
        return f"unreadable: {err.strerror}"
    except OSError as err:   # an I/O error is no property of the file: fail, a rerun resumes
        raise StorageError(f"{full}: cannot read: {err.strerror or err}",
                           transient=is_transient(err)) from err


def _symlinked_dirs(dirpath: str, dirnames: list[str], root: Path, name: str,
                    cfg: CorpusConfig, skipped: list[dict]) -> None:
    """Count the links to folders that os.walk lists but never enters (not followed, as links
    to files are not), unless `exclude` names them."""
    for d in dirnames:
        full = Path(dirpath) / d
        if full.is_symlink():
            rel = full.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, pat) for pat in cfg.exclude):
                skipped.append(skipped_entry("symlink", name, rel, _link_detail(full)))


def _list_dir(root: Path, name: str, kind: str, cfg: CorpusConfig,
              skipped: list[dict], hashes: FileHashes) -> list[Candidate]:
    if not root.is_dir():
        raise SourceError(f"source {name!r}: {root} is not a directory")
    licenses = _Licenses(_LocalTree(root), root, name, skipped)

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
        _symlinked_dirs(dirpath, dirnames, root, name, cfg, skipped)
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
                size = st.st_size if st else -1
                content = _file_content(full, st, cfg, hashes) if st else "missing"
                out.append(Candidate(name, kind, str(full), rel, size, licenses.of(full),
                                     content=content))
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
    entries, blobs, links = [], {}, {}
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, path = item.split(b"\t", 1)
        mode, typ, sha, size = meta.split()
        if typ != b"blob":
            continue
        rel = path.decode(errors="surrogateescape")  # a non-UTF-8 name is skipped by list_candidates
        if mode == b"120000":  # symlinks are not ingested (see _list_dir), only counted
            links[PurePosixPath(rel)] = sha.decode()   # a license file may be one, as in folders
            if _wanted(rel, cfg):
                skipped.append(skipped_entry("symlink", name, rel, "symlink, not followed"))
            continue
        blobs[PurePosixPath(rel)] = sha.decode()
        if _wanted(rel, cfg):
            entries.append((rel, sha.decode(), int(size)))
    # Every file's nearest license, as a folder source finds it in a checkout of the commit.
    licenses = _Licenses(_GitTree(src.path, blobs, links), PurePosixPath("."), name, skipped)
    return sorted((Candidate(name, "git", f"{src.path}\0{sha}", rel, size,
                             licenses.of(PurePosixPath(rel)), content=sha)
                   for rel, sha, size in entries), key=lambda c: c.path)


def _list_s3(src: S3Source, name: str, cfg: CorpusConfig, endpoint: str | None) -> list[Candidate]:
    fs = filesystem(src.url, endpoint)
    base = src.url[len("s3://"):].rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:   # s3fs: the bucket does not exist
        raise SourceError(f"source {name!r}: {src.url}: no such bucket") from None
    except PermissionError as err:
        raise SourceError(f"source {name!r}: {src.url}: access denied: {err}") from None
    except transport_errors() as err:   # retries spent: a rerun may list it
        raise StorageError(f"{src.url}: cannot list: {type(err).__name__}: {err}",
                           transient=is_transient(err)) from err
    if not found:   # S3 has no empty folders: a prefix without objects is a wrong path
        raise SourceError(f"source {name!r}: {src.url}: no object under this prefix "
                          "(a mistyped bucket path?)")
    out = []
    for key, info in found.items():
        rel = key[len(base):].lstrip("/")
        if _wanted(rel, cfg):
            out.append(Candidate(name, "s3", f"s3://{key}", rel, int(info.get("size", -1)), None,
                                 content=_s3_content(fs, key, info)))
    return sorted(out, key=lambda c: c.path)


def _s3_content(fs, key: str, info: dict) -> str:
    """An object's ETag, from the listing (free): a new upload of other bytes has another.
    A server that lists none: the sha256 of the object's bytes."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag {etag.strip(chr(34))}"
    return "sha256 " + hashlib.sha256(read_url(f"s3://{key}", fs=fs)).hexdigest()


def _record_candidate(name: str, kind: str, rec: object, where: str) -> Candidate:
    """The candidate of one record; ValueError says what is wrong with it (the caller names
    the record)."""
    if not isinstance(rec, dict):   # a JSON list or string: no field to take
        raise ValueError(f"not a JSON object ({type(rec).__name__})")
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
    raw = text.encode("utf-8", "surrogatepass")
    # The id is part of what the record is: an edited id makes a new dataset. Length-prefixed
    # (no id and text run into each other) and surrogatepass (a bad one is skipped by name).
    rb = str(rid).encode("utf-8", "surrogatepass")
    content = hashlib.sha256(dumps(extra) + b"\0" + b"%d:" % len(rb) + rb + raw).hexdigest()
    return Candidate(name, kind, where, path, len(raw), rec.get("license"), text, extra, content,
                     str(rid))


def _source_records(src: JsonlSource | ShardsSource, name: str,
                    endpoint: str | None) -> Iterator[tuple[str, object, str | None]]:
    """(where, record, problem) of each record of a JSONL or shards source."""
    if isinstance(src, JsonlSource):
        if not filesystem(src.path, endpoint).exists(src.path):
            raise SourceError(f"source {name!r}: {src.path} does not exist")
        yield from read_jsonl(src.path, endpoint)
    else:
        for i, rec in enumerate(Dataset.open(src.path, endpoint)):
            yield f"{src.path}#{i}", rec, None


def _list_records(src: JsonlSource | ShardsSource, name: str, cfg: CorpusConfig,
                  endpoint: str | None, bad: list[str]) -> list[Candidate]:
    kind = "jsonl" if isinstance(src, JsonlSource) else "shards"
    out, seen = [], set()
    for where, rec, problem in _source_records(src, name, endpoint):
        try:
            if problem:
                raise ValueError(problem)
            c = _record_candidate(name, kind, rec, where)
        except ValueError as err:
            if kind == "shards":  # a dataset of another kind: fatal, naming the record
                raise SourceError(f"source {name!r}: {where}: {err}") from err
            bad.append(f"{where}: {err}"[:300])
            continue
        # Output ids are SOURCE/ID: the record's own id, which its user gave to name it (paths
        # repeat: two repositories' setup.py, a corpus of several folders ingested again).
        # Two records with one id would be one record to every later stage (dedup's report,
        # evaluation names records by id), so a repeat is a bad record, counted and named,
        # as `codeworld dedup` counts it; the first one is kept: the result does not depend
        # on which records follow.
        if c.record_id in seen:
            bad.append(f"{where}: duplicate id {rec['id']!r} (first one kept)"[:300])
            continue
        seen.add(c.record_id)
        out.append(c)
    return out  # language is checked per record by the ingesting worker (and counted)


def list_candidates(cfg: CorpusConfig, endpoint: str | None = None,
                    hashes: FileHashes | None = None
                    ) -> tuple[list[Candidate], list[str], list[dict]]:
    """All candidates of all sources in params order; also the bad records met while listing,
    and the entries skipped while listing (as `skipped_entry`: links, fifos, bad names).
    `hashes`: the cache of local files' sha256 (none: every file is hashed)."""
    hashes = hashes if hashes is not None else FileHashes()
    out: list[Candidate] = []
    bad: list[str] = []
    skipped: list[dict] = []
    for src in cfg.sources:
        name = source_name(src)
        if isinstance(src, StdlibSource):
            listed = _list_dir(stdlib_dir(), name, "stdlib", cfg, skipped, hashes)
        elif isinstance(src, DirSource):
            listed = _list_dir(Path(src.path), name, "dir", cfg, skipped, hashes)
        elif isinstance(src, GitSource):
            listed = _list_git(src, name, cfg, skipped)
        elif isinstance(src, S3Source):
            listed = _list_s3(src, name, cfg, endpoint)
        else:
            listed = _list_records(src, name, cfg, endpoint, bad)
        for c in listed:
            # A path or id the records and the fingerprint cannot hold (a non-UTF-8 file name,
            # a lone surrogate in a JSONL path or id) would kill the stage: skip that one entry.
            field = "path" if not _writable(c.path) else "id" if not _writable(c.record_id) else None
            if field is None:
                out.append(c)
            else:
                where = f"{c.locator}: " if c.text is not None else ""  # a record: name its line
                skipped.append(skipped_entry("bad_name", name, c.path, f"{where}{field} is not valid UTF-8"))
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
        if header[-1:] == [b"missing"]:   # counted unreadable, like a file that is gone
            raise FileNotFoundError(f"git {repo}: object {sha} missing")
        if len(header) < 3:
            raise StorageError(f"git {repo}: cat-file answered {b' '.join(header).decode()!r} "
                               f"for {sha}")
        size = int(header[2])
        data = proc.stdout.read(size)
        if len(data) != size:
            # cat-file ended mid-object (killed, out of memory): the bytes are cut, never a
            # file's text. Its pipe is spent too: the next read starts a new process.
            self._drop(repo)
            raise StorageError(f"git {repo}: object {sha}: cat-file gave {len(data)} of its "
                               f"{size} bytes")
        proc.stdout.read(1)  # the newline after the object
        return data

    def _drop(self, repo: str) -> None:
        proc = self.procs.pop(repo)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stdin.close()
            proc.wait()


def read_bytes(c: Candidate, git: GitReader, endpoint: str | None) -> bytes:
    """The candidate's bytes. UNREADABLE errors are properties of the file (gone, not
    permitted, a folder); any other failure is a StorageError naming it, which fails the stage
    (a transient one: a rerun resumes) rather than being counted as a file skipped for good."""
    if c.kind == "git":
        repo, sha = c.locator.split("\0")
        try:
            return git.read(repo, sha)
        except UNREADABLE:
            raise
        except StorageError as err:
            raise StorageError(f"{c.path}: {err}", transient=err.transient) from err
        except OSError as err:   # cat-file died under us (a broken pipe)
            raise StorageError(f"{c.path}: git {repo}: cannot read object {sha}: {err}",
                               transient=is_transient(err)) from err
    return read_url(c.locator, endpoint)
