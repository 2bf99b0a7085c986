"""Discovery of s3:// sources through s3fs, against a moto S3 server on loopback.

The control plane runs in this process with named credentials
(ControlPlaneSettings.credentials); ingestions point at the moto endpoint
through source.options and name their credentials with credentials_ref.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import grpc
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings

# Credentials come only from the control plane's settings, never from the developer's AWS setup.
pytestmark = pytest.mark.usefixtures("aws_environment")

CREDENTIALS = {"moto": {"key": "testing", "secret": "testing"}}


def aws_client(service: str, endpoint: str) -> Any:
    """A boto3 client for setting up moto (which accepts any key while IAM checks are off)."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["moto"]["key"],
        aws_secret_access_key=CREDENTIALS["moto"]["secret"],
        region_name="us-east-1",
    )


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    return aws_client("s3", moto_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"al-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def start_plane(database_url: str, tmp_path: Path) -> Iterator[Callable[[dict[str, dict[str, str]]], grpc.Channel]]:
    """Starts a control plane with these credentials; returns a channel to it. Stopped at the end."""
    planes: list[bootstrap.ControlPlane] = []
    channels: list[grpc.Channel] = []

    def start(credentials: dict[str, dict[str, str]]) -> grpc.Channel:
        plane = bootstrap.start(
            ControlPlaneSettings(
                database_url=database_url,
                listen_address="127.0.0.1:0",
                state_dir=tmp_path / "state",
                credentials=credentials,
                shutdown_grace=1.0,
                health_interval=0.2,
            )
        )
        planes.append(plane)
        channels.append(grpc.insecure_channel(plane.address))
        return channels[-1]

    yield start
    for channel in channels:
        channel.close()
    for plane in planes:
        plane.stop(grace=0)


@pytest.fixture
def channel(start_plane: Callable[[dict[str, dict[str, str]]], grpc.Channel]) -> grpc.Channel:
    return start_plane(CREDENTIALS)


def create_ingestion(
    channel: grpc.Channel,
    ingestion_id: str,
    uri: str,
    endpoint: str,
    credentials_ref: str = "moto",
) -> str:
    source = ingestion_pb2.Source(
        uri=uri, glob="*.json", recursive=True, credentials_ref=credentials_ref, options={"endpoint_url": endpoint}
    )
    created = ingestion_pb2_grpc.IngestionServiceStub(channel).CreateIngestion(
        ingestion_pb2.CreateIngestionRequest(
            ingestion=ingestion_pb2.Ingestion(
                source=source,
                format=ingestion_pb2.Format(type=ingestion_pb2.Format.TYPE_JSON),
                destination=ingestion_pb2.Destination(table=f"raw.{ingestion_id.replace('-', '_')}"),
            ),
            ingestion_id=ingestion_id,
        ),
        timeout=10,
    )
    return created.ingestion.name


def run_discovery(channel: grpc.Channel, ingestion: str, timeout: float = 30) -> run_pb2.Run:
    """Starts a run and waits until its discovery has ended."""
    runs = run_pb2_grpc.RunServiceStub(channel)
    run = runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion), timeout=10).run
    deadline = time.monotonic() + timeout
    while run.state == run_pb2.Run.STATE_DISCOVERING:
        if time.monotonic() > deadline:
            raise AssertionError(f"discovery of {run.name} did not end within {timeout}s")
        time.sleep(0.05)
        run = runs.GetRun(run_pb2.GetRunRequest(name=run.name), timeout=10).run
    return run


def list_files(channel: grpc.Channel, ingestion: str, run: str = "") -> list[file_pb2.File]:
    stub = file_pb2_grpc.FileServiceStub(channel)
    files: list[file_pb2.File] = []
    token = ""
    while True:
        page = stub.ListFiles(
            file_pb2.ListFilesRequest(ingestion=ingestion, run=run, page_size=1000, page_token=token), timeout=10
        )
        files.extend(page.files)
        token = page.next_page_token
        if not token:
            return files


