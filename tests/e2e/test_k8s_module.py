"""The dynamic-module gateway packages as `kubectl kustomize` renders them:
k8s/gateway/envoy-gateway-module and k8s/gateway/istio-module-experimental.

Package-wide checks (rendering, strict and CRD validation against the
schemas the other packages use, conventions, one plugin configuration) are in
test_k8s_packages.py. Here:

* Each is its Wasm package with the filter swapped and nothing else: the
  same objects under the same names, the same collector cluster; the library
  path lies inside the image volume the pod mounts, under the ABI folder the
  library image uses (k8s/images/stage-module.sh stages the volume's content).
* Envoy Gateway v1.8: the fields the package uses exist there (checked
  against the v1.8.3 CRD schemas, tests/e2e/crds/eg-v1.8) once the v1.9-only
  `mergeBackends` is removed, as docs/dynamic-module.md says.
* A real Envoy of the version each platform runs, with the filter exactly as
  the platform would write it from these objects (Envoy Gateway's translator
  for EnvoyProxy + EnvoyExtensionPolicy, Istio's EnvoyFilter patch and
  ProxyConfig) and the library from the staged volume: the same traffic and
  the same label, bucket and span assertions as the Wasm packages' runs
  (test_k8s_gateway.py), metric names bare. Negative controls: without the
  runtime flag the names carry `envoy_dynamicmodulescustom_` and the
  PodMonitor drops them; without the package's proxyStatsMatcher Istio
  drops the module's stats.
* The Remote route (k8s/examples/envoy-gateway-module-remote): Envoy
  downloads the library from a local HTTP server, checks its SHA-256 and
  runs it; a wrong digest leaves the filter out and traffic flowing.
* The tenant: the module reads the verified claim from the header the JWT
  filter writes (claimToHeaders / outputClaimToHeaders); a client-sent
  header of that name counts for nothing.
No cluster runs here: Envoy Gateway, istiod, the injector and the kubelet's
image volume are stood in for as described, from their sources (read).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import subprocess
import threading
import time
import tomllib
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from harness import MODULE, REPO, envoy_binary_for, get, parse_exposition, post_json
from k8s_packages import CRDS, K8S, crd_problems, find, kustomize, render
from module_artifact import MODULE_IMAGE, abi_folder
from ops_stack import (
    EG_DEFAULT_STATS_CONFIG,
    add_static_cluster,
    eg_merged_cluster_name,
    gateway_config,
    hs256_jwt,
    insert_jwt_authn,
    istio_cluster_name,
    istio_stats_config,
    json_patch,
    launch_envoy,
    rename_clusters,
    rename_routes,
    system_tool,
)
from otlp_receiver import OtlpReceiver
from stack import STRIP_NAMESPACE_FLAG, hcm_of, remove_filter, start_sim
from test_k8s_gateway import BACKENDS, ISSUER, ROUTE_CLASSES, SECRET, _check_labels_and_buckets, _traffic, keep_regex

EG = "gateway/envoy-gateway"
EG_MODULE = "gateway/envoy-gateway-module"
ISTIO = "gateway/istio"
ISTIO_MODULE = "gateway/istio-module-experimental"
SHELL_LABEL = ("tokentap.dev/shell", "module")
STAGE = K8S / "images" / "stage-module.sh"
#: Envoy Gateway's default bootstrap runtime layer, per release
#: (internal/xds/bootstrap/bootstrap.yaml.tpl at v1.8.3 and v1.9.0), and the
#: Envoy each release runs (api/v1alpha1/shared_types.go DefaultEnvoyProxyImage:
#: distroless-v1.38.x, distroless-v1.39.0).
EG_RELEASES = {
    "v1.8": ("1.38.3", {"envoy.restart_features.use_eds_cache_for_ads": True,
                        "re2.max_program_size.error_level": 4294967295, "re2.max_program_size.warn_level": 1000}),
    "v1.9": ("1.39.3", {"re2.max_program_size.error_level": 4294967295, "re2.max_program_size.warn_level": 1000}),
}
EG_ROUTES = {
    "chat": "httproute/llm/chat/rule/0/match/0/llm_example_com",
    "completions": "httproute/llm/completions/rule/0/match/0/llm_example_com",
    "embeddings": "httproute/llm/embeddings/rule/0/match/0/llm_example_com",
}
#: Istio 1.31's istio-proxy (the first with the extension) builds an Envoy
#: main-branch commit between 1.39 and 1.40: both are run.
ISTIO_ENVOYS = ["1.39.3", "1.40.0"]


def ids(docs: list[dict]) -> set[tuple]:
    return {(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}


def without(d: dict, *paths: str) -> dict:
    """A copy of `d` without the dotted `paths` (missing ones ignored)."""
    out = copy.deepcopy(d)
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return out


def eg_proxy_container(proxy: dict) -> dict:
    return proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]


def mounted_library(volumes: list[dict], mounts: list[dict], path: str) -> tuple[dict, str]:
    """The image volume whose mount holds `path`, and `path` inside the image."""
    for mount in mounts:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (volume,) = [v for v in volumes if v["name"] == mount["name"]]
            assert mount.get("readOnly") is True, mount
            return volume, path[len(prefix):]
    raise AssertionError(f"{path} is on no mounted volume")


def assert_claim_header(claim_to_headers: list[dict], module_config: dict, wasm_config: dict) -> None:
    """The module reads the tenant from the one header the JWT filter writes
    from the claim the Wasm filter reads in jwt_authn's metadata."""
    (mapping,) = claim_to_headers
    assert module_config["tenant"] == {"header": mapping["header"], "max_values": wasm_config["tenant"]["max_values"]}
    assert mapping["claim"] == wasm_config["tenant"]["metadata"]["path"][-1]


