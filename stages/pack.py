"""Stage `pack`: shard datasets to Megatron-Core indexed datasets (`.bin`/`.idx`, written with
megatron.core.datasets' own builder), one per pack source.

Each document is the rendering of one record (stages/documents.py) tokenised and ended with
one end-of-text. A source with loss masks (agent trajectories: a share of the observations out
of the loss, as CWM did; the SFT formats: only the answers in the loss) gets a parallel uint8
dataset `<name>_mask` with one 0/1 per token, read by model/data.py. Held-out corpus ids are
skipped here, for every source and format, so no phase ever trains on them. Records that hold
no task of an SFT format are skipped and counted (`skipped`), apart from broken ones.
A source is the unit of resume: its files are renamed into place, then its own manifest; the
pack's manifest is removed before the first file that changes and written last.

With an s3:// storage root the shard datasets and the tokenizer are read (streamed) from S3,
each source is built in this node's cache (storage.local_cache, codeworld/pack_cache.py) and
uploaded under `<root>/pack/`: its files, then its record `<name>.json`; the pack's manifest
goes up last, and is taken down before the first object that changes, so a reader never sees
a pack half replaced. A rerun skips a source whose record on S3 has the same fingerprint and
whose objects still have the recorded sha256 (or uploads it from a finished local copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from codeworld.code import Code
from codeworld import pack_cache
from codeworld.config import MASKED_FORMATS, SFT_FORMATS, Params, PackSourceConfig
from codeworld.pack_cache import MANIFEST, OUTPUT, prune
from codeworld.shards import Dataset, dumps, fingerprint
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage, file_sha256
from codeworld.tokens import EOD_ID, PAD_ID, encode_batch, joined
from codeworld.tracking import StageRun
from stages import tokenizer as tokenizer_stage
from stages.documents import ASSISTANT, DocumentError, NotATask, history_that_fits, render

CODE = Code(("stages.pack",))

BATCH = 256  # records tokenised per encode_batch call (HF tokenizers spreads it over cores)


def local_dir(params: Params) -> Path:
    """The pack's folder on this machine (Megatron memory-maps its files: a local disk):
    `<root>/pack`, or with an S3 root this node's cache `<storage.local_cache>/pack`."""
    return pack_cache.local_dir(params.storage)


def read_manifest(params: Params) -> dict:
    """The pack's manifest where the pack lives (on S3 with an S3 root)."""
    where = pack_cache.storage_of(params.storage).sub(OUTPUT)
    try:
        return json.loads(where.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where.path(MANIFEST)}: no pack manifest (run the pack stage)") from None


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def source_fingerprint(name: str, src: PackSourceConfig, params: Params, tok_sha: str,
                       ds: Dataset) -> str:
    return fingerprint(CODE, "pack", 1, name, src.model_dump(), params.pack.heldout_percent,
                       params.pack.seed, tok_sha, ds.manifest["fingerprint"])


def _count_reason(counts: dict, kind: str, why: str) -> None:
    """One more record left out as `kind` (broken, skipped), and why, for the stage's report."""
    counts[kind] += 1
    reasons = counts.setdefault(f"{kind}_reasons", {})
    reasons[why] = reasons.get(why, 0) + 1


def _documents(ds: Dataset, src: PackSourceConfig, params: Params, counts: dict):
    """(segments) per usable record, in dataset order, in batches."""
    batch = []
    for record in ds:
        if not isinstance(record, dict):   # a shard member that is JSON but no object
            _count_reason(counts, "broken",
                          f"a record that is a JSON {type(record).__name__}, not an object")
            continue
        if heldout(corpus_id(record), params.pack.heldout_percent, params.pack.seed):
            counts["heldout"] += 1
            continue
        try:
            batch.append(render(record, src.format, observation_mask=src.observation_mask,
                                seed=params.pack.seed))
        except DocumentError as err:
            _count_reason(counts, "skipped" if isinstance(err, NotATask) else "broken", str(err))
            continue
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def document_tokens(segments: list[tuple[str, bool]], pieces: list[list[int]],
                    src: PackSourceConfig) -> tuple[list[int], list[int]]:
    """One rendered document's (token ids, loss mask) as it goes into the pack: its segments'
    tokens (`pieces`, one list per segment, each segment encoded apart) ended with one
    end-of-text. Evaluation's perplexity renders held-out documents through this too."""
    ids: list[int] = []
    mask: list[int] = []
    for (_, keep), piece in zip(segments, pieces, strict=True):
        ids += piece
        mask += [int(keep)] * len(piece)
    if not ids or ids[-1] != EOD_ID:   # a trace answer ends with its own end-of-text
        # SFT: the closing end-of-text is in the loss only after an answer (a trajectory that
        # ends on a tool result ends out of it); pre-training text always learns where it ends.
        sft = src.format in SFT_FORMATS
        ids.append(EOD_ID)
        mask.append(int(segments[-1][1]) if sft else 1)
    return ids, mask


