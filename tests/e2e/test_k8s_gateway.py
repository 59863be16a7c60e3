"""The gateway filter's Kubernetes deployment (k8s/gateway, and the gateway
scrape resources in k8s/observability).

* Core kinds validate strictly against the Kubernetes schemas
  (kubernetes-validate, offline).
* CRD kinds (Istio, Envoy Gateway, Gateway API, Prometheus Operator) are
  checked against minimal schemas written from their API sources: required
  fields, known fields only, enum values.
* The manifests agree with each other: selectors find the pods, routes find
  their Gateway and Services, the plugin configuration's route and backend
  keys are the names the platform gives Envoy routes and clusters, tracing
  points at a real collector cluster.
* No drift: the stats tags and histogram buckets in the Istio and Envoy
  Gateway manifests equal envoy/stats-config.yaml.
* The real Envoy + the built filter run with the bootstrap each platform
  would generate from these manifests (Istio's stats_config from
  extraStatTags/proxyStatsMatcher plus the bootstrap override; Envoy
  Gateway's default bootstrap with our JSONPatch), the platform's route and
  cluster names, and the embedded plugin configuration: the configuration is
  accepted, every label comes out as a Prometheus label with the configured
  workload values, histograms have our buckets, spans reach the collector
  through the platform's cluster name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness import REPO, parse_exposition, post_json, stream_timed, get, wait_until
from otlp_receiver import OtlpReceiver
from ops_stack import (
    EG_DEFAULT_STATS_CONFIG,
    GATEWAY,
    ISTIO_EXTRA_TAG_REGEX,
    OBSERVABILITY,
    add_static_cluster,
    all_docs,
    eg_envoy_proxy,
    eg_extension_policy,
    eg_merged_cluster_name,
    eg_plugin_config,
    eg_route_names,
    find,
    gateway_config,
    hs256_jwt,
    insert_jwt_authn,
    istio_bootstrap_override,
    istio_cluster_name,
    istio_plugin_config,
    istio_proxy_config,
    istio_stats_config,
    json_patch,
    launch_envoy,
    manifest_files,
    rename_clusters,
    rename_routes,
    set_plugin_config_raw,
    set_vm_env_keys,
    stats_config,
    system_tool,
    yaml_docs,
)
from stack import start_sim

VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
CORE_API_VERSIONS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "batch/v1"}
PLATFORM_LABELS = {
    "app.kubernetes.io/name": "vllm-openai",
    "app.kubernetes.io/part-of": "llm-platform",
    "workload.k8sllm.io/model": "mistral-7b",
    "workload.k8sllm.io/route-class": "interactive",
    "workload.k8sllm.io/team": "platform-ai",
}
ISSUER = "https://auth.llm-platform.example"
SECRET = b"tokentap-k8s-test-secret-0123456789"
CHAT = "/v1/chat/completions"


def docs_everywhere() -> list[dict]:
    return all_docs(GATEWAY) + all_docs(OBSERVABILITY)


def common_docs() -> list[dict]:
    return all_docs(GATEWAY / "common")


# --- core kinds ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.31.0", "1.37.0"])
def test_core_manifests_validate_strictly(version, tmp_path):
    core = [d for d in docs_everywhere() if d["apiVersion"] in CORE_API_VERSIONS]
    kinds = sorted({d["kind"] for d in core})
    assert {"Namespace", "Deployment", "Service", "ServiceAccount", "ConfigMap"} <= set(kinds), kinds
    bundle = tmp_path / "core.yaml"
    bundle.write_text(yaml.safe_dump_all(core, sort_keys=False))
    result = subprocess.run(
        [str(VALIDATE), "--strict", "-k", version, str(bundle)], capture_output=True, text=True, timeout=120
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed") == len(core), out


def test_strict_validation_catches_a_typo(tmp_path):
    """Negative control: the validator does reject a misspelt field."""
    dep = find(common_docs(), "Deployment", "vllm-stable")
    broken = json.loads(json.dumps(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken))
    result = subprocess.run([str(VALIDATE), "--strict", "-k", "1.31.0", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "imagee" in result.stdout + result.stderr


def test_vllm_deployments_carry_the_label_contract():
    docs = common_docs()
    for track in ("stable", "canary"):
        dep = find(docs, "Deployment", f"vllm-{track}")
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        for key, value in PLATFORM_LABELS.items():
            assert labels.get(key) == value, (track, key)
        # The selector picks exactly this Deployment's pods.
        sel = dep["spec"]["selector"]["matchLabels"]
        assert all(labels[k] == v for k, v in sel.items()) and sel["app.kubernetes.io/instance"] == f"vllm-{track}"
        (c,) = pod["spec"]["containers"]
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/path"] == "/metrics"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        args = dict((a.split("=", 1) + [""])[:2] for a in c["args"])
        assert args["--served-model-name"] == labels["workload.k8sllm.io/model"]
        assert args["--port"] == str(port)
        # Runtime spans go to the collector Service's OTLP/gRPC port.
        otlp = args["--otlp-traces-endpoint"]
        collector = find(docs, "Service", "otel-collector")
        grpc_port = {p["name"]: p["port"] for p in collector["spec"]["ports"]}["otlp-grpc"]
        assert otlp == f"http://otel-collector.{collector['metadata']['namespace']}.svc.cluster.local:{grpc_port}"
        env = {e["name"]: e for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]["value"] == "grpc"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # Each Service selects its own track, on the container's named port.
        svc = find(docs, "Service", f"vllm-{track}")
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


# --- CRD kinds: minimal schemas ---------------------------------------------------

ENUMS = {
    ("WasmPlugin", "phase"): {"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"},
    ("WasmPlugin", "failStrategy"): {"FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"},
    ("WasmPlugin", "imagePullPolicy"): {"UNSPECIFIED_POLICY", "IfNotPresent", "Always"},
    ("WasmPlugin", "type"): {"UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"},
}

#: (apiVersion, kind) -> (required spec fields, allowed spec fields). Written
#: from istio/api (extensions/v1alpha1/wasm.proto, networking/v1, security/v1),
#: envoyproxy/gateway api/v1alpha1 (v1.9.0), Gateway API v1 and the
#: Prometheus Operator's monitoring.coreos.com/v1.
SPECS = {
    ("extensions.istio.io/v1alpha1", "WasmPlugin"): (
        {"url"},
        {"selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy", "imagePullSecret",
         "verificationKey", "pluginConfig", "pluginName", "phase", "priority", "failStrategy", "vmConfig", "match", "type"},
    ),
    ("networking.istio.io/v1", "Gateway"): ({"servers"}, {"selector", "servers"}),
    ("networking.istio.io/v1", "VirtualService"): ({"hosts"}, {"hosts", "gateways", "http", "tls", "tcp", "exportTo"}),
    ("security.istio.io/v1", "RequestAuthentication"): ({"jwtRules"}, {"selector", "targetRef", "targetRefs", "jwtRules"}),
    ("security.istio.io/v1", "AuthorizationPolicy"): (set(), {"selector", "targetRef", "targetRefs", "action", "rules", "provider"}),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): (
        set(),
        {"provider", "logging", "telemetry", "bootstrap", "concurrency", "routingType", "extraArgs", "mergeGateways",
         "mergeBackends", "shutdown", "filterOrder", "backendTLS", "ipFamily", "preserveRouteOrder", "luaValidation",
         "dynamicModules", "geoIP", "mergeType"},
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): (
        set(), {"targetRef", "targetRefs", "targetSelectors", "mergeType", "wasm", "extProc", "lua", "dynamicModule"},
    ),
    ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"): (
        set(), {"targetRef", "targetRefs", "targetSelectors", "mergeType", "apiKeyAuth", "cors", "csrf", "basicAuth",
                "jwt", "oidc", "extAuth", "authorization"},
    ),
    ("gateway.networking.k8s.io/v1", "GatewayClass"): ({"controllerName"}, {"controllerName", "parametersRef", "description"}),
    ("gateway.networking.k8s.io/v1", "Gateway"): (
        {"gatewayClassName", "listeners"}, {"gatewayClassName", "listeners", "addresses", "infrastructure", "backendTLS", "allowedListeners"},
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): (set(), {"parentRefs", "hostnames", "rules"}),
    ("monitoring.coreos.com/v1", "PodMonitor"): (
        {"selector", "podMetricsEndpoints"},
        {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit"},
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ({"selector", "endpoints"}, {"selector", "endpoints", "namespaceSelector", "jobLabel"}),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ({"groups"}, {"groups"}),
}


def crd_docs() -> list[dict]:
    return [d for d in docs_everywhere() if d["apiVersion"] not in CORE_API_VERSIONS]


def shape_problems(d: dict) -> list[str]:
    key = (d["apiVersion"], d["kind"])
    if key not in SPECS:
        return [f"{key}: no schema (add one to SPECS)"]
    problems = []
    meta = d.get("metadata", {})
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta.get("name", "")):
        problems.append(f"{key}: bad metadata.name {meta.get('name')!r}")
    if d["kind"] != "GatewayClass" and not meta.get("namespace"):
        problems.append(f"{key} {meta.get('name')}: no namespace")
    required, allowed = SPECS[key]
    spec = d.get("spec", {})
    if missing := required - set(spec):
        problems.append(f"{key} {meta.get('name')}: missing {sorted(missing)}")
    if unknown := set(spec) - allowed:
        problems.append(f"{key} {meta.get('name')}: unknown fields {sorted(unknown)}")
    for (kind, field), values in ENUMS.items():
        if d["kind"] == kind and field in spec and spec[field] not in values:
            problems.append(f"{kind}.{field}={spec[field]!r} not in {sorted(values)}")
    return problems


def test_every_crd_manifest_has_a_known_kind_and_a_valid_shape():
    docs = crd_docs()
    problems = [p for d in docs for p in shape_problems(d)]
    assert not problems, "\n".join(problems)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert len(kinds) >= 13, kinds


def test_crd_shape_check_rejects_bad_manifests():
    """Negative control for the minimal schemas."""
    wp = find(all_docs(GATEWAY), "WasmPlugin")
    typo = json.loads(json.dumps(wp))
    typo["spec"]["failstrategy"] = typo["spec"].pop("failStrategy")
    assert any("unknown fields ['failstrategy']" in p for p in shape_problems(typo))
    bad_enum = json.loads(json.dumps(wp))
    bad_enum["spec"]["phase"] = "STAT"
    assert any("phase='STAT'" in p for p in shape_problems(bad_enum))
    no_url = json.loads(json.dumps(wp))
    del no_url["spec"]["url"]
    assert any("missing ['url']" in p for p in shape_problems(no_url))
    assert shape_problems({**wp, "apiVersion": "extensions.istio.io/v1"})


# --- Istio ---------------------------------------------------------------------------


def test_istio_wasmplugin_targets_the_gateway_fail_open_in_stats_phase():
    docs = all_docs(GATEWAY / "istio")
    wp = find(docs, "WasmPlugin")
    spec = wp["spec"]
    dep = find(docs, "Deployment", "llm-ingressgateway")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert wp["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert all(pod_labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    assert spec["phase"] == "STATS" and spec["failStrategy"] == "FAIL_OPEN" and spec["type"] == "HTTP"
    assert spec["url"].startswith("oci://") and spec["pluginName"] == "tokentap"
    assert spec["vmConfig"]["env"] == [
        {"name": "POD_NAME", "valueFrom": "HOST"},
        {"name": "POD_NAMESPACE", "valueFrom": "HOST"},
    ]
    # Istio's gateway injection template gives istio-proxy these variables.
    assert dep["spec"]["template"]["metadata"]["annotations"]["inject.istio.io/templates"] == "gateway"
    # The bootstrap override names a ConfigMap in the gateway's namespace.
    cm_name = dep["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/bootstrapOverride"]
    cm = find(docs, "ConfigMap", cm_name)
    assert cm["metadata"]["namespace"] == dep["metadata"]["namespace"]
    # The JWT rules and the plugin read the same gateway's traffic.
    for kind in ("RequestAuthentication", "AuthorizationPolicy"):
        pol = find(docs, kind)
        assert pol["metadata"]["namespace"] == dep["metadata"]["namespace"]
        assert pol["spec"]["selector"] == spec["selector"]


def test_istio_plugin_config_names_match_the_virtualservice():
    docs = all_docs(GATEWAY / "istio") + common_docs()
    vs = find(docs, "VirtualService")
    gw = find(docs, "Gateway", "llm-gateway")
    dep = find(docs, "Deployment", "llm-ingressgateway")
    # The Istio Gateway selects the gateway pods and serves the VS hosts.
    assert all(dep["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in gw["spec"]["selector"].items())
    assert f"{gw['metadata']['namespace']}/{gw['metadata']['name']}" in vs["spec"]["gateways"]
    assert set(vs["spec"]["hosts"]) <= {h for s in gw["spec"]["servers"] for h in s["hosts"]}
    server_port = gw["spec"]["servers"][0]["port"]["number"]
    ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["http"] == server_port
    svc = find(docs, "Service", "llm-ingressgateway")
    assert svc["spec"]["ports"][0]["targetPort"] == server_port

    plugin = istio_plugin_config()
    llm_routes = {h["name"] for h in vs["spec"]["http"] if h["match"][0]["uri"].get("exact", "").startswith("/v1/") and "models" not in h["name"]}
    assert set(plugin["routes"]) == llm_routes == {"chat", "completions", "embeddings"}
    # Matches carry no names of their own, so Istio names the Envoy route `http[].name`.
    assert all("name" not in m for h in vs["spec"]["http"] for m in h["match"])
    services = {(s["metadata"]["name"], s["metadata"]["namespace"]): {p["port"] for p in s["spec"]["ports"]}
                for s in docs if s["kind"] == "Service"}
    clusters = set()
    for h in vs["spec"]["http"]:
        weights = [r.get("weight", 100) for r in h["route"]]
        assert sum(weights) == 100, h["name"]
        for r in h["route"]:
            host, port = r["destination"]["host"], r["destination"]["port"]["number"]
            name, ns, *_ = host.split(".")
            assert host == f"{name}.{ns}.svc.cluster.local" and port in services[(name, ns)], host
            clusters.add(istio_cluster_name(host, port))
    assert set(plugin["backends"]) == clusters
    assert any("canary" in c for c in clusters) and any("stable" in c for c in clusters)
    # Tracing goes to the collector Service through Istio's cluster for it.
    collector = find(docs, "Service", "otel-collector")
    http_port = {p["name"]: p["port"] for p in collector["spec"]["ports"]}["otlp-http"]
    host = f"otel-collector.{collector['metadata']['namespace']}.svc.cluster.local"
    assert plugin["tracing"]["cluster"] == istio_cluster_name(host, http_port)
    # Route classes and teams are the workload label values of the contract.
    assert {w["team"] for w in plugin["routes"].values()} == {"platform-ai"}
    assert plugin["defaults"] == {"model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}
    # The tenant is the verified JWT claim that Istio's jwt_authn stores under `payload`.
    assert plugin["tenant"]["metadata"] == {"namespace": "envoy.filters.http.jwt_authn", "path": ["payload", "tenant"]}


def test_istio_stats_tags_and_buckets_equal_the_plain_envoy_config():
    sc = stats_config()
    tags = {t["tag_name"]: t["regex"] for t in sc["stats_tags"]}
    proxy = istio_proxy_config()
    assert proxy["extraStatTags"] == [t["tag_name"] for t in sc["stats_tags"]]
    # What Istio generates for each extraStatTags entry is our regex, byte for byte.
    for tag in proxy["extraStatTags"]:
        assert ISTIO_EXTRA_TAG_REGEX.format(tag=tag) == tags[tag], tag
    mesh = yaml.safe_load((GATEWAY / "istio" / "istiod-values.yaml").read_text())["meshConfig"]["defaultConfig"]
    assert mesh["extraStatTags"] == proxy["extraStatTags"]
    assert mesh["proxyStatsMatcher"] == proxy["proxyStatsMatcher"]
    override = istio_bootstrap_override()
    assert set(override) == {"stats_config"} and set(override["stats_config"]) == {"histogram_bucket_settings"}
    assert override["stats_config"]["histogram_bucket_settings"] == sc["histogram_bucket_settings"], yaml.safe_dump(
        sc["histogram_bucket_settings"]
    )


def test_istio_stats_matcher_regex_selects_exactly_the_tokentap_stats():
    """RE2 full match semantics (Envoy's safe_regex) on names built like the
    filter builds them (filters/core/src/metrics.rs: fields, then the name)."""
    (regex,) = istio_proxy_config()["proxyStatsMatcher"]["inclusionRegexps"]
    families = catalogue_families()
    assert len(families) >= 25
    for fam in families:
        for fields in ("", "label=.=tenant;.;", "route=.=chat;.;tenant=.=acme;.;backend=.=outbound_8000__vllm-stable.llm.svc.cluster.local;.;"):
            assert re.fullmatch(regex, f"wasmcustom.{fields}{fam}"), fam
    for other in ("cluster.xds-grpc.upstream_rq_total", "wasmcustom.other_plugin_requests", "http.inbound_0.0.0.0_8080.rq_total",
                  "wasm.envoy.wasm.runtime.v8.active", "llm_gateway_requests_total"):
        assert not re.fullmatch(regex, other), other


def catalogue_families() -> list[str]:
    text = (REPO / "filters" / "core" / "src" / "metrics.rs").read_text()
    block = text[text.index("families! {"):]
    block = block[: block.index("\n}\n")]
    return re.findall(r'=> "([a-z_]+)", (?:Counter|Gauge|Histogram),', block)


# --- Envoy Gateway ---------------------------------------------------------------------


def test_envoy_gateway_resources_reference_each_other():
    docs = all_docs(GATEWAY / "envoy-gateway") + common_docs()
    gwc = find(docs, "GatewayClass")
    assert gwc["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    gw = find(docs, "Gateway", "llm-gateway")
    assert gw["spec"]["gatewayClassName"] == gwc["metadata"]["name"]
    ref = gw["spec"]["infrastructure"]["parametersRef"]
    ep = eg_envoy_proxy()
    assert (ref["group"], ref["kind"], ref["name"]) == ("gateway.envoyproxy.io", "EnvoyProxy", ep["metadata"]["name"])
    assert ep["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert "mergeBackends" in ep["spec"] and "mergeGateways" not in ep["spec"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in ep["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}

    eep = eg_extension_policy()
    target = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw["metadata"]["name"]}
    assert eep["spec"]["targetRefs"] == [target] and eep["metadata"]["namespace"] == gw["metadata"]["namespace"]
    (wasm,) = eep["spec"]["wasm"]
    assert wasm["failOpen"] is True and wasm["rootID"] == "tokentap"
    assert wasm["code"]["type"] == "Image" and ":" in wasm["code"]["image"]["url"] and "http" not in wasm["code"]
    assert wasm["env"]["hostKeys"] == sorted(env)
    sp = find(docs, "SecurityPolicy")
    assert sp["spec"]["targetRefs"] == [target]

    listeners = {l["name"]: l for l in gw["spec"]["listeners"]}
    services = {(s["metadata"]["name"], s["metadata"]["namespace"]): {p["port"] for p in s["spec"]["ports"]}
                for s in docs if s["kind"] == "Service"}
    route_names, clusters = {}, set()
    for route in (d for d in docs if d["kind"] == "HTTPRoute"):
        ns = route["metadata"]["namespace"]
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gw["metadata"]["name"] and ns == gw["metadata"]["namespace"]
        listener = listeners[parent["sectionName"]]
        assert set(route["spec"]["hostnames"]) <= {listener["hostname"]}
        for rule in route["spec"]["rules"]:
            assert len(rule["matches"]) == 1, "one match per rule keeps one route name per rule"
            weights = [b.get("weight", 1) for b in rule["backendRefs"]]
            assert sum(weights) > 0
            for b in rule["backendRefs"]:
                assert b["port"] in services[(b["name"], ns)], b
                assert "filters" not in b, "a backendRef filter makes Envoy Gateway skip the merged cluster"
                clusters.add(eg_merged_cluster_name(ns, b["name"], b["port"]))
        route_names[route["metadata"]["name"]] = eg_route_names(route, listener.get("hostname"))

    plugin = eg_plugin_config()
    llm = {name for r, names in route_names.items() if r != "models" for name in names}
    assert set(plugin["routes"]) == llm
    assert "httproute/llm/chat/rule/0/match/0/llm_example_com" in plugin["routes"]
    assert set(plugin["backends"]) == clusters
    assert any("canary" in c for c in clusters)
    # Route names fit the configured label length (no two routes cut to one value).
    assert max(len(n) for n in llm) <= plugin["limits"]["max_value_length"]
    assert plugin["tenant"]["metadata"] == {"namespace": "envoy.filters.http.jwt_authn", "path": [sp["spec"]["jwt"]["providers"][0]["name"], "tenant"]}
    # Tracing: the static cluster added by the bootstrap patch, resolving the collector Service.
    collector = find(docs, "Service", "otel-collector")
    http_port = {p["name"]: p["port"] for p in collector["spec"]["ports"]}["otlp-http"]
    (cluster_patch,) = [p for p in ep["spec"]["bootstrap"]["jsonPatches"] if p["path"] == "/static_resources/clusters/-"]
    cluster = cluster_patch["value"]
    assert plugin["tracing"]["cluster"] == cluster["name"] == cluster["load_assignment"]["cluster_name"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": f"otel-collector.{collector['metadata']['namespace']}.svc.cluster.local", "port_value": http_port}


def test_envoy_gateway_bootstrap_patch_equals_the_plain_envoy_config():
    sc = stats_config()
    patches = eg_envoy_proxy()["spec"]["bootstrap"]
    assert patches["type"] == "JSONPatch"
    tags = [p["value"] for p in patches["jsonPatches"] if p["path"] == "/stats_config/stats_tags/-"]
    assert all(p["op"] == "add" for p in patches["jsonPatches"])
    assert tags == sc["stats_tags"]
    (hb,) = [p["value"] for p in patches["jsonPatches"] if p["path"] == "/stats_config/histogram_bucket_settings"]
    assert hb == sc["histogram_bucket_settings"]
    # Applied to Envoy Gateway's default bootstrap, the result is ours plus its own tags.
    patched = json_patch({"stats_config": EG_DEFAULT_STATS_CONFIG, "static_resources": {"clusters": []}}, patches["jsonPatches"])
    assert patched["stats_config"]["stats_tags"][4:] == sc["stats_tags"]
    assert patched["stats_config"]["histogram_bucket_settings"] == sc["histogram_bucket_settings"]


# --- monitors --------------------------------------------------------------------------------


def test_gateway_podmonitors_find_the_proxy_pods_and_keep_the_tokentap_families():
    obs = all_docs(OBSERVABILITY)
    istio = find(obs, "PodMonitor", "llm-gateway-istio")
    dep = find(all_docs(GATEWAY / "istio"), "Deployment", "llm-ingressgateway")
    tmpl = dep["spec"]["template"]
    assert istio["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert all(tmpl["metadata"]["labels"].get(k) == v for k, v in istio["spec"]["selector"]["matchLabels"].items())
    (ep,) = istio["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
    assert ports[ep["port"]] == 15090 and ep["path"] == "/stats/prometheus"
    eg = find(obs, "PodMonitor", "llm-gateway-envoy-gateway")
    sel = eg["spec"]["selector"]["matchLabels"]
    assert sel["gateway.envoyproxy.io/owning-gateway-name"] == "llm-gateway"
    assert sel["gateway.envoyproxy.io/owning-gateway-namespace"] == "llm"
    (ep2,) = eg["spec"]["podMetricsEndpoints"]
    assert ep2["port"] == "metrics" and ep2["path"] == "/stats/prometheus"
    for pm in (istio, eg):
        (keep,) = pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
        assert keep["action"] == "keep"
        for fam in catalogue_families():
            for suffix in ("", "_bucket", "_count", "_sum"):
                assert re.fullmatch(keep["regex"], fam + suffix), fam
        assert not re.fullmatch(keep["regex"], "envoy_http_downstream_rq_total")


def test_plain_prometheus_scrape_config_is_valid(tmp_path):
    """promtool checks the jobs (this Debian build lacks the Kubernetes service
    discovery, so the pod discovery is swapped for a static target)."""
    config = yaml.safe_load((OBSERVABILITY / "scrape-config.yaml").read_text())
    for job in config["scrape_configs"]:
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:15090"]}]
        (keep,) = job["metric_relabel_configs"]
        assert all(re.fullmatch(keep["regex"], f) for f in catalogue_families())
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(system_tool("promtool")), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the real Envoy with each platform's bootstrap -------------------------------------------


def _traffic(envoy, token: str, canary_header: bool = True) -> dict:
    """A small mix: chat (stream + JSON, stable and canary), a repeated prompt
    (prompt-cache hit), completions. Returns the responses' statuses."""
    auth = {"authorization": f"Bearer {token}"}
    statuses = []
    long_prompt = "Explain the rollout plan for the canary model server, step by step. " * 3
    chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 4}
    for _ in range(2):  # the second one hits the prompt cache
        statuses.append(post_json(envoy.url + CHAT, chat, headers=auth).status)
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "hi"}]}
    status, _, _, _ = stream_timed(envoy.url + CHAT, stream, headers=auth)
    statuses.append(status)
    if canary_header:
        status, _, _, _ = stream_timed(envoy.url + CHAT, stream, headers={**auth, "x-canary": "1"})
        statuses.append(status)
    statuses.append(post_json(envoy.url + "/v1/completions", {"model": "mistral-7b", "prompt": "hello", "max_tokens": 2}, headers=auth).status)
    # Without a token the edge refuses the request (jwt_authn); no tenant is invented.
    statuses.append(post_json(envoy.url + CHAT, chat).status)
    return statuses


