"""deploy/k8s/ (GKE Autopilot + KEDA) checked offline: both variants render with kubectl's
kustomize, validate against the Kubernetes JSON schemas (kubernetes-validate) and KEDA's CRD
schemas (@kubernetes-models/keda, compiled from KEDA 2.10.1's CRDs), pass checkov, and agree with
the worker's settings and the instance group's autoscaling in infra/.

Tools: kubectl (`make kube-tools`), kubernetes-validate and checkov in .venv-ci (`make ci-tools`),
node with build/k8s-tools/node_modules (`make kube-tools`). A missing tool skips its test, or fails
it when REQUIRE_CI_TOOLS=1 (make test sets it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from localcloud import autoscale_sim
from tests.test_infra import _missing_tool, ci_tool, run
from worker.settings import HttpSettings, WorkerSettings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "tfserving": K8S / "overlays" / "tfserving"}
K8S_TOOLS = REPO / "build" / "k8s-tools"
# The oldest and the newest Kubernetes schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        _missing_tool("kubectl is not installed: run `make kube-tools` (it renders deploy/k8s with `kubectl kustomize`)")
    return found


@functools.cache
def rendered_text(variant: str) -> str:
    result = run([kubectl(), "kustomize", str(VARIANTS[variant])])
    assert result.returncode == 0, f"kubectl kustomize {VARIANTS[variant]} failed:\n{result.stderr}"
    return result.stdout


def rendered(variant: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered_text(variant)) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict], name: str) -> dict:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def settings_data(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_renders_the_same_set_of_resources(variant):
    kinds = sorted(d["kind"] for d in rendered(variant))
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Deployment", "PodDisruptionBudget",
                            "NetworkPolicy", "ScaledObject", "TriggerAuthentication"])
    assert {d["metadata"].get("namespace") for d in rendered(variant) if d["kind"] != "Namespace"} == {"inference"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_the_kubernetes_schemas(variant, version, tmp_path):
    manifest = tmp_path / f"{variant}.yaml"
    manifest.write_text(rendered_text(variant))
    result = run([ci_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == 6, result.stdout  # all but the two KEDA resources, which the next test checks
    assert "ERROR" not in result.stdout


def test_the_schema_check_rejects_a_broken_manifest(tmp_path):
    docs = rendered("base")
    broken = one(docs, "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(broken))
    result = run([ci_tool("kubernetes-validate"), "--strict", str(manifest)])
    assert result.returncode != 0 and "pathh" in result.stdout + result.stderr


def keda_validate(docs: list[dict]) -> tuple[int, dict]:
    node = shutil.which("node")
    if not node or not (K8S_TOOLS / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        _missing_tool("node or KEDA's schemas are missing: run `make kube-tools` (npm ci into build/k8s-tools)")
    result = subprocess.run([node, str(K8S / "tools" / "validate-keda.cjs")], input=json.dumps(docs),
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NODE_PATH": str(K8S_TOOLS / "node_modules")})
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_keda_resources_validate_against_kedas_crd_schemas(variant):
    code, report = keda_validate(rendered(variant))
    assert code == 0, report["errors"]
    assert sorted(report["checked"]) == ["ScaledObject/inference-worker", "TriggerAuthentication/gcp-workload-identity"]


def test_the_keda_schema_check_rejects_a_broken_scaled_object():
    docs = rendered("base")
    scaled = one(docs, "ScaledObject")
    scaled["spec"]["maxReplicaCount"] = "ten"
    scaled["spec"]["triggers"][0].pop("metadata")
    code, report = keda_validate(docs)
    assert code == 1
    message = report["errors"][0]["message"]
    assert "maxReplicaCount must be integer" in message and "required property metadata" in message


def test_keda_scales_on_the_subscription_backlog_as_the_instance_group_does():
    """KEDA's schema leaves trigger metadata free-form: the gcp-pubsub fields are checked here,
    against the KEDA docs (keda.sh/docs/2.10/scalers/gcp-pub-sub) and infra/'s defaults."""
    docs = rendered("base")
    policy = autoscale_sim.load_policy()
    defaults = autoscale_sim.variable_defaults((REPO / "infra" / "variables.tf").read_text())
    scaled = one(docs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (policy.min_workers, policy.max_workers)
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "gcp-pubsub"
    assert set(trigger["metadata"]) <= {"subscriptionName", "mode", "value", "activationValue"}
    assert trigger["metadata"]["mode"] == "SubscriptionSize"
    assert float(trigger["metadata"]["value"]) == policy.messages_per_worker
    assert trigger["metadata"]["subscriptionName"].endswith(f"/subscriptions/{defaults['jobs_subscription_name']}")
    assert settings_data(docs)["WORKER_SUBSCRIPTION"] == trigger["metadata"]["subscriptionName"]
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"] == {"podIdentity": {"provider": "gcp"}}, "Workload Identity, no key file"
    scale_down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == policy.stabilization_s
    assert scale_down["policies"] == [{"type": "Pods", "value": policy.scale_in_max_vms,
                                       "periodSeconds": policy.scale_in_window_s}]


def test_the_worker_pod_has_probes_identity_and_a_grace_period_covering_its_drain():
    docs = rendered("base")
    pod = one(docs, "Deployment")["spec"]["template"]
    worker = container(docs, "worker")
    port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "http")
    assert port == HttpSettings().port
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["args"] == ["serve"]  # the HTTP face answers the probes and pulls in the same process
    # SIGTERM: gunicorn finishes requests and the pull drains within the graceful timeout; the
    # grace period must be longer, or Kubernetes SIGKILLs a worker mid-batch.
    graceful = float(settings_data(docs).get("WORKER_HTTP_GRACEFUL_TIMEOUT_S", HttpSettings().graceful_timeout_s))
    assert pod["spec"]["terminationGracePeriodSeconds"] >= graceful + 5
    # gunicorn gives the pull graceful - 5 s to drain (worker/http/gunicorn_conf.py): at least what
    # `python -m worker run` gets on a VM (WORKER_SHUTDOWN_TIMEOUT_S).
    assert graceful - 5 >= WorkerSettings().shutdown_timeout_s
    account = one(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("inference-worker@")
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["maxUnavailable"] == 1
    requests = worker["resources"]["requests"]
    assert requests["cpu"] == "2" and worker["resources"]["limits"] == requests  # one e2-standard-2's worth


def test_the_worker_settings_are_real_settings_and_cover_the_instance_groups():
    import hcl2

    data = settings_data(rendered("base"))
    known = {f"WORKER_{f.name.upper()}" for f in fields(WorkerSettings)}
    known |= {f"WORKER_HTTP_{f.name.upper()}" for f in fields(HttpSettings)} | {"WORKER_WEB_FRAMEWORK",
                                                                                "GOOGLE_CLOUD_PROJECT"}
    assert set(data) <= known, f"not settings of worker/settings.py: {set(data) - known}"
    worker_tf = hcl2.loads((REPO / "infra" / "worker.tf").read_text())
    vm_env = next(block["worker_env"] for block in worker_tf["locals"] if "worker_env" in block)
    assert set(vm_env) <= set(data), f"set on the VMs but not on the pods: {set(vm_env) - set(data)}"


def test_the_tfserving_variant_runs_the_tfserving_engine_against_its_sidecar():
    docs = rendered("tfserving")
    data = settings_data(docs)
    sidecar = container(docs, "tfserving")
    rest = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "tfs-rest")
    assert data["WORKER_ENGINE"] == "tfserving"
    assert data["WORKER_TFSERVING_URL"] == f"http://127.0.0.1:{rest}"
    assert f"--rest_api_port={rest}" in sidecar["args"]
    assert "worker-tensorflow" in container(docs, "worker")["image"]
    copier = container(docs, "copy-savedmodel")
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    base_path = next(a.split("=", 1)[1] for a in sidecar["args"] if a.startswith("--model_base_path="))
    assert base_path.startswith(mounts["served-models"]) and base_path in copier["command"][-1]
    assert data["WORKER_MODEL_DIR"] in copier["command"][-1]


def test_checkov_passes_on_the_rendered_manifests_and_every_skip_says_why(tmp_path):
    for variant in VARIANTS:
        (tmp_path / f"{variant}.yaml").write_text(rendered_text(variant))
    result = run([ci_tool("checkov"), "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json",
                  "--compact", "--skip-download"])
    assert result.stdout.strip(), f"checkov printed nothing: {result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for r in reports
              for c in r["results"]["failed_checks"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    assert sum(r["summary"]["passed"] for r in reports) > 100, "checkov evaluated suspiciously few checks"
    # Skips are annotations on the resource (they survive rendering), checkov.io/skipN: CHECK=reason.
    skips = [(key, value) for variant in VARIANTS for doc in rendered(variant)
             for key, value in (doc["metadata"].get("annotations") or {}).items() if key.startswith("checkov.io/skip")]
    assert skips, "expected the documented skip (image digest) to be present"
    for key, value in skips:
        check, _, reason = value.partition("=")
        assert check.startswith("CKV") and len(reason) > 60, f"{key}: {value!r} needs CHECK_ID=reason"
