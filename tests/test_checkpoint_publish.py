"""model/checkpoint.publish: the file-system half of a save (the rename, latest.json and the
pruning), apart from Megatron's writing of the shards."""

from __future__ import annotations

import json

from model.checkpoint import FILES, LATEST, damage, latest, publish


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


def test_each_checkpoint_lists_its_files_and_a_cut_or_lost_one_is_named(tmp_path):
    written(tmp_path, 10)
    (tmp_path / "iter_0000010.tmp" / "sub").mkdir()
    (tmp_path / "iter_0000010.tmp" / "sub" / "x.distcp").write_bytes(b"abc")
    final = publish(tmp_path, 10, keep=2)
    assert json.loads((final / FILES).read_text()) == {"shard": 2, "sub/x.distcp": 3}
    assert damage(final) is None
    (final / "sub" / "x.distcp").write_bytes(b"a")
    assert damage(final) == f"{final}/sub/x.distcp: 1 bytes, 3 when saved"
    (final / "sub" / "x.distcp").unlink()
    assert damage(final) == f"{final}/sub/x.distcp: missing"
    (final / FILES).unlink()           # saved before the lists were kept: not judged
    assert damage(final) is None
