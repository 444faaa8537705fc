"""The stack's state folder, its names and ports: what every part of :mod:`ops` works on.

``stack.json`` in the state folder (``.silotune/stack/`` by default) records the ports, the silos,
the database and the pids of the running parts; everything else a part keeps (buckets, the Prefect and
MLflow databases, S3 identities, policies, the silos' private folders) lives under the same folder, so
``up`` after ``down`` finds the same federations, runs and models.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.errors import SilotuneError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = Path(".silotune/stack")
DEFAULT_SILOS = ("clinic", "bank", "lab")
DATA_BUCKET = "silotune"
RESULTS_BUCKET = "silotune-results"
MLFLOW_BUCKET = "silotune-mlflow"
RESULTS_BLOCK = "silotune-results"
REGION = "us-east-1"
COORDINATOR_POOL = "coordinator"
PREFECT_AUTH_FILE = "prefect/api-auth-string"
# As silotune.config validates silo names: no '*', '?' or '/', so a name is literal in an S3 action.
SILO_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# The user-facing ports are the usual ones; SeaweedFS's internal servers get theirs explicitly so that
# nothing ends up on a port we did not check.
DEFAULT_PORTS = {
    "prefect": 4200,
    "mlflow": 5000,
    "s3": 8333,
    "s3_grpc": 18333,
    "weed_master": 9333,
    "weed_master_grpc": 19333,
    "weed_volume": 9340,
    "weed_volume_grpc": 19340,
    "weed_filer": 8888,
    "weed_filer_grpc": 18888,
    "weed_admin": 23646,
    "weed_admin_grpc": 33646,
}


class StackError(SilotuneError):
    """The stack could not be started, stopped or reached."""


@dataclass
class Stack:
    """A stack's state folder and what ``stack.json`` records about it."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    silos: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    database: str = "sqlite"
    # Across hosts: the address the Prefect API, MLflow and S3 listen on (loopback by default), whether
    # they speak HTTPS with the certificates in ``tls/`` (:mod:`ops.tls`), and whether the silos' workers
    # run on their own hosts (``silotune silo join`` there) instead of being started here.
    host: str = "127.0.0.1"
    tls: bool = False
    remote_silos: bool = False

    @classmethod
    def load(cls, root: Path | str = DEFAULT_STATE) -> Stack:
        root = Path(root).resolve()
        f = root / "stack.json"
        if not f.is_file():
            return cls(root=root)
        data = json.loads(f.read_text())
        return cls(
            root=root,
            ports=data["ports"],
            silos=data["silos"],
            pids=data.get("pids", {}),
            database=data.get("database", "sqlite"),
            host=data.get("host", "127.0.0.1"),
            tls=data.get("tls", False),
            remote_silos=data.get("remote_silos", False),
        )

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "stack.json.tmp"
        data = {
            "ports": self.ports,
            "silos": self.silos,
            "pids": self.pids,
            "database": self.database,
            "host": self.host,
            "tls": self.tls,
            "remote_silos": self.remote_silos,
        }
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.root / "stack.json")

    # where things live
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def prefect_api(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['prefect']}/api"

    @property
    def prefect_ui(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['prefect']}"

    @property
    def mlflow_uri(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['s3']}"

    @property
    def tls_dir(self) -> Path:
        """The CA (``ca.pem``; its key ``ca.key``) and the services' certificate (``server.pem``/``.key``)."""
        return self.root / "tls"

    @property
    def ca_file(self) -> Path | None:
        """The CA every client of this stack pins (None without TLS)."""
        return self.tls_dir / "ca.pem" if self.tls else None

    def tls_env(self) -> dict[str, str]:
        """The environment that makes Prefect, boto3 and MLflow clients trust this stack's CA, and only it."""
        if not self.tls:
            return {}
        ca = str(self.ca_file)
        return {"PREFECT_API_SSL_CERT_FILE": ca, "AWS_CA_BUNDLE": ca, "MLFLOW_TRACKING_SERVER_CERT_PATH": ca}

    def mlflow_users(self) -> dict[str, str]:
        """MLflow's basic-auth users (``mlflow/users.json``, mode 0600): password by role; {} without TLS."""
        f = self.root / "mlflow" / "users.json"
        return json.loads(f.read_text()) if self.tls and f.is_file() else {}

    def mlflow_env(self, role: str) -> dict[str, str]:
        """MLflow client settings acting as ``role`` (``coordinator``, ``reader``, ``admin``)."""
        users = self.mlflow_users()
        if role not in users:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": role, "MLFLOW_TRACKING_PASSWORD": users[role]}

    def credentials(self) -> dict[str, dict[str, str]]:
        return json.loads((self.root / "s3" / "credentials.json").read_text())

    def identity_env(self, identity: str) -> dict[str, str]:
        """The environment that makes boto3 (silotune, prefect-aws, MLflow) sign as ``identity``."""
        c = self.credentials()[identity]
        return {
            "AWS_ACCESS_KEY_ID": c["access_key"],
            "AWS_SECRET_ACCESS_KEY": c["secret_key"],
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def prefect_auth_file(self) -> Path:
        return self.root / PREFECT_AUTH_FILE

    def prefect_auth_string(self) -> str:
        """The secret the Prefect server requires (``PREFECT_SERVER_API_AUTH_STRING``) and clients send."""
        try:
            return self.prefect_auth_file.read_text().strip()
        except FileNotFoundError:
            raise StackError(
                f"no Prefect API auth string in {self.prefect_auth_file} (`silotune stack up` creates it)"
            ) from None

    def prefect_env(self, identity: str = COORDINATOR_POOL) -> dict[str, str]:
        """The environment of a Prefect client of this stack acting for ``identity``.

        The coordinator (and ``prefect deploy``) keeps its flow results in the S3 result bucket. A silo
        has no right on that bucket and its own Prefect home: what a silo reports travels as signed
        JSON records in its own prefix of the data bucket, never through Prefect's result store.
        """
        env = {"PREFECT_API_URL": self.prefect_api, "PREFECT_API_AUTH_STRING": self.prefect_auth_string()}
        env.update(self.tls_env())
        if identity == COORDINATOR_POOL:
            env["PREFECT_HOME"] = str(self.root / "prefect")
            env["PREFECT_DEFAULT_RESULT_STORAGE_BLOCK"] = f"s3-bucket/{RESULTS_BLOCK}"
        else:
            env["PREFECT_HOME"] = str(self.root / "workers" / identity / "prefect")
        return env

    def store_spec(self) -> dict[str, Any]:
        """The ``store`` section of a federation config that uses this stack's S3 bucket."""
        return {"kind": "s3", "endpoint_url": self.s3_endpoint, "bucket": DATA_BUCKET, "region": REGION}

    def tracking_spec(self, experiment: str = "silotune") -> dict[str, Any]:
        return {"kind": "mlflow", "uri": self.mlflow_uri, "experiment": experiment}

    def local_pools(self) -> list[str]:
        """The pools whose workers this stack starts (the silos' run on their own hosts when remote)."""
        return [COORDINATOR_POOL] if self.remote_silos else self.pools()

    def pools(self) -> list[str]:
        return [COORDINATOR_POOL, *(f"silo-{s}" for s in self.silos)]

    # the silos' and the coordinator's own folders
    def silo_dir(self, silo: str) -> Path:
        """The silo's folder (mode 0700): ``private/`` (its private_dir) and ``data/``."""
        return self.root / "silos" / silo

    def private_dir(self, silo: str) -> Path:
        return self.silo_dir(silo) / "private"

    def data_dir(self, silo: str) -> Path:
        return self.silo_dir(silo) / "data"

    def policy_path(self, silo: str) -> Path:
        """The policy file the silo's worker joins with (``silo join --policy``)."""
        return self.root / "policies" / f"{silo}.yaml"

    @property
    def keys_dir(self) -> Path:
        """The coordinator's keys folder (``security.keys_dir`` of configs made for this stack)."""
        return self.root / "coordinator" / "keys"

    def config_path(self, federation_id: str) -> Path:
        """Where ``up --config`` writes a config made for this stack."""
        return self.root / "federations" / f"{federation_id}.yaml"

    def federation_config(self, federation_id: str) -> Any:
        """A config ``up --config`` made for this stack (a :class:`~silotune.config.FederationConfig`)."""
        from silotune.config import load_config  # imports torch (~4 s): `stack status`/`down` need none

        return load_config(self.config_path(federation_id))
