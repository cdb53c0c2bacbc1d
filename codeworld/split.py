"""Held-out split by corpus id, decided once for every stage: a function of the id and a seed
only, so no training source ever contains a held-out program and evaluation needs no list."""

from __future__ import annotations

import hashlib


def heldout(corpus_id: str, percent: float, seed: int = 0) -> bool:
    if percent <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{corpus_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 < percent * 10_000


def corpus_id(record: dict) -> str:
    """The unit a record is held out by: a trace's corpus file (or repository module), an
    agent trajectory's task, else the record's own id (corpus and dedup records)."""
    prov = record.get("provenance")
    if isinstance(prov, dict):
        if prov.get("corpus_id"):
            return str(prov["corpus_id"])
        if prov.get("repo"):  # a repository trace: its package module is the unit
            return f"{prov['repo']}:{record.get('module', '')}"
    if record.get("task_id"):  # an agent trajectory: every policy's try at one task together
        return f"task:{record['task_id']}"
    return str(record.get("id", ""))
