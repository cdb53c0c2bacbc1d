"""The DVC remote on S3 (dvc-s3) against a moto server on loopback: a stage's outputs pushed,
the workspace and cache wiped, pulled back byte for byte; a missing object is named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DVC = str(Path(sys.executable).parent / "dvc")


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def _repo(tmp_path: Path, bucket: str, endpoint: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(["init", "-q"], repo)
    dvc(["remote", "add", "-d", "store", f"{bucket}/dvcstore"], repo)
    dvc(["remote", "modify", "store", "endpointurl", endpoint], repo)
    return repo


def test_push_wipe_pull_roundtrip(s3_endpoint, s3_bucket, s3_client, tmp_path):
    repo = _repo(tmp_path, s3_bucket, s3_endpoint)
    data = repo / "data" / "corpus"
    data.mkdir(parents=True)
    files = {f"shard-{i:05d}.tar": os.urandom(200_000 + i) for i in range(3)}
    files["manifest.json"] = b'{"records": 3}\n'
    for name, body in files.items():
        (data / name).write_bytes(body)
    # a stage output, as dvc.yaml declares ours
    (repo / "dvc.yaml").write_text(
        "stages:\n  corpus:\n    cmd: test -d data/corpus\n    outs:\n      - data/corpus\n")
    dvc(["commit", "-f", "corpus"], repo)
    dvc(["push"], repo)
    bucket = s3_bucket[len("s3://"):]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and all(k.startswith("dvcstore/") for k in keys)

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(["pull"], repo)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == files
    assert "Data and pipelines are up to date" in dvc(["status"], repo).stdout

    # an object gone from the remote: pull fails and names what is missing
    for k in keys:
        s3_client.delete_object(Bucket=bucket, Key=k)
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    bad = dvc(["pull"], repo, check=False)
    assert bad.returncode != 0
    assert "data/corpus" in bad.stdout + bad.stderr
