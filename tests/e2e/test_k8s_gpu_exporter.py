"""The gpu-exporter package (k8s/gpu-exporter, and its ServiceMonitor
variant k8s/examples/gpu-exporter-servicemonitor) as `kubectl kustomize`
renders it: core kinds validate strictly against the Kubernetes schemas
(kubernetes-validate), the Prometheus Operator resources have the shape the
exporter needs, the security posture the docs promise is the one shipped,
and the container's flags and environment are accepted by the real binary.
(CRD schema checks and the monitor-selection label: test_k8s_packages.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import bin_path
from k8s_packages import find, render

PACKAGE = "gpu-exporter"
SERVICEMONITOR_VARIANT = "examples/gpu-exporter-servicemonitor"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def one(kind: str, package: str = PACKAGE) -> dict:
    return find(render(package), kind)


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_core_objects_validate_strictly(version, tmp_path):
    core = [d for d in render(PACKAGE) if d["apiVersion"] != "monitoring.coreos.com/v1"]
    assert len(core) == 6
    bundle = tmp_path / "gpu-exporter.yaml"
    bundle.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(VALIDATE), "--strict", "-k", version, str(bundle)],
                            capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed") == 6, out


@pytest.mark.parametrize("package,monitor", [(PACKAGE, "PodMonitor"), (SERVICEMONITOR_VARIANT, "ServiceMonitor")])
def test_package_is_one_namespace_with_exactly_one_monitor(package, monitor):
    docs = render(package)
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "tokentap-system", (package, d["kind"])
    # PodMonitor and ServiceMonitor are alternatives: each would scrape every exporter.
    assert [d["kind"] for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")] == [monitor]
    others = {d["kind"] for d in docs} - {"PodMonitor", "ServiceMonitor"}
    assert others == {d["kind"] for d in render(PACKAGE)} - {"PodMonitor"}


def test_rbac_only_reads_pods():
    role, binding = one("ClusterRole"), one("ClusterRoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]


def test_daemonset_security_and_mounts():
    ds = one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
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
    ds = one("DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    svc = one("Service")
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    for package, kind, endpoints in ((PACKAGE, "PodMonitor", "podMetricsEndpoints"),
                                     (SERVICEMONITOR_VARIANT, "ServiceMonitor", "endpoints")):
        m = one(kind, package)
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
    (c,) = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "node-from-downward-api") for e in c["env"]}
    # `--version` last: every earlier flag is parsed (and rejected if wrong) first.
    result = subprocess.run([str(bin_path("gpu-exporter")), *c["args"], "--version"],
                            env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu-exporter ")
    bad = subprocess.run([str(bin_path("gpu-exporter")), "--collect-interval=10parsecs", "--version"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
