"""Training data: the pack stage's indexed datasets, split into train and validation documents
and blended as Megatron's BlendedMegatronDatasetBuilder does (a source too small for a
validation split trains whole and is left out of the validation blend), loss masks applied,
and split into micro-batches per data-parallel rank.

Every rank reads its own micro-batches directly (TP and PP peers compute the same indices), so
no broadcast is needed; the position in the data is a function of the iteration only, so a
resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from codeworld.tokens import EOD_ID, PAD_ID

VALID_PERCENT = 2   # of each source's documents, for the validation loss
# What a phase's blend weights share out (PhaseConfig.blend_unit): the loss tokens (answer
# tokens of SFT) or Megatron's samples (seq_length tokens each, whatever their loss mask).
BLEND_UNITS = ("loss_tokens", "samples")


class CodeworldTokenizer:
    """What Megatron's GPT datasets need of a tokenizer (ids of end-of-text and padding)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = EOD_ID
        self.pad = PAD_ID
        # Megatron hashes these into the names of its cached sample indices.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size,
                                   "eod": EOD_ID, "pad": PAD_ID}

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": EOD_ID, "pad_token": PAD_ID}


def _masked_dataset_class():
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class MaskedGPTDataset(GPTDataset):
        """A GPTDataset whose loss mask also honours the pack stage's `<prefix>_mask` dataset
        (1 = the token is a label in the loss), sampled with exactly the same indices."""

        def __init__(self, indexed_dataset, dataset_path, *args, **kwargs):
            super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
            # GPTDataset caches the first sample's loss mask, then zeroes that sample's PAD
            # labels in the cached tensor itself (megatron-core 0.16): every later sample lost
            # its loss at the positions where the first one was padded (SFT windows: answer
            # tokens). Masks computed per sample (a vector of ones) are never shared.
            self.masks_and_position_ids_are_cacheable = False
            mask_prefix = f"{dataset_path}_mask"
            self.mask_dataset = (IndexedDataset(mask_prefix)
                                 if os.path.exists(mask_prefix + ".idx") else None)

        @contextmanager
        def _reading(self, ds):
            saved, self.dataset = self.dataset, ds
            try:
                yield
            finally:
                self.dataset = saved

        def __getitem__(self, idx):
            sample = super().__getitem__(idx)
            if self.mask_dataset is not None and idx is not None:
                with self._reading(self.mask_dataset):
                    flags, _ = self._query_document_sample_shuffle_indices(idx)
                # labels are tokens shifted by one: a label's flag is the next token's
                keep = torch.from_numpy(np.asarray(flags[1:] == 1, dtype=np.float32))
                sample["loss_mask"] = sample["loss_mask"] * keep[: sample["loss_mask"].numel()]
            return sample

    return MaskedGPTDataset


def split_documents(documents: int) -> tuple[int, int]:
    """(train, valid) documents of a source, cut as Megatron cuts a "98,2,0" split: the first
    98% train, the rest validate (rounded as its split matrix rounds)."""
    train = int(round((100 - VALID_PERCENT) / 100 * documents))
    return train, documents - train


def plan_validation(documents: dict[str, int]) -> tuple[list[str], list[str]]:
    """(validated, train_only) sources of a blend, by their document counts. A source too
    small for one validation document trains on all of its documents and is left out of the
    validation blend (Megatron would loop forever on an empty split); a blend of such sources
    only has no validation loss to give, which is an error."""
    validated = [n for n in sorted(documents) if split_documents(documents[n])[1] >= 1]
    train_only = [n for n in sorted(documents) if n not in validated]
    if not validated:
        sizes = ", ".join(f"{n}: {documents[n]} documents" for n in train_only)
        raise ValueError(f"no source of the blend ({sizes}) can give a validation split: its "
                         f"{VALID_PERCENT}% needs at least {math.ceil(50 / VALID_PERCENT)} "
                         f"documents; add a larger source to the blend")
    return validated, train_only


def loss_density(name: str, meta: dict) -> float:
    """Loss tokens per token the pack stored for source `name` (its manifest entry `meta`),
    window padding counted: a sample of seq_length tokens carries this many per token. 1 for
    sources whose every token is a label (code, traces), far less for SFT's windows."""
    try:
        stored = meta["tokens"] + meta.get("pad_tokens", 0)
        loss = meta["loss_tokens"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"pack source {name!r}: its manifest entry has no {err} count (repack "
                         "it with the pack stage)") from None
    if not stored:
        raise ValueError(f"pack source {name!r}: its manifest entry counts no tokens")
    return loss / stored