def claim_to_headers(config: dict, mappings: list[dict]) -> None:
    """jwt_authn's `claim_to_headers`, as both platforms write it from
    claimToHeaders / outputClaimToHeaders, on the provider insert_jwt_authn added."""
    (provider,) = hcm_of(config)["http_filters"][0]["typed_config"]["providers"].values()
    provider["claim_to_headers"] = [{"header_name": m["header"], "claim_name": m["claim"]} for m in mappings]


def forged_tenant_is_ignored(envoy, header: str) -> None:
    """A client-sent tenant header counts for nothing: with the claim, the
    claim wins; a token without it counts as `unknown` (jwt_authn removes the
    header before it writes the claim)."""
    chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    exp = int(time.time()) + 600
    for claims in ({"iss": ISSUER, "tenant": "acme", "exp": exp}, {"iss": ISSUER, "exp": exp}):
        headers = {"authorization": f"Bearer {hs256_jwt(claims, SECRET)}", header: "forged"}
        assert post_json(envoy.url + "/v1/chat/completions", chat, headers=headers).status == 200
    envoy.flush_wait()
    tenants = {s.labels["tenant"] for s in parse_exposition(envoy.stats_prometheus()).series("llm_gateway_requests_total")}
    assert tenants == {"acme", "unknown"}, tenants


