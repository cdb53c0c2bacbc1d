"""Storage, shards and the corpus/dedup stages against a real moto S3 server (over HTTP on
loopback, not mocked clients). The endpoint is always handed to the code under test explicitly
(Storage(endpoint_url=...) / params storage.s3_endpoint_url); only credentials are in the env."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from codeworld.config import CorpusConfig, Params, StorageConfig, load_params
from codeworld.shards import Dataset, DatasetWriter, ShardError, fingerprint
from codeworld.storage import Storage
from stages import corpus, dedup
from tests.helpers import make_tree, write_params

STDLIB = Path(sysconfig.get_paths()["stdlib"])
BIN = Path(sys.executable).parent
RECORDS = [{"id": f"r{i}", "text": f"def f{i}():\n    return {i}  # ünï\n"} for i in range(12)]


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    name = bucket[len("s3://"):]
    out, token = [], None
    while True:
        kw = {"Bucket": name, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        resp = client.list_objects_v2(**kw)
        out += [o["Key"] for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            return sorted(out)
        token = resp["NextContinuationToken"]


def get(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket[len("s3://"):], Key=key)["Body"].read()


def put(client, bucket: str, key: str, data: bytes) -> None:
    client.put_object(Bucket=bucket[len("s3://"):], Key=key, Body=data)


def write_dataset(storage: Storage, name: str = "ds", chunks=(5, 5, 2)) -> dict:
    w = DatasetWriter(storage, name, fingerprint(corpus.CODE, "test", name))
    assert w.prepare() is None
    infos, start = [], 0
    for i, n in enumerate(chunks):
        infos.append(w.write(i, RECORDS[start:start + n]))
        start += n
    return w.finish(infos)


# --- Storage -----------------------------------------------------------------------------------

def test_storage_write_read_list_remove(s3_endpoint, s3_bucket, s3_client):
    st = Storage(f"{s3_bucket}/pre", s3_endpoint)
    assert st.is_s3
    assert st.list() == [] and st.list("nothing") == []
    assert not st.exists("a/x.bin")
    st.write_bytes("a/x.bin", b"\x00hello")
    st.write_bytes("a/y.txt", "ünï".encode())
    st.write_bytes("top.json", b"{}")
    # really on the server, under the prefix, byte for byte
    assert keys(s3_client, s3_bucket) == ["pre/a/x.bin", "pre/a/y.txt", "pre/top.json"]
    assert get(s3_client, s3_bucket, "pre/a/x.bin") == b"\x00hello"
    assert st.exists("a/x.bin")
    assert st.read_bytes("a/y.txt") == "ünï".encode()
    assert st.sub("a").read_bytes("x.bin") == b"\x00hello"
    assert st.list() == ["a", "top.json"]
    assert st.list("a") == ["x.bin", "y.txt"]
    st.write_bytes("a/x.bin", b"new")  # overwrite
    assert st.read_bytes("a/x.bin") == b"new"
    with pytest.raises(FileNotFoundError):
        st.read_bytes("a/missing.bin")
    st.remove("a/x.bin")
    assert not st.exists("a/x.bin") and st.list("a") == ["y.txt"]
    st.remove("a")  # recursive
    st.remove("never-there")  # no error
    assert keys(s3_client, s3_bucket) == ["pre/top.json"]
    assert st.list() == ["top.json"]


def test_storage_sees_what_other_writers_did_after_a_listing(s3_endpoint, s3_bucket, s3_client):
    """Objects written or deleted by another process (a stage's worker, another node: here
    boto3) after this process listed their folder are seen at once. s3fs kept every listing
    for the life of the process (and fsspec keeps one instance per endpoint): after a list(),
    a new object was missing (exists False, read FileNotFoundError) and a deleted one listed."""
    st = Storage(f"{s3_bucket}/pre", s3_endpoint)
    st.write_bytes("ds/a.json", b"1")
    assert st.list("ds") == ["a.json"]
    put(s3_client, s3_bucket, "pre/ds/b.json", b"2")
    s3_client.delete_object(Bucket=s3_bucket[len("s3://"):], Key="pre/ds/a.json")
    assert st.list("ds") == ["b.json"]
    assert st.exists("ds/b.json") and not st.exists("ds/a.json")
    assert st.read_bytes("ds/b.json") == b"2"


# --- Shards ------------------------------------------------------------------------------------

def test_dataset_roundtrip_on_s3(s3_endpoint, s3_bucket, s3_client):
    root = Storage(f"{s3_bucket}/prefix", s3_endpoint)
    m = write_dataset(root)
    assert m["records"] == 12 and [s["records"] for s in m["shards"]] == [5, 5, 2]
    # shards + manifest, and the resume work area is gone
    assert keys(s3_client, s3_bucket) == ["prefix/ds/manifest.json", "prefix/ds/shard-00000.tar",
                                          "prefix/ds/shard-00001.tar", "prefix/ds/shard-00002.tar"]
    for s in m["shards"]:
        assert hashlib.sha256(get(s3_client, s3_bucket, f"prefix/ds/{s['name']}")).hexdigest() == s["sha256"]
    ds = Dataset.open(f"{s3_bucket}/prefix/ds", s3_endpoint)
    assert len(ds) == 12 and list(ds) == RECORDS
    # a finished dataset with the same fingerprint is reused as is
    again = DatasetWriter(root, "ds", fingerprint(corpus.CODE, "test", "ds"))
    assert again.prepare() == m


def test_corrupt_and_missing_shard_on_s3_are_named(s3_endpoint, s3_bucket, s3_client):
    write_dataset(Storage(f"{s3_bucket}/p", s3_endpoint))
    data = bytearray(get(s3_client, s3_bucket, "p/ds/shard-00001.tar"))
    data[600] ^= 0xFF  # inside the first member's payload
    put(s3_client, s3_bucket, "p/ds/shard-00001.tar", bytes(data))
    ds = Dataset.open(f"{s3_bucket}/p/ds", s3_endpoint)
    assert ds.read_shard(ds.shards[0]) == RECORDS[:5]  # the others still read
    with pytest.raises(ShardError, match=rf"{s3_bucket}/p/ds/shard-00001\.tar: checksum mismatch"):
        list(ds)
    s3_client.delete_object(Bucket=s3_bucket[5:], Key="p/ds/shard-00002.tar")
    with pytest.raises(ShardError, match=r"shard-00002\.tar: listed in the manifest but missing"):
        ds.read_shard(ds.shards[2])
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        Dataset.open(f"{s3_bucket}/p/other", s3_endpoint)


def test_failed_write_leaves_no_partial_object(s3_endpoint, s3_bucket, s3_client):
    root = Storage(f"{s3_bucket}/p", s3_endpoint)
    fp = fingerprint(corpus.CODE, "partial")
    w = DatasetWriter(root, "ds", fp)
    assert w.prepare() is None
    w.write(0, RECORDS[:5])

    def dies_mid_shard():
        yield from RECORDS[5:8]
        raise RuntimeError("source died mid-shard")

    with pytest.raises(RuntimeError, match="mid-shard"):
        w.write(1, dies_mid_shard())
    listed = keys(s3_client, s3_bucket)
    # shard 0 and its completion record; nothing of shard 1, no manifest
    assert "p/ds/shard-00000.tar" in listed and "p/.work/ds/shard-00000.tar.json" in listed
    assert not [k for k in listed if "shard-00001" in k], listed
    assert "p/ds/manifest.json" not in listed
    with pytest.raises(ShardError, match="missing"):
        Dataset(root.sub("ds"))  # unfinished: not readable as a dataset
    # A new run with the same fingerprint resumes: shard 0 is reused, shard 1 is redone.
    w2 = DatasetWriter(root, "ds", fp)
    assert w2.prepare() is None
    assert w2.completed(0) is not None and w2.completed(1) is None
    info0, _ = w2.completed(0)
    m = w2.finish([info0, w2.write(1, RECORDS[5:12])])
    assert m["records"] == 12 and list(Dataset(root.sub("ds"))) == RECORDS
    assert not [k for k in keys(s3_client, s3_bucket) if "/.work/" in k]


def test_write_file_atomic_takes_a_local_path_or_an_s3_url(s3_endpoint, s3_bucket, s3_client,
                                                          tmp_path):
    """storage.write_file_atomic: a Path or str to a local file (its folder made, no temp file
    left), an s3:// URL to the object; a path it cannot write is a StorageError naming it."""
    from codeworld.storage import StorageError, write_file_atomic

    local = tmp_path / "new" / "folder" / "a.json"
    write_file_atomic(local, b"one")
    write_file_atomic(str(local), b"two")
    assert local.read_bytes() == b"two" and os.listdir(local.parent) == ["a.json"]
    write_file_atomic(f"{s3_bucket}/p/a.json", b"three", s3_endpoint)
    bucket = s3_bucket[len("s3://"):]
    assert s3_client.get_object(Bucket=bucket, Key="p/a.json")["Body"].read() == b"three"
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=f"{tmp_path / 'file' / 'b.json'}: cannot write"):
        write_file_atomic(tmp_path / "file" / "b.json", b"x")   # a file where a folder belongs