def _check_labels_and_buckets(scrape, *, routes: dict[str, str], backends: dict[str, str]):
    """Every tokentap sample is a clean Prometheus name with real labels."""
    sc = stats_config()
    tag_names = {t["tag_name"] for t in sc["stats_tags"]}
    for s in scrape.samples:
        if "llm_" in s.name:
            assert s.name.startswith(("llm_gateway_", "llm_rag_")), f"label residue in name: {s.name}"
            assert set(s.labels) - {"le"} <= tag_names, (s.name, s.labels)
    reqs = scrape.series("llm_gateway_requests_total")
    assert reqs, "no llm_gateway_requests_total"
    seen = set()
    for s in reqs:
        lab = s.labels
        assert lab["tenant"] == "acme" and lab["model"] == "mistral-7b" and lab["team"] == "platform-ai", lab
        seen.add((lab["route"], lab["route_class"], lab["backend"]))
    for route, route_class in routes.items():
        assert any(r == route and rc == route_class for r, rc, _ in seen), (route, seen)
    assert {b for _, _, b in seen} == set(backends.values()), seen
    # The prompt-cache hit: `cache` label extracted (also next to Istio's own `cache` tag).
    assert scrape.series("llm_gateway_cache_hits_total", cache="prompt"), scrape.label_sets("llm_gateway_cache_hits_total")
    # Histograms carry the buckets of envoy/stats-config.yaml.
    for setting in sc["histogram_bucket_settings"]:
        name = setting["match"]["suffix"]
        les = sorted({float(s.labels["le"]) for s in scrape.series(name + "_bucket")})
        if les:
            assert les == sorted(float(b) for b in setting["buckets"]) + [float("inf")], name
    ttft = scrape.series("llm_gateway_time_to_first_token_milliseconds_count")
    assert sum(s.value for s in ttft) >= 1