def stage_volume(pod_root: Path, mount_path: str) -> None:
    """The image volume's content, as the library image holds it
    (k8s/images/stage-module.sh, which build.sh uses), at its mount path."""
    system_tool("readelf")
    target = pod_root / mount_path.lstrip("/")
    result = subprocess.run([str(STAGE), str(MODULE), str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- Envoy Gateway: the objects ----------------------------------------------------


def test_envoy_gateway_module_package_is_the_wasm_package_with_the_filter_swapped():
    wasm, module = render(EG), render(EG_MODULE)
    assert ids(wasm) == ids(module)
    for d in module:
        if d["kind"] not in ("EnvoyProxy", "EnvoyExtensionPolicy", "SecurityPolicy"):
            (same,) = [w for w in wasm if ids([w]) == ids([d])]
            assert d == same, (d["kind"], d["metadata"]["name"])
    # The JWT provider also writes the verified claim to the header the module reads.
    (provider,), (wasm_provider,) = find(module, "SecurityPolicy")["spec"]["jwt"]["providers"], find(wasm, "SecurityPolicy")["spec"]["jwt"]["providers"]
    assert without(provider, "claimToHeaders") == wasm_provider
    assert_claim_header(provider["claimToHeaders"], find(module, "EnvoyExtensionPolicy")["spec"]["dynamicModule"][0]["config"],
                        find(wasm, "EnvoyExtensionPolicy")["spec"]["wasm"][0]["config"])
    proxy, wasm_proxy = find(module, "EnvoyProxy"), find(wasm, "EnvoyProxy")
    assert proxy["metadata"]["labels"][SHELL_LABEL[0]] == SHELL_LABEL[1]
    deployment = "spec.provider.kubernetes.envoyDeployment"
    assert (without(proxy, "metadata.labels", "spec.dynamicModules", "spec.bootstrap", f"{deployment}.pod",
                    f"{deployment}.container.volumeMounts")
            == without(wasm_proxy, "metadata.labels", "spec.bootstrap"))
    # The bootstrap: the runtime flag and the Wasm package's collector cluster, no stats tags.
    patches = proxy["spec"]["bootstrap"]["jsonPatches"]
    assert proxy["spec"]["bootstrap"]["type"] == "JSONPatch"
    assert patches[0] == {"op": "add", "path": f"/layered_runtime/layers/0/static_layer/{STRIP_NAMESPACE_FLAG}", "value": True}
    clusters = [p for p in wasm_proxy["spec"]["bootstrap"]["jsonPatches"] if p["path"] == "/static_resources/clusters/-"]
    assert patches[1:] == clusters and len(clusters) == 1
    # The policy: same target, the module instead of Wasm, the allowlisted name.
    eep, wasm_eep = find(module, "EnvoyExtensionPolicy"), find(wasm, "EnvoyExtensionPolicy")
    assert "wasm" not in eep["spec"] and eep["spec"]["targetRefs"] == wasm_eep["spec"]["targetRefs"]
    (dm,) = eep["spec"]["dynamicModule"]
    (entry,) = proxy["spec"]["dynamicModules"]
    assert dm["name"] == entry["name"] and dm["filterName"] == "tokentap" and not dm.get("terminalFilter")
    assert entry["doNotClose"] is True and not entry.get("loadGlobally")
    assert without(dm["config"], "tenant") == without(wasm_eep["spec"]["wasm"][0]["config"], "tenant")


def test_module_library_is_on_the_image_volume_under_its_abi_folder():
    """Both packages load the library from the library image they mount,
    under the ABI folder of this source tree, tagged with that ABI."""
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    proxy = find(render(EG_MODULE), "EnvoyProxy")
    (entry,) = proxy["spec"]["dynamicModules"]
    # The source union's CEL rules (not evaluated by the schema check).
    assert set(entry["source"]) == {"type", "local"} and entry["source"]["type"] == "Local"
    dep = eg_proxy_container(proxy)
    eg_volume, eg_inside = mounted_library(dep["pod"]["volumes"], dep["container"]["volumeMounts"], entry["source"]["local"]["path"])
    docs = render(ISTIO_MODULE)
    pod = find(docs, "Deployment", "llm-ingressgateway")["spec"]["template"]["spec"]
    (proxy_container,) = [c for c in pod["containers"] if c["name"] == "istio-proxy"]
    (patch,) = find(docs, "EnvoyFilter", "tokentap")["spec"]["configPatches"]
    filename = patch["patch"]["value"]["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"]
    istio_volume, istio_inside = mounted_library(pod["volumes"], proxy_container["volumeMounts"], filename)
    assert eg_inside == istio_inside == f"{abi_folder()}/libtokentap_module.so"
    for volume in (eg_volume, istio_volume):
        assert volume["image"] == {"reference": f"{MODULE_IMAGE}:{version}-{abi_folder()}", "pullPolicy": "IfNotPresent"}


def test_envoy_gateway_v1_8_takes_the_package_without_merge_backends(tmp_path):
    """The dynamic-module fields exist in v1.8.3's CRDs; `mergeBackends` is
    the one field the package uses that v1.8 lacks (docs/dynamic-module.md:
    the v1.8 overlay removes it)."""
    v18 = CRDS / "eg-v1.8"
    shipped = [d for d in render(EG_MODULE) if d["kind"] in ("EnvoyProxy", "EnvoyExtensionPolicy")]
    problems = [p for d in shipped for p in crd_problems(d, v18)]
    assert len(problems) == 1 and "'mergeBackends' was unexpected" in problems[0], problems
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / EG_MODULE, tmp_path)],
        "patches": [{"target": {"kind": "EnvoyProxy"}, "patch": "- op: remove\n  path: /spec/mergeBackends\n"}],
    }))
    overlay = [d for d in yaml.safe_load_all(kustomize(tmp_path)) if d]
    for d in overlay:
        if d["kind"] in ("EnvoyProxy", "EnvoyExtensionPolicy"):
            assert crd_problems(d, v18) == [], d["kind"]
    # Negative control: both schema sets refuse a misspelt or mistyped module field.
    proxy = find(overlay, "EnvoyProxy")
    proxy["spec"]["dynamicModules"][0]["doNotclose"] = True
    eep = find(overlay, "EnvoyExtensionPolicy")
    eep["spec"]["dynamicModule"][0]["terminalFilter"] = "no"
    for crds in (v18, CRDS):
        assert any("'doNotclose' was unexpected" in p for p in crd_problems(proxy, crds))
        assert any("terminalFilter" in p and "is not of type 'boolean'" in p for p in crd_problems(eep, crds))


