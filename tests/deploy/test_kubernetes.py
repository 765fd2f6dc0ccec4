"""deploy/kubernetes: the manifests parse, validate against the Kubernetes API schemas (strict:
no unknown field), and agree with each other and with the image.

Not tested (no cluster here): scheduling, the kubelet's gRPC probes against a running pod,
rollouts, the PodDisruptionBudget under a drain, the migration Job against PostgreSQL, and
kustomize's rendering (`kubectl apply -k`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.files import KUBERNETES, parse_dockerfile, port_of

FILES = sorted(KUBERNETES.glob("*.yaml"))
DOCS = [(path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]
RESOURCES = [(path, doc) for path, doc in DOCS if doc["kind"] != "Kustomization"]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in RESOURCES if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    [doc] = of_kind(kind)
    return doc


DEPLOYMENT = one("Deployment")
POD = DEPLOYMENT["spec"]["template"]
[CONTAINER] = POD["spec"]["containers"]
PORTS = {port["name"]: port["containerPort"] for port in CONTAINER["ports"]}
CONFIG = one("ConfigMap")["data"]
JOB = one("Job")
[JOB_CONTAINER] = JOB["spec"]["template"]["spec"]["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_the_expected_resources_and_the_kustomization_lists_every_file() -> None:
    kinds = sorted(doc["kind"] for _, doc in RESOURCES)
    assert kinds == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service", "Service"]
    [kustomization] = [doc for _, doc in DOCS if doc["kind"] == "Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in FILES if path.name != "kustomization.yaml"
    )
    assert not of_kind("Secret"), "no Secret (and so no secret value) is committed"


@pytest.mark.parametrize("version", ["1.27.0", "latest"])
def test_every_manifest_validates_against_the_api_schema(version: str) -> None:
    """1.27: the first release with the gRPC probe GA, the oldest these manifests need."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    for path, doc in RESOURCES:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except Exception as error:  # jsonschema's ValidationError, whose text is the schema
            message = getattr(error, "message", error)
            pytest.fail(f"{path.name} {doc['kind']} (Kubernetes {version}): {message}")


def test_labels_selectors_and_ports_agree() -> None:
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    labels = POD["metadata"]["labels"]
    assert selects(selector, labels)
    grpc_port = port_of(CONFIG["TURNID_LISTEN"])
    metrics_port = port_of(CONFIG["TURNID_METRICS_LISTEN"])
    assert {"grpc": grpc_port, "metrics": metrics_port} == PORTS
    for service in of_kind("Service"):
        assert service["spec"]["selector"] == selector
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert PORTS[target] == port["port"] if isinstance(target, str) else target
        assert service["spec"]["ports"][0]["port"] == grpc_port
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    # The migration Job's pod is selected by none of them.
    job_labels = JOB["spec"]["template"]["metadata"]["labels"]
    assert not selects(selector, job_labels)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], job_labels)
    # The ports are the image's, and the metrics annotation names the metrics port.
    image_env = parse_dockerfile()[-1].env
    assert port_of(image_env["TURNID_LISTEN"]) == grpc_port
    assert port_of(image_env["TURNID_METRICS_LISTEN"]) == metrics_port
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_are_native_grpc_on_the_serving_port_and_stop_fits_the_grace_period() -> None:
    grpc_port = PORTS["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert CONTAINER[probe]["grpc"] == {"port": grpc_port}, probe
    drain, grace = float(CONFIG["TURNID_DRAIN"]), float(CONFIG["TURNID_GRACE"])
    period = POD["spec"]["terminationGracePeriodSeconds"]
    assert period > drain + grace
    assert "lifecycle" not in CONTAINER, "no preStop: --drain does its work (see deployment.yaml)"
    # Liveness cannot kill a replica that reports NOT_SERVING while it drains and finishes.
    liveness = CONTAINER["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= drain + grace
    # A rollout never lowers the ready count.
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    refs = {}
    for variable in container.get("env", []):
        assert "value" not in variable or variable["name"] != "TURNID_DATABASE"
        if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
            refs[variable["name"]] = (ref["name"], ref["key"])
    return refs


def test_database_url_and_password_come_from_a_secret_in_server_and_job() -> None:
    expected = {
        "TURNID_DATABASE": ("turnid-postgres", "dsn"),
        "PGPASSWORD": ("turnid-postgres", "password"),
    }
    assert secret_refs(CONTAINER) == expected
    assert secret_refs(JOB_CONTAINER) == expected
    assert "TURNID_DATABASE" not in CONFIG
    for key in CONFIG:
        assert key.startswith("TURNID_"), key
        assert not any(word in key for word in ("PASSWORD", "SECRET")), key


def test_the_migration_job_migrates_with_the_same_image_and_replicas_do_not() -> None:
    assert JOB_CONTAINER["args"] == ["migrate"]
    assert JOB_CONTAINER["image"] == CONTAINER["image"]
    assert JOB["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert CONTAINER["args"] == ["serve"]
    assert CONFIG["TURNID_MIGRATE"] == "0"


@pytest.mark.parametrize("workload", ["Deployment", "Job"])
def test_security_context_resources_and_writable_paths(workload: str) -> None:
    spec = one(workload)["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind
    # Every mount has its volume; /tmp is writable though the root is not.
    volumes = {volume["name"] for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert set(mounts.values()) <= volumes
    assert "/tmp" in mounts


def test_the_tokens_file_setting_points_into_its_secret_mount() -> None:
    tokens = Path(CONFIG["TURNID_AUTH_TOKENS"])
    mounts = {Path(m["mountPath"]): m for m in CONTAINER["volumeMounts"]}
    mount = mounts[tokens.parent]
    assert mount["readOnly"] is True
    [volume] = [v for v in POD["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "turnid-auth-tokens"
    assert tokens.name == "tokens"