def test_istio_equivalent_bootstrap_runs_the_wasmplugin_config(logdir, wasm_path):
    """Istio's generated stats_config (our extraStatTags + Istio's own tags,
    its stats matcher + our proxyStatsMatcher), our bootstrap override via
    --config-yaml as istio-agent passes it, Istio's route/cluster names, its
    jwt_authn metadata key, and the WasmPlugin's pluginConfig as JSON."""
    plugin = istio_plugin_config()
    stable = istio_cluster_name("vllm-stable.llm.svc.cluster.local", 8000)
    canary = istio_cluster_name("vllm-canary.llm.svc.cluster.local", 8000)
    otel = plugin["tracing"]["cluster"]
    with OtlpReceiver() as collector:
        sim_stable = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", name="sim-stable")
        sim_canary = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", "--seed", "2", name="sim-canary")
        config, ports = gateway_config(logdir, stable_port=sim_stable.port, canary_port=sim_canary.port)
        config["stats_config"] = istio_stats_config(istio_proxy_config())
        rename_clusters(config, {"llm_stable": stable, "llm_canary": canary})
        add_static_cluster(config, {
            "name": otel, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": otel, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": collector.port}}}}]}]},
        })
        insert_jwt_authn(config, payload_in_metadata="payload", issuer=ISSUER, secret=SECRET)
        plugin["tracing"]["flush_interval_ms"] = 200
        plugin["tracing"]["sample_ratio"] = 1.0
        set_plugin_config_raw(config, plugin)
        set_vm_env_keys(config, ["POD_NAME", "POD_NAMESPACE"])
        override = json.dumps(istio_bootstrap_override())
        envoy = launch_envoy(logdir, config, ports, extra_args=["--config-yaml", override],
                             env={"POD_NAME": "llm-ingressgateway-7f9c-x2x", "POD_NAMESPACE": "istio-ingress"})
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            statuses = _traffic(envoy, token)
            assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 401, statuses
            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            _check_labels_and_buckets(
                scrape,
                routes={"chat": "interactive", "completions": "batch"},
                # `|` is not a label character: the filter writes `_` (filters/core labels::sanitize).
                backends={"stable": stable.replace("|", "_"), "canary": canary.replace("|", "_")},
            )
            # The stats matcher kept our stats (they exist at all under Istio's matcher)
            # and our own regex selects every one of them, Istio's `wasm` prefix aside.
            (regex,) = istio_proxy_config()["proxyStatsMatcher"]["inclusionRegexps"]
            names = json.loads(get(f"{envoy.admin}/stats?format=json&filter=llm_").body)["stats"]
            stat_names = [s["name"] for s in names if "name" in s] + [
                h["name"] for s in names if "histograms" in s for h in s["histograms"].get("computed_quantiles", [])]
            wasm_stats = [n for n in stat_names if n.startswith("wasmcustom.")]
            assert len(wasm_stats) >= 10 and all(re.fullmatch(regex, n) for n in wasm_stats), wasm_stats[:5]
            # Spans leave through Istio's cluster name for the collector, with the pod identity.
            spans = collector.wait_for_spans(3, timeout=10)
            assert spans[0]["resource"]["k8s.pod.name"] == "llm-ingressgateway-7f9c-x2x"
            assert spans[0]["resource"]["k8s.namespace.name"] == "istio-ingress"
            assert spans[0]["resource"]["service.name"] == "llm-gateway"
            assert {s["attributes"]["tokentap.tenant"] for s in spans} == {"acme"}
        finally:
            envoy.stop()
            sim_stable.stop()
            sim_canary.stop()