def test_killed_upload_leaves_no_object(s3_endpoint, s3_bucket, s3_client):
    """A writer killed (SIGKILL) in the middle of a large, multipart upload: the key never
    becomes visible, to Storage or to a plain S3 client."""
    bucket = s3_bucket[len("s3://"):]
    script = ("import sys\nfrom codeworld.storage import Storage\n"
              "Storage(sys.argv[1], sys.argv[2]).write_bytes('big.bin', b'x' * (120 * 2**20))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, f"{s3_bucket}/p", s3_endpoint])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ups = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if any(u["Key"] == "p/big.bin" for u in ups):
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.skip(f"the upload finished (exit {proc.returncode}) before it could be killed")
        proc.kill()
        proc.wait(30)
        with pytest.raises(ClientError):
            s3_client.head_object(Bucket=bucket, Key="p/big.bin")
        st = Storage(f"{s3_bucket}/p", s3_endpoint)
        assert not st.exists("big.bin") and st.list() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for u in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            s3_client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])


# --- Stages ------------------------------------------------------------------------------------

def stage_params(tmp_path: Path, name: str, root: str, src: Path, **over) -> Params:
    return load_params(write_params(tmp_path / f"{name}.yaml", root,
                                    [{"kind": "dir", "path": str(src), "name": "t"}], **over))


