"""Training data: the pack stage's indexed datasets, blended by Megatron's
BlendedMegatronDatasetBuilder, loss masks applied, and split into micro-batches per
data-parallel rank.

Every rank reads its own micro-batches directly (TP and PP peers compute the same indices), so
no broadcast is needed; the position in the data is a function of the iteration only, so a
resumed run reads exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from codeworld.tokens import EOD_ID, PAD_ID

VALID_PERCENT = 2   # of each source's documents, for the validation loss


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


def build_datasets(pack_dir: Path, blend: dict[str, float], seq_length: int, seed: int,
                   train_samples: int, valid_samples: int, vocab_size: int, cache_dir: Path):
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = [], []
    for name, weight in sorted(blend.items()):
        prefix = pack_dir / name
        if not (prefix.with_suffix(".idx")).exists():
            raise FileNotFoundError(f"{prefix}.idx: pack source {name!r} of the blend is missing "
                                    "(run the pack stage)")
        docs = len(IndexedDataset(str(prefix)))
        if round(docs * VALID_PERCENT / 100) < 1:
            # Megatron would loop forever looking for tokens in an empty split.
            raise ValueError(f"{prefix}: pack source {name!r} has {docs} documents; its "
                             f"{VALID_PERCENT}% validation split needs at least one "
                             f"(>= {math.ceil(50 / VALID_PERCENT)} documents)")
        prefixes.append(str(prefix))
        weights.append(weight)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights),
        split=f"{100 - VALID_PERCENT},{VALID_PERCENT},0", path_to_cache=str(cache_dir), tokenizer=CodeworldTokenizer(vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        _masked_dataset_class(), [train_samples, valid_samples, 0], lambda: True, config).build()
    return train, valid


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
