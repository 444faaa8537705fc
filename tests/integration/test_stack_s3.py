"""The stack's S3 identities on the real SeaweedFS (only ``weed``, on free loopback ports; about 2 s).

1. ``s3_allows`` (the pure-Python copy used by tests/unit/test_stack_config.py) answers exactly as the
   server for every identity of a 3-silo stack, plus probe grants, over a grid of keys and actions.
2. What a silo could try beyond plain PUT/GET is refused: copying another silo's update into its own
   prefix, a multipart part copied from it, batch deletes, browser (POST policy) uploads, ``..`` and
   encoded path segments, bucket settings.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.stack, pytest.mark.timeout(300)]

SILOS = ("clinic", "bank", "lab")
AREAS = ("updates", "results", "messages", "published", "federations")
PROBES = {
    "probe-star": ["Write:silotune/pre/fix/*", "Read:silotune/pre/fix/*"],
    "probe-mid": ["Write:silotune/a*c", "Read:silotune/q?x"],
    "probe-exact": ["Write:silotune/exact/key.bin", "Read:silotune/pre/fix/"],
    "probe-bucket": ["Write:silotune", "List:silotune"],
}


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    from ops import seaweedfs
    from ops.credentials import identities, write_identities
    from ops.stack import down
    from ops.state import DEFAULT_PORTS, Stack
    from ops.supervise import free_ports

    root = tmp_path_factory.mktemp("weed")
    st = Stack(root=root, silos=list(SILOS))
    st.ports = free_ports(DEFAULT_PORTS)
    st.save()
    actions = {**identities(SILOS), **PROBES}
    write_identities(st, actions)
    seaweedfs.start(st)
    try:
        seaweedfs.wait_ready(st, 120)
        yield st, actions
    finally:
        with contextlib.suppress(Exception):
            down(root, echo=print)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__))


def _allowed(fn: Any) -> bool:
    """True if the server let the request through (a missing key still means it was allowed)."""
    try:
        fn()
    except Exception as exc:
        code = _code(exc)
        if code in ("AccessDenied", "403"):
            return False
        if code in ("NoSuchKey", "404"):
            return True
        raise
    return True


def _keys() -> list[str]:
    keys = [
        "x",
        "pre/fix/a",
        "pre/fix/",
        "pre/fixa",
        "exact/key.bin",
        "ac",
        "a/b/c",
        "a/b/cd",
        "q/x",
        "qax",
        "updates/clinic",
        "updates/clinicx/a",
        "updates//bank/a",
    ]
    for area in AREAS:
        for silo in SILOS:
            keys.append(f"{area}/{silo}/fed-1/00001/obj")
    keys += ["federations/fed-1/rounds/00001/global.safetensors", "federations/fed-1/state.json"]
    return keys


def _server_allows(c: Any, action: str, bucket: str, key: str) -> bool:
    if action == "Write":
        return _allowed(lambda: c.put_object(Bucket=bucket, Key=key, Body=b"probe"))
    if action == "Read":
        return _allowed(lambda: c.get_object(Bucket=bucket, Key=key)["Body"].read())
    return _allowed(lambda: c.list_objects_v2(Bucket=bucket, Prefix=key))


def test_matcher_agrees_with_seaweedfs(weed) -> None:
    from ops.credentials import s3_allows, s3_client
    from ops.state import DATA_BUCKET, MLFLOW_BUCKET, RESULTS_BUCKET

    st, actions = weed
    cases = []
    for bucket in (DATA_BUCKET, RESULTS_BUCKET, MLFLOW_BUCKET):
        keys = _keys() if bucket == DATA_BUCKET else ["x", "updates/clinic/x"]
        cases += [(action, bucket, key) for key in keys for action in ("Write", "Read")]
        cases += [
            ("List", bucket, p) for p in ("", "updates/", "federations/", "messages/clinic/", "pre/fix/")
        ]
    disagree = []
    for ident, grants in actions.items():
        if ident == "admin":
            continue
        c = s3_client(st, ident)
        for action, bucket, key in cases:
            server = _server_allows(c, action, bucket, key)
            if server is not s3_allows(grants, action, bucket, key):
                disagree.append((ident, action, bucket, key, server))
    assert not disagree, disagree
    assert len(cases) * (len(actions) - 1) > 500


def _seed(st: Any) -> dict[str, bytes]:
    from ops.credentials import s3_client
    from ops.state import DATA_BUCKET

    admin = s3_client(st, "admin")
    objs = {
        "updates/bank/fed-1/00001/update.masked": b"bank's update",
        "results/bank/fed-1/00001/train.json": b'{"silo": "bank"}',
        "published/bank/fed-1/final/adapter_model.safetensors": b"bank's final",
        "federations/fed-1/rounds/00001/global.safetensors": b"global",
    }
    for k, v in objs.items():
        admin.put_object(Bucket=DATA_BUCKET, Key=k, Body=v)
    return objs


def _raw(st: Any, ident: str, method: str, path: str, query: str = "", body: bytes = b"") -> int:
    """A request signed for ``ident`` with this exact path (no client-side normalization)."""
    import base64
    import hashlib

    import urllib3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    env = st.identity_env(ident)
    url = st.s3_endpoint + path + (f"?{query}" if query else "")
    headers = {"Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()} if body else {}
    req = AWSRequest(method=method, url=url, data=body, headers=headers)
    S3SigV4Auth(
        Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), "s3", "us-east-1"
    ).add_auth(req)
    r = urllib3.PoolManager().request(
        method, url, body=body or None, headers=dict(req.headers.items()), redirect=False
    )
    return int(r.status)


def test_a_silo_cannot_reach_another_silos_objects_by_other_requests(weed) -> None:
    import urllib3

    from ops.credentials import s3_client
    from ops.state import DATA_BUCKET

    st, _ = weed
    objs = _seed(st)
    admin = s3_client(st, "admin")
    before = {o["Key"]: o["ETag"] for o in admin.list_objects_v2(Bucket=DATA_BUCKET)["Contents"]}
    c = s3_client(st, "silo-clinic")
    b, bank_update = DATA_BUCKET, "updates/bank/fed-1/00001/update.masked"
    denied = []

    def refused(what: str, fn: Any) -> None:
        if _allowed(fn):
            denied.append(what)

    # read another silo's update by copying it into its own prefix (whole object, or as a multipart part)
    refused(
        "copy",
        lambda: c.copy_object(
            Bucket=b, Key="updates/clinic/stolen", CopySource={"Bucket": b, "Key": bank_update}
        ),
    )

    def part_copy() -> None:
        up = c.create_multipart_upload(Bucket=b, Key="updates/clinic/mp")
        c.upload_part_copy(
            Bucket=b,
            Key="updates/clinic/mp",
            UploadId=up["UploadId"],
            PartNumber=1,
            CopySource={"Bucket": b, "Key": bank_update},
        )

    refused("upload_part_copy", part_copy)
    # write into another silo's prefix from its own object
    c.put_object(Bucket=b, Key="updates/clinic/fed-1/00001/update.masked", Body=b"clinic's")
    refused(
        "copy out",
        lambda: c.copy_object(
            Bucket=b,
            Key="updates/bank/fed-1/00002/update.masked",
            CopySource={"Bucket": b, "Key": "updates/clinic/fed-1/00001/update.masked"},
        ),
    )
    # delete another silo's objects, one by one or in a batch
    refused("delete", lambda: c.delete_object(Bucket=b, Key=bank_update))
    batch = c.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in objs]})
    assert not batch.get("Deleted") and {e["Code"] for e in batch["Errors"]} == {"AccessDenied"}
    refused(
        "tagging",
        lambda: c.put_object_tagging(
            Bucket=b, Key=bank_update, Tagging={"TagSet": [{"Key": "a", "Value": "b"}]}
        ),
    )
    # browser-form (POST policy) uploads need a bucket-wide Write: refused even into its own prefix
    for key in ("updates/bank/fed-1/00003/update.masked", "updates/clinic/fed-1/00003/update.masked"):
        post = c.generate_presigned_post(b, key)
        status = (
            urllib3.PoolManager()
            .request("POST", post["url"], fields={**post["fields"], "file": ("f", b"x")})
            .status
        )
        assert status == 403, (key, status)
    # presigned GET of another silo's update
    url = c.generate_presigned_url("get_object", Params={"Bucket": b, "Key": bank_update})
    assert urllib3.PoolManager().request("GET", url).status == 403
    assert not denied, denied

    # path tricks: '..' is resolved before the check (then the signature no longer matches), encoded '..'
    # and backslashes are refused, '//' collapses inside the silo's own prefix
    escape = "updates/clinic/../bank/fed-1/00004/update.masked"
    assert _raw(st, "silo-clinic", "PUT", f"/{b}/{escape}", body=b"t") == 403
    for enc in ("%2e%2e/bank/x", "%2E%2E%2Fbank%2Fx", "..%5Cbank%5Cx"):
        assert _raw(st, "silo-clinic", "PUT", f"/{b}/updates/clinic/{enc}", body=b"t") in (400, 403), enc
    assert _raw(st, "silo-clinic", "PUT", f"/{b}//updates/clinic//dbl", body=b"t") == 200
    # bucket settings (lifecycle expiry, CORS, versioning), also with the '?prefix=' of its own slot
    lifecycle = (
        b"<LifecycleConfiguration><Rule><ID>x</ID><Filter><Prefix>updates/</Prefix></Filter><Status>Enabled"
        b"</Status><Expiration><Days>1</Days></Expiration></Rule></LifecycleConfiguration>"
    )
    versioning = b"<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"
    own = urllib.parse.quote("updates/clinic/", safe="")
    for query, body in (
        ("lifecycle", lifecycle),
        (f"lifecycle&prefix={own}", lifecycle),
        (f"versioning&prefix={own}", versioning),
    ):
        assert (
            _raw(st, "silo-clinic", "PUT", f"/{b}", query, lifecycle if "lifecycle" in query else body) == 403
        )
    assert _raw(st, "silo-clinic", "DELETE", f"/{b}", f"prefix={own}") == 403
    # nothing of bank's changed, and nothing landed outside clinic's prefix
    for k, v in objs.items():
        assert admin.get_object(Bucket=b, Key=k)["Body"].read() == v
    after = {o["Key"]: o["ETag"] for o in admin.list_objects_v2(Bucket=b)["Contents"]}
    changed = {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
    assert changed == {"updates/clinic/fed-1/00001/update.masked", "updates/clinic/dbl"}, changed
    assert (
        c.get_object(Bucket=b, Key="federations/fed-1/rounds/00001/global.safetensors")["Body"].read()
        == b"global"
    )