# --- Envoy Gateway: a real Envoy as Envoy Gateway would configure it ----------------------


def eg_translated_config(tmp: Path, *, stable_port: int, canary_port: int, collector_port: int, release: str,
                         runtime_flag: bool = True, docs: list[dict] | None = None) -> tuple[dict, object]:
    """The template's listener and clusters with what Envoy Gateway `release`
    generates from the module package: its default bootstrap (stats config,
    runtime layer) with the EnvoyProxy's JSONPatch, route and merged-cluster
    names, jwt_authn under the provider name, and the dynamic-module filter of
    internal/xds/translator/dynamicmodule.go (v1.8.3 and v1.9.0 alike): named
    after the policy, `disabled` on the listener, enabled on each route with
    an empty FilterConfig, the module by `local.filename`, `config` as a
    StringValue of its JSON. The library comes from the staged image volume
    (Local), or over HTTP from a cluster named as url2Cluster names it
    (Remote, `docs` of the Remote example)."""
    docs = docs or render(EG_MODULE)
    proxy, eep = find(docs, "EnvoyProxy"), find(docs, "EnvoyExtensionPolicy")
    config, ports = gateway_config(tmp, stable_port=stable_port, canary_port=canary_port)
    patches = copy.deepcopy(proxy["spec"]["bootstrap"]["jsonPatches"])
    for p in patches:
        if p["path"] == "/static_resources/clusters/-":
            sa = p["value"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            sa.update(address="127.0.0.1", port_value=collector_port)
    if not runtime_flag:
        patches = [p for p in patches if STRIP_NAMESPACE_FLAG not in p["path"]]
    config["stats_config"] = copy.deepcopy(EG_DEFAULT_STATS_CONFIG)
    config["layered_runtime"] = {"layers": [{"name": "global_config", "static_layer": dict(EG_RELEASES[release][1])}]}
    config = json_patch(config, patches)
    rename_routes(config, EG_ROUTES)
    rename_clusters(config, {"llm_stable": eg_merged_cluster_name("llm", "vllm-stable", 8000),
                             "llm_canary": eg_merged_cluster_name("llm", "vllm-canary", 8000)})
    (provider,) = find(docs, "SecurityPolicy")["spec"]["jwt"]["providers"]
    remove_filter(config)
    insert_jwt_authn(config, payload_in_metadata=provider["name"], issuer=ISSUER, secret=SECRET)
    claim_to_headers(config, provider["claimToHeaders"])

    (dm,) = eep["spec"]["dynamicModule"]
    (entry,) = [m for m in proxy["spec"]["dynamicModules"] if m["name"] == dm["name"]]
    if entry["source"]["type"] == "Local":
        pod_root = tmp / "pod"
        for mount in eg_proxy_container(proxy)["container"]["volumeMounts"]:
            stage_volume(pod_root, mount["mountPath"])
        library = pod_root / entry["source"]["local"]["path"].lstrip("/")
        assert library.is_file(), "the Local path is not where the image volume puts the library"
        module_config = {"module": {"local": {"filename": str(library)}}}
    else:
        remote = entry["source"]["remote"]
        url = urllib.parse.urlsplit(remote["url"])
        cluster = f"{url.hostname.replace('.', '_')}_{url.port}"
        add_static_cluster(config, {"name": cluster, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": url.hostname, "port_value": url.port}}}}]}]}})
        module_config = {"module": {"remote": {"http_uri": {"uri": remote["url"], "cluster": cluster, "timeout": "10s"},
                                               "sha256": remote["sha256"]}}}
    if entry.get("doNotClose"):
        module_config["do_not_close"] = True
    if entry.get("loadGlobally"):
        module_config["load_globally"] = True
    name = f"envoy.filters.http.dynamic_modules/envoyextensionpolicy/{eep['metadata']['namespace']}/{eep['metadata']['name']}/dynamic-module/0"
    plugin = copy.deepcopy(dm["config"])
    plugin["tracing"].update(flush_interval_ms=200, sample_ratio=1.0)
    hcm = hcm_of(config)
    router = [f["name"] for f in hcm["http_filters"]].index("envoy.filters.http.router")
    hcm["http_filters"].insert(router, {"name": name, "disabled": True, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": module_config,
        "filter_name": dm["filterName"],
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(plugin)},
    }})
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route["typed_per_filter_config"] = {name: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}}
    return config, ports


