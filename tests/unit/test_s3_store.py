"""S3Store against botocore's Stubber (no server): keys, prefix, missing objects, access errors.

The real SeaweedFS server is exercised in tests/integration/test_stack.py.
"""

from __future__ import annotations

import io

import boto3
import pytest
from botocore import exceptions as bx
from botocore.response import StreamingBody
from botocore.stub import Stubber

from silotune.config import StoreSpec, parse_config
from silotune.errors import ConfigError, StoreError, StoreUnavailable
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


class _Unreachable:
    """A client whose every call fails as botocore fails when the link to the store is down."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str):
        def call(**_: object) -> None:
            raise self.error

        return call


@pytest.mark.parametrize(
    "error",
    [
        bx.EndpointConnectionError(endpoint_url="https://10.0.0.1:8333/b"),
        bx.ConnectionClosedError(endpoint_url="https://10.0.0.1:8333/b"),
        bx.ReadTimeoutError(endpoint_url="https://10.0.0.1:8333/b"),
        bx.SSLError(endpoint_url="https://10.0.0.1:8333/b", error="EOF occurred in violation of protocol"),
    ],
)
def test_an_unreachable_store_is_unavailable(error: Exception) -> None:
    store = S3Store(SPEC, client=_Unreachable(error))
    with pytest.raises(StoreUnavailable, match=r"S3 read a/x\.bin"):
        store.get("a/x.bin")
    with pytest.raises(StoreUnavailable, match=r"S3 write a/x\.bin"):
        store.put("a/x.bin", b"x")
    with pytest.raises(StoreUnavailable):
        store.exists("a/x.bin")


def test_busy_is_unavailable_but_definite_answers_are_not() -> None:
    store, stub = _store()
    stub.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
    stub.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    stub.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    with stub:
        with pytest.raises(StoreUnavailable, match="SlowDown"):
            store.get("a")
        for call in (lambda: store.get("a"), lambda: store.put("a", b"x")):
            with pytest.raises(StoreError) as info:
                call()
            assert not isinstance(info.value, StoreUnavailable)
    # A certificate that does not verify is another server, not an outage.
    wrong = bx.SSLError(endpoint_url="https://10.0.0.1:8333/b", error="[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    with pytest.raises(StoreError) as info:
        S3Store(SPEC, client=_Unreachable(wrong)).get("a")
    assert not isinstance(info.value, StoreUnavailable)


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