def body_for(key: str, version: int = 0) -> bytes:
    return (f'{{"key": "{key}", "version": {version}}}\n' + "x" * version).encode()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# 210 objects the ingestion selects (s3://bucket/prefix, "*.json", recursive) ...
MATCHING = [
    *(f"prefix/top-{i:02d}.json" for i in range(20)),
    *(f"prefix/year=2024/month={m:02d}/part-{i:03d}.json" for m in range(1, 13) for i in range(15)),
    *(f"prefix/a/b/c/deep-{i}.json" for i in range(10)),
]
# ... and 90 it must not: other extensions, hidden names and directories, other prefixes.
NOT_MATCHING = [
    *(f"prefix/year=2024/month={m:02d}/part-{i:03d}.csv" for m in range(1, 13) for i in range(3)),
    *(f"prefix/logs/log-{i:02d}.txt" for i in range(20)),
    *(f"prefix-sibling/s-{i}.json" for i in range(10)),
    *(f"other/o-{i}.json" for i in range(10)),
    *(f"prefix/_temporary/0/part-{i}.json" for i in range(5)),
    *(f"prefix/.staging/x-{i}.json" for i in range(3)),
    "prefix/.hidden-0.json",
    "prefix/.hidden-1.json",
    "prefix/_SUCCESS",
    "prefix/year=2024/_SUCCESS",
    "prefix/data.json.tmp",
    "prefix/upper.JSON",
]
assert len(MATCHING) == 210
assert len(MATCHING) + len(NOT_MATCHING) == 300


def finish_run_as_agents_would(engine: Engine, run_name: str) -> None:
    """No LeaseService is served yet: mark the run's files loaded and end the run, as agents would."""
    run_id = run_name.rsplit("/", 1)[1]
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE files SET state = 'SUCCEEDED', records = 1 "
                "WHERE run_pk = (SELECT id FROM runs WHERE run_id = :run)"
            ),
            {"run": run_id},
        )
        conn.execute(text("UPDATE runs SET state = 'SUCCEEDED', end_time = now() WHERE run_id = :run"), {"run": run_id})


def test_lists_matching_objects_then_only_changed_ones(
    channel: grpc.Channel, s3: Any, bucket: str, moto_endpoint: str, engine: Engine
) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=body_for(key)), MATCHING + NOT_MATCHING))
    ingestion = create_ingestion(channel, "orders", f"s3://{bucket}/prefix", moto_endpoint)

    first = run_discovery(channel, ingestion)
    assert first.state == run_pb2.Run.STATE_RUNNING, first.error
    assert first.HasField("discovery_end_time")
    assert first.error == ""
    assert first.file_counts.total == first.file_counts.pending == len(MATCHING)
    files = list_files(channel, ingestion)
    assert len(files) == len(MATCHING)
    assert {f.path: (f.size_bytes, f.etag) for f in files} == {
        f"s3://{bucket}/{key}": (len(body_for(key)), md5(body_for(key))) for key in MATCHING
    }
    for file in files:
        assert file.HasField("modified_time"), file.path
        assert file.state == file_pb2.File.STATE_PENDING
        assert file.run == first.name

    # Nothing changed: the next run lists everything again and queues nothing.
    finish_run_as_agents_would(engine, first.name)
    second = run_discovery(channel, ingestion)
    assert second.state == run_pb2.Run.STATE_SUCCEEDED, second.error
    assert second.file_counts.total == 0
    assert list_files(channel, ingestion, run=second.name) == []

    # Five objects overwritten with new content: exactly those are queued again, in place.
    changed = MATCHING[::42]
    assert len(changed) == 5
    for key in changed:
        s3.put_object(Bucket=bucket, Key=key, Body=body_for(key, version=1))
    third = run_discovery(channel, ingestion)
    assert third.state == run_pb2.Run.STATE_RUNNING, third.error
    assert third.file_counts.total == third.file_counts.pending == 5
    requeued = list_files(channel, ingestion, run=third.name)
    assert {f.path: (f.size_bytes, f.etag) for f in requeued} == {
        f"s3://{bucket}/{key}": (len(body_for(key, 1)), md5(body_for(key, 1))) for key in changed
    }
    assert all(f.state == file_pb2.File.STATE_PENDING for f in requeued)
    attempts = file_pb2_grpc.FileServiceStub(channel).ListFileAttempts(
        file_pb2.ListFileAttemptsRequest(file=requeued[0].name), timeout=10
    )
    assert [a.outcome for a in attempts.attempts] == [file_pb2.FileAttempt.OUTCOME_SUPERSEDED]
    with engine.connect() as conn:
        total, distinct = conn.execute(text("SELECT count(*), count(DISTINCT path) FROM files")).one()
    assert total == distinct == len(MATCHING)