@pytest.mark.parametrize("release", list(EG_RELEASES))
def test_envoy_gateway_equivalent_config_runs_the_module(logdir, release):
    version = EG_RELEASES[release][0]
    try:
        binary = envoy_binary_for(version)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with OtlpReceiver() as collector:
        sim_stable = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", name="sim-stable")
        sim_canary = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", "--seed", "2", name="sim-canary")
        config, ports = eg_translated_config(logdir, stable_port=sim_stable.port, canary_port=sim_canary.port,
                                             collector_port=collector.port, release=release)
        envoy = launch_envoy(logdir, config, ports, envoy_bin=binary,
                             env={"POD_NAME": "envoy-llm-gateway-5d8-abc", "POD_NAMESPACE": "envoy-gateway-system"})
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            statuses = _traffic(envoy, token)
            assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 401, statuses
            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            _check_labels_and_buckets(scrape, routes=ROUTE_CLASSES, backends=BACKENDS)
            assert not [s.name for s in scrape.samples if "dynamicmodulescustom" in s.name]
            assert scrape.value("llm_gateway_module_panics_total") == 0
            # The PodMonitor keeps what the module prints.
            regex = keep_regex(find(render(EG_MODULE), "PodMonitor")["spec"]["podMetricsEndpoints"][0])
            assert re.fullmatch(regex, "llm_gateway_requests_total")
            spans = collector.wait_for_spans(3, timeout=10)
            assert spans[0]["resource"]["k8s.pod.name"] == "envoy-llm-gateway-5d8-abc"
            assert {s["attributes"]["tokentap.route"] for s in spans} >= {"chat"}
            (provider,) = find(render(EG_MODULE), "SecurityPolicy")["spec"]["jwt"]["providers"]
            forged_tenant_is_ignored(envoy, provider["claimToHeaders"][0]["header"])
        finally:
            envoy.stop()
            sim_stable.stop()
            sim_canary.stop()


def test_without_the_runtime_flag_the_podmonitor_would_drop_the_metrics(logdir):
    """Negative control: the flag the EnvoyProxy adds is what keeps the names
    bare; without it Envoy prefixes the default namespace, which the
    PodMonitor's keep regex (and every dashboard) does not match."""
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    config, ports = eg_translated_config(logdir, stable_port=sim.port, canary_port=sim.port, collector_port=1,
                                         release="v1.9", runtime_flag=False)
    envoy = launch_envoy(logdir, config, ports, envoy_bin=envoy_binary_for(EG_RELEASES["v1.9"][0]))
    try:
        token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
        chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert post_json(envoy.url + "/v1/chat/completions", chat, headers={"authorization": f"Bearer {token}"}).status == 200
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        assert not scrape.series("llm_gateway_requests_total")
        prefixed = scrape.series("envoy_dynamicmodulescustom_llm_gateway_requests_total")
        assert prefixed and prefixed[0].labels["tenant"] == "acme"
        regex = keep_regex(find(render(EG_MODULE), "PodMonitor")["spec"]["podMetricsEndpoints"][0])
        assert not re.fullmatch(regex, "envoy_dynamicmodulescustom_llm_gateway_requests_total")
    finally:
        envoy.stop()
        sim.stop()


