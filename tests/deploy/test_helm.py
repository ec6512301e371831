"""deploy/helm/rfserve rendered by Helm's own engine (helm-python-sdk) with the default, GPU
and CPU values; the manifests validate against the Kubernetes schemas, and the container's
start command turns the models ConfigMap into the right `rfserve serve` flags."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from rfserve.server.cli_args import build_parser

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed: pip install -e '.[deploy-check]'")

CHART = Path(__file__).parents[2] / "deploy/helm/rfserve"
VALUES = {"default": None, "gpu": CHART / "ci/gpu-values.yaml", "cpu": CHART / "ci/cpu-values.yaml"}
KUBE_VERSION = "1.30.0"


def render(values: str) -> dict[str, dict]:
    """Manifests by kind."""
    path = VALUES[values]
    with helm.Chart.load(CHART) as chart:
        files = chart.render(yaml.safe_load(path.read_text()) if path else None, name="demo", namespace="ml")
    docs = [d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return {d["kind"]: d for d in docs}


def container(manifests: dict[str, dict]) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_chart_lints_clean():
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"] and all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("values", VALUES)
def test_manifests_validate_against_kubernetes_schemas(values):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    manifests = render(values)
    assert {"Deployment", "Service", "ConfigMap"} <= set(manifests)
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def test_default_is_one_gpu_pod_with_probes_and_a_cache_claim():
    m = render("default")
    c = container(m)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert m["Deployment"]["spec"]["replicas"] == 1 and "HorizontalPodAutoscaler" not in m
    volumes = {v["name"]: v for v in m["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] == m["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["models"]["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    assert m["Service"]["spec"]["selector"].items() <= m["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_gpu_values_scale_on_queue_depth():
    m = render("gpu")
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == m["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "rfserve_queue_depth"
    assert "replicas" not in m["Deployment"]["spec"]  # the HPA owns the count
    assert m["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_values_request_no_gpu_and_no_claim():
    m = render("cpu")
    assert "nvidia.com/gpu" not in container(m)["resources"].get("limits", {})
    assert "PersistentVolumeClaim" not in m


def test_models_configmap_becomes_model_flags(tmp_path):
    m = render("gpu")
    (tmp_path / "models").write_text(m["ConfigMap"]["data"]["models"])
    stub = tmp_path / "bin/rfserve"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    c = container(m)
    script = c["args"][0].replace("/etc/rfserve/models", str(tmp_path / "models"))
    run = subprocess.run([*c["command"], script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"})
    args = run.stdout.splitlines()
    assert args[:5] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert args[-6:] == ["--max-steps", "8", "--model", "instaflow-0.9b",
                         "--model", "perflow-sd15=hansyan/perflow-sd15-dreamshaper?variant=v0-1&base=/data/hf/sd15"]
    parsed = build_parser().parse_args(args)                    # every flag the chart writes is one serve takes
    assert (parsed.max_batch, parsed.continuous, parsed.max_steps) == (8, "on", 8)