def test_missing_bucket_fails_the_run_with_a_readable_error(channel: grpc.Channel, moto_endpoint: str) -> None:
    missing = f"al-missing-{uuid.uuid4().hex[:8]}"
    ingestion = create_ingestion(channel, "missing", f"s3://{missing}/prefix", moto_endpoint)
    run = run_discovery(channel, ingestion)
    assert run.state == run_pb2.Run.STATE_FAILED
    assert run.error == f"s3://{missing}/prefix does not exist"
    assert run.HasField("end_time")
    assert run.file_counts.total == 0


def test_unknown_credentials_ref_fails_the_run(channel: grpc.Channel, bucket: str, s3: Any, moto_endpoint: str) -> None:
    s3.put_object(Bucket=bucket, Key="prefix/a.json", Body=b"{}")
    ingestion = create_ingestion(channel, "nocreds", f"s3://{bucket}/prefix", moto_endpoint, credentials_ref="nobody")
    run = run_discovery(channel, ingestion)
    assert run.state == run_pb2.Run.STATE_FAILED
    assert run.error == "credentials 'nobody' are not configured on the control plane"
    assert run.file_counts.total == 0


@pytest.fixture
def iam_enforced(moto_endpoint: str) -> Iterator[None]:
    """Moto accepts any key unless IAM checks are on: turn them on (moto's reset-auth API) for one test."""

    def set_no_auth_count(value: str) -> None:
        connection = http.client.HTTPConnection(urlsplit(moto_endpoint).netloc, timeout=10)
        try:
            # text/plain: a form body would not reach moto as request.data.
            connection.request("POST", "/moto-api/reset-auth", body=value, headers={"Content-Type": "text/plain"})
            assert connection.getresponse().status == 200
        finally:
            connection.close()

    set_no_auth_count("0")
    try:
        yield
    finally:
        set_no_auth_count("inf")


def test_wrong_credentials_fail_the_run_with_a_readable_error(
    start_plane: Callable[[dict[str, dict[str, str]]], grpc.Channel],
    s3: Any,
    bucket: str,
    moto_endpoint: str,
    request: pytest.FixtureRequest,
) -> None:
    iam = aws_client("iam", moto_endpoint)
    user = f"loader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="read",
        PolicyDocument='{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}]}',
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    s3.put_object(Bucket=bucket, Key="prefix/a.json", Body=b"{}")
    channel = start_plane(
        {
            "good": {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]},
            "unknown-key": {"key": "AKIAIOSFODNN7EXAMPLE", "secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
            "bad-secret": {"key": key["AccessKeyId"], "secret": "not-the-secret"},
        }
    )
    uri = f"s3://{bucket}/prefix"
    request.getfixturevalue("iam_enforced")

    # The right key still works, so the failures below are about the credentials.
    good = run_discovery(channel, create_ingestion(channel, "good", uri, moto_endpoint, credentials_ref="good"))
    assert good.state == run_pb2.Run.STATE_RUNNING, good.error
    assert good.file_counts.total == 1

    for ref, reason in (("unknown-key", "Access Key Id"), ("bad-secret", "signature")):
        run = run_discovery(channel, create_ingestion(channel, ref, uri, moto_endpoint, credentials_ref=ref))
        assert run.state == run_pb2.Run.STATE_FAILED, ref
        assert run.error.startswith(f"access to {uri} was denied: "), run.error
        assert reason in run.error
        assert "\n" not in run.error
        assert run.file_counts.total == 0
