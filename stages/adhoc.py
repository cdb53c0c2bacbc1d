"""The stages on plain files, outside the DAG: `codeworld corpus` and `codeworld dedup`.

Both reuse the stages' own code paths; JSONL input is staged as a temporary shard dataset.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from codeworld.code import Code
from codeworld.config import ConfigError, CorpusConfig, DedupConfig, Params, StorageConfig
from codeworld.jsonl import read_jsonl
from codeworld.shards import MANIFEST, Dataset, DatasetWriter, ShardError, dumps, fingerprint
from codeworld.storage import Storage, filesystem, write_file_atomic
from stages import corpus, dedup
from stages.corpus_sources import printable

CODE = Code(("stages.adhoc",))


def _split(out: str) -> tuple[str, str]:
    out = out.rstrip("/")
    join = posixpath if out.startswith("s3://") else os.path
    parent, name = join.split(out)
    return parent or ".", name


def _manifest_of(arg: str) -> str:
    return posixpath.join(arg, MANIFEST) if arg.startswith("s3://") else os.path.join(arg, MANIFEST)


def _source_spec(arg: str, i: int) -> dict:
    """What kind of source a command-line argument is: a JSONL file, a shard dataset (its
    manifest, looked up through fsspec: on S3 too), a git commit, else a folder or prefix."""
    name = f"src{i}"
    if arg.endswith(".jsonl"):
        return {"kind": "jsonl", "path": arg, "name": name}
    if filesystem(arg).exists(_manifest_of(arg)):
        return {"kind": "shards", "path": arg, "name": name}
    if arg.startswith("s3://"):
        return {"kind": "s3", "url": arg, "name": name}
    if "@" in arg and not Path(arg).exists():
        path, commit = arg.rsplit("@", 1)
        return {"kind": "git", "path": path, "commit": commit, "name": name}
    return {"kind": "dir", "path": arg, "name": Path(arg).resolve().name or name}


def corpus_adhoc(sources: list[str], out: str, *, extensions: list[str] | None = None,
                 max_bytes: int = 1_000_000, workers: int = 2) -> dict:
    specs = [_source_spec(a, i) for i, a in enumerate(sources)]
    names = [s["name"] for s in specs]
    for i, s in enumerate(specs):  # two folders with one basename: keep names unique
        if names.count(s["name"]) > 1:
            s["name"] = f"{s['name']}{i}"
    parent, name = _split(out)
    params = Params(storage=StorageConfig(root=parent),
                    corpus=CorpusConfig.model_validate({"sources": specs, "extensions": extensions or [".py"],
                                                        "max_bytes": max_bytes, "workers": workers}))
    return corpus.run(params, track=False, metrics_path=None, output=name)


def _checked(items: Iterable[tuple[str, dict | None, str | None]], unique_ids: bool = True,
             keep: bool = True) -> tuple[list[dict], list[str]]:
    """The records dedup can take from `(where, record, problem)` items (none unless `keep`),
    and the bad ones named by `where`: no JSON object, no string `text` or no `id`, a field
    that is not valid UTF-8, a repeated id (when `unique_ids`)."""
    records, bad, seen = [], [], set()
    for where, rec, problem in items:
        if problem:
            bad.append(f"{where}: {problem}"[:300])
        elif not isinstance(rec.get("text"), str) or "id" not in rec:
            bad.append(f"{where}: needs string field 'text' and field 'id'")
        elif (field := _unwritable_field(rec)) is not None:
            bad.append(f"{where}: field {field!r} is not valid UTF-8 (a lone surrogate)"[:300])
        elif unique_ids and str(rec["id"]) in seen:
            bad.append(f"{where}: duplicate id {rec['id']!r} (first one kept)")
        else:
            if unique_ids:
                seen.add(str(rec["id"]))
            if keep:
                records.append(rec)
    return records, bad


def _unwritable_field(rec: dict) -> str | None:
    """The first field (by name) of `rec` that UTF-8 cannot hold: JSON allows a lone surrogate
    escape ("\\ud800"), which staging and writing the record would fail on, killing the run."""
    for key in sorted(rec, key=lambda k: k.encode("utf-8", "surrogatepass")):
        try:
            dumps({key: rec[key]})
        except UnicodeEncodeError:
            return printable(key)
    return None


def _read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    return _checked(read_jsonl(path))


def _dataset_items(source: Dataset, inp: str) -> Iterator[tuple[str, dict | None, str | None]]:
    for i, rec in enumerate(source):
        problem = None if isinstance(rec, dict) else f"not a JSON object ({type(rec).__name__})"
        yield f"{inp}#{i}", rec if problem is None else None, problem


def _stage(tmp: str, name: str, records: list[dict], fp: str, shard_records: int) -> Dataset:
    """`records` as a finished shard dataset `name` under the folder `tmp`."""
    staged = DatasetWriter(Storage(tmp), name, fp)
    staged.prepare()
    infos = [staged.write(i // shard_records, records[i:i + shard_records])
             for i in range(0, len(records), shard_records)]
    staged.finish(infos)
    return Dataset(Storage(tmp).sub(name))


def dedup_adhoc(inp: str, out: str, *, report_path: str | None = None, threshold: float = 0.7,
                workers: int = 2, shard_records: int = 1000) -> dict:
    cfg = DedupConfig(threshold=threshold, workers=workers)
    report_path = report_path or f"{out.rstrip('/')}.report.json"
    fs = filesystem(inp)
    if fs.exists(_manifest_of(inp)):
        source = Dataset.open(inp)
        # Records of another kind of dataset (no `text`, no `id`) are bad records, counted
        # as in JSONL input; the good ones are then deduplicated as a staged dataset of their
        # own. Only the problems are kept while checking: a good dataset streams as before.
        bad = _checked(_dataset_items(source, inp), unique_ids=False, keep=False)[1]
        parent, name = _split(out)
        with tempfile.TemporaryDirectory(prefix="codeworld-dedup-") as tmp:
            if bad:
                good = _checked(_dataset_items(source, inp), unique_ids=False)[0]
                source = _stage(tmp, "input", good, fingerprint(
                    CODE, "adhoc-dataset", source.manifest["fingerprint"]), shard_records)
            dedup.dedup_dataset(source, DatasetWriter(Storage(parent), name,
                                                      dedup.output_fingerprint(cfg, source)), cfg)
        report = json.loads(Storage(parent).sub(name).read_bytes(dedup.REPORT))
    else:
        if not inp.startswith("s3://") and os.path.isdir(inp):
            # read as JSONL it would fail with a bare IsADirectoryError
            raise ShardError(f"{inp}: a folder without {MANIFEST}: not a finished shard dataset "
                             "(its stage has not finished?) nor a JSONL file")
        records, bad = _read_jsonl(inp)
        with tempfile.TemporaryDirectory(prefix="codeworld-dedup-") as tmp:
            source = _stage(tmp, "input", records, fingerprint(CODE, "adhoc-input", inp),
                            shard_records)
            dedup.dedup_dataset(source, DatasetWriter(Storage(tmp), "output", dedup.output_fingerprint(cfg, source)), cfg)
            kept = Dataset(Storage(tmp).sub("output"))
            body = b"".join(dumps(r) + b"\n" for r in kept)
            write_file_atomic(out, body)
            report = json.loads(Storage(tmp).sub("output").read_bytes(dedup.REPORT))
    report["bad_records"] = bad
    report["input"] = inp
    report["output"] = out
    write_file_atomic(report_path, json.dumps(report, indent=1).encode() + b"\n")
    report["path"] = report_path
    return report


def trace_adhoc(inp: str, out: str, *, workers: int = 0, wall_seconds: float = 2.0,
                max_events: int = 10_000) -> dict:
    """`codeworld trace`: one output line per input line, in order; a bad line becomes a record
    with status "invalid" and never stops the batch."""
    from codeworld.config import TraceLimitsConfig
    from stages.trace_runner import trace_requests

    # a line that is not a JSON object becomes a request without code: status "invalid",
    # its error saying what is wrong with the line
    lines = list(read_jsonl(inp))
    requests = [req if req is not None else {"id": where} for where, req, _ in lines]
    limits = TraceLimitsConfig(wall_seconds=wall_seconds, cpu_seconds=wall_seconds, max_events=max_events)
    results = trace_requests(requests, limits, workers)
    for r, (_, req, problem) in zip(results, lines):
        if req is None and problem:
            r["error"] = f"Invalid: {problem}"
    fields = ("id", "trace", "result", "error", "status")
    # A trace is only complete when execution left main (a return or an exception); partial
    # text of a too_long or killed program is not emitted.
    rows = [{k: (r.get(k) if k != "trace" or r["status"] in ("ok", "exception") else None)
             for k in fields} for r in results]
    body = b"".join(dumps(row) + b"\n" for row in rows)
    write_file_atomic(out, body)
    counts = Counter(r["status"] for r in results)
    return {"records": len(results), "statuses": dict(sorted(counts.items())), "output": out}


def export_adhoc(params: Params, checkpoint: str, out: str) -> dict:
    """`codeworld export`: a phase checkpoint directory (a run by hand, another machine's) as a
    Hugging Face folder, checked as the export stage checks its own. Its lineage is its own
    run.json only: the params' phase chain need not be the one it was trained through."""
    from model.checkpoint import latest
    from stages.export import export, phase_record

    found = latest(Path(checkpoint))
    if found is None:
        raise ConfigError(f"--checkpoint {checkpoint}: not a phase checkpoint directory "
                          "(no latest.json)")
    return export(params, found, Storage(out, params.storage.s3_endpoint_url),
                  [phase_record(Path(checkpoint))])
