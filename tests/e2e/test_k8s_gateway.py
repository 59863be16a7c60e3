"""The gateway packages (k8s/gateway/*) as `kubectl kustomize` renders them.

Package-wide checks (rendering, strict and CRD validation, no runtime in a
gateway package, monitor selection, one plugin configuration) are in
test_k8s_packages.py. Here:

* The objects agree with each other: selectors find the pods, routes find
  their Gateway and Services, the plugin configuration's route and backend
  keys are the names each platform gives Envoy routes and clusters, tracing
  points at a real collector cluster.
* No drift: the stats tags in the Istio and Envoy Gateway packages equal
  envoy/stats-config.yaml (`le` included: the filter publishes histograms
  as `_bucket{le}` counters, so no platform sets buckets).
* The real Envoy + the built filter run with the bootstrap each platform
  would generate from these objects (Istio's stats_config from
  extraStatTags/proxyStatsMatcher; Envoy
  Gateway's default bootstrap with our JSONPatch), the platform's route and
  cluster names, and the rendered plugin configuration: the configuration is
  accepted, every label comes out as a Prometheus label with the configured
  workload values (the same `route` and `backend` values on both platforms),
  histogram buckets come out as `le` labels, spans reach the collector through the
  platform's cluster name.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from harness import REPO, parse_exposition, post_json, stream_timed, get, wait_until
from k8s_packages import (
    K8S,
    eg_envoy_proxy,
    eg_extension_policy,
    eg_plugin_config,
    find,
    istio_plugin_config,
    istio_proxy_config,
    render,
)
from otlp_receiver import OtlpReceiver
from ops_stack import (
    EG_DEFAULT_STATS_CONFIG,
    ISTIO_EXTRA_TAG_REGEX,
    add_static_cluster,
    eg_merged_cluster_name,
    eg_route_names,
    gateway_config,
    hs256_jwt,
    insert_jwt_authn,
    istio_cluster_name,
    istio_stats_config,
    json_patch,
    launch_envoy,
    rename_clusters,
    rename_routes,
    set_plugin_config_raw,
    set_vm_env_keys,
    stats_config,
    system_tool,
)
from stack import start_sim

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
ISTIO_PACKAGES = ["gateway/istio", "gateway/istio-gateway-api"]
#: The label values every platform's names map to (k8s/components/plugin-config).
ROUTE_CLASSES = {"chat": "interactive", "completions": "batch"}
BACKENDS = {"stable": "vllm-stable", "canary": "vllm-canary"}


def example_docs() -> list[dict]:
    return render("examples/vllm")


def with_backends(package: str) -> list[dict]:
    """A gateway package plus the example runtime its routes point at."""
    return render(package) + example_docs()


def collector_http_host_port(docs: list[dict]) -> tuple[str, int]:
    collector = find(docs, "Service", "otel-collector")
    http_port = {p["name"]: p["port"] for p in collector["spec"]["ports"]}["otlp-http"]
    return f"otel-collector.{collector['metadata']['namespace']}.svc.cluster.local", http_port


def test_vllm_deployments_carry_the_label_contract():
    docs = example_docs() + render("gateway/istio")
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


# --- Istio ---------------------------------------------------------------------------


def test_istio_wasmplugin_targets_the_gateway_fail_open_in_stats_phase():
    docs = render("gateway/istio")
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
    # No bootstrap override: the filter publishes its own buckets.
    assert not any(k.startswith("sidecar.istio.io/") and k != "sidecar.istio.io/inject"
                   for k in dep["spec"]["template"]["metadata"]["annotations"])
    # The JWT rules and the plugin read the same gateway's traffic.
    for kind in ("RequestAuthentication", "AuthorizationPolicy"):
        pol = find(docs, kind)
        assert pol["metadata"]["namespace"] == dep["metadata"]["namespace"]
        assert pol["spec"]["selector"] == spec["selector"]


def test_istio_gateway_api_package_attaches_everything_to_its_gateway():
    docs = render("gateway/istio-gateway-api")
    gw = find(docs, "Gateway", "llm-gateway")
    assert gw["spec"]["gatewayClassName"] == "istio"
    target = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "llm-gateway"}]
    wp = find(docs, "WasmPlugin")
    assert wp["spec"]["targetRefs"] == target and "selector" not in wp["spec"]
    assert wp["spec"]["failStrategy"] == "FAIL_OPEN" and wp["spec"]["phase"] == "STATS"
    classic = find(render("gateway/istio"), "WasmPlugin")["spec"]
    assert {k: v for k, v in wp["spec"].items() if k != "targetRefs"} == {k: v for k, v in classic.items() if k != "selector"}
    for kind in ("RequestAuthentication", "AuthorizationPolicy"):
        pol = find(docs, kind)
        assert pol["spec"]["targetRefs"] == target and pol["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert wp["metadata"]["namespace"] == gw["metadata"]["namespace"]
    # The options ConfigMap: overlays istiod applies to what it generates.
    ref = gw["spec"]["infrastructure"]["parametersRef"]
    assert (ref["group"], ref["kind"]) == ("", "ConfigMap")
    options = find(docs, "ConfigMap", ref["name"])
    assert options["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert set(options["data"]) <= {"deployment", "service", "serviceAccount", "horizontalPodAutoscaler", "podDisruptionBudget"}
    assert yaml.safe_load(options["data"]["service"]) == {"spec": {"type": "ClusterIP"}}
    # The PodMonitor selects the pods istiod labels for this Gateway (kube-gateway template).
    pm = find(docs, "PodMonitor")
    assert pm["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert pm["spec"]["selector"]["matchLabels"] == {
        "gateway.networking.k8s.io/gateway-name": gw["metadata"]["name"],
        "gateway.networking.k8s.io/gateway-class-name": gw["spec"]["gatewayClassName"],
    }


def test_istio_gateway_api_route_names_are_plugin_route_keys():
    """Istio names the Envoy route of an HTTPRoute rule after its `name`."""
    docs = with_backends("gateway/istio-gateway-api")
    gw = find(docs, "Gateway", "llm-gateway")
    plugin = istio_plugin_config("gateway/istio-gateway-api")
    listeners = {l["name"]: l for l in gw["spec"]["listeners"]}
    clusters = set()
    for route in (d for d in docs if d["kind"] == "HTTPRoute"):
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gw["metadata"]["name"] and parent["sectionName"] in listeners
        assert route["metadata"]["namespace"] == gw["metadata"]["namespace"]
        for rule in route["spec"]["rules"]:
            if rule["name"] != "models":
                assert rule["name"] in plugin["routes"], rule["name"]
            for b in rule["backendRefs"]:
                clusters.add(istio_cluster_name(f"{b['name']}.{route['metadata']['namespace']}.svc.cluster.local", b["port"]))
    assert clusters <= set(plugin["backends"]) and len(clusters) == 2


def test_istio_plugin_config_names_match_the_virtualservice():
    docs = with_backends("gateway/istio")
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
    assert llm_routes == {"chat", "completions", "embeddings"} and llm_routes <= set(plugin["routes"])
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
    assert {b for b in plugin["backends"] if b.startswith("outbound|")} == clusters
    assert any("canary" in c for c in clusters) and any("stable" in c for c in clusters)
    # Tracing goes to the collector Service through Istio's cluster for it.
    host, http_port = collector_http_host_port(docs)
    assert plugin["tracing"]["cluster"] == istio_cluster_name(host, http_port)
    # Route classes and teams are the workload label values of the contract.
    assert {w["team"] for w in plugin["routes"].values()} == {"platform-ai"}
    assert plugin["defaults"] == {"model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}
    # The tenant is the verified JWT claim that Istio's jwt_authn stores under `payload`.
    assert plugin["tenant"]["metadata"] == {"namespace": "envoy.filters.http.jwt_authn", "path": ["payload", "tenant"]}


@pytest.mark.parametrize("package", ISTIO_PACKAGES)
def test_istio_stats_tags_equal_the_plain_envoy_config(package):
    sc = stats_config()
    tags = {t["tag_name"]: t["regex"] for t in sc["stats_tags"]}
    proxy = istio_proxy_config(package)
    assert proxy["extraStatTags"] == [t["tag_name"] for t in sc["stats_tags"]]
    # What Istio generates for each extraStatTags entry is our regex, byte for byte.
    for tag in proxy["extraStatTags"]:
        assert ISTIO_EXTRA_TAG_REGEX.format(tag=tag) == tags[tag], tag
    mesh = yaml.safe_load((K8S / "gateway" / "istio" / "istiod-values.yaml").read_text())["meshConfig"]["defaultConfig"]
    assert mesh["extraStatTags"] == proxy["extraStatTags"]
    assert mesh["proxyStatsMatcher"] == proxy["proxyStatsMatcher"]
    assert "le" in proxy["extraStatTags"] and "histogram_bucket_settings" not in sc


def test_istio_stats_matcher_regex_selects_exactly_the_tokentap_stats():
    """RE2 full match semantics (Envoy's safe_regex) on names built like the
    filter builds them (filters/core/src/metrics: fields, then the name)."""
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
    """The filter's metric families, from its `families!` catalogue."""
    (source,) = [p for p in (REPO / "filters" / "core" / "src").rglob("*.rs") if "\nfamilies! {" in p.read_text()]
    text = source.read_text()
    block = text[text.index("families! {"):]
    block = block[: block.index("\n}\n")]
    return re.findall(r'=> "([a-z_]+)", (?:Counter|Gauge|Histogram),', block)


# --- Envoy Gateway ---------------------------------------------------------------------


def test_envoy_gateway_resources_reference_each_other():
    docs = with_backends("gateway/envoy-gateway")
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
    assert {r for r in plugin["routes"] if r.startswith("httproute/")} == llm
    assert "httproute/llm/chat/rule/0/match/0/llm_example_com" in plugin["routes"]
    assert {b for b in plugin["backends"] if b.startswith("service/")} == clusters
    assert any("canary" in c for c in clusters)
    # Envoy Gateway stores the verified payload under the provider's name.
    assert plugin["tenant"]["metadata"] == {"namespace": "envoy.filters.http.jwt_authn", "path": [sp["spec"]["jwt"]["providers"][0]["name"], "tenant"]}
    # Tracing: the static cluster added by the bootstrap patch, resolving the collector Service.
    host, http_port = collector_http_host_port(docs)
    (cluster_patch,) = [p for p in ep["spec"]["bootstrap"]["jsonPatches"] if p["path"] == "/static_resources/clusters/-"]
    cluster = cluster_patch["value"]
    assert plugin["tracing"]["cluster"] == cluster["name"] == cluster["load_assignment"]["cluster_name"]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": host, "port_value": http_port}


def test_envoy_gateway_bootstrap_patch_equals_the_plain_envoy_config():
    sc = stats_config()
    patches = eg_envoy_proxy()["spec"]["bootstrap"]
    assert patches["type"] == "JSONPatch"
    tags = [p["value"] for p in patches["jsonPatches"] if p["path"] == "/stats_config/stats_tags/-"]
    assert all(p["op"] == "add" for p in patches["jsonPatches"])
    assert tags == sc["stats_tags"]
    assert {p["path"] for p in patches["jsonPatches"]} == {"/stats_config/stats_tags/-", "/static_resources/clusters/-"}
    # Applied to Envoy Gateway's default bootstrap, the result is ours plus its own tags.
    patched = json_patch({"stats_config": EG_DEFAULT_STATS_CONFIG, "static_resources": {"clusters": []}}, patches["jsonPatches"])
    assert patched["stats_config"]["stats_tags"][4:] == sc["stats_tags"]
    # Before v1.7 the default bootstrap has no stats_config.stats_tags: the patch cannot apply.
    with pytest.raises(KeyError):
        json_patch({"static_resources": {"clusters": []}}, patches["jsonPatches"])


# --- monitors --------------------------------------------------------------------------------


def keep_regex(endpoint: dict) -> str:
    (keep,) = endpoint["metricRelabelings"]
    assert keep["action"] == "keep"
    return keep["regex"]


def test_gateway_podmonitors_find_the_proxy_pods_and_keep_the_tokentap_families():
    docs = render("gateway/istio")
    istio = find(docs, "PodMonitor", "llm-gateway-istio")
    dep = find(docs, "Deployment", "llm-ingressgateway")
    tmpl = dep["spec"]["template"]
    assert istio["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert all(tmpl["metadata"]["labels"].get(k) == v for k, v in istio["spec"]["selector"]["matchLabels"].items())
    (ep,) = istio["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
    assert ports[ep["port"]] == 15090 and ep["path"] == "/stats/prometheus"
    eg = find(render("gateway/envoy-gateway"), "PodMonitor", "llm-gateway-envoy-gateway")
    sel = eg["spec"]["selector"]["matchLabels"]
    assert sel["gateway.envoyproxy.io/owning-gateway-name"] == "llm-gateway"
    assert sel["gateway.envoyproxy.io/owning-gateway-namespace"] == "llm"
    (ep2,) = eg["spec"]["podMetricsEndpoints"]
    assert ep2["port"] == "metrics" and ep2["path"] == "/stats/prometheus"
    gapi = find(render("gateway/istio-gateway-api"), "PodMonitor")
    (ep3,) = gapi["spec"]["podMetricsEndpoints"]
    assert ep3["port"] == ep["port"] and ep3["path"] == ep["path"]
    for endpoint in (ep, ep2, ep3):
        regex = keep_regex(endpoint)
        for fam in catalogue_families():
            for suffix in ("", "_bucket", "_count", "_sum"):
                assert re.fullmatch(regex, fam + suffix), fam
        assert not re.fullmatch(regex, "envoy_http_downstream_rq_total")


def test_plain_prometheus_scrape_config_covers_every_part(tmp_path):
    """promtool checks the jobs (this Debian build lacks the Kubernetes service
    discovery, so the pod discovery is swapped for a static target), and the
    jobs find what the packages deploy."""
    promtool = system_tool("promtool")
    config = yaml.safe_load((K8S / "observability" / "plain-prometheus" / "scrape-config.yaml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"llm-gateway-istio", "llm-gateway-istio-gateway-api", "llm-gateway-envoy-gateway", "gpu-exporter", "llm-runtimes"}
    for name, job in jobs.items():
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
        if name.startswith("llm-gateway-"):
            (keep,) = job["metric_relabel_configs"]
            assert all(re.fullmatch(keep["regex"], f) for f in catalogue_families())
    # The exporter's namespace/pod/container name the GPU's workload: they must win.
    assert jobs["gpu-exporter"]["honor_labels"] is True
    ds = find(render("gpu-exporter"), "DaemonSet")
    assert jobs["gpu-exporter"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == [ds["metadata"]["namespace"]]
    # The runtime job keeps the example runtimes (annotated, with a model label) and names their workload.
    runtime_ns = {d["metadata"]["namespace"] for d in render("examples/vllm") if d["kind"] == "Deployment"}
    assert jobs["llm-runtimes"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == sorted(runtime_ns)
    targets = {r.get("target_label") for r in jobs["llm-runtimes"]["relabel_configs"]}
    assert {"model", "route_class", "team", "pod", "namespace", "__address__", "__metrics_path__"} <= targets
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:15090"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
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
    # Histogram buckets come out as `le` labels (the filter's cumulative
    # counters): each series has +Inf, equal to its _count.
    histograms = {s.name[: -len("_bucket")] for s in scrape.samples if s.name.endswith("_bucket")}
    assert "llm_gateway_request_duration_milliseconds" in histograms, histograms
    for name in histograms:
        counts = {tuple(sorted(s.labels.items())): s.value for s in scrape.series(name + "_count")}
        infs = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")): s.value
                for s in scrape.series(name + "_bucket") if s.labels["le"] == "+Inf"}
        assert infs == counts and counts, name
    ttft = scrape.series("llm_gateway_time_to_first_token_milliseconds_count")
    assert sum(s.value for s in ttft) >= 1


def test_istio_equivalent_bootstrap_runs_the_wasmplugin_config(logdir, wasm_path):
    """Istio's generated stats_config (our extraStatTags + Istio's own tags,
    its stats matcher + our proxyStatsMatcher), Istio's route/cluster names,
    its jwt_authn metadata key, and the WasmPlugin's pluginConfig as JSON."""
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
        envoy = launch_envoy(logdir, config, ports, env={"POD_NAME": "llm-ingressgateway-7f9c-x2x", "POD_NAMESPACE": "istio-ingress"})
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            statuses = _traffic(envoy, token)
            assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 401, statuses
            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            _check_labels_and_buckets(
                scrape,
                # Istio's cluster names, aliased by the plugin configuration.
                routes=ROUTE_CLASSES,
                backends=BACKENDS,
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
    the EnvoyExtensionPolicy's rendered config."""
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
        provider = find(render("gateway/envoy-gateway"), "SecurityPolicy")["spec"]["jwt"]["providers"][0]["name"]
        insert_jwt_authn(config, payload_in_metadata=provider, issuer=ISSUER, secret=SECRET)
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
                # Envoy Gateway's generated names read as the same labels as on Istio.
                routes=ROUTE_CLASSES,
                backends=BACKENDS,
            )
            spans = collector.wait_for_spans(3, timeout=10)
            assert spans[0]["resource"]["k8s.pod.name"] == "envoy-llm-gateway-5d8-abc"
            assert {s["attributes"]["tokentap.route"] for s in spans} >= {"chat"}
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