def sample_weights(blend: dict[str, float], sources: dict[str, dict],
                   unit: str = "loss_tokens") -> dict[str, float]:
    """The per-sample weights Megatron's blend is given for `blend` in `unit` (BLEND_UNITS),
    from the pack manifest's `sources`. Megatron draws samples in proportion to its weights;
    for the weights to share out loss tokens, each is divided by its source's loss tokens per
    sample (loss_density: every sample has seq_length tokens). Scaled by the densest source's
    density, a source as dense as it keeps its weight bit for bit: a blend whose sources all
    have the same density (pretrain's) gives Megatron exactly the weights it gave before."""
    if unit not in BLEND_UNITS:
        raise ValueError(f"blend_unit {unit!r} is not one of {', '.join(BLEND_UNITS)}")
    if unit == "samples":
        return dict(blend)
    missing = sorted(set(blend) - set(sources))
    if missing:
        raise ValueError(f"blend source(s) {', '.join(missing)} not in the pack manifest (run "
                         "the pack stage)")
    density = {n: loss_density(n, sources[n]) for n in blend}
    empty = sorted(n for n, d in density.items() if d == 0)
    if empty:
        raise ValueError(f"pack source(s) {', '.join(empty)} carry no loss tokens: a blend in "
                         "loss_tokens (blend_unit) can give them no share of the loss; drop "
                         "them from the blend or set blend_unit: samples")
    top = max(density.values())
    return {n: w if density[n] == top else w * (top / density[n]) for n, w in blend.items()}


def loss_token_shares(weights: dict[str, float], sources: dict[str, dict]) -> dict[str, float]:
    """Each source's expected share of the loss tokens when Megatron draws samples by the
    per-sample `weights` (sample_weights), from the pack manifest's `sources`."""
    mass = {n: w * loss_density(n, sources[n]) for n, w in weights.items()}
    total = sum(mass.values())
    return {n: m / total for n, m in mass.items()}


class IndexCacheError(RuntimeError):
    """Megatron's data indices could not be built into or read from their cache folder."""


