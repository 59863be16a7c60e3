"""Helpers for the deployment, alert and drill suites (`k8s/gateway`,
`k8s/observability`, `docs/operations.md`).

* The names Istio and Envoy Gateway give Envoy routes and clusters (the
  rendered packages themselves: k8s_packages.py).
* Platform-equivalent bootstraps: the `stats_config` Istio's agent generates
  from `extraStatTags` / `proxyStatsMatcher`, and Envoy Gateway's default one
  with our JSONPatch applied, so a real Envoy runs with what the manifests
  would produce in a cluster.
* A Prometheus server on loopback (the Debian `prometheus` package) that
  scrapes Envoy, to evaluate dashboard and alert PromQL against real samples,
  optionally with the rules loaded (`fast_rules`: rules.yaml with 1 s
  intervals and `for` durations, generated, not copied), and a stub that
  serves kube-state-metrics- and cAdvisor-shaped series for the Kubernetes
  panels and alerts (no cluster here).
* Histogram arithmetic with Prometheus' `histogram_quantile` semantics, for
  the drills.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable

import pytest
import yaml

from harness import REPO, Proc, Scrape, free_port, get, next_base_id, envoy_binary, wait_http_ok, WASM, wait_until
from stack import Envoy, render_template, hcm_of, wasm_filter

K8S = REPO / "k8s"
OBSERVABILITY = K8S / "observability"
DOCS = REPO / "docs"


def system_tool(name: str) -> Path:
    """A system tool (`prometheus`, `promtool`, `buildah`) from PATH; the
    test is skipped without it."""
    found = shutil.which(name)
    if found is None:
        package = "prometheus" if name in ("prometheus", "promtool") else name
        pytest.skip(f"{name} not on PATH (Debian package {package}; `cargo xtask setup` installs it when root)")
    return Path(found)


# --- manifests (rendered: k8s_packages.py) --------------------------------------


def stats_config() -> dict:
    """`envoy/stats-config.yaml`: the source of truth for tags and buckets."""
    return yaml.safe_load((REPO / "envoy" / "stats-config.yaml").read_text())["stats_config"]


def istio_cluster_name(host: str, port: int, subset: str = "") -> str:
    """Istio's outbound cluster name (`outbound|<port>|<subset>|<FQDN>`)."""
    return f"outbound|{port}|{subset}|{host}"


def eg_route_names(route: dict, listener_hostname: str | None) -> list[str]:
    """Envoy route names Envoy Gateway generates for an HTTPRoute.

    From envoyproxy/gateway internal/gatewayapi (v1.4 to v1.9, checked at
    d32f282): irRouteName = `httproute/<ns>/<name>/rule/<r>/match/<m>`, then
    `/<hostname with dots as underscores>` per hostname (computeHosts: the
    route's hostnames, else the listener's, else `*`).
    """
    ns = route["metadata"].get("namespace", "default")
    name = route["metadata"]["name"]
    hosts = route["spec"].get("hostnames") or ([listener_hostname] if listener_hostname else ["*"])
    names = []
    for r, rule in enumerate(route["spec"]["rules"]):
        matches = rule.get("matches") or [None]
        for m, _ in enumerate(matches):
            idx = m if rule.get("matches") else -1
            for host in hosts:
                names.append(f"httproute/{ns}/{name}/rule/{r}/match/{idx}/{host.replace('.', '_')}")
    return names


def eg_merged_cluster_name(namespace: str, service: str, port: int) -> str:
    """Cluster name of a merged backend (EnvoyProxy mergeBackends, Envoy
    Gateway v1.9: irBackendClusterName, protocol HTTP for HTTPRoutes)."""
    return f"service/{namespace}/{service}/{port}/http"


# --- platform-equivalent stats configuration ----------------------------------

#: What Istio generates for each `extraStatTags` entry
#: (istio/istio tools/packaging/common/envoy_bootstrap.json @86c9f01).
ISTIO_EXTRA_TAG_REGEX = r"({tag}=\.=(.*?);\.;)"

