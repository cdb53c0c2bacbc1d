"""Stage `corpus`: ingest source files into shards, one record per file with its provenance.

Record: {id, text, source, path, size, language, sha256, license}; the id is SOURCE/PATH for a
file, SOURCE/ID for a record of a JSONL or shards source (its own id; a repeated one is a bad
record). Candidates are listed in a fixed order and cut into groups of `shard_files` before
filtering, so shard i always holds the same files: each group is an independent unit that
workers build in parallel and a killed run resumes. Binary, non-UTF-8, unreadable and
out-of-size files are skipped and counted; so are, while listing, symlinks (never followed),
fifos, sockets and devices (never opened), entries whose path or id is not valid UTF-8 and
license files that cannot be read or are links leading out of the source (their files' license
is "unreadable"; a link within it is followed).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath

from codeworld.code import Code
from codeworld.config import LANGUAGES, CorpusConfig, ExecutorConfig, Params
from codeworld.executor import Witness
from codeworld.parallel import pool_map
from codeworld.shards import DatasetWriter, ShardInfo, fingerprint
from codeworld.storage import UNREADABLE, Storage, StorageError
from codeworld.tracking import StageRun
from stages.corpus_sources import (NO_LICENSE, Candidate, FileHashes, GitReader, SourceError, identity,
                                   license_admitted, license_filter, list_candidates, read_bytes,
                                   source_name)

CODE = Code(("stages.corpus",))

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Group:
    writer: DatasetWriter
    index: int
    candidates: list[Candidate]
    min_bytes: int
    max_bytes: int
    endpoint: str | None
    languages: frozenset[str]
    licenses: frozenset[str] = frozenset()   # the labels admitted (empty: any); license_admitted


def _skip(counts: Counter, examples: list, reason: str, c: Candidate, detail: str = "") -> None:
    counts[f"skipped_{reason}"] += 1
    if len(examples) < MAX_EXAMPLES:
        examples.append({"reason": reason, "source": c.source, "path": c.path, "detail": detail})


def _language(c: Candidate) -> str | None:
    """A record's own language (JSONL, shards) in the stage's spelling, LANGUAGES' lower case:
    public code datasets write "Python", which was no language of extensions [".py"]; else the
    language of the file's extension."""
    own = dict(c.extra).get("language")
    return own.lower() if own else LANGUAGES.get(PurePosixPath(c.path).suffix)


def _record(c: Candidate, text: str, raw: bytes, digest: str) -> dict:
    return {
        # A record's own id where it has one (JSONL, shards: see _list_records), else its path.
        "id": f"{c.source}/{c.path if c.record_id is None else c.record_id}",
        "text": text,
        "source": c.source,
        "path": c.path,
        "size": len(raw),
        "language": _language(c),
        "sha256": digest,
        "license": c.license,
    }


def _check_unchanged(c: Candidate, digest: str) -> None:
    """A local file must still hold the bytes its listing hashed: the fingerprint names those,
    so a file edited in between would give a dataset its manifest does not describe. A
    StorageError (may pass on retry): the rerun lists the file again."""
    if c.kind in ("dir", "stdlib") and len(c.content) == 64 and digest != c.content:
        raise StorageError(f"{c.locator}: changed while the corpus stage ran (its sha256 differs "
                           "from the listing's): rerun the stage to list it again", transient=True)


