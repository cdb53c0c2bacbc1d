"""Shared fixtures: a real moto S3 server and a real MLflow tracking server on loopback."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

try:
    from tests.servers import mlflow_server, moto_server
except ImportError:  # tests/ collected as plain folder (rootdir not importable)
    from servers import mlflow_server, moto_server

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def _data_manifests(data: Path) -> dict[str, bytes]:
    """The manifests of the repository's pipeline data (data/NAME/, data/agent/NAME/)."""
    return {str(p): p.read_bytes() for pattern in ("*/manifest.json", "*/*/manifest.json",
                                                   "*/codeworld.json")
            for p in sorted(data.glob(pattern))}


@pytest.fixture(scope="session", autouse=True)
def repository_data_untouched():
    """No test may change the repository's own data/ (a developer's `make run` output): a stage
    run in-process with the repository as its working folder pins its manifests there (tests
    of session 28 replaced data/agent's with their tmp datasets', unseen until dvc status)."""
    data = Path(__file__).resolve().parents[1] / "data"
    before = _data_manifests(data)
    yield
    after = _data_manifests(data)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests changed the repository's data: {changed}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto server. While it lives, AWS credentials for it are set in the environment
    (restored afterwards); the endpoint itself is never put in the environment, so code under
    test must be handed it explicitly."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        with moto_server() as url:
            yield url


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """A fresh, empty bucket on the moto server: 's3://NAME'."""
    name = f"cw-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def tracking_proxy(mlflow_url, monkeypatch):
    """The real MLflow server behind tests/fault_proxy.py, which can cut it off (every request
    reset unanswered: a server gone down) and bring it back; MLFLOW_TRACKING_URI at the proxy,
    MLflow's HTTP retries off so that a failure comes at once."""
    import mlflow

    from tests.fault_proxy import FaultProxy

    with FaultProxy(mlflow_url) as proxy:
        # the environment's URI, as in a rank; first, because dropping a URI an earlier test's
        # in-process run set (StageRun sets it) also unsets MLFLOW_TRACKING_URI (MLflow 3)
        mlflow.set_tracking_uri(None)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        yield proxy
    mlflow.set_tracking_uri(None)
