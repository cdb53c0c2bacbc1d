"""Seeds derived from a configured seed and a name: the same name gives the same seed on every
rank, layout and run, and other names give unrelated ones."""

from __future__ import annotations

import hashlib


def seed_of(seed: int, *names) -> int:
    """A 60-bit seed for `names` under `seed` (room below 2**63 for Megatron's offsets)."""
    key = "\0".join(str(part) for part in (seed, *names))
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