def ingest_group(g: Group) -> tuple[ShardInfo, dict]:
    counts: Counter = Counter()
    examples: list[dict] = []
    records = []
    git = GitReader()
    try:
        for c in g.candidates:
            counts["candidates"] += 1
            if _language(c) not in g.languages:  # records (JSONL, shards) carry their own
                _skip(counts, examples, "language", c, str(_language(c)))
                continue
            if g.licenses and not license_admitted(c.license, g.licenses):
                _skip(counts, examples, "license", c, c.license or NO_LICENSE)
                continue
            if c.size > g.max_bytes:  # known from the listing: never read a huge file
                _skip(counts, examples, "too_large", c, f"{c.size} bytes")
                continue
            if c.text is not None:
                raw = c.text.encode("utf-8", "surrogatepass")
            else:
                try:
                    raw = read_bytes(c, git, g.endpoint)
                except UNREADABLE as err:   # other errors fail the stage: a rerun resumes
                    _skip(counts, examples, "unreadable", c, (err.strerror or str(err))[:200])
                    continue
            digest = hashlib.sha256(raw).hexdigest()  # hashed once: the check and the record
            if c.text is None:
                _check_unchanged(c, digest)
            if len(raw) > g.max_bytes:
                _skip(counts, examples, "too_large", c, f"{len(raw)} bytes")
            elif len(raw) < g.min_bytes:
                _skip(counts, examples, "too_small", c, f"{len(raw)} bytes")
            elif b"\0" in raw[:8192]:
                _skip(counts, examples, "binary", c)
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    _skip(counts, examples, "non_utf8", c, str(err)[:200])
                    continue
                counts["kept"] += 1
                counts["kept_bytes"] += len(raw)
                records.append(_record(c, text, raw, digest))
    finally:
        git.close()
    meta = {"counts": dict(counts), "examples": examples}
    return g.writer.write(g.index, records, meta), meta


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/corpus.json",
        output: str = "corpus") -> dict:
    cfg: CorpusConfig = params.corpus
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    with StageRun("corpus", params.model_dump(include={"storage", "corpus"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        licenses = license_filter(cfg.licenses)   # before listing: a misspelt label fails fast
        with run_.timed("listing"):
            hashes = _file_hashes(storage, output)
            candidates, bad, skipped = list_candidates(cfg, params.storage.s3_endpoint_url, hashes)
            hashes.save()
        if not candidates:
            raise SourceError("corpus: the sources hold no file with extensions "
                              f"{cfg.extensions}: nothing to ingest" + _rejected(bad, skipped))
        # What listing rejected is part of the inputs too: a finished dataset is not reused
        # with the counts of another listing.
        fp = fingerprint(CODE, "corpus", 1, cfg.model_dump(exclude={"workers"}),
                         [(c.source, c.path, c.size, c.license, identity(c)) for c in candidates],
                         bad, skipped)
        writer = DatasetWriter(storage, output, fp)
        finished = writer.prepare()
        if finished is not None:  # same inputs and params as a finished run: nothing to redo
            run_.log(records=finished["records"], shards=len(finished["shards"]),
                     **finished["stats"]["counts"])
            return finished
        n = cfg.shard_files
        languages = frozenset(LANGUAGES[e] for e in cfg.extensions)
        groups = [Group(writer, i // n, candidates[i:i + n], cfg.min_bytes, cfg.max_bytes,
                        params.storage.s3_endpoint_url, languages, licenses)
                  for i in range(0, len(candidates), n)]
        with run_.timed("ingest"):
            results = _build(groups, cfg.workers, params.executor, storage,
                             _witnesses(candidates, params.storage.s3_endpoint_url))
        counts: Counter = Counter(f"skipped_{s['reason']}" for s in skipped)
        examples: list = list(skipped[:MAX_EXAMPLES])
        for _, meta in results:
            counts.update(meta["counts"])
            examples += meta["examples"]
        counts["bad_records"] = len(bad)
        per_source = Counter(c.source for c in candidates)
        sources = {name: per_source.get(name, 0) for name in (source_name(s) for s in cfg.sources)}
        # An empty source is not fatal when others have files, but it is reported.
        empty = sorted(n for n, k in sources.items() if k == 0)
        counts["empty_sources"] = len(empty)
        for name in empty:
            log.warning("corpus: source %r has no file with extensions %s", name, cfg.extensions)
        stats = {"counts": dict(sorted(counts.items())), "examples": examples[:MAX_EXAMPLES],
                 "bad_records": bad[:MAX_EXAMPLES], "sources": sources, "empty_sources": empty}
        manifest = writer.finish([info for info, _ in results], {"stats": stats})
        run_.log(records=manifest["records"], shards=len(manifest["shards"]), **counts)
        run_.artifact(stats, "corpus_report.json")
        return manifest


def _file_hashes(storage: Storage, output: str) -> FileHashes:
    """The cache of local source files' sha256 (see FileHashes), in the storage's work area,
    beside (not in) the dataset's own .work/NAME, which a finished run removes. With an S3
    root there is none: its keys (paths, inodes) are this machine's, which a bucket shared by
    machines must not hold, and an S3 run writes nothing locally; files are hashed each run."""
    if storage.is_s3:
        return FileHashes()
    return FileHashes.load(storage.sub(".work"), f"file-hashes/{output}.json")


def _rejected(bad: list[str], skipped: list[dict]) -> str:
    """What listing rejected, for the error that nothing is left to ingest."""
    out = ""
    if bad:
        out += f"; {len(bad)} bad records, the first: {bad[0]}"
    if skipped:
        s = skipped[0]
        out += (f"; {len(skipped)} entries skipped, the first: {s['source']}/{s['path']} "
                f"({s['reason']}: {s['detail']})")
    return out


def _build(groups: list[Group], workers: int, executor: ExecutorConfig | None = None,
           storage: Storage | None = None, witnesses: list[Witness] = ()) -> list[tuple[ShardInfo, dict]]:
    """Build every group's shard, reusing shards an interrupted run already finished."""
    done = {g.index: g.writer.completed(g.index) for g in groups}
    todo = [g for g in groups if done[g.index] is None]
    done.update(zip((g.index for g in todo),
                    pool_map(ingest_group, todo, workers, "corpus", executor, storage=storage,
                             witnesses=witnesses, name=lambda g: f"shard {g.index}")))
    return [done[g.index] for g in groups]


def _read_one(c: Candidate, endpoint: str | None) -> bytes:
    git = GitReader()
    try:
        return read_bytes(c, git, endpoint)
    finally:
        git.close()


def _witnesses(candidates: list[Candidate], endpoint: str | None) -> list[Witness]:
    """One file per source that a worker reads from its own disk (folders, git repositories,
    the stdlib): a worker that cannot see it as this machine does would count those files as
    unreadable, or read other bytes (another Python's stdlib), so it is refused instead.
    Record sources (JSONL, shards) travel inside the jobs; S3 is the same from everywhere."""
    first: dict[str, Candidate] = {}
    for c in candidates:
        if c.text is None and c.kind != "s3":
            first.setdefault(c.source, c)
    return [Witness(f"corpus source {c.source!r} file {c.path!r} ({c.locator.split(chr(0))[0]})",
                    partial(_read_one, c, endpoint)) for c in first.values()]
