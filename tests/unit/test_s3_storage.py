"""The S3 blob store against a real S3-compatible server process (moto's standalone server over loopback HTTP)."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import pytest

from darkroom.config import Settings, StorageSettings
from darkroom.errors import NotFound
from darkroom.storage import LocalBlobStore, open_blob_store
from darkroom.storage.s3 import S3BlobStore, normalise_prefix
from tests.infra.s3 import ACCESS_KEY, REGION, SECRET_KEY


def storage_settings(server, bucket: str, **kw) -> StorageSettings:
    return StorageSettings(
        blob_backend="s3",
        s3_bucket=bucket,
        s3_endpoint_url=server.endpoint_url,
        s3_region=REGION,
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
        **kw,
    )


@pytest.fixture
def store(s3_server, s3_bucket) -> S3BlobStore:
    return S3BlobStore.from_settings(storage_settings(s3_server, s3_bucket, s3_prefix="/darkroom/test/"))


def test_put_get_exists_delete(store, s3_server):
    digest, key = store.put(b"hello", "text/plain")
    assert digest == hashlib.sha256(b"hello").hexdigest() and key == f"{digest[:2]}/{digest[2:4]}/{digest}"
    assert store.exists(key) and store.get(key) == b"hello"
    head = s3_server.client().head_object(Bucket=store.bucket, Key=f"darkroom/test/{key}")
    assert head["ContentType"] == "text/plain" and head["Metadata"]["sha256"] == digest
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(NotFound):
        store.get(key)
    store.delete(key)  # deleting twice is fine


def test_same_bytes_are_stored_once(store, s3_server):
    first = store.put(b"same", "image/png")
    assert store.put(b"same", "image/png") == first
    listed = s3_server.client().list_objects_v2(Bucket=store.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"darkroom/test/{first[1]}"]


def test_presigned_url_is_fetchable_over_http(store):
    _, key = store.put(b"\x89PNG fake", "image/png")
    url = store.url(key, expires=60)
    assert "Signature=" in url or "X-Amz-Signature=" in url
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.content == b"\x89PNG fake"
    tampered = url.replace(key, key[:-1] + ("0" if key[-1] != "0" else "1"))
    assert httpx.get(tampered, timeout=10).status_code in (403, 404)


def test_big_streaming_upload_goes_multipart_and_round_trips(store, s3_server):
    data = os.urandom(3 * 1024 * 1024) * 4  # 12 MiB: above the 8 MiB multipart threshold
    digest, key = store.put_stream(io.BytesIO(data), "application/octet-stream")
    assert digest == hashlib.sha256(data).hexdigest()
    head = s3_server.client().head_object(Bucket=store.bucket, Key=f"darkroom/test/{key}")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-2")  # two 8 MiB parts
    assert hashlib.sha256(store.get(key)).hexdigest() == digest
    assert sum(len(c) for c in store.stream(key, chunk_size=1 << 20)) == len(data)
    assert store.put(data, "application/octet-stream") == (digest, key)  # bytes already there: no second upload


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/etc/passwd", "ab/cd/../../x", "ab/cd/" + "g" * 64, "ab/cd/" + "a" * 64 + "/.."]
)
def test_keys_that_are_not_content_addresses_are_refused(store, key):
    for call in (store.get, store.exists, store.delete, store.url):
        with pytest.raises(NotFound):
            call(key)


@pytest.mark.parametrize("prefix", ["../x", "a/../b", "a/./b"])
def test_prefix_may_not_climb(prefix):
    with pytest.raises(ValueError):
        normalise_prefix(prefix)


def test_missing_bucket_is_created_only_when_asked(s3_server):
    settings = storage_settings(s3_server, "made-by-darkroom", s3_create_bucket=True)
    store = S3BlobStore.from_settings(settings)
    assert store.get(store.put(b"x", "text/plain")[1]) == b"x"


def test_open_blob_store_follows_settings(tmp_path, s3_server, s3_bucket):
    assert isinstance(open_blob_store(Settings(data_dir=tmp_path)), LocalBlobStore)
    s3 = open_blob_store(Settings(data_dir=tmp_path, storage=storage_settings(s3_server, s3_bucket)))
    assert isinstance(s3, S3BlobStore) and s3.bucket == s3_bucket
    with pytest.raises(ValueError, match="S3_BUCKET"):
        open_blob_store(Settings(data_dir=tmp_path, storage=StorageSettings(blob_backend="s3")))


def test_storage_settings_come_from_nested_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DARKROOM_STORAGE__BLOB_BACKEND", "s3")
    monkeypatch.setenv("DARKROOM_STORAGE__S3_BUCKET", "images")
    monkeypatch.setenv("DARKROOM_STORAGE__S3_SECRET_ACCESS_KEY", "hunter2")
    storage = Settings(data_dir=tmp_path).storage
    assert (storage.blob_backend, storage.s3_bucket) == ("s3", "images")
    assert "hunter2" not in repr(storage) and storage.s3_secret_access_key.get_secret_value() == "hunter2"
