"""WebDataset tar shards with a manifest: the one way records move between stages.

Layout of a dataset `NAME` under a storage root:
    NAME/shard-00000.tar ...    one `<key>.json` member per record (webdataset convention)
    NAME/manifest.json          written last: shards, sha256, record counts, fingerprint
    .work/NAME/                 per-shard completion records of an unfinished run (for resume)

A dataset without a manifest is unfinished. Readers verify each shard's sha256 and record count
against the manifest and name the shard that does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import webdataset as wds

from codeworld.code import Code
from codeworld.storage import Storage, write_file_atomic

FORMAT = "codeworld-shards/1"
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or dataset that cannot be read as written; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sha256: str
    records: int
    bytes: int


def dumps(obj: object) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8; the same record gives the same bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fingerprint(code: Code, *parts: object) -> str:
    """Identity of a dataset: the params and inputs in `parts`, and the code that made it (its
    stage's imports, codeworld/code.py), so a finished output is reused (or a killed run
    resumed) only by the same code."""
    return hashlib.sha256(dumps([code.version(), *parts])).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def encode_shard(records: Iterable[dict], index: int) -> tuple[bytes, int]:
    buf = io.BytesIO()
    # mtime=0 and fixed owner: tar headers carry no clock or user, so bytes are reproducible.
    writer = wds.TarWriter(buf, user="codeworld", group="codeworld", mtime=0, encoder=False)
    count = 0
    for count, rec in enumerate(records, 1):
        writer.write({"__key__": f"{index:05d}-{count - 1:07d}", "json": dumps(rec)})
    writer.close()
    return buf.getvalue(), count


def decode_shard(data: bytes, where: str) -> list[dict]:
    records = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if not member.name.endswith(".json"):
                    raise ShardError(f"{where}: unexpected member {member.name!r}")
                records.append(json.loads(tar.extractfile(member).read()))
    except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as err:
        raise ShardError(f"{where}: corrupt shard: {err}") from err
    except RecursionError:  # a record nested deeper than the JSON parser recurses
        raise ShardError(f"{where}: corrupt shard: a record is nested too deeply to parse") from None
    return records


@dataclass(frozen=True)
class DatasetWriter:
    """Writes shards of one dataset; resumable across killed runs with the same fingerprint."""

    storage: Storage
    name: str
    fingerprint: str

    @property
    def out(self) -> Storage:
        return self.storage.sub(self.name)

    @property
    def work(self) -> Storage:
        return self.storage.sub(".work", self.name)

    def prepare(self) -> dict | None:
        """Start or resume a run. Returns the manifest when a finished dataset with this
        fingerprint already exists (nothing to do), else None."""
        manifest = _read_manifest(self.out)
        if manifest is not None and pinned_elsewhere(manifest, self.out) is not None:
            manifest = {**manifest, "fingerprint": None}  # another root's dataset: not this one
        if manifest is not None and manifest.get("fingerprint") == self.fingerprint:
            if not self.work.exists("fingerprint"):
                self.work.remove("")  # leftovers of a run killed while cleaning up
                return manifest
        if manifest is not None:
            # Outputs of other params: the dataset is unfinished from here on.
            self.out.remove(MANIFEST)
        if self.work.exists("fingerprint"):
            if self.work.read_bytes("fingerprint") != self.fingerprint.encode():
                self.work.remove("")   # another run's work (or a damaged record of it)
        if not self.work.exists("fingerprint"):
            self.work.write_bytes("fingerprint", self.fingerprint.encode())
        return None

    def completed(self, index: int) -> tuple[ShardInfo, dict] | None:
        """The shard and its stage-specific meta when an earlier run finished it intact."""
        side = f"{shard_name(index)}.json"
        if not self.work.exists(side):
            return None
        try:
            done = json.loads(self.work.read_bytes(side))
            if done.get("fingerprint") != self.fingerprint:  # left by a run with other params
                return None
            info = ShardInfo(**done["shard"])
            meta = done["meta"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None   # damaged from outside (writes are atomic): redo the shard
        try:
            data = self.out.read_bytes(info.name)
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            return None
        return info, meta

    def write(self, index: int, records: Iterable[dict], meta: dict | None = None) -> ShardInfo:
        """Write shard `index` atomically, then its completion record (with `meta`, e.g. the
        shard's skip counts, so a resumed run reports the same totals)."""
        data, count = encode_shard(records, index)
        info = ShardInfo(shard_name(index), hashlib.sha256(data).hexdigest(), count, len(data))
        self.out.write_bytes(info.name, data)
        self.work.write_bytes(f"{info.name}.json", dumps({"shard": asdict(info), "meta": meta or {},
                                                          "fingerprint": self.fingerprint}))
        return info

    def finish(self, infos: list[ShardInfo], extra: dict | None = None) -> dict:
        manifest = {
            "format": FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "records": sum(i.records for i in infos),
            "shards": [asdict(i) for i in infos],
            **(extra or {}),
        }
        keep = {i.name for i in infos}
        for stale in self.out.list():
            # shards of other params, and temp files of writes a killed run left behind
            if (stale.startswith("shard-") and stale not in keep) or (
                    stale.startswith(".") and ".tmp-" in stale):
                self.out.remove(stale)
        self.out.write_bytes(MANIFEST, dumps(manifest) + b"\n")
        self.work.remove("")
        return manifest


def _read_manifest(where: Storage) -> dict | None:
    try:
        raw = where.read_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ShardError(f"{where.path(MANIFEST)}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ShardError(f"{where.path(MANIFEST)}: a JSON {type(manifest).__name__}, expected "
                         f"an object (a {FORMAT} manifest)")
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{where.path(MANIFEST)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def pinned_elsewhere(manifest: dict, where: Storage) -> str | None:
    """Where the dataset lies when this manifest is a pin (see pin_manifest) of a dataset
    stored under another root, else None."""
    loc = manifest.get("location")
    if loc is None:
        return None
    same = loc == where.root if where.is_s3 or loc.startswith("s3://") else \
        same_local_path(loc, where.root)
    return None if same else loc


def same_local_path(a: str, b: str) -> bool:
    """Whether two local paths name one place: through symlinks (a `data` linked to another
    disk is that disk's folder), and whether or not it exists yet."""
    return os.path.realpath(a) == os.path.realpath(b)


class Dataset:
    """A finished dataset: its manifest, and verified reads of its shards."""

    def __init__(self, storage: Storage):
        self.storage = storage
        manifest = _read_manifest(storage)
        if manifest is None:
            raise ShardError(f"{storage.path(MANIFEST)}: missing: the stage writing "
                             f"{storage.root} has not finished (rerun it)")
        elsewhere = pinned_elsewhere(manifest, storage)
        if elsewhere is not None:
            # the shards here (if any) are another run's: reading them would fail their checksums
            raise ShardError(f"{storage.path(MANIFEST)}: pins the dataset stored at {elsewhere} "
                             "(written by a run whose storage.root was there): read it there, or "
                             "rerun the stage with this storage root")
        self.manifest = manifest
        self.shards = [ShardInfo(**s) for s in manifest["shards"]]

    @classmethod
    def open(cls, path: str, endpoint_url: str | None = None) -> "Dataset":
        return cls(Storage(path, endpoint_url))

    def __len__(self) -> int:
        return int(self.manifest["records"])

    def read_shard(self, info: ShardInfo) -> list[dict]:
        where = self.storage.path(info.name)
        try:
            data = self.storage.read_bytes(info.name)
        except FileNotFoundError:
            raise ShardError(f"{where}: listed in the manifest but missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"{where}: checksum mismatch (manifest {info.sha256[:12]}, "
                             f"file {digest[:12]}): the shard is corrupt or was modified")
        records = decode_shard(data, where)
        if len(records) != info.records:
            raise ShardError(f"{where}: {len(records)} records, manifest says {info.records}")
        return records

    def __iter__(self) -> Iterator[dict]:
        for info in self.shards:
            yield from self.read_shard(info)


def pin_manifest(storage: Storage, name: str, manifest: dict, local_root: str = "data") -> None:
    """DVC tracks `data/NAME` (dvc.yaml). When the storage root is elsewhere (S3, another disk),
    a copy of the manifest there pins the dataset's exact content by its shards' sha256, so
    `dvc repro` still sees each stage's output change exactly when the data does."""
    local = os.path.abspath(os.path.join(local_root, name))
    if not storage.is_s3 and same_local_path(storage.path(name), local):
        return   # the dataset itself lies there: a pin would overwrite its own manifest
    pinned = {**manifest, "location": storage.path(name)}
    write_file_atomic(os.path.join(local, MANIFEST), dumps(pinned) + b"\n")