def test_corpus_and_dedup_stages_on_s3(s3_endpoint, s3_bucket, s3_client, tmp_path, monkeypatch):
    """The stages with storage.root on S3 give exactly what they give on a local disk (same
    shard bytes, same stats), write nothing locally, and leave no work area behind."""
    src = make_tree(tmp_path)
    # The reference run on disk in-process (workers do not enter fingerprints or results); the
    # S3 run with worker processes that read and write S3 themselves.
    local = stage_params(tmp_path, "local", str(tmp_path / "local"), src, corpus={"shard_files": 15})
    remote = stage_params(tmp_path, "s3", f"{s3_bucket}/run/", src, corpus={"shard_files": 15, "workers": 2},
                          dedup={"workers": 2}, storage={"s3_endpoint_url": s3_endpoint})
    want_corpus = corpus.run(local, track=False, metrics_path=None)
    want_dedup = dedup.run(local, track=False, metrics_path=None)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may be written locally

    m = corpus.run(remote, track=False, metrics_path=None)
    py = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    counts = m["stats"]["counts"]
    assert counts["candidates"] == len(py) and counts["kept"] == len(py) - 3
    assert (counts["skipped_non_utf8"], counts["skipped_binary"], counts["skipped_too_large"]) == (1, 1, 1)
    assert m["records"] == len(py) - 3 and len(m["shards"]) == -(-len(py) // 15)
    assert m == want_corpus  # same fingerprint, shard sha256s, records and stats as on disk
    corpus_keys = [k for k in keys(s3_client, s3_bucket) if k.startswith("run/corpus/")]
    assert corpus_keys == ["run/corpus/manifest.json"] + [f"run/corpus/{s['name']}" for s in m["shards"]]
    for s in m["shards"]:
        assert hashlib.sha256(get(s3_client, s3_bucket, f"run/corpus/{s['name']}")).hexdigest() == s["sha256"]
    assert not [k for k in keys(s3_client, s3_bucket) if k.startswith("run/.work/")]
    recs = list(Dataset.open(f"{s3_bucket}/run/corpus", s3_endpoint))
    by_path = {r["path"]: r for r in recs}
    assert sorted(by_path) == sorted(set(py) - {"bad/latin1.py", "bad/blob.py", "bad/huge.py"})
    raw = (src / "json" / "scanner.py").read_bytes()
    assert by_path["json/scanner.py"]["text"].encode() == raw
    assert by_path["json/scanner.py"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert by_path["json/scanner.py"]["id"] == "t/json/scanner.py"
    assert by_path["json/scanner.py"]["license"] == "MIT"

    # Same params and inputs again: the finished dataset is reused, no object rewritten.
    def stamps() -> dict:
        return {k: (h["ETag"], h["LastModified"]) for k in corpus_keys
                for h in [s3_client.head_object(Bucket=s3_bucket[5:], Key=k)]}

    before = stamps()
    assert corpus.run(remote, track=False, metrics_path=None) == m
    assert stamps() == before

    d = dedup.run(remote, track=False, metrics_path=None)
    assert d == want_dedup
    st = d["stats"]
    assert st["documents"] == len(recs) == st["kept"] + st["removed_exact"] + st["removed_near"]
    assert st["removed_exact"] >= 3 and st["removed_near"] >= 1  # the copies/ files, empty __init__s
    report = json.loads(get(s3_client, s3_bucket, "run/dedup/report.json"))
    removed = {r["id"]: r["step"] for r in report["removed"]}
    assert removed["t/json/decoder.py"] == "exact" and removed["t/json/encoder.py"] == "exact"
    assert "near" in removed.values()
    kept = {r["id"] for r in Dataset.open(f"{s3_bucket}/run/dedup", s3_endpoint)}
    assert len(kept) == st["kept"] and not kept & set(removed)
    assert kept | set(removed) == {r["id"] for r in recs}
    assert not [k for k in keys(s3_client, s3_bucket) if k.startswith("run/.work/")]
    assert list(work.iterdir()) == []


def test_cli_stage_corpus_on_s3_pins_manifest(s3_endpoint, s3_bucket, s3_client, tmp_path):
    """`codeworld stage corpus` (what `dvc repro` runs) with storage.root on S3: shards go to S3
    and data/corpus/manifest.json is pinned locally with the dataset's location, so DVC sees
    the output change exactly when the data does."""
    src = make_tree(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws / "params.yaml", f"{s3_bucket}/cli", [{"kind": "dir", "path": str(src), "name": "t"}],
                 storage={"s3_endpoint_url": s3_endpoint})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CODEWORLD_"))}
    res = subprocess.run([str(BIN / "codeworld"), "stage", "corpus", "--no-track"], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    remote = json.loads(get(s3_client, s3_bucket, "cli/corpus/manifest.json"))
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary == {"stage": "corpus", "records": remote["records"], "shards": len(remote["shards"])}
    assert [k for k in keys(s3_client, s3_bucket) if k.startswith("cli/corpus/")] == \
        ["cli/corpus/manifest.json"] + [f"cli/corpus/{s['name']}" for s in remote["shards"]]
    pinned = json.loads((ws / "data" / "corpus" / "manifest.json").read_text())
    assert pinned["location"] == f"{s3_bucket}/cli/corpus"
    assert {k: v for k, v in pinned.items() if k != "location"} == remote
    assert sorted(p.name for p in (ws / "data" / "corpus").iterdir()) == ["manifest.json"]  # no shard
    metrics = json.loads((ws / "metrics" / "corpus.json").read_text())
    assert metrics["records"] == remote["records"] and metrics["shards"] == len(remote["shards"])

    # Bad input is reported as such (exit 2) and naming the path; the pin is left as it was.
    write_params(ws / "params.yaml", f"{s3_bucket}/cli", [{"kind": "dir", "path": str(tmp_path / "gone")}],
                 storage={"s3_endpoint_url": s3_endpoint})
    res = subprocess.run([str(BIN / "codeworld"), "stage", "corpus", "--no-track"], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert str(tmp_path / "gone") in res.stderr
    assert json.loads((ws / "data" / "corpus" / "manifest.json").read_text()) == pinned


def test_s3_source_is_ingested(s3_endpoint, s3_bucket, s3_client, tmp_path):
    a = (STDLIB / "json" / "scanner.py").read_bytes()
    b = (STDLIB / "json" / "tool.py").read_bytes()
    put(s3_client, s3_bucket, "src/a.py", a)
    put(s3_client, s3_bucket, "src/pkg/b.py", b)
    put(s3_client, s3_bucket, "src/notes.txt", b"not python")
    put(s3_client, s3_bucket, "src/latin1.py", "x = 'caf\xe9'\n".encode("latin-1"))
    put(s3_client, s3_bucket, "src-other/c.py", b"print('a sibling prefix, not under src/')\n")
    params = Params(
        storage=StorageConfig(root=str(tmp_path / "data"), s3_endpoint_url=s3_endpoint),
        corpus=CorpusConfig.model_validate({"sources": [{"kind": "s3", "url": f"{s3_bucket}/src"}],
                                            "workers": 1}))
    m = corpus.run(params, track=False, metrics_path=None)
    assert m["stats"]["sources"] == {"src": 3}
    assert m["stats"]["counts"]["skipped_non_utf8"] == 1
    recs = list(Dataset.open(str(tmp_path / "data" / "corpus")))
    assert [(r["id"], r["path"], r["source"]) for r in recs] == [("src/a.py", "a.py", "src"),
                                                                  ("src/pkg/b.py", "pkg/b.py", "src")]
    assert recs[0]["text"].encode() == a and recs[1]["text"].encode() == b
    assert recs[1]["sha256"] == hashlib.sha256(b).hexdigest() and recs[1]["size"] == len(b)
    assert all(r["language"] == "python" for r in recs)


# --- S3 corpus sources -------------------------------------------------------------------------
def s3_source_params(tmp_path: Path, endpoint: str, url: str, **storage) -> Params:
    return load_params(write_params(tmp_path / "s3src.yaml", tmp_path / "data",
                                    [{"kind": "s3", "url": url, "name": "s"}],
                                    storage={"s3_endpoint_url": endpoint, **storage}))


def test_a_missing_s3_prefix_or_bucket_is_a_source_error_naming_it(s3_endpoint, s3_bucket, s3_client, tmp_path):
    from stages.corpus_sources import SourceError

    put(s3_client, s3_bucket, "src/m.py", b"y = 2\n")
    for url, why in ((f"{s3_bucket}/srcTYPO", "no object under this prefix"),   # was a warning
                     (f"{s3_bucket}-nobucket/src", "no such bucket")):          # a bare FileNotFoundError
        with pytest.raises(SourceError, match=f"source 's': {url}: {why}"):
            corpus.run(s3_source_params(tmp_path, s3_endpoint, url), track=False, metrics_path=None)


def test_a_same_size_edit_of_an_s3_source_object_makes_a_new_dataset(s3_endpoint, s3_bucket, s3_client, tmp_path):
    put(s3_client, s3_bucket, "src/m.py", b"y = 1\n")
    params = s3_source_params(tmp_path, s3_endpoint, f"{s3_bucket}/src")
    corpus.run(params, track=False, metrics_path=None)
    put(s3_client, s3_bucket, "src/m.py", b"y = 2\n")   # same size: a new ETag
    corpus.run(params, track=False, metrics_path=None)
    assert [r["text"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))] == ["y = 2\n"]


def test_a_transient_s3_read_error_fails_the_stage_and_a_rerun_resumes(s3_endpoint, s3_bucket, s3_client,
                                                                       tmp_path, monkeypatch):
    from codeworld.storage import StorageError
    from tests.fault_proxy import FaultProxy

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")   # botocore's retries, quickly spent
    put(s3_client, s3_bucket, "src/a.py", b"a = 1\n")
    put(s3_client, s3_bucket, "src/b.py", b"b = 2\n")
    with FaultProxy(s3_endpoint) as proxy:
        params = s3_source_params(tmp_path, proxy.url, f"{s3_bucket}/src")
        proxy.fail("internal", None, match=lambda method, key: method == "GET" and key.endswith("src/b.py"))
        with pytest.raises(StorageError, match=f"{s3_bucket}/src/b.py: cannot read"):
            corpus.run(params, track=False, metrics_path=None)   # was "unreadable", and final
        assert not (tmp_path / "data" / "corpus" / "manifest.json").exists()
        proxy.heal()
        m = corpus.run(params, track=False, metrics_path=None)
    assert m["records"] == 2 and "skipped_unreadable" not in m["stats"]["counts"]


def test_adhoc_corpus_takes_s3_jsonl_and_s3_datasets_by_what_they_are(s3_endpoint, s3_bucket, s3_client,
                                                                      tmp_path, monkeypatch):
    from stages.adhoc import corpus_adhoc

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)   # how the CLI is pointed at a server
    put(s3_client, s3_bucket, "in.jsonl", (json.dumps({"id": "a", "text": "x = 1\n", "path": "a.py"}) + "\n").encode())
    m = corpus_adhoc([f"{s3_bucket}/in.jsonl"], str(tmp_path / "from-jsonl"), workers=1)
    assert m["records"] == 1 and m["stats"]["sources"] == {"src0": 1}   # was listed as a prefix: 0
    w = DatasetWriter(Storage(f"{s3_bucket}/sets", s3_endpoint), "ds", "fp")
    w.prepare()
    w.finish([w.write(0, [{"id": "b", "text": "y = 2\n", "path": "b.py"}])])
    m = corpus_adhoc([f"{s3_bucket}/sets/ds"], str(tmp_path / "from-shards"), workers=1)
    assert m["records"] == 1   # was listed as a prefix of .tar and .json files: nothing to ingest
    assert [r["id"] for r in Dataset.open(str(tmp_path / "from-shards"))] == ["src0/b"]   # SOURCE/ID
