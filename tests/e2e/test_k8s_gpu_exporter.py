"""The gpu-exporter manifests in k8s/gpu-exporter: core kinds validate
strictly against the Kubernetes schemas (kubernetes-validate), the Prometheus
Operator resources have the shape the exporter needs, the security posture
the docs promise is the one shipped, and the container's flags and
environment are accepted by the real binary.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import REPO, bin_path

K8S = REPO / "k8s" / "gpu-exporter"
CORE = ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "daemonset.yaml", "service.yaml"]
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str) -> dict:
    (d,) = docs(name)
    return d


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_core_manifests_validate_strictly(version):
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", version, *[str(K8S / f) for f in CORE]],
        capture_output=True, text=True, timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed") == 6, out


def test_kustomization_lists_existing_files_in_one_namespace():
    kustomization = one("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    for name in kustomization["resources"]:
        assert (K8S / name).exists(), name
        for d in docs(name):
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                assert d["metadata"]["namespace"] == "tokentap-system", (name, d["kind"])
    # PodMonitor and ServiceMonitor are alternatives: only one is applied.
    assert "podmonitor.yaml" in kustomization["resources"]
    assert "servicemonitor.yaml" not in kustomization["resources"]


def test_rbac_only_reads_pods():
    role, binding = docs("rbac.yaml")
    assert role["kind"] == "ClusterRole"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one("serviceaccount.yaml")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]


def test_daemonset_security_and_mounts():
    ds = one("daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["serviceAccountName"] == one("serviceaccount.yaml")["metadata"]["name"]
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert all(m["readOnly"] is True for m in c["volumeMounts"])
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert volumes == {"pod-resources": "/var/lib/kubelet/pod-resources", "host-proc": "/proc"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port == {"metrics": 9402}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["resources"]["limits"]["memory"] == "64Mi"


def test_scrape_configs_match_the_pods():
    ds = one("daemonset.yaml")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    svc = one("service.yaml")
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    for name, kind, endpoints in (("podmonitor.yaml", "PodMonitor", "podMetricsEndpoints"),
                                  ("servicemonitor.yaml", "ServiceMonitor", "endpoints")):
        m = one(name)
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["kind"] == kind
        target = pod_labels if kind == "PodMonitor" else svc["metadata"]["labels"]
        assert all(target[k] == v for k, v in m["spec"]["selector"]["matchLabels"].items())
        (ep,) = m["spec"][endpoints]
        assert ep["port"] == "metrics"
        assert ep["path"] == "/metrics"
        # The exporter's pod/namespace/container must win over target labels.
        assert ep["honorLabels"] is True
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in ep[
            "relabelings"
        ]


def test_container_flags_and_env_are_accepted_by_the_binary():
    (c,) = one("daemonset.yaml")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "node-from-downward-api") for e in c["env"]}
    # `--version` last: every earlier flag is parsed (and rejected if wrong) first.
    result = subprocess.run([str(bin_path("gpu-exporter")), *c["args"], "--version"],
                            env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu-exporter ")
    bad = subprocess.run([str(bin_path("gpu-exporter")), "--collect-interval=10parsecs", "--version"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