def test_istio_matcher_without_our_regex_or_istio_prefix_drops_the_stats(logdir, wasm_path):
    """Negative control: the stats matcher does govern which stats exist, so
    the inclusion checked above is meaningful."""
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    config, ports = gateway_config(logdir, stable_port=sim.port)
    proxy = {**istio_proxy_config(), "proxyStatsMatcher": {}}
    config["stats_config"] = istio_stats_config(proxy, required_inclusions=False)
    envoy = launch_envoy(logdir, config, ports)
    try:
        chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert post_json(envoy.url + CHAT, chat, headers={"x-tenant-id": "acme"}).status == 200
        envoy.flush_wait()
        assert not parse_exposition(envoy.stats_prometheus()).series("llm_gateway_requests_total")
    finally:
        envoy.stop()
        sim.stop()


def test_envoy_gateway_equivalent_bootstrap_runs_the_extension_policy_config(logdir, wasm_path):
    """Envoy Gateway's default stats_config with the EnvoyProxy JSONPatch
    applied (the collector address swapped for the local receiver), its route
    and merged-cluster names, jwt_authn metadata under the provider name, and
    the EnvoyExtensionPolicy's config."""
    plugin = eg_plugin_config()
    eg_routes = {
        "chat": "httproute/llm/chat/rule/0/match/0/llm_example_com",
        "completions": "httproute/llm/completions/rule/0/match/0/llm_example_com",
        "embeddings": "httproute/llm/embeddings/rule/0/match/0/llm_example_com",
    }
    assert set(eg_routes.values()) <= set(plugin["routes"])
    stable = eg_merged_cluster_name("llm", "vllm-stable", 8000)
    canary = eg_merged_cluster_name("llm", "vllm-canary", 8000)
    with OtlpReceiver() as collector:
        sim_stable = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", name="sim-stable")
        sim_canary = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", "--seed", "2", name="sim-canary")
        config, ports = gateway_config(logdir, stable_port=sim_stable.port, canary_port=sim_canary.port)
        patches = json.loads(json.dumps(eg_envoy_proxy()["spec"]["bootstrap"]["jsonPatches"]))
        for p in patches:
            if p["path"] == "/static_resources/clusters/-":
                sa = p["value"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                sa.update(address="127.0.0.1", port_value=collector.port)
        config["stats_config"] = EG_DEFAULT_STATS_CONFIG
        config = json_patch(config, patches)
        rename_routes(config, eg_routes)
        rename_clusters(config, {"llm_stable": stable, "llm_canary": canary})
        insert_jwt_authn(config, payload_in_metadata="platform", issuer=ISSUER, secret=SECRET)
        plugin["tracing"]["flush_interval_ms"] = 200
        plugin["tracing"]["sample_ratio"] = 1.0
        set_plugin_config_raw(config, plugin)
        set_vm_env_keys(config, eg_extension_policy()["spec"]["wasm"][0]["env"]["hostKeys"])
        envoy = launch_envoy(logdir, config, ports, env={"POD_NAME": "envoy-llm-gateway-5d8-abc", "POD_NAMESPACE": "envoy-gateway-system"})
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            statuses = _traffic(envoy, token)
            assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 401, statuses
            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            _check_labels_and_buckets(
                scrape,
                routes={eg_routes["chat"]: "interactive", eg_routes["completions"]: "batch"},
                backends={"stable": stable, "canary": canary},
            )
            spans = collector.wait_for_spans(3, timeout=10)
            assert spans[0]["resource"]["k8s.pod.name"] == "envoy-llm-gateway-5d8-abc"
            assert {s["attributes"]["tokentap.route"] for s in spans} >= {eg_routes["chat"]}
        finally:
            envoy.stop()
            sim_stable.stop()
            sim_canary.stop()


@pytest.mark.parametrize("platform", ["istio", "envoy-gateway"])
def test_a_broken_embedded_config_is_refused_by_the_filter(logdir, wasm_path, platform):
    """Negative control for the config checks above: the same path refuses a
    bad value in the embedded configuration (Envoy does not become ready)."""
    plugin = istio_plugin_config() if platform == "istio" else eg_plugin_config()
    plugin["tracing"]["sample_ratio"] = 2
    config, ports = gateway_config(logdir, stable_port=1)
    set_plugin_config_raw(config, plugin)
    envoy = launch_envoy(logdir, config, ports, wait_ready=False)
    try:
        wait_until(lambda: "plugin configuration field `tracing.sample_ratio`: must be between 0 and 1" in envoy.proc.logs(400),
                   timeout=30, what="the filter refusing its configuration")
        # Refused means the listener never comes up: Envoy is not ready.
        def ready():
            try:
                return get(f"{envoy.admin}/ready", timeout=1).status == 200
            except OSError:
                return False
        assert not ready()
        assert "Unable to create Wasm plugin" in envoy.proc.logs(400) or "failed to load" in envoy.proc.logs(400)
    finally:
        envoy.stop()


def test_filter_image_recipe_is_the_docker_compat_wasm_layout():
    text = (GATEWAY / "Dockerfile.wasm").read_text()
    instructions = [l.split(None, 1) for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert instructions == [["FROM", "scratch"], ["COPY", "tokentap_filter.wasm /plugin.wasm"]]
    # The images named in the manifests are the same artifact.
    oci = find(all_docs(GATEWAY / "istio"), "WasmPlugin")["spec"]["url"]
    eg = eg_extension_policy()["spec"]["wasm"][0]["code"]["image"]["url"]
    assert oci == "oci://" + eg


def test_kustomizations_list_existing_files():
    for k in GATEWAY.rglob("kustomization.yaml"):
        (doc,) = yaml_docs(k)
        assert doc["kind"] == "Kustomization"
        for res in doc["resources"]:
            target = (k.parent / res).resolve()
            assert target.exists(), (k, res)
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), target
    # Every manifest is applied by some kustomization (istiod-values.yaml is Helm values).
    listed = set()
    for k in GATEWAY.rglob("kustomization.yaml"):
        for res in yaml_docs(k)[0]["resources"]:
            listed.add((k.parent / res).resolve())
    for f in manifest_files(GATEWAY):
        if f.name != "istiod-values.yaml":
            assert f.resolve() in listed, f