@contextlib.contextmanager
def serving(directory: Path):
    """An HTTP server on loopback serving `directory` (the release's download site)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def remote_example(tmp: Path, url: str, sha256: str) -> list[dict]:
    """k8s/examples/envoy-gateway-module-remote with its placeholders replaced."""
    overlay = tmp / "remote-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "examples" / "envoy-gateway-module-remote", overlay)],
        "patches": [{"target": {"kind": "EnvoyProxy"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/spec/dynamicModules/0/source/remote", "value": {"url": url, "sha256": sha256}}])}],
    }))
    return [d for d in yaml.safe_load_all(kustomize(overlay)) if d]


@pytest.mark.parametrize("release", list(EG_RELEASES))
def test_envoy_gateway_remote_example_fetches_and_runs_the_module(logdir, release):
    """The Remote route (no image volume): Envoy downloads the library, checks
    its SHA-256 and runs it. The example carries no volume any more."""
    example = render("examples/envoy-gateway-module-remote")
    dep = eg_proxy_container(find(example, "EnvoyProxy"))
    assert "pod" not in dep and "volumeMounts" not in dep["container"]
    # The source union's CEL rules (not evaluated by the schema check):
    # Remote has `remote` and no `local`.
    (entry,) = find(example, "EnvoyProxy")["spec"]["dynamicModules"]
    assert set(entry["source"]) == {"type", "remote"} and entry["source"]["type"] == "Remote"
    sha256 = hashlib.sha256(MODULE.read_bytes()).hexdigest()
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    with serving(MODULE.parent) as site:
        docs = remote_example(logdir, f"{site}/{MODULE.name}", sha256)
        config, ports = eg_translated_config(logdir, stable_port=sim.port, canary_port=sim.port, collector_port=1,
                                             release=release, docs=docs)
        envoy = launch_envoy(logdir, config, ports, envoy_bin=envoy_binary_for(EG_RELEASES[release][0]))
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            assert post_json(envoy.url + "/v1/chat/completions", chat, headers={"authorization": f"Bearer {token}"}).status == 200
            envoy.flush_wait()
            (sample,) = parse_exposition(envoy.stats_prometheus()).series("llm_gateway_requests_total")
            assert sample.labels["tenant"] == "acme" and sample.labels["route"] == "chat"
        finally:
            envoy.stop()
            sim.stop()


def test_a_remote_library_that_does_not_match_its_digest_is_not_loaded(logdir):
    """Negative control for the digest, and the failure mode the example
    documents: traffic flows, without telemetry."""
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    with serving(MODULE.parent) as site:
        docs = remote_example(logdir, f"{site}/{MODULE.name}", "1" * 64)
        config, ports = eg_translated_config(logdir, stable_port=sim.port, canary_port=sim.port, collector_port=1,
                                             release="v1.9", docs=docs)
        envoy = launch_envoy(logdir, config, ports, envoy_bin=envoy_binary_for(EG_RELEASES["v1.9"][0]))
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            assert post_json(envoy.url + "/v1/chat/completions", chat, headers={"authorization": f"Bearer {token}"}).status == 200
            envoy.flush_wait()
            assert not [s for s in parse_exposition(envoy.stats_prometheus()).samples if "llm_gateway" in s.name]
            assert "module will not be loaded" in envoy.proc.logs(400)
        finally:
            envoy.stop()
            sim.stop()


# --- Istio (experimental) -----------------------------------------------------------------


def istio_module_proxy_config() -> dict:
    dep = find(render(ISTIO_MODULE), "Deployment", "llm-ingressgateway")
    return yaml.safe_load(dep["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])


def test_istio_module_package_is_the_wasm_package_with_the_filter_swapped():
    wasm, module = render(ISTIO), render(ISTIO_MODULE)
    wasm_plugin = find(wasm, "WasmPlugin")
    envoy_filter = find(module, "EnvoyFilter", "tokentap")
    assert ids(module) == ids(wasm) - ids([wasm_plugin]) | ids([envoy_filter])
    for d in module:
        if d["kind"] not in ("Deployment", "EnvoyFilter", "RequestAuthentication"):
            (same,) = [w for w in wasm if ids([w]) == ids([d])]
            assert d == same, (d["kind"], d["metadata"]["name"])
    (rule,), (wasm_rule,) = find(module, "RequestAuthentication")["spec"]["jwtRules"], find(wasm, "RequestAuthentication")["spec"]["jwtRules"]
    assert without(rule, "outputClaimToHeaders") == wasm_rule
    module_config = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["filter_config"]["value"]
    assert_claim_header(rule["outputClaimToHeaders"], module_config, wasm_plugin["spec"]["pluginConfig"])
    assert without(module_config, "tenant") == without(wasm_plugin["spec"]["pluginConfig"], "tenant")
    dep, wasm_dep = find(module, "Deployment"), find(wasm, "Deployment")
    assert without(dep, "metadata.labels", "spec.template") == without(wasm_dep, "metadata.labels", "spec.template")
    assert dep["metadata"]["labels"] == {**wasm_dep["metadata"]["labels"], SHELL_LABEL[0]: SHELL_LABEL[1]}
    annotations = dict(dep["spec"]["template"]["metadata"]["annotations"])
    wasm_annotations = dict(wasm_dep["spec"]["template"]["metadata"]["annotations"])
    assert annotations.pop("proxy.istio.io/config") != wasm_annotations.pop("proxy.istio.io/config")
    assert annotations == wasm_annotations
    pod, wasm_pod = dep["spec"]["template"]["spec"], wasm_dep["spec"]["template"]["spec"]
    (container,), (wasm_container,) = pod["containers"], wasm_pod["containers"]
    assert without(container, "volumeMounts") == wasm_container
    assert without(pod, "volumes", "containers") == without(wasm_pod, "containers")
    assert dep["spec"]["template"]["metadata"]["labels"] == wasm_dep["spec"]["template"]["metadata"]["labels"]
    # The proxy side: the runtime flag, a stats matcher for the module's stats, no tags.
    proxy = istio_module_proxy_config()
    assert proxy["runtimeValues"] == {STRIP_NAMESPACE_FLAG: "true"}
    assert "extraStatTags" not in proxy
    # The EnvoyFilter: on this gateway's pods, before the router of its HTTP listeners.
    spec = envoy_filter["spec"]
    assert spec["workloadSelector"]["labels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (patch,) = spec["configPatches"]
    assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == "GATEWAY"
    assert patch["match"]["listener"]["filterChain"]["filter"] == {
        "name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": "envoy.filters.http.router"}}
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    typed = patch["patch"]["value"]["typed_config"]
    assert typed["filter_name"] == "tokentap" and typed["dynamic_module_config"]["do_not_close"] is True
    # Namespace the stats matcher selects.
    (regex,) = proxy["proxyStatsMatcher"]["inclusionRegexps"]
    assert regex.startswith(re.escape(typed["dynamic_module_config"]["metrics_namespace"] + "."))


def istio_envoyfilter_config(tmp: Path, *, stable_port: int, canary_port: int, collector_port: int,
                             proxy_config: dict) -> tuple[dict, object, str]:
    """The template's listener and clusters with what istiod and istio-agent
    write from the module package: Istio's stats config and runtime flags from
    its ProxyConfig (pkg/bootstrap/config.go: runtimeValues, "true" as a
    boolean), Istio's cluster names and jwt_authn key, no Wasm filter, and the
    EnvoyFilter's http filter inserted before the router. The library comes
    from the staged image volume."""
    docs = render(ISTIO_MODULE)
    config, ports = gateway_config(tmp, stable_port=stable_port, canary_port=canary_port)
    config["stats_config"] = istio_stats_config(proxy_config)
    flags = {k: {"true": True, "false": False}.get(v, v) for k, v in proxy_config.get("runtimeValues", {}).items()}
    config["layered_runtime"] = {"layers": [{"name": "global config", "static_layer": flags}]}
    rename_clusters(config, {"llm_stable": istio_cluster_name("vllm-stable.llm.svc.cluster.local", 8000),
                             "llm_canary": istio_cluster_name("vllm-canary.llm.svc.cluster.local", 8000)})
    remove_filter(config)
    insert_jwt_authn(config, payload_in_metadata="payload", issuer=ISSUER, secret=SECRET)
    (rule,) = find(docs, "RequestAuthentication")["spec"]["jwtRules"]
    claim_to_headers(config, rule["outputClaimToHeaders"])
    dep = find(docs, "Deployment", "llm-ingressgateway")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    pod_root = tmp / "pod"
    for mount in container["volumeMounts"]:
        stage_volume(pod_root, mount["mountPath"])
    (patch,) = find(docs, "EnvoyFilter", "tokentap")["spec"]["configPatches"]
    value = copy.deepcopy(patch["patch"]["value"])
    local = value["typed_config"]["dynamic_module_config"]["module"]["local"]
    local["filename"] = str(pod_root / local["filename"].lstrip("/"))
    assert Path(local["filename"]).is_file(), "the EnvoyFilter's path is not where the image volume puts the library"
    plugin = value["typed_config"]["filter_config"]["value"]
    plugin["tracing"].update(flush_interval_ms=200, sample_ratio=1.0)
    add_static_cluster(config, {
        "name": plugin["tracing"]["cluster"], "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": plugin["tracing"]["cluster"], "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": collector_port}}}}]}]},
    })
    for vhost in hcm_of(config)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route.pop("typed_per_filter_config", None)
    filters = hcm_of(config)["http_filters"]
    filters.insert([f["name"] for f in filters].index(patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]), value)
    return config, ports, value["typed_config"]["dynamic_module_config"]["metrics_namespace"]


@pytest.mark.parametrize("version", ISTIO_ENVOYS)
def test_istio_equivalent_config_runs_the_module(logdir, version):
    try:
        binary = envoy_binary_for(version)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    proxy_config = istio_module_proxy_config()
    with OtlpReceiver() as collector:
        sim_stable = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", name="sim-stable")
        sim_canary = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", "--seed", "2", name="sim-canary")
        config, ports, namespace = istio_envoyfilter_config(logdir, stable_port=sim_stable.port, canary_port=sim_canary.port,
                                                            collector_port=collector.port, proxy_config=proxy_config)
        # JSON: the Struct's numbers stay numbers, as istiod sends them over xDS.
        envoy = launch_envoy(logdir, config, ports, envoy_bin=binary, as_json=True,
                             env={"POD_NAME": "llm-ingressgateway-7f9c-x2x", "POD_NAMESPACE": "istio-ingress"})
        try:
            token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
            statuses = _traffic(envoy, token)
            assert statuses[:-1] == [200] * (len(statuses) - 1) and statuses[-1] == 401, statuses
            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            _check_labels_and_buckets(scrape, routes=ROUTE_CLASSES, backends=BACKENDS)
            # Inside Envoy the stats carry the namespace; the package's matcher selects every one.
            (regex,) = proxy_config["proxyStatsMatcher"]["inclusionRegexps"]
            names = [s["name"] for s in json.loads(get(f"{envoy.admin}/stats?format=json&filter=llm_").body)["stats"] if "name" in s]
            assert len(names) >= 10 and all(n.startswith(namespace + ".") and re.fullmatch(regex, n) for n in names), names[:5]
            spans = collector.wait_for_spans(3, timeout=10)
            assert spans[0]["resource"]["k8s.pod.name"] == "llm-ingressgateway-7f9c-x2x"
            assert {s["attributes"]["tokentap.tenant"] for s in spans} == {"acme"}
            (rule,) = find(render(ISTIO_MODULE), "RequestAuthentication")["spec"]["jwtRules"]
            forged_tenant_is_ignored(envoy, rule["outputClaimToHeaders"][0]["header"])
        finally:
            envoy.stop()
            sim_stable.stop()
            sim_canary.stop()


def test_istio_drops_the_module_stats_without_the_package_matcher(logdir):
    """Negative control: Istio's own inclusions (the `wasm` prefix among
    them) do not cover the module's namespace; the package's matcher does."""
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    proxy_config = {**istio_module_proxy_config(), "proxyStatsMatcher": {}}
    config, ports, _ = istio_envoyfilter_config(logdir, stable_port=sim.port, canary_port=sim.port, collector_port=1,
                                                proxy_config=proxy_config)
    envoy = launch_envoy(logdir, config, ports, envoy_bin=envoy_binary_for(ISTIO_ENVOYS[-1]), as_json=True)
    try:
        token = hs256_jwt({"iss": ISSUER, "tenant": "acme", "exp": int(time.time()) + 600}, SECRET)
        chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert post_json(envoy.url + "/v1/chat/completions", chat, headers={"authorization": f"Bearer {token}"}).status == 200
        envoy.flush_wait()
        assert not parse_exposition(envoy.stats_prometheus()).series("llm_gateway_requests_total")
    finally:
        envoy.stop()
        sim.stop()
