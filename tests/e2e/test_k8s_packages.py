"""What `kubectl apply -k` would apply, for every package under k8s/.

* Every kustomization renders with `kubectl kustomize`, and every file
  under k8s/ is used by one (or is a documented non-Kubernetes file).
* Rendered core objects validate strictly against the Kubernetes schemas
  (kubernetes-validate, offline); rendered custom resources validate against
  their CRDs' schemas (tests/e2e/crds, unknown fields refused).
* A gateway package installs a gateway, not an inference runtime, and no
  pod template annotates Envoy's port 15090 for Prometheus (Istio 1.31+
  refuses to inject such a pod).
* Every monitor and rule follows the one selection convention
  (k8s/components/monitor-selection), and an overlay can change it.
* The plugin configuration exists once (k8s/components/plugin-config) and
  reaches every platform's resource unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_packages import (
    CORE_API_VERSIONS,
    GATEWAY_PACKAGES,
    K8S,
    MONITOR_KINDS,
    PACKAGES,
    crd_problems,
    eg_plugin_config,
    find,
    istio_plugin_config,
    kustomization_dirs,
    kustomize,
    pod_templates,
    render,
)

VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
#: Files under k8s/ that are not applied by a kustomization, and why.
NOT_APPLIED = {
    "observability/rules.yaml": "Prometheus rule file (plain Prometheus; source of prometheusrule.yaml)",
    "observability/rules_test.yaml": "promtool unit tests of rules.yaml",
    "observability/plain-prometheus/scrape-config.yaml": "scrape jobs for plain Prometheus",
    "gateway/istio/istiod-values.yaml": "values for the istio/istiod Helm chart",
}
SELECTION = yaml.safe_load((K8S / "components" / "monitor-selection" / "release-label.yaml").read_text())["labels"]


def all_objects() -> list[tuple[str, dict]]:
    return [(p, d) for p in PACKAGES for d in render(p)]


# --- rendering -------------------------------------------------------------------


def test_every_kustomization_renders_and_every_file_is_used():
    used: set[Path] = set()
    rendered = 0
    for directory in kustomization_dirs():
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        entries = k.get("resources", []) + k.get("components", []) + k.get("transformers", [])
        entries += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
        entries += [p["path"] for p in k.get("patches", []) if "path" in p]
        for entry in entries:
            target = (directory / entry).resolve()
            assert target.exists(), (directory, entry)
            used.add(target)
        if k["kind"] == "Kustomization":  # a Component renders as part of a package
            assert kustomize(directory).strip(), directory
            rendered += 1
    assert rendered >= len(PACKAGES)
    for p in sorted(K8S.rglob("*.y*ml")) + sorted(K8S.rglob("*.json")):
        rel = p.relative_to(K8S).as_posix()
        if p.name != "kustomization.yaml" and rel not in NOT_APPLIED:
            assert p.resolve() in used, f"{rel} is in no kustomization"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_renders_alone_with_its_namespaces(package):
    """`kubectl apply -k` of one package must not need objects of another:
    every namespace it puts objects in is created by it, or is the
    platform's own (Istio's or Envoy Gateway's install creates those)."""
    docs = render(package)
    assert docs, package
    created = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    platform_owned = {"istio-ingress", "envoy-gateway-system"}
    for d in docs:
        ns = d["metadata"].get("namespace")
        if ns and ns not in created:
            assert ns in platform_owned and d["kind"] == "PodMonitor", (package, d["kind"], ns)
    ids = [(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids)), package


