"""A real S3-compatible server process for tests: moto's standalone server (`moto[server]` from PyPI) on loopback.

A separate process speaking S3 over HTTP, not an in-process mock: boto3 signs, retries, streams multipart uploads and
follows presigned URLs exactly as it would against MinIO or AWS, and worker processes started by integration tests
reach the same server. Its state lives in memory, so a bucket per test keeps tests apart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def moto_available() -> bool:
    return importlib.util.find_spec("moto.server") is not None and importlib.util.find_spec("flask") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`python -m moto.server` on 127.0.0.1 and a free port, with its output in a log file."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="darkroom-s3-")) / "moto.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> S3Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code < 500:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {timeout}s")

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """Settings for darkroom processes that should store blobs here."""
        return {
            "DARKROOM_STORAGE__BLOB_BACKEND": "s3",
            "DARKROOM_STORAGE__S3_BUCKET": bucket,
            "DARKROOM_STORAGE__S3_PREFIX": prefix,
            "DARKROOM_STORAGE__S3_ENDPOINT_URL": self.endpoint_url,
            "DARKROOM_STORAGE__S3_REGION": REGION,
            "DARKROOM_STORAGE__S3_ACCESS_KEY_ID": ACCESS_KEY,
            "DARKROOM_STORAGE__S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()
        shutil.rmtree(self.log.parent, ignore_errors=True)
