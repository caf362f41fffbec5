"""The Kubernetes manifests (deploy/k8s) against the Kubernetes API schemas, no cluster needed.

kustomize itself is not installed in CI, so the overlay is checked the way it is built: every
resource a kustomization lists exists, every patch targets a base resource, and the base
Deployment with the overlay's patch merged in (containers matched by name) is still valid.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = latest_version()


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(folder: Path) -> list[dict]:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out = []
    for entry in kust["resources"]:
        target = folder / entry
        out += resources(target) if target.is_dir() else documents(target)
    return out


def merge(base, patch):
    """Strategic merge, as far as these manifests need: dicts merged, lists of named items merged by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        by_name = {x["name"]: x for x in base}
        return [merge(by_name[x["name"]], x) if x["name"] in by_name else x for x in patch] + [
            x for x in base if x["name"] not in {p["name"] for p in patch}
        ]
    return patch


@pytest.mark.parametrize(
    "path",
    sorted(
        p.relative_to(K8S) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "overlays" not in p.parts
    ),
)
def test_every_manifest_is_valid_kubernetes(path):
    for doc in documents(K8S / path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_api_deployment_is_locked_down_and_probed():
    (deploy,) = [d for d in resources(K8S / "base") if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    env = {e["name"]: e for e in c["env"]}
    assert env["LESION_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lesion-api-key"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["runs"]["readOnly"] and env["LESION_BUNDLE"]["value"].startswith(mounts["runs"]["mountPath"])
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    kinds = {d["kind"] for d in resources(K8S / "base")}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_production_overlay_patches_the_base_and_stays_valid():
    folder = K8S / "overlays" / "production"
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    base = {(d["kind"], d["metadata"]["name"]): d for d in resources(folder)}
    for patch in kust["patches"]:
        if "path" in patch:
            for doc in documents(folder / patch["path"]):
                key = (doc["kind"], doc["metadata"]["name"])
                assert key in base, f"{patch['path']} patches nothing: {key}"
                merged = merge(copy.deepcopy(base[key]), doc)
                kubernetes_validate.validate(merged, VERSION, strict=True)
                assert "nvidia.com/gpu" not in str(merged)  # GPU-free production serving
        else:
            assert (patch["target"]["kind"], patch["target"]["name"]) in base


def test_fold_job_trains_one_fold_per_pod():
    (job,) = documents(K8S / "training" / "cnn-folds-job.yaml")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "cnn" and args[args.index("--fold") + 1] == "$(JOB_COMPLETION_INDEX)"
    (rest,) = documents(K8S / "training" / "rest-job.yaml")
    assert rest["spec"]["template"]["spec"]["containers"][0]["args"][0] == "run"
    out = lambda a: a[a.index("--out") + 1]  # noqa: E731
    assert out(args) == out(rest["spec"]["template"]["spec"]["containers"][0]["args"])
