"""The pack stage's output on a local disk, where Megatron can memory-map it.

With a local storage root the pack is written in place (`<root>/pack`). With an s3:// root it
lives under `<root>/pack/` on S3 and each node keeps a local copy in `storage.local_cache`: the
pack stage builds each source there and uploads it; training fetches the pack back (`fetch`)
into the cache of every node it runs on before Megatron opens it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from codeworld.storage import Storage, StorageError, file_sha256

OUTPUT = "pack"
MANIFEST = "manifest.json"
LOCK = ".fetch.lock"
STAMP = ".fetched.json"   # what the last fetch verified (see fetch)


def storage_of(cfg) -> Storage:
    """The Storage of a StorageConfig (params.storage)."""
    return Storage(cfg.root, cfg.s3_endpoint_url)


def local_dir(cfg) -> Path:
    """The local folder of the pack's .bin/.idx files for a StorageConfig."""
    storage = storage_of(cfg)
    return Path(cfg.local_cache, OUTPUT) if storage.is_s3 else Path(storage.path(OUTPUT))


def pack_files(manifest: dict) -> dict[str, str]:
    """{file name: sha256} of every file a pack manifest names (a source's .bin before its
    .idx, as the pack stage writes them)."""
    return {f: sha for meta in manifest["sources"].values() for f, sha in meta["files"].items()}


def prune(local: Path, manifest: dict) -> None:
    """Remove what the pack of `manifest` does not hold from its local folder: sources no
    longer packed, a mask of a source that lost it (model/data.py applies any `<name>_mask`
    it finds), temp files of a killed write."""
    keep = {MANIFEST, LOCK, STAMP, *pack_files(manifest), *(f"{n}.json" for n in manifest["sources"])}
    for name in os.listdir(local):
        if name not in keep and (local / name).is_file():
            os.remove(local / name)


def materialise(cfg, local: Path) -> dict | None:
    """Before training opens the pack in `local`: with an S3 root, fetch it there and return
    its manifest; with a local root, `local` is the pack itself: nothing to do (None)."""
    storage = storage_of(cfg)
    if not storage.is_s3:
        return None
    return fetch(storage.sub(OUTPUT), local)


def _stamp(local: Path, manifest_sha: str, files) -> dict:
    stats = {}
    for name in files:
        st = (local / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"manifest_sha256": manifest_sha, "files": stats}


def verify(local: Path, want: dict[str, str], stamp_path: Path) -> None:
    """The files `want` ({name: sha256}) of a local pack are present and whole: StorageError
    naming the first that is not. What was verified is stamped at `stamp_path` as fetch
    stamps it, so files nobody has touched since are not hashed again."""
    for name in sorted(want):
        if not (local / name).exists():
            raise StorageError(f"{local / name}: missing, the pack manifest names it "
                               "(rerun the pack stage)")
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()
    stamp = _stamp(local, key, want)
    try:
        if json.loads(stamp_path.read_bytes()) == stamp:
            return
    except (OSError, ValueError):
        pass
    for name, sha in sorted(want.items()):
        if file_sha256(local / name) != sha:
            raise StorageError(f"{local / name}: its sha256 differs from the pack manifest's "
                               "(cut or modified since packing; rerun the pack stage)")
    _write(stamp_path, json.dumps(stamp).encode())


def fetch(remote: Storage, local: Path) -> dict:
    """Make `local` a verified copy of the pack at `remote` and return its manifest.

    Each file the remote manifest names is downloaded when its local copy is missing or its
    sha256 differs (into a temp file, checked, renamed into place); what the pack does not
    hold is removed; the manifest is written last. Every local rank of a node calls this: an
    exclusive lock makes the first one fetch while the others wait, and a stamp of what it
    verified (the manifest's sha256; each file's size, mtime and inode) lets the others, and
    later runs, skip hashing files nobody has touched since."""
    try:
        body = remote.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(f"{remote.path(MANIFEST)}: no pack manifest on S3 (run the pack "
                                "stage)") from None
    try:
        manifest = json.loads(body)
        want = pack_files(manifest)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StorageError(f"{remote.path(MANIFEST)}: not a pack manifest ({err!r}); rerun the "
                           f"pack stage") from None
    manifest_sha = hashlib.sha256(body).hexdigest()
    local.mkdir(parents=True, exist_ok=True)
    with open(local / LOCK, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)   # released when the file closes
        try:
            if (json.loads((local / STAMP).read_bytes()) == _stamp(local, manifest_sha, want)
                    and (local / MANIFEST).read_bytes() == body):
                return manifest
        except (OSError, ValueError):
            pass
        (local / STAMP).unlink(missing_ok=True)
        (local / MANIFEST).unlink(missing_ok=True)   # the old manifest no longer describes local
        for name, sha in want.items():
            if (local / name).exists() and file_sha256(local / name) == sha:
                continue
            try:
                remote.download(name, local / name, sha256=sha)
            except FileNotFoundError:
                raise StorageError(f"{remote.path(name)}: listed in {remote.path(MANIFEST)} but "
                                   "missing (rerun the pack stage)") from None
        prune(local, manifest)
        _write(local / MANIFEST, body)
        _write(local / STAMP, json.dumps(_stamp(local, manifest_sha, want)).encode())
    return manifest


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
