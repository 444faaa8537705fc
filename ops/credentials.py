"""The stack's secrets: S3 identities and their grants, and the Prefect API auth string.

Everything listens on 127.0.0.1 only. S3 identities are generated once per stack (random keys in
``s3/credentials.json``, mode 0600) and handed to each process through its environment
(:meth:`~ops.state.Stack.identity_env`): the coordinator, MLflow and every silo sign with their own
identity, limited to exact per-silo prefixes (see :func:`identities`). SeaweedFS reads the grants
from ``s3/identities.json``.

The Prefect API requires authentication: the server runs with ``PREFECT_SERVER_API_AUTH_STRING``, a
random secret generated once per stack (``prefect/api-auth-string``, mode 0600, by
:func:`write_prefect_auth`), and every client the stack starts or configures (workers, ``prefect
deploy``, :func:`ops.prefect_server.prefect_api`) sends it as ``PREFECT_API_AUTH_STRING``
(:meth:`~ops.state.Stack.prefect_env`). Requests without it get HTTP 401 (``/api/health`` and
``/api/ready`` stay open for probes); the UI asks for the string once. It is one shared secret: it
keeps out whoever is not part of the federation, not a participant that holds it, so each silo still
enforces its own policy.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from ops.state import DATA_BUCKET, MLFLOW_BUCKET, REGION, RESULTS_BUCKET, SILO_NAME, Stack, StackError


def identities(silos: Iterable[str]) -> dict[str, list[str]]:
    """What each S3 identity may do: SeaweedFS ``Action:bucket/key-pattern`` grants (see :func:`s3_allows`).

    The data bucket's layout gives every silo its own top-level prefixes, so each grant is one exact
    prefix ``<area>/<silo>/*`` (``*`` crosses ``/``, but the ``/`` after the silo's name keeps
    ``clinic`` from matching ``clinic2``; silo names cannot hold ``*`` or ``?``):

    ============ ========================================== ==========================================
    identity     may                                        why
    ============ ========================================== ==========================================
    silo-<s>     write ``updates/<s>/``                     its (signed; masked or encrypted) update
                 write ``results/<s>/``                     its signed result records (plain JSON)
                 write ``messages/<s>/``                    the secure-aggregation messages it sends
                 write ``published/<s>/``                   CKKS: the final adapter it decrypted, when
                                                            it is the designated publisher (readers
                                                            read only that silo's ``published/``)
                 read ``federations/``                      globals, CKKS pointers and aggregates,
                                                            survivors, manifests, the signed config
                 read ``messages/``                         peers' adverts, shares (encrypted to their
                                                            addressee) and unmask answers
                 read ``updates/**.ckks(.sig)``             CKKS: the listed ciphertexts, to recompute
                                                            the sum it decrypts (the shared key's limit:
                                                            see silotune.protection.ckks)
                 nothing else                               no list (readers read exact keys), no
                                                            ``updates/``/``results/`` of anyone (its own
                                                            included), no ``federations/`` write, no
                                                            Prefect result bucket, no MLflow bucket
                                                            (artifacts go through the MLflow server)
    coordinator  read, list the data bucket                 every silo's slots, to aggregate and check
                 write ``federations/``                     globals, aggregates, manifests, state, final
                                                            (never a silo's prefix: it cannot forge a
                                                            silo's update, message or published final)
                 read, write the Prefect result bucket      its own flows' results (``silotune run``)
    mlflow       read, write, list the MLflow bucket        artifacts it serves (``--serve-artifacts``)
    admin        everything                                 ``stack up`` creates the buckets; tests
    ============ ========================================== ==========================================

    SeaweedFS (4.48, checked against the real server in tests/integration/test_stack_s3.py) matches a
    grant with ``*`` or ``?`` as a glob over the whole ``Action:bucket/key`` (``*`` and ``?`` match
    ``/`` too); a grant without them counts only as ``Action:bucket``, the whole bucket, so
    ``Write:bucket/exact/key`` and ``Write:bucket/prefix/`` grant nothing. Keys are checked after
    ``//`` is collapsed and ``..`` is resolved (or refused), and a copy checks Read on its source.
    """
    d = DATA_BUCKET
    ids = {
        "admin": ["Admin", "Read", "Write", "List", "Tagging"],
        "coordinator": [
            f"Read:{d}",
            f"List:{d}",
            f"Write:{d}/federations/*",
            f"Read:{RESULTS_BUCKET}",
            f"Write:{RESULTS_BUCKET}",
        ],
        "mlflow": [f"Read:{MLFLOW_BUCKET}", f"Write:{MLFLOW_BUCKET}", f"List:{MLFLOW_BUCKET}"],
    }
    for s in silos:
        if not SILO_NAME.match(s):
            raise StackError(f"silo name {s!r}: lowercase letters, digits, '-' or '_' (at most 63)")
        ids[f"silo-{s}"] = [
            *(f"Write:{d}/{area}/{s}/*" for area in ("updates", "results", "messages", "published")),
            f"Read:{d}/federations/*",
            f"Read:{d}/messages/*",
            # CKKS: a silo decrypts only a sum it recomputed from the listed, signed uploads. Only
            # ciphertexts (and their signatures) are readable; plaintext and masked uploads are not.
            f"Read:{d}/updates/*.ckks",
            f"Read:{d}/updates/*.ckks.sig",
        ]
    return ids


def s3_allows(actions: Iterable[str], action: str, bucket: str, key: str = "") -> bool:
    """Whether SeaweedFS grants ``action`` on ``bucket/key`` to an identity holding ``actions``.

    A pure-Python copy of the matching observed on the real server (``Identity.CanDo``): a bare
    action (``Read``) covers every bucket; ``Admin`` everything; a grant with ``*``/``?`` is a glob
    over ``Action:bucket/key`` where both match any character, ``/`` included; a grant without them
    is ``Action:bucket`` or ``Admin:bucket`` for the whole bucket and nothing narrower. Keys are
    normalized as the server does (leading ``/`` dropped, ``//`` collapsed).
    """
    acts = list(actions)
    if "Admin" in acts or action in acts:
        return True
    if not bucket:
        return False
    key = re.sub(r"/+", "/", key.replace("\\", "/")).lstrip("/")
    path = f"{bucket}/{key}" if key else bucket
    for a in acts:
        if any(c in a for c in "*?"):
            # fnmatch without character classes: escape '[' so only '*' and '?' are special.
            pattern = a.replace("[", "[[]")
            if any(fnmatch.fnmatchcase(f"{act}:{path}", pattern) for act in (action, "Admin")):
                return True
        elif a in (f"{action}:{bucket}", f"Admin:{bucket}"):
            return True
    return False


def write_identities(stack: Stack, actions: dict[str, list[str]] | None = None) -> None:
    """Keys (generated once, kept) and SeaweedFS's identities file for ``actions`` (default: the stack's)."""
    d = stack.root / "s3"
    d.mkdir(parents=True, exist_ok=True)
    cred_file = d / "credentials.json"
    creds: dict[str, dict[str, str]] = json.loads(cred_file.read_text()) if cred_file.is_file() else {}
    actions = identities(stack.silos) if actions is None else actions
    for ident in actions:
        creds.setdefault(
            ident,
            {"access_key": f"{ident[:12]}-{secrets.token_hex(6)}", "secret_key": secrets.token_urlsafe(30)},
        )
    write_secret(cred_file, json.dumps(creds, indent=2))
    config = {
        "identities": [
            {
                "name": ident,
                "credentials": [
                    {"accessKey": creds[ident]["access_key"], "secretKey": creds[ident]["secret_key"]}
                ],
                "actions": acts,
            }
            for ident, acts in actions.items()
        ]
    }
    write_secret(d / "identities.json", json.dumps(config, indent=2))


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by the owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # also when the file existed with looser bits


def write_prefect_auth(stack: Stack) -> None:
    """Generate the stack's Prefect API auth string once (kept across ``down``/``up``, mode 0600)."""
    f = stack.prefect_auth_file
    current = f.read_text().strip() if f.is_file() else ""
    write_secret(f, current or f"silotune:{secrets.token_urlsafe(32)}")


def s3_client(stack: Stack, identity: str = "admin") -> Any:
    """A boto3 client of this stack's S3 endpoint that signs as ``identity``."""
    env = stack.identity_env(identity)
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        verify=str(stack.ca_file) if stack.ca_file else None,
    )


MLFLOW_ROLES = ("admin", "coordinator", "reader")


def write_mlflow_users(stack: Stack) -> dict[str, str]:
    """MLflow's basic-auth users, one per role, passwords generated once (``mlflow/users.json``, 0600).

    ``admin`` administers the server (users, permissions); ``coordinator`` is what the coordinator's
    flows log and register models as; ``reader`` reads runs and models (dashboards, reviewers). The
    server's default permission is READ, so a run or model the coordinator creates is readable by every
    user and writable by the coordinator (its creator) and the admin only.
    """
    f = stack.root / "mlflow" / "users.json"
    users: dict[str, str] = json.loads(f.read_text()) if f.is_file() else {}
    for role in MLFLOW_ROLES:
        users.setdefault(role, secrets.token_urlsafe(24))
    write_secret(f, json.dumps(users, indent=2))
    return users