# --- strict validation --------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.31.0", "1.37.0"])
def test_rendered_core_objects_validate_strictly(version, tmp_path):
    core = [d for _, d in all_objects() if d["apiVersion"] in CORE_API_VERSIONS]
    kinds = {d["kind"] for d in core}
    assert {"Namespace", "Deployment", "DaemonSet", "Service", "ServiceAccount", "ConfigMap", "ClusterRole"} <= kinds, kinds
    bundle = tmp_path / "core.yaml"
    bundle.write_text(yaml.safe_dump_all(core, sort_keys=False))
    result = subprocess.run([str(VALIDATE), "--strict", "-k", version, str(bundle)],
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed") == len(core), out


def test_strict_validation_catches_a_typo(tmp_path):
    """Negative control: the validator does reject a misspelt field."""
    dep = find(render("examples/vllm"), "Deployment", "vllm-stable")
    dep["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dep))
    result = subprocess.run([str(VALIDATE), "--strict", "-k", "1.31.0", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr


def test_rendered_custom_resources_match_their_crd_schemas():
    custom = [(p, d) for p, d in all_objects() if d["apiVersion"] not in CORE_API_VERSIONS]
    problems = [f"{p}: {problem}" for p, d in custom for problem in crd_problems(d)]
    assert not problems, "\n".join(problems)
    kinds = {(d["apiVersion"], d["kind"]) for _, d in custom}
    assert {k for _, k in kinds} >= {"WasmPlugin", "EnvoyExtensionPolicy", "EnvoyProxy", "PodMonitor", "ServiceMonitor",
                                     "PrometheusRule", "HTTPRoute", "VirtualService", "SecurityPolicy", "EnvoyFilter"}, kinds
    assert len(kinds) == 15, sorted(kinds)


def test_crd_check_rejects_unknown_fields_bad_enums_and_missing_fields():
    """Negative control for the CRD schemas."""
    wp = find(render("gateway/istio"), "WasmPlugin")
    wp["spec"]["failstrategy"] = wp["spec"].pop("failStrategy")
    wp["spec"]["phase"] = "STAT"
    problems = "\n".join(crd_problems(wp))
    assert "'failstrategy' was unexpected" in problems and "'STAT' is not one of" in problems, problems
    route = find(render("gateway/envoy-gateway"), "HTTPRoute", "chat")
    route["spec"]["rules"][0]["timeouts"]["request"] = "forever"
    assert any("does not match" in p for p in crd_problems(route))
    monitor = find(render("gpu-exporter"), "PodMonitor")
    del monitor["spec"]["podMetricsEndpoints"][0]["port"]
    monitor["spec"]["podMetricsEndpoints"][0]["honorlabels"] = True
    assert any("'honorlabels' was unexpected" in p for p in crd_problems(monitor))
    rule = find(render("observability"), "PrometheusRule")
    del rule["spec"]["groups"][0]["name"]
    assert any("'name' is a required property" in p for p in crd_problems(rule))


# --- gateway packages -----------------------------------------------------------------


def is_envoy_pod(template: dict) -> bool:
    """An Envoy proxy pod: an istio-proxy container or Envoy's stats port."""
    containers = template["spec"]["containers"]
    return any(c["name"] == "istio-proxy" or any(p.get("containerPort") == 15090 for p in c.get("ports", []))
               for c in containers)


def prometheus_port_annotations(docs: list[dict]) -> list[str]:
    """Every prometheus.io/* annotation on a gateway pod (Envoy pod
    templates, and Gateway API infrastructure annotations, which istiod
    copies onto its gateway pods), and any naming port 15090 anywhere."""
    annotated = [(w, t["metadata"].get("annotations", {}), is_envoy_pod(t)) for w, t in pod_templates(docs)]
    annotated += [(g, g["spec"].get("infrastructure", {}).get("annotations", {}), True)
                  for g in docs if g["kind"] == "Gateway" and g["apiVersion"].startswith("gateway.networking.k8s.io")]
    return [f"{obj['kind']} {obj['metadata']['name']}: {key}={value}"
            for obj, annotations, envoy in annotated for key, value in annotations.items()
            if key.startswith("prometheus.io/") and (envoy or value == "15090")]


@pytest.mark.parametrize("package", GATEWAY_PACKAGES)
def test_gateway_package_installs_no_inference_workload(package):
    docs = render(package)
    for workload, template in pod_templates(docs):
        labels = template["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") != "vllm-openai", workload["metadata"]["name"]
        for c in template["spec"]["containers"]:
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), workload["metadata"]["name"]
    # No cloud load balancer either: the gateway is exposed as the cluster does it.
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in docs if d["kind"] == "Service")


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_pod_annotates_envoy_prometheus_port(package):
    assert prometheus_port_annotations(render(package)) == []


def test_annotation_check_catches_15090():
    """Negative control: the annotation Istio 1.31 refuses is found, on the
    classic gateway's pod template and on a Gateway API Gateway, and 15090
    on any pod; the runtimes' own annotations (port 8000) are not flagged."""
    docs = render("gateway/istio")
    find(docs, "Deployment", "llm-ingressgateway")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "15090"
    assert prometheus_port_annotations(docs) == ["Deployment llm-ingressgateway: prometheus.io/port=15090"]
    docs = render("gateway/istio-gateway-api")
    find(docs, "Gateway", "llm-gateway")["spec"]["infrastructure"]["annotations"]["prometheus.io/scrape"] = "true"
    assert prometheus_port_annotations(docs) == ["Gateway llm-gateway: prometheus.io/scrape=true"]
    docs = render("examples/vllm")
    assert prometheus_port_annotations(docs) == []
    find(docs, "Deployment", "vllm-canary")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "15090"
    assert prometheus_port_annotations(docs) == ["Deployment vllm-canary: prometheus.io/port=15090"]


# --- monitor selection ------------------------------------------------------------------


def monitors(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in MONITOR_KINDS]


def test_every_monitor_and_rule_follows_the_selection_convention():
    found = [(p, d) for p, d in all_objects() if d["kind"] in MONITOR_KINDS]
    assert {d["kind"] for _, d in found} == MONITOR_KINDS
    assert len(found) >= 6, [(p, d["metadata"]["name"]) for p, d in found]
    assert SELECTION == {"release": "kube-prometheus-stack"}
    for package, d in found:
        labels = d["metadata"].get("labels", {})
        assert all(labels.get(k) == v for k, v in SELECTION.items()), (package, d["kind"], d["metadata"]["name"], labels)


def test_selection_convention_is_overridable_in_one_place(tmp_path):
    """An overlay of any package changes the label on all its monitors and
    rules with one LabelTransformer (the override docs/operations.md shows)."""
    for package in PACKAGES:
        overlay = tmp_path / package.replace("/", "-")
        overlay.mkdir()
        (overlay / "release.yaml").write_text(yaml.safe_dump({
            "apiVersion": "builtin", "kind": "LabelTransformer", "metadata": {"name": "release"},
            "labels": {"release": "monitoring"},
            "fieldSpecs": [{"kind": k, "path": "metadata/labels", "create": True} for k in sorted(MONITOR_KINDS)],
        }))
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / package, overlay)], "transformers": ["release.yaml"],
        }))
        docs = [d for d in yaml.safe_load_all(kustomize(overlay)) if d]
        assert len(docs) == len(render(package))
        for d in monitors(docs):
            assert d["metadata"]["labels"]["release"] == "monitoring", (package, d["metadata"]["name"])
        for d in docs:
            if d["kind"] not in MONITOR_KINDS:
                assert "release" not in d["metadata"].get("labels", {}), (package, d["kind"])


