"""model/checkpoint.publish: the file-system half of a save (the rename, latest.json and the
pruning), apart from Megatron's writing of the shards."""

from __future__ import annotations

import json

from model.checkpoint import LATEST, latest, publish


def written(root, iteration):   # what every rank's dist_checkpointing.save leaves
    tmp = root / f"iter_{iteration:07d}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "shard").write_text(str(iteration))


def test_publish_renames_names_latest_and_keeps_the_newest(tmp_path):
    for it in (10, 20, 30):
        written(tmp_path, it)
        publish(tmp_path, it, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000020", "iter_0000030", LATEST]
    assert latest(tmp_path) == (30, tmp_path / "iter_0000030")
    assert (tmp_path / "iter_0000030" / "shard").read_text() == "30"


def test_a_save_killed_at_another_iteration_neither_counts_nor_stays(tmp_path):
    for it in (10, 20):
        written(tmp_path, it)
        publish(tmp_path, it, keep=2)
    written(tmp_path, 25)   # killed while saving the final step of a 25-step run
    # rerun with 30 steps: resumes from 20, saves 30; iteration 25 is never saved again
    written(tmp_path, 30)
    publish(tmp_path, 30, keep=2)
    # the two newest complete checkpoints, not one of them and the half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000020", "iter_0000030", LATEST]
    assert json.loads((tmp_path / LATEST).read_text()) == {"iteration": 30, "dir": "iter_0000030"}