@contextmanager
def _one_process_group():
    """A process group of this process alone while Megatron builds indices: its builder asks
    for the rank (BlendedDataset even with no group) and writes the cache on rank 0 only."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise IndexCacheError("the data indices must be built before the training's process "
                                  "group exists (Megatron writes them on global rank 0 only, "
                                  "which another node's ranks cannot read)")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cache_complete(cache_dir: Path, record: Path) -> bool:
    """Whether `record` lists index files that are all in `cache_dir` at their sizes."""
    try:
        files = json.loads(record.read_bytes())["files"]
        return all((cache_dir / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_index_cache(cache_dir: Path, key: str, make) -> None:
    """Make this node's `cache_dir` hold the indices that `make(path_to_cache)` (Megatron's
    dataset constructors) reads, building them here if it does not.

    Megatron builds its sample and shuffle indices on global rank 0 alone and the other ranks
    read them from the cache after a barrier, which fails on a node whose cache is a disk of
    its own (an S3 storage root's storage.local_cache). So every node builds them before the
    process group exists, with the same seed and code: the same files on every node. The
    first local rank builds under a lock while the others wait, into a private folder whose
    files are renamed into place, then `<key>.json` lists them: a killed build, or builders
    of several nodes sharing one folder, leave no partial file a reader would take."""
    record = cache_dir / f"{key}.json"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / ".build.lock", "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)   # released when the file closes
            except OSError as err:
                # a shared file system without flock (Lustre mounted noflock): ranks may then
                # build at once, each into its own folder, the same files: only work is lost
                if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            if _cache_complete(cache_dir, record):
                return
            staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
            try:
                with _one_process_group():
                    make(staging)
                names = sorted(os.listdir(staging))
                if not names:
                    raise IndexCacheError(f"{cache_dir}: Megatron wrote no index files")
                for name in names:
                    os.replace(staging / name, cache_dir / name)
                files = {n: (cache_dir / n).stat().st_size for n in names}
                (staging / record.name).write_text(json.dumps({"files": files}, indent=1,
                                                              sort_keys=True))
                os.replace(staging / record.name, record)   # last: the files are all in place
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Exception as err:
        # Megatron's builder turns a failed write into a bare Exception (its cause the OSError)
        cause = err if isinstance(err, OSError) else err.__cause__
        if not isinstance(cause, OSError):
            raise
        raise IndexCacheError(f"{cache_dir}: cannot build Megatron's data indices there "
                              f"({type(cause).__name__}: {cause}); the folder must be writable "
                              "on every node (storage.local_cache with an S3 root)") from err


def _index_key(configs, **inputs) -> str:
    """What the indices of build_datasets depend on, hashed: its inputs, the Megatron configs
    (but the cache folder) and Megatron's version."""
    import dataclasses

    import megatron.core

    def fields(cfg) -> dict:
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name != "path_to_cache"}

    def identify(obj):   # the tokenizer, as Megatron names it in its own cache keys
        ids = getattr(obj, "unique_identifiers", None)
        if ids is None:
            raise TypeError(f"no cache key for {type(obj).__name__}")
        return ids

    text = json.dumps({"megatron_core": megatron.core.__version__,
                       "configs": [fields(c) for c in configs], **inputs},
                      sort_keys=True, default=identify)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_datasets(pack_dir: Path, blend: dict[str, float], seq_length: int, seed: int,
                   train_samples: int, valid_samples: int, vocab_size: int, cache_dir: Path,
                   blend_unit: str = "loss_tokens"):
    """(train, valid): Megatron BlendedDatasets over the blend's sources, its weights in
    `blend_unit` (sample_weights, with the counts of the pack's manifest.json), each
    source cut into train and valid documents as BlendedMegatronDatasetBuilder would cut it
    with split "98,2,0", except that a source too small to validate (plan_validation) trains on
    all its documents and is not in the valid blend. Weights are renormalised over the
    validated sources for the valid blend. Their indices are built into `cache_dir` on this
    node if they are not there yet (ensure_index_cache): call it before the process group."""
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split, normalize

    if blend_unit != "samples":
        manifest = pack_dir / "manifest.json"
        try:
            blend = sample_weights(blend, json.loads(manifest.read_text())["sources"], blend_unit)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{manifest}: the blend's weights in {blend_unit} need each "
                             f"source's loss tokens from it: {err}") from None
    prefixes, documents = {}, {}
    for name in sorted(blend):
        prefix = pack_dir / name
        if not (prefix.with_suffix(".idx")).exists():
            raise FileNotFoundError(f"{prefix}.idx: pack source {name!r} of the blend is missing "
                                    "(run the pack stage)")
        prefixes[name] = str(prefix)
        documents[name] = len(IndexedDataset(str(prefix)))
    try:
        validated, train_only = plan_validation(documents)
    except ValueError as err:
        raise ValueError(f"{pack_dir}: {err}") from None

    def config(split: str, path_to_cache: Path) -> GPTDatasetConfig:
        # The split string is part of Megatron's cache key: a train-only source gets its own.
        return GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length,
            blend=(list(prefixes.values()), [blend[n] for n in prefixes]), split=split,
            path_to_cache=str(path_to_cache), tokenizer=CodeworldTokenizer(vocab_size),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, mmap_bin_files=True)

    cls = _masked_dataset_class()
    # Each process builds what it is given: ensure_index_cache has made the cache already
    # (no barrier: no rank waits for another's files).
    build = BlendedMegatronDatasetBuilder.build_generic_dataset

    def make(path_to_cache: Path):
        split_cfg = config(f"{100 - VALID_PERCENT},{VALID_PERCENT},0", path_to_cache)
        whole_cfg = config("100,0,0", path_to_cache)

        def source(name: str, split, size: int):
            cfg = split_cfg if name in validated else whole_cfg
            low = cls.build_low_level_dataset(prefixes[name], cfg)
            begin, end = (round(f * documents[name]) for f in cfg.split_matrix[split.value])
            return build(cls, lambda: True, False, low, prefixes[name],
                         np.arange(begin, end, dtype=np.int32), size, split, cfg)

        def blended(split, names: list[str], samples: int):
            weights = normalize([blend[n] for n in names])
            # as the builder sizes a blend: each source's share, built with Megatron's surplus
            targets = [math.ceil(samples * w) for w in weights]
            parts = [source(n, split, math.ceil(t * (1 + split_cfg.mid_level_dataset_surplus)))
                     for n, t in zip(names, targets)]
            return build(BlendedDataset, lambda: True, False, parts, weights, sum(targets),
                         split_cfg)

        return (blended(Split.train, list(prefixes), train_samples),
                blended(Split.valid, validated, valid_samples))

    key = _index_key([config(s, cache_dir) for s in (f"{100 - VALID_PERCENT},{VALID_PERCENT},0",
                                                       "100,0,0")],
                     prefixes=prefixes, documents=documents, validated=validated,
                     train_samples=train_samples, valid_samples=valid_samples)
    ensure_index_cache(cache_dir, key, make)
    return make(cache_dir)


def drawn_loss_tokens(train, samples: int) -> dict[str, tuple[int, int]]:
    """(samples, loss tokens) per source in the first `samples` samples of a blend that
    build_datasets made: what training on them reads, each sample's loss mask as the loss
    sees it. Reads every sample: for measuring a blend (bench/blend_shares.py, tests)."""
    names = [Path(d.dataset_path).name for d in train.datasets]
    drawn, loss = [0] * len(names), [0] * len(names)
    for i in range(samples):
        k = int(train.dataset_index[i])
        drawn[k] += 1
        loss[k] += int(train[i]["loss_mask"].sum())
    return {n: (drawn[k], loss[k]) for k, n in enumerate(names)}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask",
                                                              "position_ids")}


class MicroBatches:
    """The micro-batches of one data-parallel rank for one global batch after another."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 start_iteration: int = 0):
        self.dataset, self.gbs, self.mbs = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.iteration = start_iteration

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.mbs

    def next_global_batch(self):
        """An iterator over this rank's micro-batches of the next global batch."""
        base = self.iteration * self.gbs + self.dp_rank * self.per_rank
        self.iteration += 1
        n = len(self.dataset)
        for m in range(self.num_microbatches):
            start = base + m * self.mbs
            yield collate([self.dataset[(start + i) % n] for i in range(self.mbs)])