# --- one plugin configuration ------------------------------------------------------------


def test_plugin_configuration_exists_once_and_reaches_every_platform():
    source = yaml.safe_load((K8S / "components" / "plugin-config" / "plugin-config.yaml").read_text())["config"]
    assert istio_plugin_config("gateway/istio") == source
    assert istio_plugin_config("gateway/istio-gateway-api") == source
    assert eg_plugin_config() == source
    # The dynamic-module packages: Envoy Gateway's module entry, Istio's
    # EnvoyFilter (a Struct, which Envoy hands over as its JSON text): the
    # same, but the tenant from the claim's header (k8s/components/module-tenant),
    # with the same cap.
    module_tenant = yaml.safe_load((K8S / "components" / "module-tenant" / "module-tenant.yaml").read_text())["tenant"]
    assert module_tenant["max_values"] == source["tenant"]["max_values"] and "header" in module_tenant
    (module,) = find(render("gateway/envoy-gateway-module"), "EnvoyExtensionPolicy", "tokentap")["spec"]["dynamicModule"]
    assert json.loads(json.dumps(module["config"])) == {**source, "tenant": module_tenant}
    (patch,) = find(render("gateway/istio-module-experimental"), "EnvoyFilter", "tokentap")["spec"]["configPatches"]
    assert json.loads(json.dumps(patch["patch"]["value"]["typed_config"]["filter_config"]["value"])) == {**source, "tenant": module_tenant}
    # The configuration objects themselves are local: kustomize never emits them.
    for package in GATEWAY_PACKAGES:
        assert not any(d["kind"] in ("TokentapPluginConfig", "TokentapModuleTenant") for d in render(package))
    # No package source writes a configuration of its own.
    for p in (K8S / "gateway").rglob("*.yaml"):
        for d in (d for d in yaml.safe_load_all(p.read_text()) if d):
            assert "pluginConfig" not in d.get("spec", {}), p
            assert all("config" not in w for w in d.get("spec", {}).get("wasm") or []), p
            assert all("config" not in m for m in d.get("spec", {}).get("dynamicModule", [])), p
            for c in d.get("spec", {}).get("configPatches", []):
                assert "value" not in c["patch"]["value"]["typed_config"].get("filter_config", {}), p


