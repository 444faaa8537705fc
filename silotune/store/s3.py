"""Object store on an S3-compatible bucket (SeaweedFS on the stack; MinIO, Ceph RGW or AWS S3 elsewhere).

A single S3 PUT is atomic: a reader sees the old object or the new one, never half
of it, which is the guarantee the federation's commit protocol needs (the manifest
is written before ``state.json``). Keys go under ``prefix/`` in ``bucket``.

Credentials come from the environment variables the spec names (or a boto3
profile), read in the process that opens the store: the coordinator and each
silo sign with their own identity, and no secret ever travels in a config or a
Prefect parameter.
"""

from __future__ import annotations

import os
from typing import Any

from silotune.config import StoreSpec
from silotune.errors import StoreError, StoreUnavailable
from silotune.links import LinkError, require_secure
from silotune.store.local import _check_key

_MISSING = {"NoSuchKey", "404", "NotFound"}


# Server-side answers that say "not now" rather than "no".
_BUSY = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
}


def _response(exc: Exception) -> dict[str, Any]:
    return getattr(exc, "response", None) or {}  # some botocore errors carry ``response = None``


def _code(exc: Exception) -> str:
    return str(_response(exc).get("Error", {}).get("Code", ""))


def _unavailable(exc: Exception) -> bool:
    """Whether the same call may succeed later: the link failed (refused, reset, timed out, cut mid-body)
    or the server was busy or failing (HTTP 5xx, throttling). A certificate that does not verify is a
    wrong server, not an outage; missing, forbidden or invalid requests fail the same way every time.
    """
    from botocore import exceptions as bx

    if isinstance(exc, bx.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return False
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError):
        return True
    status = _response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return _code(exc) in _BUSY or (isinstance(status, int) and status >= 500)


class S3Store:
    """Bytes by key in ``s3://bucket/prefix/``; boto3 with path-style addressing by default."""

    def __init__(self, spec: StoreSpec, *, client: Any | None = None) -> None:
        if spec.kind != "s3" or not spec.bucket:
            raise StoreError("S3Store needs a store spec with kind 's3' and a bucket")
        if spec.endpoint_url:
            try:  # across hosts only HTTPS; plain HTTP stays on loopback
                require_secure(spec.endpoint_url, "store.endpoint_url")
            except LinkError as exc:
                raise StoreError(str(exc)) from None
        self.spec = spec
        self.bucket = spec.bucket
        self.prefix = spec.prefix.strip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            # boto3 adds ~180 modules to every worker's start; only S3 stores need it
            import boto3
            from botocore.config import Config

            spec = self.spec
            if spec.profile:
                session = boto3.session.Session(profile_name=spec.profile, region_name=spec.region)
            else:
                # Only the variable *names* are configured; unset names fall back to boto3's usual chain.
                session = boto3.session.Session(
                    aws_access_key_id=os.environ.get(spec.access_key_env) or None,
                    aws_secret_access_key=os.environ.get(spec.secret_key_env) or None,
                    region_name=spec.region,
                )
            self._client = session.client(
                "s3",
                endpoint_url=spec.endpoint_url,
                config=Config(
                    s3={"addressing_style": spec.addressing_style},
                    retries={"max_attempts": 4, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
        return self._client

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, op: str, key: str, exc: Exception) -> StoreError:
        code = _code(exc) or type(exc).__name__
        hint = ""
        if code in ("AccessDenied", "403", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
            hint = (
                f" (this process's S3 identity, from ${self.spec.access_key_env}"
                f"{' / profile ' + self.spec.profile if self.spec.profile else ''}, may not {op} this key)"
            )
        at = f" at {self.spec.endpoint_url}" if self.spec.endpoint_url else ""
        kind = StoreUnavailable if _unavailable(exc) else StoreError
        return kind(f"S3 {op} {key} in {self.describe()}{at} failed: {code}: {exc}{hint}")

    def put(self, key: str, data: bytes) -> None:
        k = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data)
        except Exception as exc:
            raise self._error("write", key, exc) from None

    def get(self, key: str) -> bytes:
        k = self._key(key)
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read())
        except Exception as exc:
            if _code(exc) in _MISSING:
                raise StoreError(f"object not found: {key} (in {self.describe()})") from None
            raise self._error("read", key, exc) from None

    def get_bounded(self, key: str, max_bytes: int) -> bytes:
        k = self._key(key)
        try:  # a ranged read: never more than max_bytes + 1 bytes cross the wire
            resp = self.client.get_object(Bucket=self.bucket, Key=k, Range=f"bytes=0-{max_bytes}")
            data = bytes(resp["Body"].read(max_bytes + 1))
        except Exception as exc:
            if _code(exc) in _MISSING:
                raise StoreError(f"object not found: {key} (in {self.describe()})") from None
            raise self._error("read", key, exc) from None
        if len(data) > max_bytes:
            raise StoreError(f"{key}: object is larger than the {max_bytes}-byte limit; not read")
        return data

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=k)
            return True
        except Exception as exc:
            if _code(exc) in _MISSING:
                return False
            raise self._error("read", key, exc) from None

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._error("list", prefix or "/", exc) from None
        return sorted(out)

    def delete(self, key: str) -> None:
        k = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=k)
        except Exception as exc:
            if _code(exc) not in _MISSING:
                raise self._error("delete", key, exc) from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
