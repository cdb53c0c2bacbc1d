import hashlib
import json
import os

import pytest

from codeworld.shards import Dataset, DatasetWriter, ShardError, decode_shard, encode_shard
from codeworld.storage import Storage

RECORDS = [{"id": f"r{i}", "text": f"def f{i}():\n    return {i}\n", "ünï": "çödé"} for i in range(25)]


def write(root, name="ds", fp="fp1", chunks=(10, 10, 5)):
    w = DatasetWriter(Storage(str(root)), name, fp)
    assert w.prepare() is None
    infos, start = [], 0
    for i, n in enumerate(chunks):
        infos.append(w.write(i, RECORDS[start:start + n], {"n": n}))
        start += n
    return w.finish(infos)


def test_roundtrip_and_manifest(tmp_path):
    m = write(tmp_path)
    assert m["records"] == 25 and len(m["shards"]) == 3
    ds = Dataset.open(str(tmp_path / "ds"))
    assert list(ds) == RECORDS and len(ds) == 25
    # no temp files or work area left behind
    assert sorted(os.listdir(tmp_path / "ds")) == ["manifest.json", "shard-00000.tar",
                                                   "shard-00001.tar", "shard-00002.tar"]
    assert not (tmp_path / ".work" / "ds").exists()


def test_shards_are_webdataset_tars_and_byte_identical(tmp_path):
    write(tmp_path / "a")
    write(tmp_path / "b")
    for name in ("shard-00000.tar", "manifest.json"):
        assert (tmp_path / "a/ds" / name).read_bytes() == (tmp_path / "b/ds" / name).read_bytes()
    import webdataset as wds
    samples = list(wds.WebDataset(str(tmp_path / "a/ds/shard-00001.tar"), shardshuffle=False))
    assert [json.loads(s["json"])["id"] for s in samples] == [f"r{i}" for i in range(10, 20)]


def test_corrupt_shard_is_named(tmp_path):
    write(tmp_path)
    shard = tmp_path / "ds" / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = Dataset.open(str(tmp_path / "ds"))
    assert ds.read_shard(ds.shards[0])  # the others still read
    with pytest.raises(ShardError, match=r"shard-00001.tar: checksum mismatch"):
        list(ds)


def test_missing_shard_and_missing_manifest(tmp_path):
    write(tmp_path)
    (tmp_path / "ds" / "shard-00002.tar").unlink()
    with pytest.raises(ShardError, match="shard-00002.tar: listed in the manifest but missing"):
        list(Dataset.open(str(tmp_path / "ds")))
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json: missing: the stage writing"):
        Dataset.open(str(tmp_path / "ds"))


def test_garbage_shard_with_matching_checksum_is_named(tmp_path):
    with pytest.raises(ShardError, match="x.tar: corrupt shard"):
        decode_shard(b"not a tar file at all" * 40, "x.tar")


def test_resume_reuses_finished_shards_and_drops_other_params(tmp_path):
    st = Storage(str(tmp_path))
    w = DatasetWriter(st, "ds", "fp1")
    w.prepare()
    w.write(0, RECORDS[:10], {"n": 10})
    # a "killed" run: shard 0 finished, shard 1 never written
    w2 = DatasetWriter(st, "ds", "fp1")
    assert w2.prepare() is None
    info, meta = w2.completed(0)
    assert meta == {"n": 10} and info.records == 10
    assert w2.completed(1) is None
    # a damaged finished shard is not reused
    (tmp_path / "ds" / "shard-00000.tar").write_bytes(b"junk")
    assert w2.completed(0) is None
    # other params: the earlier run's work is discarded
    w3 = DatasetWriter(st, "ds", "fp2")
    w3.prepare()
    assert w3.completed(0) is None


def test_damaged_resume_records_are_redone_not_fatal(tmp_path):
    """Resume records are written atomically; one damaged from outside (a truncated copy, a
    full disk elsewhere) must cost a redo, not fail every rerun."""
    st = Storage(str(tmp_path))
    w = DatasetWriter(st, "ds", "fp1")
    w.prepare()
    w.write(0, RECORDS[:10], {"n": 10})
    w.write(1, RECORDS[10:20], {"n": 10})
    work = w.work.root
    for bad in (b"{trunc", b"[]", b'{"fingerprint": "fp1"}', b'{"fingerprint": "fp1", "shard": 3}'):
        with open(os.path.join(work, "shard-00000.tar.json"), "wb") as f:
            f.write(bad)
        w2 = DatasetWriter(st, "ds", "fp1")
        assert w2.prepare() is None
        assert w2.completed(0) is None and w2.completed(1) is not None
    with open(os.path.join(work, "fingerprint"), "wb") as f:
        f.write(b"\xff\xfe")   # not even text: another run's work, discarded
    w3 = DatasetWriter(st, "ds", "fp1")
    assert w3.prepare() is None and w3.completed(1) is None