def test_route_and_backend_labels_read_the_same_on_every_platform():
    """Each platform's Envoy route and cluster names map, through `label`,
    onto one set of label values (a key without `label` is its own value)."""
    config = yaml.safe_load((K8S / "components" / "plugin-config" / "plugin-config.yaml").read_text())["config"]

    def label(table: str, name: str) -> str:
        return config[table][name].get("label", name)

    istio_routes = {h["name"] for h in find(render("gateway/istio"), "VirtualService")["spec"]["http"]}
    rule_names = {r["name"] for d in render("gateway/istio-gateway-api") if d["kind"] == "HTTPRoute" for r in d["spec"]["rules"]}
    eg_routes = {n for n in config["routes"] if n.startswith("httproute/")}
    llm = {"chat", "completions", "embeddings"}
    for names in (istio_routes, rule_names):
        assert {label("routes", n) for n in names if n in config["routes"]} == llm, names
    assert {label("routes", n) for n in eg_routes} == llm
    istio_backends = {n for n in config["backends"] if n.startswith("outbound|")}
    eg_backends = {n for n in config["backends"] if n.startswith("service/")}
    assert {label("backends", n) for n in istio_backends} == {label("backends", n) for n in eg_backends} == {"vllm-stable", "vllm-canary"}
    # Every workload label a route carries is the same whichever platform's name it has.
    by_label: dict[str, set] = {}
    for name, entry in config["routes"].items():
        by_label.setdefault(label("routes", name), set()).add(json.dumps({k: v for k, v in entry.items() if k != "label"}, sort_keys=True))
    assert all(len(v) == 1 for v in by_label.values()), by_label


def test_streaming_routes_are_not_cut_by_a_route_timeout():
    vs = find(render("gateway/istio"), "VirtualService")
    for h in vs["spec"]["http"]:
        if h["name"] in ("chat", "completions"):
            assert "timeout" not in h, h["name"]  # Istio's default: no route timeout
    for package in ("gateway/envoy-gateway", "gateway/istio-gateway-api"):
        for name in ("chat", "completions"):
            (rule,) = find(render(package), "HTTPRoute", name)["spec"]["rules"]
            assert rule["timeouts"] == {"request": "0s"}, (package, name)  # zero: no timeout