#: Istio's fixed tags around the extraStatTags (same file). The regexes are
#: facts about Istio, kept here as data so the equivalent bootstrap matches.
ISTIO_TAGS_BEFORE = [
    {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
    {"tag_name": "http_conn_manager_prefix", "regex": r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"},
    {"tag_name": "thread_name", "regex": r"^server(\.(.+))\.watchdog"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "http_conn_manager_listener_prefix", "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "listener_address", "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "mongo_prefix", "regex": r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"},
]
ISTIO_TAGS_AFTER = [
    {"tag_name": "cache", "regex": r"(cache\.(.+?)\.)"},
    {"tag_name": "component", "regex": r"(component\.(.+?)\.)"},
    {"tag_name": "tag", "regex": r"(tag\.(.+?);\.)"},
    {"tag_name": "wasm_filter", "regex": r"(wasm_filter\.(.+?)\.)"},
    {"tag_name": "authz_enforce_result", "regex": r"rbac(\.(allowed|denied))"},
    {"tag_name": "authz_dry_run_action", "regex": r"(\.istio_dry_run_(allow|deny)_)"},
    {"tag_name": "authz_dry_run_result", "regex": r"(\.shadow_(allowed|denied))"},
]
#: pkg/bootstrap/config.go: always-included stats (readiness, rbac, routes).
ISTIO_REQUIRED_PREFIXES = ["cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"]
ISTIO_REQUIRED_SUFFIXES = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"]
ISTIO_REQUIRED_REGEXPS = [r"vhost\..*\.route\..*"]


def istio_stats_config(proxy_config: dict, *, required_inclusions: bool = True) -> dict:
    """The `stats_config` istio-agent writes for a proxy with this ProxyConfig.

    `required_inclusions=False` leaves out Istio's always-included prefixes
    (among them `wasm`, which covers `wasmcustom.*` today), to show what the
    manifest's own proxyStatsMatcher selects.
    """
    tags = list(ISTIO_TAGS_BEFORE)
    for tag in proxy_config.get("extraStatTags", []):
        tags.append({"tag_name": tag, "regex": ISTIO_EXTRA_TAG_REGEX.format(tag=tag)})
    tags += ISTIO_TAGS_AFTER
    matcher = proxy_config.get("proxyStatsMatcher", {})
    prefixes = list(matcher.get("inclusionPrefixes", [])) + (ISTIO_REQUIRED_PREFIXES if required_inclusions else [])
    suffixes = list(matcher.get("inclusionSuffixes", [])) + (ISTIO_REQUIRED_SUFFIXES if required_inclusions else [])
    regexps = list(matcher.get("inclusionRegexps", [])) + (ISTIO_REQUIRED_REGEXPS if required_inclusions else [])
    patterns = [{"prefix": "reporter="}]
    patterns += [{"prefix": p} for p in prefixes]
    patterns += [{"suffix": s} for s in suffixes]
    patterns += [{"safe_regex": {"regex": r}} for r in regexps]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]
    return {"use_all_default_tags": False, "stats_tags": tags, "stats_matcher": {"inclusion_list": {"patterns": patterns}}}


#: Envoy Gateway's default bootstrap stats_config
#: (internal/xds/bootstrap/bootstrap.yaml.tpl, v1.9.0).
EG_DEFAULT_STATS_CONFIG = {
    "use_all_default_tags": True,
    "stats_tags": [
        {"regex": r"\.zone(\.(([^\.]+)\.))", "tag_name": "from_zone"},
        {"regex": r"\.zone\.[^\.]+\.(([^\.]+)\.)", "tag_name": "to_zone"},
        {"regex": r"^cluster(\..+\.(.+))\.total_match_count$", "tag_name": "socket_match_name"},
        {"regex": r"circuit_breakers\.((.+?)\.).+", "tag_name": "priority"},
    ],
}


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with /: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 `add` / `replace` / `remove` (what the EnvoyProxy uses)."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        target = out
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        kind = op["op"]
        if isinstance(target, list):
            if kind == "add":
                if last == "-":
                    target.append(copy.deepcopy(op["value"]))
                else:
                    target.insert(int(last), copy.deepcopy(op["value"]))
            elif kind == "replace":
                target[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del target[int(last)]
            else:
                raise ValueError(f"unsupported op {kind}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and last not in target:
                    raise KeyError(op["path"])
                target[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del target[last]
            else:
                raise ValueError(f"unsupported op {kind}")
    return out


# --- Envoy with a platform-shaped bootstrap ------------------------------------


@dataclass
class GatewayPorts:
    listen: int
    admin: int
    access_log: Path


def gateway_config(tmp: Path, *, stable_port: int, canary_port: int | None = None, rag_port: int | None = None,
                   name: str = "envoy", flush_interval: str = "1s") -> tuple[dict, GatewayPorts]:
    """`envoy/tokentap.yaml` rendered as the tests render it, parsed."""
    ports = GatewayPorts(free_port(), free_port(), tmp / f"{name}-access.log")
    text = render_template(
        {
            "LISTEN_PORT": ports.listen,
            "ADMIN_PORT": ports.admin,
            "STABLE_PORT": stable_port,
            "CANARY_PORT": canary_port or stable_port,
            "RAG_PORT": rag_port or stable_port,
            "WASM_PATH": WASM,
            "ACCESS_LOG": ports.access_log,
            "STATS_FLUSH_INTERVAL": flush_interval,
        }
    )
    return yaml.safe_load(text), ports


def launch_envoy(tmp: Path, config: dict, ports: GatewayPorts, *, name: str = "envoy",
                 extra_args: Iterable[str] = (), env: dict | None = None, timeout: float = 30,
                 wait_ready: bool = True, envoy_bin: Path | None = None, as_json: bool = False) -> Envoy:
    """Start Envoy on a prepared bootstrap (plus e.g. `--config-yaml`);
    `envoy_bin`: another supported version's binary (harness.envoy_binary_for);
    `as_json`: write the bootstrap as JSON, so numbers inside a
    google.protobuf.Struct stay numbers as over xDS (Envoy's YAML loader
    turns `1.0` there into a string)."""
    path = tmp / f"{name}.{'json' if as_json else 'yaml'}"
    path.write_text(json.dumps(config) if as_json else yaml.safe_dump(config, sort_keys=False))
    proc = Proc(
        name,
        [envoy_bin or envoy_binary(), "-c", path, "--concurrency", "2", "--base-id", str(next_base_id()),
         "--log-level", "info", "--component-log-level", "wasm:info", *extra_args],
        tmp / f"{name}.log",
        env=env,
    ).start()
    envoy = Envoy(proc, ports.listen, ports.admin, path, ports.access_log)
    if wait_ready:
        wait_http_ok(f"{envoy.admin}/ready", proc, timeout=timeout)
    return envoy


def rename_clusters(config: dict, mapping: dict[str, str]) -> None:
    """Give the template's clusters the names a platform would generate."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in mapping:
            new = mapping[cluster["name"]]
            cluster["name"] = new
            cluster["load_assignment"]["cluster_name"] = new
    for vhost in hcm_of(config)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            action = route.get("route", {})
            if action.get("cluster") in mapping:
                action["cluster"] = mapping[action["cluster"]]


def rename_routes(config: dict, mapping: dict[str, str]) -> None:
    for vhost in hcm_of(config)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            if route.get("name") in mapping:
                route["name"] = mapping[route["name"]]


def set_plugin_config_raw(config: dict, plugin: dict) -> None:
    wasm_filter(config)["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin)


def set_vm_env_keys(config: dict, keys: list[str]) -> None:
    """`vm_config.environment_variables.host_env_keys`: what Istio's
    `vmConfig.env[].valueFrom: HOST` and Envoy Gateway's `env.hostKeys` set."""
    vm = wasm_filter(config)["typed_config"]["config"]["vm_config"]
    vm["environment_variables"] = {"host_env_keys": list(keys)}


def add_static_cluster(config: dict, cluster: dict) -> None:
    config["static_resources"]["clusters"].append(cluster)


def insert_jwt_authn(config: dict, *, payload_in_metadata: str, issuer: str, secret: bytes) -> None:
    """Envoy's jwt_authn filter as Istio / Envoy Gateway configure it: the
    verified payload goes to dynamic metadata under `payload_in_metadata`."""
    jwks = json.dumps({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64url(secret)}]})
    hcm_of(config)["http_filters"].insert(0, {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"platform": {
                "issuer": issuer,
                "local_jwks": {"inline_string": jwks},
                "payload_in_metadata": payload_in_metadata,
                "forward": False,
            }},
            "rules": [{"match": {"prefix": "/v1/"}, "requires": {"provider_name": "platform"}}],
        },
    })


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256_jwt(claims: dict, secret: bytes) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


# --- Prometheus on loopback ----------------------------------------------------


@dataclass
class Prometheus:
    proc: Proc
    port: int
    #: job -> file_sd file holding its target (see `set_target`).
    target_files: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_target(self, job: str, address: str) -> None:
        """Point `job` at another address (a restarted process on a new port)."""
        _write_targets(self.target_files[job], address)

    def alerts(self) -> list[dict]:
        """Pending and firing alerts (`/api/v1/alerts`)."""
        r = get(f"{self.url}/api/v1/alerts", timeout=10)
        return json.loads(r.body)["data"]["alerts"]

    def firing(self, name: str) -> list[dict[str, str]]:
        """Label sets of the firing alerts named `name`."""
        return [a["labels"] for a in self.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]

    def query(self, expr: str) -> list[dict]:
        r = get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=10)
        body = json.loads(r.body)
        if r.status != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({r.status}): {expr}\n{body}")
        if body["data"]["resultType"] != "vector":
            raise AssertionError(f"{expr}: {body['data']['resultType']}, not a vector")
        return body["data"]["result"]

    def targets_up(self, count: int = 1) -> bool:
        r = get(f"{self.url}/api/v1/targets", timeout=5)
        active = json.loads(r.body)["data"]["activeTargets"]
        return len(active) >= count and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        self.proc.stop()