def test_finished_dataset_with_same_fingerprint_is_not_rebuilt(tmp_path):
    m = write(tmp_path)
    w = DatasetWriter(Storage(str(tmp_path)), "ds", "fp1")
    assert w.prepare() == m
    # a new fingerprint removes the manifest first: the dataset reads as unfinished
    DatasetWriter(Storage(str(tmp_path)), "ds", "fp2").prepare()
    with pytest.raises(ShardError, match="missing"):
        Dataset.open(str(tmp_path / "ds"))


def test_finish_removes_stale_shards(tmp_path):
    write(tmp_path, chunks=(10, 10, 5))
    m = write(tmp_path, fp="fp2", chunks=(25,))
    assert [s["name"] for s in m["shards"]] == ["shard-00000.tar"]
    assert sorted(os.listdir(tmp_path / "ds")) == ["manifest.json", "shard-00000.tar"]


def test_encode_is_deterministic():
    a, n = encode_shard(RECORDS, 3)
    b, _ = encode_shard(list(RECORDS), 3)
    assert n == 25 and hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def test_fingerprint_covers_params_inputs_and_code():
    from codeworld.code import Code
    from codeworld.shards import fingerprint
    code = Code(("stages.dedup",))
    base = fingerprint(code, "stage", {"a": 1}, "input-fp")
    assert base == fingerprint(code, "stage", {"a": 1}, "input-fp")
    assert base != fingerprint(code, "stage", {"a": 2}, "input-fp")
    assert base != fingerprint(Code(("stages.corpus",)), "stage", {"a": 1}, "input-fp")  # other code


def test_a_pin_of_another_roots_dataset_is_not_read_nor_taken_as_finished(tmp_path):
    """data/NAME holds shards of a local run; a run with storage.root elsewhere pins its own
    manifest there (for DVC). Reading data/NAME then says where the dataset is (its shards
    would fail their checksums), and a local run of the same params rebuilds it."""
    from codeworld.shards import pin_manifest

    write(tmp_path / "data", fp="fp1", chunks=(10, 10, 5))
    other = write(tmp_path / "elsewhere", fp="fp1", chunks=(5, 20))
    pin_manifest(Storage(str(tmp_path / "elsewhere")), "ds", other, local_root=str(tmp_path / "data"))
    with pytest.raises(ShardError, match=r"data/ds/manifest\.json: pins the dataset stored at "
                                         r"\S+/elsewhere/ds \(written by a run whose storage\.root"):
        Dataset.open(str(tmp_path / "data" / "ds"))
    assert list(Dataset.open(str(tmp_path / "elsewhere" / "ds"))) == RECORDS
    m = write(tmp_path / "data", fp="fp1", chunks=(25,))   # prepare() did not return the pin
    assert "location" not in m and list(Dataset.open(str(tmp_path / "data" / "ds"))) == RECORDS


def test_a_symlinked_root_is_the_same_place_not_a_pin_of_another(tmp_path):
    """data/ linked to a bigger disk, storage.root naming that disk: the dataset's manifest is
    data/ds/manifest.json itself, so no pin may overwrite it (it then read as a pin of
    another root, and the dataset as unreadable)."""
    from codeworld.shards import pin_manifest, pinned_elsewhere

    m = write(tmp_path / "disk", fp="fp1")
    os.symlink(tmp_path / "disk", tmp_path / "data")
    before = (tmp_path / "disk" / "ds" / "manifest.json").read_bytes()
    pin_manifest(Storage(str(tmp_path / "disk")), "ds", m, local_root=str(tmp_path / "data"))
    assert (tmp_path / "disk" / "ds" / "manifest.json").read_bytes() == before
    for path in ("data", "disk"):
        assert list(Dataset.open(str(tmp_path / path / "ds"))) == RECORDS
    pin = {**m, "location": str(tmp_path / "disk" / "ds")}
    assert pinned_elsewhere(pin, Storage(str(tmp_path / "data" / "ds"))) is None
    assert pinned_elsewhere(pin, Storage(str(tmp_path / "other" / "ds"))) == pin["location"]


def test_a_completion_record_without_meta_is_redone(tmp_path):
    w = DatasetWriter(Storage(str(tmp_path)), "ds", "fp1")
    w.prepare()
    info = w.write(0, RECORDS[:10], {"n": 10})
    side = os.path.join(w.work.root, "shard-00000.tar.json")
    with open(side, "w") as f:
        json.dump({"fingerprint": "fp1", "shard": {"name": info.name, "sha256": info.sha256,
                                                   "records": info.records, "bytes": info.bytes}}, f)
    assert w.completed(0) is None


@pytest.mark.parametrize("body, needle", [
    (b"[1, 2]\n", "a JSON list, expected an object"),
    (b'"x"\n', "a JSON str, expected an object"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_a_manifest_that_is_no_object_is_a_shard_error(tmp_path, body, needle):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_bytes(body)
    with pytest.raises(ShardError, match=needle) as err:
        Dataset.open(str(tmp_path / "ds"))
    assert "ds/manifest.json" in str(err.value)


def test_a_record_nested_too_deeply_is_a_corrupt_shard():
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"[" * 200_000
        member = tarfile.TarInfo("00000-0000000.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match="where.tar: corrupt shard: a record is nested too deeply"):
        decode_shard(buf.getvalue(), "where.tar")
