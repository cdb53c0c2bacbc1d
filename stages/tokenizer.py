"""Stage `tokenizer`: byte-level BPE (HF `tokenizers`) on the deduped corpus and the traces.

Every byte is in the base alphabet, so any text round-trips; CWM's trace tokens, the agent's
tool markers, the turn markers and end-of-text are single special tokens with fixed ids
(codeworld/tokens.py). Held-out corpus ids (pack.heldout_percent) are never seen. The output is
`tokenizer/tokenizer.json` plus a manifest with its sha256 and the fingerprint of what made it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterator

from codeworld.code import Code
from codeworld.config import Params
from codeworld.shards import Dataset, dumps, fingerprint
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage
from codeworld.tokens import EOD_ID, PAD_ID, SPECIAL_TOKENS, Plain
from codeworld.tracking import StageRun
from stages.documents import DocumentError, Segment, object_records, render

CODE = Code(("stages.tokenizer",))

OUTPUT = "tokenizer"
FILE = "tokenizer.json"
MANIFEST = "manifest.json"


def output_fingerprint(params: Params, inputs: dict[str, Dataset]) -> str:
    sources = {n: params.pack.sources[n].model_dump() for n in params.tokenizer.sources}
    return fingerprint(CODE, "tokenizer", 1, params.tokenizer.model_dump(), sources,
                       params.pack.heldout_percent, params.pack.seed, SPECIAL_TOKENS,
                       {n: d.manifest["fingerprint"] for n, d in inputs.items()})


_MARKUP = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def training_pieces(segments: list[Segment]) -> list[str]:
    """A document's text as the BPE trainer must see it: cut at its markup. Encoding splits a
    special token out before anything else, so no other token ever spans one; the trainer does
    not split them itself, and learnt merges such as '"}<|' out of the traces' markup, tokens
    no encoding uses. Plain text is whole: a token's text there is text (codeworld/tokens)."""
    out: list[str] = []
    for text, _ in segments:
        for part in (text,) if isinstance(text, str) else text:
            out += [part] if isinstance(part, Plain) else _MARKUP.split(part)
    return [p for p in out if p]


def training_texts(params: Params, inputs: dict[str, Dataset], counts: dict) -> Iterator[str]:
    """Documents of each source in order (each cut at its markup, training_pieces), held-out
    ids skipped; max_chars is shared equally between the sources, so a large code corpus does
    not crowd out the traces' vocabulary."""
    share = params.tokenizer.max_chars / len(inputs) if params.tokenizer.max_chars else float("inf")
    for name, ds in inputs.items():
        src = params.pack.sources[name]
        budget = share
        for record in object_records(ds, counts, "broken"):
            if heldout(corpus_id(record), params.pack.heldout_percent, params.pack.seed):
                counts["heldout"] += 1
                continue
            try:
                pieces = training_pieces(render(record, src.format))
            except DocumentError:
                counts["broken"] += 1
                continue
            if budget < 1:
                break
            counts["documents"] += 1
            for text in pieces:
                text = text[: int(min(len(text), budget))]
                if not text:
                    break
                budget -= len(text)
                counts["chars"] += len(text)
                yield text


def train(params: Params, texts: Iterator[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.tokenizer.vocab_size, min_frequency=params.tokenizer.min_frequency,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    return tok


def run(params: Params, *, track: bool = True, metrics_path: str | None = "metrics/tokenizer.json") -> dict:
    storage = Storage(params.storage.root, params.storage.s3_endpoint_url)
    inputs = {n: Dataset(storage.sub(params.pack.sources[n].dataset)) for n in params.tokenizer.sources}
    fp = output_fingerprint(params, inputs)
    out = storage.sub(OUTPUT)
    with StageRun("tokenizer", params.model_dump(include={"storage", "tokenizer", "pack"}),
                  params.tracking.experiment, metrics_path, track) as run_:
        if out.exists(MANIFEST):
            manifest = json.loads(out.read_bytes(MANIFEST))
            if manifest.get("fingerprint") == fp and out.exists(FILE) and hashlib.sha256(
                    out.read_bytes(FILE)).hexdigest() == manifest["sha256"]:
                run_.log(**manifest["stats"], reused=1)
                return manifest
        counts = {"documents": 0, "chars": 0, "heldout": 0, "broken": 0}
        with run_.timed("train"):
            tok = train(params, training_texts(params, inputs, counts))
        # Canonical JSON (sorted keys): the same params and data give the same bytes.
        body = dumps(json.loads(tok.to_str())) + b"\n"
        stats = {**counts, "vocab_size": tok.get_vocab_size(), "special_tokens": len(SPECIAL_TOKENS)}
        manifest = {"name": OUTPUT, "fingerprint": fp, "file": FILE,
                    "sha256": hashlib.sha256(body).hexdigest(), "records": stats["vocab_size"],
                    "eod_id": EOD_ID, "pad_id": PAD_ID, "stats": stats}
        out.write_bytes(FILE, body)
        out.write_bytes(MANIFEST, dumps(manifest) + b"\n")
        run_.log(**stats)
        return manifest


def recorded_sha256(storage: Storage) -> str:
    """The sha256 of the storage root's tokenizer.json as its manifest records it (which
    ``load`` checks the file against): what a training phase records it trained with."""
    out = storage.sub(OUTPUT)
    try:
        return json.loads(out.read_bytes(MANIFEST))["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{out.path(MANIFEST)}: not a tokenizer manifest ({err!r})") from None


def load(storage: Storage, sha256: str | None = None):
    """The trained tokenizer, verified against its manifest, or against `sha256` when given:
    what the caller read with recorded_sha256 and recorded (one read for both, so the
    tokenizer it uses is the one it named)."""
    from tokenizers import Tokenizer

    out = storage.sub(OUTPUT)
    want = recorded_sha256(storage) if sha256 is None else sha256
    body = out.read_bytes(FILE)
    if hashlib.sha256(body).hexdigest() != want:
        what = "its manifest" if sha256 is None else f"the recorded {sha256[:12]}"
        raise ValueError(f"{out.path(FILE)}: sha256 differs from {what} (corrupt, edited or "
                         f"retrained since)")
    return Tokenizer.from_str(body.decode())