def _write_targets(path: Path, address: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [address]}]))
    tmp.replace(path)


def start_prometheus(tmp: Path, targets: dict[str, tuple[str, str]], *, interval: str = "1s",
                     rule_files: Iterable[Path] = ()) -> Prometheus:
    """A Prometheus server on 127.0.0.1 scraping `targets` ({job: (host:port,
    metrics_path)}) every `interval` (file_sd, so `set_target` can move a
    job), evaluating `rule_files`."""
    port = free_port()
    files = {job: tmp / f"targets-{job}.json" for job in targets}
    for job, (addr, _) in targets.items():
        _write_targets(files[job], addr)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": path,
             "file_sd_configs": [{"files": [str(files[job])], "refresh_interval": "1s"}]}
            for job, (_, path) in targets.items()
        ],
    }
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    proc = Proc(
        "prometheus",
        [system_tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'prom-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        tmp / "prometheus.log",
    ).start()
    prom = Prometheus(proc, port, files)
    wait_http_ok(f"{prom.url}/-/ready", proc, timeout=30)
    wait_until(lambda: prom.targets_up(len(targets)), timeout=20, interval=0.2, what="prometheus targets up")
    return prom


def fast_rules(tmp: Path, *, interval: str = "1s", hold: str = "1s") -> Path:
    """rules.yaml with every group evaluated each `interval` and every alert's
    `for` set to `hold`: the shipped expressions, on a test's time scale."""
    doc = yaml.safe_load((OBSERVABILITY / "rules.yaml").read_text())
    for group in doc["groups"]:
        group["interval"] = interval
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = hold
    path = tmp / "rules-fast.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ExpositionStub:
    """Serves `render(path)` as Prometheus text exposition on loopback: the
    kube-state-metrics and cAdvisor series the Kubernetes panels and alerts
    read, shaped as those exporters write them (see test_alerts_and_dashboards'
    KUBE catalogue), where the stack has no cluster."""

    def __init__(self, render) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = stub.render(self.path).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.render = render
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- histograms ----------------------------------------------------------------


def buckets(scrape: Scrape, name: str, **match: str) -> list[tuple[float, float]]:
    """Cumulative `(le, count)` of a histogram, summed over the series whose
    labels include `match`, sorted by `le`."""
    sums: dict[float, float] = {}
    for s in scrape.series(name + "_bucket", **match):
        le = float(s.labels["le"])
        sums[le] = sums.get(le, 0.0) + s.value
    return sorted(sums.items())


def bucket_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    prev = dict(before)
    return [(le, c - prev.get(le, 0.0)) for le, c in after]


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus' `histogram_quantile` (linear interpolation in the bucket,
    the lowest bucket starting at 0, the +Inf bucket answered with the
    highest finite bound)."""
    if not cumulative or cumulative[-1][0] != math.inf:
        return math.nan
    total = cumulative[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if le == math.inf:
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return math.nan


def now() -> float:
    return time.monotonic()
