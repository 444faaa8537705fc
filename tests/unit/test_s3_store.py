"""S3Store against botocore's Stubber (no server): keys, prefix, missing objects, access errors.

The real SeaweedFS server is exercised in tests/integration/test_stack.py.
"""

from __future__ import annotations

import io

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from silotune.config import StoreSpec, parse_config
from silotune.errors import ConfigError, StoreError
from silotune.store import S3Store, open_store

SPEC = StoreSpec(kind="s3", endpoint_url="http://127.0.0.1:1", bucket="b", prefix="team")


def _store() -> tuple[S3Store, Stubber]:
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:1",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    return S3Store(SPEC, client=client), Stubber(client)


def test_put_get_list_with_prefix() -> None:
    store, stub = _store()
    stub.add_response("put_object", {}, {"Bucket": "b", "Key": "team/a/x.bin", "Body": b"hi"})
    body = StreamingBody(io.BytesIO(b"hi"), 2)
    stub.add_response("get_object", {"Body": body}, {"Bucket": "b", "Key": "team/a/x.bin"})
    stub.add_response(
        "list_objects_v2",
        {"Contents": [{"Key": "team/a/y.bin"}, {"Key": "team/a/x.bin"}], "IsTruncated": False},
        {"Bucket": "b", "Prefix": "team/a/"},
    )
    with stub:
        store.put("a/x.bin", b"hi")
        assert store.get("a/x.bin") == b"hi"
        assert store.list("a/") == ["a/x.bin", "a/y.bin"]
    assert store.describe() == "s3://b/team/"


def test_missing_and_denied_are_store_errors() -> None:
    store, stub = _store()
    stub.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stub.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    with stub:
        with pytest.raises(StoreError, match="object not found: nope"):
            store.get("nope")
        assert store.exists("nope") is False
        with pytest.raises(StoreError, match=r"AccessDenied.*AWS_ACCESS_KEY_ID"):
            store.put("other", b"x")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        _store()[0].put(key, b"x")


def test_spec_validation_and_fingerprint() -> None:
    assert isinstance(open_store(SPEC), S3Store)
    base = {
        "federation_id": "f",
        "silos": [{"name": "a", "train_path": "a.jsonl"}],
    }
    with pytest.raises(ConfigError, match="an S3 store needs a bucket"):
        parse_config({**base, "store": {"kind": "s3"}})
    local = parse_config(base)
    stacked = parse_config(
        {**base, "store": SPEC.model_dump(), "orchestration": {"mode": "workpools", "silo_timeout_s": 5}}
    )
    assert local.orchestration.mode == "embedded"
    # Where updates live and how silos are reached do not change what is trained: same federation.
    assert local.fingerprint() == stacked.fingerprint()
