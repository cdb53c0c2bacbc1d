"""Training data on S3, against a real moto server on loopback: the tokenizer and pack stages
streaming their inputs from S3, the pack uploaded whole (manifest last), training fetching it
into a node-local cache and training exactly as from a local root, corrupt or missing objects
named, concurrent local ranks downloading once, and transient S3 errors retried. Faults come
from tests/fault_proxy.py, an HTTP proxy between the code under test and the server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from codeworld import pack_cache
from codeworld.config import ConfigError, parse_params
from codeworld.storage import Storage, StorageError, file_sha256
from stages import pack, tokenizer
from stages.train_phase import run_in_own_group
from tests.fault_proxy import FaultProxy
from tests.train_fixtures import agent_records, code_records, tiny_params, trace_records, write_dataset

DATASETS = ("dedup", "traces", "agent")


def client_for(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def copy_prefix(client, bucket: str, src: str, dst: str) -> None:
    for key in keys(client, bucket, src):
        client.copy_object(Bucket=bucket, Key=dst + key[len(src):],
                           CopySource={"Bucket": bucket, "Key": key})


def s3_params(bucket: str, prefix: str, endpoint: str, cache: Path, **sections) -> dict:
    params = tiny_params(Path("unused"), **sections)
    params["storage"] = {"root": f"s3://{bucket}/{prefix}", "s3_endpoint_url": endpoint,
                         "local_cache": str(cache)}
    return params


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_puts(log, prefix: str) -> list[str]:
    """Names under `prefix` written (forwarded PUTs), in order."""
    return [s.key[len(prefix):] for s in log
            if s.method == "PUT" and s.action == "forwarded" and s.key.startswith(prefix)]


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> Path:
    """The datasets, tokenizer and pack of tests/train_fixtures.py on a local disk."""
    root = tmp_path_factory.mktemp("local-root")
    write_dataset(root, "dedup", code_records())
    write_dataset(root, "traces", trace_records())
    write_dataset(root, "agent", agent_records())
    params = parse_params(tiny_params(root))
    tokenizer.run(params, track=False, metrics_path=None)
    pack.run(params, track=False, metrics_path=None)
    return root


@pytest.fixture(scope="module")
def s3_run(local_root, s3_endpoint, tmp_path_factory):
    """The same datasets on S3 (s3://BUCKET/run/), then the tokenizer and pack stages with that
    storage root, through a proxy that fails the first try of every upload and cuts off the
    first read of every shard. Yields what the tests look at, the proxy still serving."""
    client = client_for(s3_endpoint)
    bucket = f"cw-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for name in DATASETS:
        for f in sorted((local_root / name).iterdir()):
            client.upload_file(str(f), bucket, f"run/{name}/{f.name}")
    cache = tmp_path_factory.mktemp("pack-cache")
    with FaultProxy(s3_endpoint) as proxy:
        params = s3_params(bucket, "run", proxy.url, cache)
        tok = tokenizer.run(parse_params(params), track=False, metrics_path=None)
        proxy.fail("slowdown", 1, match=lambda method, key: method == "PUT")
        proxy.fail("truncate", 1, match=lambda method, key: key.endswith(".tar"))
        manifest = pack.run(parse_params(params), track=False, metrics_path=None)
        log = list(proxy.log)
        proxy.heal()
        yield {"client": client, "bucket": bucket, "proxy": proxy, "params": params, "tok": tok,
               "manifest": manifest, "log": log, "cache": cache}


def test_pack_on_s3_uploads_each_source_whole_and_the_manifest_last(s3_run, local_root):
    client, bucket, manifest = s3_run["client"], s3_run["bucket"], s3_run["manifest"]
    # streamed from S3, the same tokenizer and pack as from a local disk
    assert client.get_object(Bucket=bucket, Key="run/tokenizer/tokenizer.json")["Body"].read() == \
        (local_root / "tokenizer" / "tokenizer.json").read_bytes()
    local_manifest = json.loads((local_root / "pack" / "manifest.json").read_text())
    assert manifest == local_manifest
    files = pack_cache.pack_files(manifest)
    assert sorted(files) == sorted(["code.bin", "code.idx", "traces.bin", "traces.idx", "agent.bin",
                                    "agent.idx", "agent_mask.bin", "agent_mask.idx"])
    want = sorted(["run/pack/manifest.json", *(f"run/pack/{n}.json" for n in manifest["sources"]),
                   *(f"run/pack/{f}" for f in files)])
    assert keys(client, bucket, "run/pack/") == want
    for name, digest in files.items():
        body = client.get_object(Bucket=bucket, Key=f"run/pack/{name}")["Body"].read()
        assert sha(body) == digest and body == (local_root / "pack" / name).read_bytes()
    # every upload failed once (503 SlowDown) and every shard read was cut off once: retried
    log = s3_run["log"]
    assert any(s.action == "slowdown" for s in log) and any(s.action == "truncate" for s in log)
    # order: a source's files, then its record; the manifest once, after everything else
    puts = pack_puts(log, f"{bucket}/run/pack/")
    assert puts[-1] == "manifest.json" and puts.count("manifest.json") == 1
    for name, meta in manifest["sources"].items():
        assert all(puts.index(f) < puts.index(f"{name}.json") for f in meta["files"])
    # the cache holds the built files; only a fetch gives it a manifest
    cache = s3_run["cache"] / "pack"
    assert all((cache / f).exists() for f in files) and not (cache / "manifest.json").exists()


def test_pack_rerun_on_s3_resumes_and_a_failed_upload_publishes_nothing(s3_run, tmp_path, monkeypatch):
    """A copy of the run under p2/, a fresh cache: a change to one source repacks that source
    only (the others are verified on S3, not rebuilt or re-sent). Its upload fails for good:
    no manifest is visible and a fetch refuses. Healed, the rerun uploads that source alone."""
    client, bucket = s3_run["client"], s3_run["bucket"]
    copy_prefix(client, bucket, "run/", "p2/")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # no retry of the failure below: a quick test
    with FaultProxy(s3_run["proxy"].upstream) as proxy:
        changed = s3_params(bucket, "p2", proxy.url, tmp_path / "cache",
                            pack={"sources": {**tiny_params(Path("x"))["pack"]["sources"],
                                              "traces": {"dataset": "traces", "format": "trace",
                                                         "max_tokens": 3000}}})
        proxy.fail("internal", None, match=lambda m, k: m == "PUT" and k.endswith("p2/pack/traces.idx"))
        with pytest.raises(StorageError, match=rf"s3://{bucket}/p2/pack/traces\.idx: cannot upload"):
            pack.run(parse_params(changed), track=False, metrics_path=None)
        left = keys(client, bucket, "p2/pack/")
        assert "p2/pack/manifest.json" not in left and "p2/pack/traces.json" not in left
        assert "p2/pack/traces.idx" in left   # the old object: no record names it any more
        with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/p2/pack/manifest\.json: no pack manifest"):
            pack_cache.fetch(Storage(f"s3://{bucket}/p2/pack", proxy.url), tmp_path / "reader")
        assert not (tmp_path / "reader" / "manifest.json").exists()

        proxy.heal()
        proxy.log.clear()
        m = pack.run(parse_params(changed), track=False, metrics_path=None)
        assert pack_puts(proxy.log, f"{bucket}/p2/pack/") == \
            ["traces.bin", "traces.idx", "traces.json", "manifest.json"]
    assert m["sources"]["traces"]["tokens"] <= 3000 and m["sources"]["code"] == s3_run["manifest"]["sources"]["code"]
    assert json.loads(client.get_object(Bucket=bucket, Key="p2/pack/manifest.json")["Body"].read()) == m
    assert sorted(os.listdir(tmp_path / "cache" / "pack")) == ["traces.bin", "traces.idx", "traces.json"]


def train(params: dict, pack_dir: Path, out: Path) -> list[float]:
    """A tiny single-process run (4 steps of tests/train_fixtures.py's model), its losses."""
    out.mkdir(parents=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "model.train", "--params", str(out / "params.yaml"), "--pack", str(pack_dir),
           "--out", str(out / "ck"), "--steps-log", str(out / "steps.jsonl")]
    with open(out / "log", "w") as log:
        proc = run_in_own_group(cmd, stdout=log, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (out / "log").read_text()[-4000:]
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


def test_training_from_an_s3_root_fetches_the_pack_and_matches_a_local_root(s3_run, local_root, tmp_path):
    """model.train with the S3 storage root and --pack in an empty node-local cache, through
    a proxy that drops the first try of every request and cuts off the first download of
    each object halfway: the pack is fetched, verified, and the losses are those of the same
    run from the local root, bit for bit."""
    want = train(tiny_params(local_root), local_root / "pack", tmp_path / "local")
    cache = tmp_path / "node-cache"
    with FaultProxy(s3_run["proxy"].upstream) as proxy:
        proxy.fail("truncate", 1, match=lambda m, k: "/pack/" in k)
        proxy.fail("reset", 1)
        got = train(s3_params(s3_run["bucket"], "run", proxy.url, cache), cache / "pack",
                    tmp_path / "s3")
        assert {"truncate", "reset"} <= {s.action for s in proxy.log}
    assert len(got) == 4 and got == want
    files = pack_cache.pack_files(s3_run["manifest"])
    for name, digest in files.items():
        assert file_sha256(cache / "pack" / name) == digest
    assert json.loads((cache / "pack" / "manifest.json").read_text()) == s3_run["manifest"]
    assert not [n for n in os.listdir(cache / "pack") if ".tmp" in n]


FETCH = """
import json, sys
from pathlib import Path
from codeworld.pack_cache import fetch
from codeworld.storage import Storage
print(json.dumps(fetch(Storage(sys.argv[1], sys.argv[2]), Path(sys.argv[3]))["fingerprint"]))
"""


def test_local_ranks_fetching_at_once_download_each_object_once(s3_run, tmp_path):
    """Three processes (a node's local ranks) fetch into one cache at the same time: the lock
    lets one download, the others find the verified copy; a later fetch reads the manifest
    only (the stamp of what was verified)."""
    bucket, fp = s3_run["bucket"], s3_run["manifest"]["fingerprint"]
    cache = tmp_path / "cache" / "pack"
    with FaultProxy(s3_run["proxy"].upstream) as proxy:
        argv = [sys.executable, "-c", FETCH, f"s3://{bucket}/run/pack", proxy.url, str(cache)]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert [json.loads(o) for o, _ in outs] == [fp] * 3
        gets = [s.key.rsplit("/", 1)[1] for s in proxy.log if s.method == "GET"]
        files = pack_cache.pack_files(s3_run["manifest"])
        assert sorted(n for n in gets if n in files) == sorted(files)   # each object once
        assert gets.count("manifest.json") == 3
        proxy.log.clear()
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        assert [s.key.rsplit("/", 1)[1] for s in proxy.log if s.method == "GET"] == ["manifest.json"]
    # a cached file that changed is found out and fetched again
    (cache / "code.bin").write_bytes(b"\0" + (cache / "code.bin").read_bytes()[1:])
    pack_cache.fetch(Storage(f"s3://{bucket}/run/pack", s3_run["proxy"].upstream), cache)
    assert file_sha256(cache / "code.bin") == files["code.bin"]


def test_a_corrupt_or_missing_object_on_s3_is_named(s3_run, tmp_path):
    client, bucket = s3_run["client"], s3_run["bucket"]
    endpoint = s3_run["proxy"].upstream
    copy_prefix(client, bucket, "run/pack/", "bad/pack/")
    body = bytearray(client.get_object(Bucket=bucket, Key="bad/pack/code.bin")["Body"].read())
    body[100] ^= 0xFF
    client.put_object(Bucket=bucket, Key="bad/pack/code.bin", Body=bytes(body))
    remote = Storage(f"s3://{bucket}/bad/pack", endpoint)
    cache = tmp_path / "cache" / "pack"
    with pytest.raises(StorageError, match=rf"s3://{bucket}/bad/pack/code\.bin: sha256 \w+\.\.\. "
                                           r"differs from the expected"):
        pack_cache.fetch(remote, cache)
    # nothing unverified is left where Megatron would look, and no manifest
    left = os.listdir(cache)
    assert "code.bin" not in left and "manifest.json" not in left and not [n for n in left if ".tmp" in n]

    # what training says: the object, before any process group or model
    params = s3_params(bucket, "bad", endpoint, tmp_path / "cache")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "model.train", "--params", str(tmp_path / "p.yaml"),
                           "--pack", str(cache), "--out", str(tmp_path / "ck"),
                           "--steps-log", str(tmp_path / "s.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"StorageError: s3://{bucket}/bad/pack/code.bin: sha256" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ck").exists()

    client.put_object(Bucket=bucket, Key="bad/pack/code.bin",
                      Body=client.get_object(Bucket=bucket, Key="run/pack/code.bin")["Body"].read())
    client.delete_object(Bucket=bucket, Key="bad/pack/traces.idx")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/bad/pack/traces\.idx: listed in "
                                           rf"s3://{bucket}/bad/pack/manifest\.json but missing"):
        pack_cache.fetch(remote, cache)
    assert not (cache / "manifest.json").exists()

    # a manifest that is not one (cut short, or of something else) is named too
    for body in (b'{"sources": {"code": ', b'{"name": "corpus", "shards": []}'):
        client.put_object(Bucket=bucket, Key="bad/pack/manifest.json", Body=body)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/bad/pack/manifest\.json: not a "
                                               r"pack manifest"):
            pack_cache.fetch(remote, cache)


def test_transient_errors_are_retried_and_a_lasting_one_names_the_path(s3_run, tmp_path, monkeypatch):
    bucket = s3_run["bucket"]
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    with FaultProxy(s3_run["proxy"].upstream) as proxy:
        st = Storage(f"s3://{bucket}/retry", proxy.url)
        ops = [("slowdown", lambda: st.write_bytes("a.bin", b"abc" * 1000) or True),
               ("internal", lambda: st.upload(src, "big.bin") or True),
               ("internal", lambda: st.exists("a.bin")),
               ("reset", lambda: st.read_bytes("a.bin") == b"abc" * 1000),
               ("truncate", lambda: st.sha256("big.bin") == sha(src.read_bytes())),
               ("truncate", lambda: st.download("big.bin", tmp_path / "d.bin", sha(src.read_bytes())) or True),
               ("slowdown", lambda: st.list() == ["a.bin", "big.bin"]),
               ("reset", lambda: st.remove("a.bin") or not st.exists("a.bin"))]
        for fault, op in ops:
            proxy.heal()
            proxy.log.clear()
            proxy.fail(fault, 1)
            assert op(), fault
            assert proxy.faults() >= 1, (fault, proxy.log)
    assert (tmp_path / "d.bin").read_bytes() == src.read_bytes()

    # Failing for good: the last error (botocore's retries off, s3fs's own still on) names the path.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(s3_run["proxy"].upstream) as proxy:
        st = Storage(f"s3://{bucket}/retry", proxy.url)
        proxy.fail("internal", None)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/retry/big\.bin: cannot read"):
            st.read_bytes("big.bin")
        proxy.heal()
        proxy.fail("truncate", None)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/retry/big\.bin: cannot download"):
            st.download("big.bin", tmp_path / "e.bin")
        assert sorted(os.listdir(tmp_path)) == ["d.bin", "src.bin"]   # no partial copy
        proxy.heal()
        proxy.fail("reset", None)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/retry/new\.bin: cannot write"):
            st.write_bytes("new.bin", b"x")
        assert sum(s.action == "reset" for s in proxy.log) > 1   # s3fs retried it
    assert keys(s3_run["client"], bucket, "retry/new") == []


def test_s3_root_paths_and_the_cli_pins(s3_run, tmp_path, monkeypatch):
    from codeworld.cli import main
    from model.launch import torchrun_command
    from stages.train_phase import phase_dir

    params = parse_params(s3_run["params"])
    assert pack.local_dir(params) == s3_run["cache"] / "pack"
    cmd = torchrun_command(params, "pretrain")
    assert cmd[cmd.index("--pack") + 1] == str(s3_run["cache"] / "pack")
    # checkpoints on a filesystem the nodes share, where dvc.yaml has them; not in the cache
    assert phase_dir(params, "pretrain") == Path("data/checkpoints/pretrain")
    with pytest.raises(ConfigError, match="local_cache"):
        parse_params({**s3_run["params"], "storage": {"root": "data", "local_cache": "s3://b/c"}})
    # `codeworld stage pack` (what DVC runs): nothing to redo; DVC's data/pack and
    # data/tokenizer are copies of the manifests on S3, with their location
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(s3_run["params"]))
    for stage in ("tokenizer", "pack"):
        assert main(["stage", stage, "--params", "params.yaml", "--no-track"]) == 0
        pinned = json.loads((tmp_path / "data" / stage / "manifest.json").read_text())
        assert pinned.pop("location") == f"s3://{s3_run['bucket']}/run/{stage}"
        assert pinned == (s3_run["manifest"] if stage == "pack" else s3_run["tok"])
