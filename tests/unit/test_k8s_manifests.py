"""infra/k8s, offline: every manifest of the base and of each overlay, rendered, is valid
against the bundled Kubernetes schemas in strict mode (kubernetes-validate) or, for KEDA's
ScaledObject, against its CRD's openAPIV3Schema made strict (tests/unit/schemas/); the
manifests agree with the code (topics, groups, partitions, probes, settings); the Grafana
dashboard queries only the agreed metric names; the Airflow chart values parse.

The overlays are rendered here for the subset of kustomize they use (resources,
namespace, images, JSON 6902 patches); a kustomization with any other field fails the test
instead of being rendered wrongly.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.settings import Settings
from pipeline.workers import SPECS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.json"
KEDA_SCHEMAS = {
    "ScaledObject": KEDA_SCHEMA,
    "TriggerAuthentication": Path(__file__).parent / "schemas" / "keda-triggerauthentication-v1alpha1.json",
}
KUBERNETES_VERSION = "1.33"
OVERLAYS = ["base", "overlays/production"]

SUPPORTED_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"PriorityClass", "Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
METRICS = {
    "greetflow_messages_consumed_total",
    "greetflow_messages_succeeded_total",
    "greetflow_messages_retried_total",
    "greetflow_messages_dead_lettered_total",
    "greetflow_handler_seconds",
    "greetflow_render_phase_seconds",
    "greetflow_segment_cache_total",
    "greetflow_moderation_decisions_total",
    "greetflow_published_total",
    "greetflow_taken_down_total",
    "greetflow_webhook_deliveries_total",
    "greetflow_step_takeovers_total",
    "greetflow_sweeps_total",
    "greetflow_jobs",
    "greetflow_consumer_lag",
    "greetflow_worker_ready",
}
HISTOGRAMS = {"greetflow_handler_seconds", "greetflow_render_phase_seconds"}


# --------------------------------------------------------------------------- rendering


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _set_image(doc: dict[str, Any], images: list[dict[str, str]]) -> None:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        name, _, tag = c["image"].partition(":")
        for rule in images:
            if rule["name"] == name:
                c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in `directory`."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_KUSTOMIZE_FIELDS
    assert not unknown, f"{directory}: kustomization fields this test cannot render: {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs.extend(render(path) if path.is_dir() else _load_docs(path))
    docs = copy.deepcopy(docs)
    for patch in kust.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"only inline JSON 6902 patches with a target: {patch}"
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        assert len(hits) == 1, f"patch target {target} matches {len(hits)} resources"
        docs[hits[0]] = jsonpatch.apply_patch(docs[hits[0]], ops)
    for d in docs:
        _set_image(d, kust.get("images", []))
        if "namespace" in kust and d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = kust["namespace"]
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / request.param)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# --------------------------------------------------------------------------- schemas


def test_base_lists_every_manifest_file() -> None:
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk
    assert not list(K8S.glob("*.yaml")), "manifests belong under base/ or an overlay"


def test_every_manifest_is_valid_in_strict_mode(rendered: list[dict[str, Any]]) -> None:
    keda = {kind: jsonschema.Draft7Validator(json.loads(p.read_text())) for kind, p in KEDA_SCHEMAS.items()}
    errors: list[str] = []
    for doc in rendered:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc["apiVersion"].startswith("keda.sh/"):
            assert doc["kind"] in keda, f"{where}: no schema vendored for this KEDA kind"
            errors.extend(f"{where}: {e.json_path}: {e.message}" for e in keda[doc["kind"]].iter_errors(doc))
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_keda_schema_is_strict() -> None:
    """A typo'd ScaledObject field fails (the vendored schema forbids unknown properties)."""
    keda = jsonschema.Draft7Validator(json.loads(KEDA_SCHEMA.read_text()))
    doc = _one(render(K8S / "base"), "ScaledObject", "greetflow-moderate")
    assert not list(keda.iter_errors(doc))
    doc["spec"]["maxReplicaCounts"] = 3
    doc["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 10
    messages = sorted(e.message for e in keda.iter_errors(doc))
    assert any("maxReplicaCounts" in m for m in messages), messages
    assert any("is not of type 'string'" in m for m in messages), messages


# --------------------------------------------------------------------------- agreement with the code


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = _one(docs, "ConfigMap", "greetflow")["data"]
    return data


def test_configmap_names_only_real_settings(rendered: list[dict[str, Any]]) -> None:
    unknown = [
        k for k in _config(rendered) if k.removeprefix("GREETFLOW_").lower() not in Settings.model_fields
    ]
    assert not unknown, f"not settings (pipeline/settings.py): {unknown}"
    Settings(**{k.removeprefix("GREETFLOW_").lower(): v for k, v in _config(rendered).items()})


def test_one_deployment_per_worker_kind_with_probes_and_a_pdb(rendered: list[dict[str, Any]]) -> None:
    port = int(_config(rendered)["GREETFLOW_METRICS_PORT"])
    assert port > 0
    commands = {
        **{role: ["greetflow", "worker", role] for role in SPECS},
        "sweep": ["greetflow", "worker", "sweep"],
        "review": ["greetflow", "review", "serve"],
        "api": ["greetflow", "api", "serve"],
    }
    for kind, command in commands.items():
        dep = _one(rendered, "Deployment", f"greetflow-{kind}")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"][: len(command)] == command, c["command"]
        metrics = [p for p in c["ports"] if p["name"] == "metrics"]
        assert metrics and metrics[0]["containerPort"] == port
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        pdb = _one(rendered, "PodDisruptionBudget", f"greetflow-{kind}")
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        assert dep["spec"]["template"]["metadata"]["labels"] == dep["spec"]["selector"]["matchLabels"]


def test_render_workers_get_gpus(rendered: list[dict[str, Any]]) -> None:
    pod = _one(rendered, "Deployment", "greetflow-render")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_keda_scales_each_consumer_on_its_group_lag_within_the_partitions(
    rendered: list[dict[str, Any]],
) -> None:
    partitions = int(_config(rendered)["GREETFLOW_TOPIC_PARTITIONS"])
    bootstrap = _config(rendered)["GREETFLOW_KAFKA_BOOTSTRAP"]
    for role, spec in SPECS.items():
        so = _one(rendered, "ScaledObject", f"greetflow-{role}")
        assert so["spec"]["scaleTargetRef"]["name"] == f"greetflow-{role}"
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert (meta["topic"], meta["consumerGroup"]) == (spec.topic, spec.group_id)
        assert meta["bootstrapServers"] == bootstrap
        auth = _one(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}
        assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= partitions
        # KEDA owns the replica count of a scaled Deployment.
        assert "replicas" not in _one(rendered, "Deployment", f"greetflow-{role}")["spec"]


def test_stack_init_job(rendered: list[dict[str, Any]]) -> None:
    job = _one(rendered, "Job", "greetflow-stack-init")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["greetflow", "stack", "init"]
    assert _config(rendered)["GREETFLOW_MIGRATE_ON_START"] == "false"


# --------------------------------------------------------------------------- grafana, airflow


def _queries(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str | dict):
                out.extend([v] if isinstance(v, str) else _queries({"expr": v.get("query", "")}))
            else:
                out.extend(_queries(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_queries(v))
    return out


def test_grafana_dashboard_queries_only_agreed_metrics() -> None:
    dashboard = json.loads((K8S / "grafana" / "greetflow-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    queries = [q for q in _queries(dashboard) if q != "prometheus"]
    assert all(p.get("targets") for p in dashboard["panels"])
    used: set[str] = set()
    for q in queries:
        for name in re.findall(r"\bgreetflow_[a-z_]+", q):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            used.add(base if base in HISTOGRAMS else name)
    unknown = used - METRICS
    assert not unknown, f"metrics not in the agreed list: {sorted(unknown)}"
    assert {"greetflow_consumer_lag", "greetflow_messages_dead_lettered_total", "greetflow_jobs"} <= used


def test_airflow_values_use_the_kubernetes_executor_on_dags() -> None:
    values = yaml.safe_load((ROOT / "infra" / "airflow" / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["dags"]["gitSync"]["enabled"] is True
    assert values["dags"]["gitSync"]["subPath"] == "dags"
    assert "configMapRef" in values["extraEnvFrom"]