def too_long(ids: list[int], src: PackSourceConfig) -> bool:
    """A document the source leaves out (`max_document_tokens`, or longer than a window)."""
    limit = _limit(src)
    return bool(limit) and len(ids) > limit


def _limit(src: PackSourceConfig) -> int:
    return min((n for n in (src.max_document_tokens, src.window) if n), default=0)


def source_documents(segments: list[tuple[str, bool]], pieces: list[list[int]],
                     src: PackSourceConfig) -> tuple[list[tuple[list[int], list[int]]], int]:
    """The (token ids, loss mask) documents one rendered record gives its source, and how many
    it leaves out as too long. Pack and evaluation's perplexity both take documents here."""
    if src.format == "sft_agent" and src.window:
        return agent_turn_documents(segments, pieces, _limit(src))
    ids, mask = document_tokens(segments, pieces, src)
    return ([], 1) if too_long(ids, src) else ([(ids, mask)], 0)


def agent_turn_documents(segments: list[tuple[str, bool]], pieces: list[list[int]],
                         limit: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """A trajectory as one document per assistant turn, each at most ``limit`` tokens: the
    messages before the first assistant turn (system prompt, task), the latest messages before
    the turn that fit whole (documents.history_that_fits), then the turn, the only tokens in
    the loss. A trajectory longer than the window, cut into consecutive samples, would train
    most turns without their task; whole-window documents make one sample each. A turn whose
    task and own tokens alone overflow is left out (counted too long). The closing end-of-text
    is out of the loss: the conversation goes on after the turn."""
    # render's sft_agent segments: one per message, but an assistant turn is two (its role
    # marker out of the loss, then its text in it)
    messages: list[tuple[list[int], list[int], bool]] = []   # (ids, mask, an assistant turn)
    i = 0
    while i < len(segments):
        text, keep = segments[i]
        if joined(text) == ASSISTANT and not keep and i + 1 < len(segments) and segments[i + 1][1]:
            ids = pieces[i] + pieces[i + 1]
            messages.append((ids, [0] * len(pieces[i]) + [1] * len(pieces[i + 1]), True))
            i += 2
        else:
            messages.append((pieces[i], [int(keep)] * len(pieces[i]), False))
            i += 1
    first = next((k for k, m in enumerate(messages) if m[2]), len(messages))
    head = [t for m in messages[:first] for t in m[0]]
    docs, left_out = [], 0
    for k in range(first, len(messages)):
        ids, mask, assistant = messages[k]
        if not assistant:
            continue
        budget = limit - len(head) - len(ids) - 1
        if budget < 0:
            left_out += 1
            continue
        kept = history_that_fits([len(m[0]) for m in messages[first:k]], budget)
        history = [t for m in messages[k - kept:k] for t in m[0]]
        doc = head + history + ids + [EOD_ID]
        docs.append((doc, [0] * (len(head) + len(history)) + mask + [0]))
    return docs, left_out


class _Windows:
    """Documents into the indexed dataset(s): as they come, or (``window``) packed whole into
    windows of exactly ``window`` tokens, at most ``per_window`` documents each, each window
    padded to its end with PAD out of the loss."""

    def __init__(self, builder, mask_builder, window: int, counts: dict, per_window: int = 1):
        self.builder, self.mask_builder = builder, mask_builder
        self.window, self.counts, self.per_window = window, counts, per_window
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.documents = 0

    def add(self, ids: list[int], mask: list[int]) -> None:
        if not self.window:
            self._write(ids, mask)
            return
        if len(self.ids) + len(ids) > self.window or self.documents == self.per_window:
            self.flush()
        self.ids += ids
        self.mask += mask
        self.documents += 1

    def flush(self) -> None:
        if self.ids:
            pad = self.window - len(self.ids)
            self._write(self.ids + [PAD_ID] * pad, self.mask + [0] * pad)
            self.counts["windows"] += 1
            self.counts["pad_tokens"] += pad
            self.ids, self.mask, self.documents = [], [], 0

    def _write(self, ids: list[int], mask: list[int]) -> None:
        self.builder.add_document(np.asarray(ids), [len(ids)])
        if self.mask_builder is not None:
            self.mask_builder.add_document(np.asarray(mask), [len(mask)])


def _token_documents(ds: Dataset, src: PackSourceConfig, params: Params, counts: dict, tok):
    """(ids, mask) of each training document of the source, in order, encoded a batch of
    records at a time; records that give none are counted in ``counts`` as they pass."""
    for batch in _documents(ds, src, params, counts):
        texts = [t for doc in batch for t, _ in doc]
        encoded = iter(encode_batch(tok, texts))
        for doc in batch:
            docs, left_out = source_documents(doc, [next(encoded) for _ in doc], src)
            counts["too_long"] += left_out
            yield from docs


def pack_source(name: str, src: PackSourceConfig, ds: Dataset, tok, params: Params,
                out: Path, fp: str) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    masked = src.format in MASKED_FORMATS
    tmp = {k: out / f".{name}{k}.tmp" for k in (".bin", ".idx", "_mask.bin", "_mask.idx")}
    builder = IndexedDatasetBuilder(str(tmp[".bin"]), dtype=token_dtype(tok.get_vocab_size()))
    mask_builder = IndexedDatasetBuilder(str(tmp["_mask.bin"]), dtype=np.uint8) if masked else None
    counts = {"documents": 0, "tokens": 0, "loss_tokens": 0, "heldout": 0, "broken": 0,
              "skipped": 0, "too_long": 0, "truncated_at_cap": 0}
    if src.window:
        counts.update(windows=0, pad_tokens=0)
    out_docs = _Windows(builder, mask_builder, src.window, counts, src.window_documents)
    cap = src.max_tokens or float("inf")
    for ids, mask in _token_documents(ds, src, params, counts, tok):
        if counts["tokens"] + len(ids) > cap:
            counts["truncated_at_cap"] = 1
            break
        out_docs.add(ids, mask)
        counts["documents"] += 1
        counts["tokens"] += len(ids)
        counts["loss_tokens"] += sum(mask)
    out_docs.flush()
    if counts["documents"] == 0:
        raise ValueError(f"pack source {name!r} ({ds.storage.path()}): no usable document "
                         f"({counts['heldout']} held out, {counts['broken']} broken, "
                         f"{counts['skipped']} without a {src.format} task, "
                         f"{counts['too_long']} over max_document_tokens)")
    builder.finalize(str(tmp[".idx"]))
    files = [".bin", ".idx"]
    if mask_builder is not None:
        mask_builder.finalize(str(tmp["_mask.idx"]))
        files += ["_mask.bin", "_mask.idx"]
    shas = {}
    for k in files:  # the .idx last: a prefix with an .idx is complete
        final = out / f"{name}{k}"
        os.replace(tmp[k], final)
        shas[final.name] = file_sha256(final)
    meta = {"source": name, "fingerprint": fp, "files": shas, "masked": masked, **counts}
    (out / f".{name}.json.tmp").write_bytes(dumps(meta) + b"\n")
    os.replace(out / f".{name}.json.tmp", out / f"{name}.json")
    return meta


def _finished(out: Path, name: str, fp: str) -> dict | None:
    try:
        meta = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fp:
        return None
    for fname, sha in meta["files"].items():
        if not (out / fname).exists() or file_sha256(out / fname) != sha:
            return None
    return meta


def _uploaded(remote: Storage, name: str, fp: str) -> dict | None:
    """The source's record when S3 holds it whole: same fingerprint, and every object it names
    with the recorded sha256 (hashed as it streams, nothing stored)."""
    try:
        meta = json.loads(remote.read_bytes(f"{name}.json"))
    except (FileNotFoundError, ValueError):
        return None
    if meta.get("fingerprint") != fp:
        return None
    for fname, sha in meta["files"].items():
        try:
            if remote.sha256(fname) != sha:
                return None
        except FileNotFoundError:
            return None
    return meta


def _upload(remote: Storage, out: Path, name: str, meta: dict) -> None:
    """A finished source to S3: its record is taken down first and put back last, so S3 never
    holds a record whose objects are not all there."""
    remote.remove(f"{name}.json")
    for fname in meta["files"]:   # each object appears whole or not at all
        remote.upload(out / fname, fname)
    remote.write_bytes(f"{name}.json", dumps(meta) + b"\n")


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/pack.json") -> dict:
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    remote = storage.sub(OUTPUT) if storage.is_s3 else None
    published = remote is not None   # S3's manifest still stands (taken down before a change)
    out = local_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_stage.load(storage)
    tok_sha = json.loads(storage.sub(tokenizer_stage.OUTPUT).read_bytes(tokenizer_stage.MANIFEST))["sha256"]
    with StageRun("pack", params.model_dump(include={"storage", "pack"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        sources = {}
        for name, src in params.pack.sources.items():
            ds = Dataset(storage.sub(src.dataset))
            fp = source_fingerprint(name, src, params, tok_sha, ds)
            meta = _uploaded(remote, name, fp) if remote is not None else None
            if meta is None:
                meta = _finished(out, name, fp)
                if meta is None:
                    if remote is None:
                        # the manifest names the files this replaces: down first, so that a
                        # killed run never leaves a half-replaced pack that reads as finished
                        (out / MANIFEST).unlink(missing_ok=True)
                    with run_.timed(f"pack_{name}"):
                        meta = pack_source(name, src, ds, tok, params, out, fp)
                if remote is not None:
                    if published:
                        remote.remove(MANIFEST)
                        published = False
                    with run_.timed(f"upload_{name}"):
                        _upload(remote, out, name, meta)
            sources[name] = meta
            run_.log(**{f"{name}_{k}": v for k, v in meta.items() if isinstance(v, int)
                        and not isinstance(v, bool)})
        manifest = {"name": OUTPUT, "fingerprint": fingerprint(
                        CODE, "pack", 1, {n: m["fingerprint"] for n, m in sources.items()}),
                    "tokenizer_sha256": tok_sha, "vocab_size": tok.get_vocab_size(),
                    "records": sum(m["documents"] for m in sources.values()),
                    "tokens": sum(m["tokens"] for m in sources.values()), "sources": sources}
        body = dumps(manifest) + b"\n"
        if remote is None and (out / MANIFEST).exists() and (out / MANIFEST).read_bytes() != body:
            (out / MANIFEST).unlink()   # (as above: prune may remove files it names)
        prune(out, manifest)   # sources no longer in params, masks a source lost, temp files
        if remote is None:
            (out / f".{MANIFEST}.tmp").write_bytes(body)
            os.replace(out / f".{MANIFEST}.tmp", out / MANIFEST)
        else:
            keep = {MANIFEST, *pack_cache.pack_files(manifest), *(f"{n}.json" for n in sources)}
            stale = [n for n in remote.list() if n not in keep]   # dropped sources, lost masks
            if stale and published:
                remote.remove(MANIFEST)
                published = False
            for name in stale:
                remote.remove(name)
            if not published:
                # The cache's manifest is only ever written by a fetch (pack_cache.fetch),
                # which checks every file it names; this one no longer describes the pack.
                (out / MANIFEST).unlink(missing_ok=True)
            remote.write_bytes(MANIFEST, body)
        run_.log(records=manifest["records"], tokens=manifest["tokens"])
        return manifest
