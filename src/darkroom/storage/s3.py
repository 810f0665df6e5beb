"""Blobs in an S3-compatible bucket (AWS S3, MinIO, R2, …): what every node of a multi-node deployment shares.

Keys are the same content addresses as the local store, under an optional prefix, so one bucket can hold several
deployments. Clients fetch images with presigned GET URLs, so image bytes need not pass through the API process.
Uploads go through boto3's managed transfer (`upload_fileobj`): multipart above 8 MiB, so a large blob never has to
fit in one request. botocore retries throttling and transient errors itself (standard mode, `s3_max_attempts`);
what still fails (server unreachable, 5xx after the retries) leaves as `StorageUnavailable` (503), so the API and the
worker treat it as an outage of the node's store, not as the request's fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from darkroom.errors import NotFound, StorageUnavailable
from darkroom.storage.base import content_key

if TYPE_CHECKING:
    from darkroom.config import StorageSettings

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}$")
_MISSING = {"404", "NoSuchKey", "NotFound"}
# Refusals of the store itself, not of one blob: the bucket is gone (a restarted or wiped server) or this node's
# credentials no longer work. Like an unreachable server they are the node's problem, never the job's or the request's.
_STORE_REFUSED = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
MiB = 1024 * 1024
SPOOL_BYTES = 16 * MiB  # a streamed upload is hashed into memory up to this size, then into a temp file


def normalise_prefix(prefix: str) -> str:
    """`a/b/` → `a/b`. A `.` or `..` segment is refused: HTTP clients collapse them, which would leave the prefix."""
    parts = [p for p in prefix.strip("/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"s3 prefix {prefix!r} may not contain '.' or '..' segments")
    return "/".join(parts)


def make_client(storage: StorageSettings) -> Any:
    """A boto3 S3 client from settings. Path-style addressing for custom endpoints: MinIO and friends rarely have
    the wildcard DNS that virtual-host style needs. Checksums only where required: several S3-compatible servers
    reject the newer default checksum headers."""
    secret = storage.s3_secret_access_key.get_secret_value() if storage.s3_secret_access_key else None
    config = Config(
        retries={"max_attempts": storage.s3_max_attempts, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        signature_version="s3v4",
        s3={"addressing_style": "path" if storage.s3_endpoint_url else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=storage.s3_endpoint_url,
        region_name=storage.s3_region,
        aws_access_key_id=storage.s3_access_key_id,
        aws_secret_access_key=secret,
        config=config,
    )


class S3BlobStore:
    def __init__(self, client: Any, bucket: str, prefix: str = "", *, presign_seconds: int = 3600) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.presign_seconds = presign_seconds
        self.transfer = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> S3BlobStore:
        if not storage.s3_bucket:
            raise ValueError("blob_backend is 's3' but no bucket is set (DARKROOM_STORAGE__S3_BUCKET)")
        store = cls(
            make_client(storage), storage.s3_bucket, storage.s3_prefix, presign_seconds=storage.s3_presign_seconds
        )
        if storage.s3_create_bucket:
            store.ensure_bucket()
        return store

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (development and tests; production buckets are made by operators)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING | {"NoSuchBucket"}:
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def object_name(self, key: str) -> str:
        # Keys are content addresses we made; anything else ("../", absolute paths) is refused, never sent.
        if not _KEY.match(key):
            raise NotFound("no such blob", field="key")
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- BlobStore ---------------------------------------------------------------------------------------------------

    def put(self, data: bytes, content_type: str) -> tuple[str, str]:
        digest, key = content_key(data)
        if not self.exists(key):
            with _unavailable("store a blob"):
                self._upload(io.BytesIO(data), key, content_type, digest)
        return digest, key

    def put_stream(self, fileobj: IO[bytes], content_type: str) -> tuple[str, str]:
        """Store a stream without holding it in memory. The key is the content's hash, so the stream is spooled
        (memory, then a temp file) while hashing and uploaded from the spool once the key is known."""
        sha = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            while chunk := fileobj.read(MiB):
                sha.update(chunk)
                spool.write(chunk)
            digest = sha.hexdigest()
            key = f"{digest[:2]}/{digest[2:4]}/{digest}"
            if not self.exists(key):
                spool.seek(0)
                with _unavailable("store a blob"):
                    self._upload(spool, key, content_type, digest)
        return digest, key

    def get(self, key: str) -> bytes:
        return b"".join(self.stream(key))

    def stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        """The blob in chunks, for responses that should not buffer a whole file."""
        try:
            with _unavailable("read a blob"):
                body = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))["Body"]
        except ClientError as exc:
            raise _not_found(exc) from None
        with body:
            yield from body.iter_chunks(chunk_size)

    def exists(self, key: str) -> bool:
        try:
            with _unavailable("look up a blob"):
                self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise StorageUnavailable(f"blob store unavailable: cannot look up a blob ({_code(exc)})") from exc
        return True

    def delete(self, key: str) -> None:
        with _unavailable("delete a blob"):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))

    def url(self, key: str, expires: int | None = None) -> str:
        """A presigned GET URL: anyone holding it can fetch this blob until it expires, without credentials."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.object_name(key)},
            ExpiresIn=expires or self.presign_seconds,
        )

    # --- helpers -----------------------------------------------------------------------------------------------------

    def _upload(self, fileobj: IO[bytes], key: str, content_type: str, digest: str) -> None:
        self.client.upload_fileobj(
            fileobj,
            self.bucket,
            self.object_name(key),
            ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": digest}},
            Config=self.transfer,
        )


@contextlib.contextmanager
def _unavailable(action: str) -> Iterator[None]:
    """Connection failures, and server errors that outlived botocore's retries, are an outage of the store."""
    try:
        yield
    except BotoCoreError as exc:
        raise StorageUnavailable(f"blob store unavailable: cannot {action} ({type(exc).__name__})") from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500 or _code(exc) in {"SlowDown", "ServiceUnavailable", "InternalError", *_STORE_REFUSED}:
            raise StorageUnavailable(f"blob store unavailable: cannot {action} ({_code(exc) or status})") from exc
        raise


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _not_found(exc: ClientError) -> Exception:
    return NotFound("no such blob", field="key") if _code(exc) in _MISSING else exc
