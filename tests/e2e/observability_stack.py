"""The Prometheus side of the local stack (`cargo xtask up` and `cargo xtask
drill`, demo/), shared with the tests that check it.

* `prometheus_config`: the shipped plain-Prometheus scrape jobs
  (`k8s/observability/plain-prometheus/scrape-config.yaml`) and the shipped
  rule file (`k8s/observability/rules.yaml`), for a Prometheus on loopback.
  Debian's `prometheus` is built without Kubernetes service discovery, so each
  job's `kubernetes_sd_configs` becomes a `file_sd_configs` whose file lists
  the pods of the (fake) Kubernetes API in those namespaces, with the
  `__meta_kubernetes_*` labels Prometheus' pod discovery gives them
  (`pod_targets`). Everything else in a job (relabeling, metric relabeling,
  `honor_labels`, paths) is the shipped text, so the shipped relabeling
  decides what is scraped and how it is labelled.
* Time scale: at scale 1 Prometheus loads `rules.yaml` itself, unchanged. At
  scale k (the short drills) it loads `time_scaled_rules(k)`: the same file
  with every duration divided by k (group `interval`, alert `for`, range
  selectors and `offset`s), so "for: 10m" holds for 20 s at k = 30 and a
  5-minute rate window spans 10 s. Nothing else changes: names, expressions,
  thresholds, labels and annotations are the shipped ones. (Thresholds that
  are themselves durations in seconds, such as an index age over a day, are
  values and keep their meaning.) Scrape and evaluation intervals are divided
  the same way, never below 1 s.
* `dashboard_links`: one Prometheus graph link per panel of the LLM incident
  dashboard, made from the panel's own queries (variables at "All").
"""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import REPO, Proc, get, http_request, wait_http_ok, wait_until

OBSERVABILITY = REPO / "k8s" / "observability"
RULES = OBSERVABILITY / "rules.yaml"
SCRAPE_CONFIG = OBSERVABILITY / "plain-prometheus" / "scrape-config.yaml"
INCIDENT_DASHBOARD = OBSERVABILITY / "dashboards" / "llm-incident.json"

#: Global intervals at scale 1. The shipped scrape jobs set their own
#: scrape_interval (15s); rules without a group interval are evaluated this often.
EVALUATION_INTERVAL = "15s"
#: Shortest scrape or evaluation interval on a compressed time scale.
MIN_INTERVAL_S = 1.0

# --- durations -----------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def seconds(duration: str) -> float:
    """A Prometheus duration (`5m`, `1h30m`, `500ms`) in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def duration(secs: float) -> str:
    """Seconds as the shortest Prometheus duration (whole milliseconds)."""
    ms = int(round(secs * 1000))
    if ms <= 0:
        raise ValueError(f"duration must be positive: {secs}")
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def scaled(value: str, scale: float, floor_s: float = 0.0) -> str:
    return duration(max(seconds(value) / scale, floor_s))


_RANGE = re.compile(r"\[(\d+(?:ms|s|m|h|d|w|y))+\]")
_OFFSET = re.compile(r"\boffset\s+((?:\d+(?:ms|s|m|h|d|w|y))+)")


def scale_expr(expr: str, scale: float) -> str:
    """Range selectors and offsets of a PromQL expression divided by `scale`."""
    if scale == 1:
        return expr
    expr = _RANGE.sub(lambda m: f"[{scaled(m.group(0)[1:-1], scale)}]", expr)
    return _OFFSET.sub(lambda m: f"offset {scaled(m.group(1), scale)}", expr)


def time_scaled_rules(scale: float, source: Path = RULES) -> dict:
    """`rules.yaml` with every duration divided by `scale` (see the module
    docs); group intervals no shorter than MIN_INTERVAL_S."""
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        if "interval" in group:
            group["interval"] = scaled(group["interval"], scale, MIN_INTERVAL_S)
        for rule in group["rules"]:
            rule["expr"] = scale_expr(rule["expr"], scale)
            if "for" in rule:
                rule["for"] = scaled(rule["for"], scale)
    return doc


@dataclass(frozen=True)
class TimeScale:
    """How fast Prometheus' clock runs for the rules: 1 is the shipped rules."""

    scale: float = 1.0

    @property
    def scrape_interval_s(self) -> float:
        return max(seconds("15s") / self.scale, MIN_INTERVAL_S)

    @property
    def evaluation_interval(self) -> str:
        return scaled(EVALUATION_INTERVAL, self.scale, MIN_INTERVAL_S)

    @property
    def rate_interval(self) -> str:
        """Grafana's `$__rate_interval` at its floor: four scrape intervals."""
        return duration(4 * self.scrape_interval_s)

    def window(self, shipped: str) -> str:
        """A duration of the shipped rules on this time scale."""
        return scaled(shipped, self.scale)


# --- Kubernetes pod discovery, for a Prometheus built without it -----------------


def _sanitize(name: str) -> str:
    """Prometheus' strutil.SanitizeLabelName."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pods: list[dict], namespaces: list[str] | None) -> list[dict]:
    """file_sd target groups for `pods` (Kubernetes pod objects) as
    Prometheus' Kubernetes discovery with `role: pod` makes them
    (prometheus/discovery/kubernetes/pod.go, v2.42): one target per declared
    container port (`<podIP>:<port>`), one per container without ports
    (`<podIP>`), with the pod's `__meta_kubernetes_*` labels; pods without
    an IP give none. `namespaces` is the job's `namespaces.names`."""
    groups = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        if namespaces and meta["namespace"] not in namespaces:
            continue
        ip = status.get("podIP")
        if not ip:
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_ready": str(ready).lower(),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
            "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
            labels[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
        for key, value in (meta.get("annotations") or {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
            labels[f"__meta_kubernetes_pod_annotationpresent_{_sanitize(key)}"] = "true"
        for container in spec.get("containers", []):
            base = {"__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_image": container.get("image", ""),
                    "__meta_kubernetes_pod_container_init": "false"}
            ports = container.get("ports") or []
            if not ports:
                groups.append({"targets": [ip], "labels": {**labels, **base}})
            for port in ports:
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **labels, **base,
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP"),
                }})
    return groups


def shipped_jobs() -> list[dict]:
    return yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]


def prometheus_config(run_dir: Path, pods: list[dict], time_scale: TimeScale) -> dict:
    """prometheus.yml for the local stack (see the module docs). Writes the
    job's file_sd files (and the scaled rule file) under `run_dir`."""
    jobs = []
    for job in shipped_jobs():
        job = json.loads(json.dumps(job))
        (sd,) = job.pop("kubernetes_sd_configs")
        assert sd["role"] == "pod", f"{job['job_name']}: only pod discovery is translated"
        targets = run_dir / f"sd-{job['job_name']}.json"
        tmp = targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(pod_targets(pods, sd.get("namespaces", {}).get("names")), indent=1))
        tmp.replace(targets)
        job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "5s"}]
        if time_scale.scale != 1:
            interval = max(seconds(job.get("scrape_interval", "1m")) / time_scale.scale, MIN_INTERVAL_S)
            job["scrape_interval"] = duration(interval)
            job["scrape_timeout"] = duration(min(seconds(job.get("scrape_timeout", "10s")), interval))
        jobs.append(job)
    if time_scale.scale == 1:
        rules = RULES
    else:
        rules = run_dir / f"rules-timescale-{time_scale.scale:g}.yaml"
        rules.write_text(f"# {RULES.relative_to(REPO)} with every duration divided by {time_scale.scale:g}"
                         " (tests/e2e/observability_stack.py)\n"
                         + yaml.safe_dump(time_scaled_rules(time_scale.scale), sort_keys=False))
    return {
        "global": {"scrape_interval": "15s" if time_scale.scale == 1 else duration(time_scale.scrape_interval_s),
                   "evaluation_interval": time_scale.evaluation_interval},
        "rule_files": [str(rules)],
        "scrape_configs": jobs,
    }


# --- the Prometheus process ---------------------------------------------------------


@dataclass
class LocalPrometheus:
    """A Prometheus server with its config file, reloadable (`/-/reload`)."""

    proc: Proc | None
    url: str
    config_path: Path

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        r = get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=30)
        body = json.loads(r.body)
        if r.status != 200 or body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: HTTP {r.status}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        data = self.api("query", query=expr, time=None if at is None else f"{at:.3f}")
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr}: {data['resultType']}, not a vector")
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rule_groups(self) -> list[dict]:
        return self.api("rules")["groups"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def apply(self, config: dict, time_scale: TimeScale) -> None:
        """Write `config` and reload; returns once the rules of that time
        scale are loaded."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_path)
        status, _, body = http_request("POST", f"{self.url}/-/reload", timeout=30)
        if status != 200:
            raise RuntimeError(f"prometheus reload failed: HTTP {status}: {body[:300]!r}")
        wanted = config["rule_files"][0]
        wait_until(lambda: all(g["file"] == wanted for g in self.rule_groups()), timeout=30, interval=0.2,
                   what=f"prometheus rules of time scale {time_scale.scale:g}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(run_dir: Path, config: dict, port: int, time_scale: TimeScale) -> LocalPrometheus:
    """Prometheus on 127.0.0.1:`port` with `config`, a fresh TSDB under
    `run_dir`, reloads enabled. Raises FileNotFoundError without `prometheus`."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus")
    data = run_dir / "prometheus-data"
    shutil.rmtree(data, ignore_errors=True)
    path = run_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = Proc("prometheus", [binary, f"--config.file={path}", f"--storage.tsdb.path={data}",
                               f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
                               "--log.level=warn"], run_dir / "prometheus.log").start()
    prom = LocalPrometheus(proc, f"http://127.0.0.1:{port}", path)
    wait_http_ok(f"{prom.url}/-/ready", proc, timeout=60)
    return prom


# --- the incident dashboard as Prometheus links ---------------------------------------


def incident_panels() -> list[dict]:
    return [p for p in json.loads(INCIDENT_DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_variables() -> list[str]:
    doc = json.loads(INCIDENT_DASHBOARD.read_text())
    return [v["name"] for v in doc["templating"]["list"] if v["type"] != "datasource"]


def panel_expr(expr: str, rate_interval: str, range_: str, values: dict[str, str] | None = None) -> str:
    """A panel query as Grafana sends it: `$__rate_interval`, `$__range` and
    the template variables filled in ("All" is `.*`, the variables' allValue)."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    values = values or {}
    # Longest names first: $route_class before $route.
    for var in sorted(dashboard_variables(), key=len, reverse=True):
        out = out.replace(f"${var}", values.get(var, ".*"))
    if "$" in out:
        raise ValueError(f"unfilled variable in {out}")
    return out


def dashboard_range() -> str:
    """The dashboard's default time range (`now-1h` -> `1h`)."""
    frm = json.loads(INCIDENT_DASHBOARD.read_text())["time"]["from"]
    return frm.removeprefix("now-")


def graph_url(prom_url: str, exprs: list[str], range_input: str) -> str:
    params = {}
    for i, expr in enumerate(exprs):
        params[f"g{i}.expr"] = expr
        params[f"g{i}.tab"] = "0"
        params[f"g{i}.range_input"] = range_input
    return f"{prom_url}/graph?{urllib.parse.urlencode(params, quote_via=urllib.parse.quote)}"


def dashboard_links(prom_url: str, time_scale: TimeScale = TimeScale()) -> list[tuple[str, str]]:
    """(panel title, graph link) for every panel of the incident dashboard,
    in dashboard order; each target of a panel is one graph of the link."""
    range_ = dashboard_range()
    out = []
    for panel in incident_panels():
        exprs = [panel_expr(t["expr"], time_scale.rate_interval, range_) for t in panel["targets"]]
        out.append((panel["title"], graph_url(prom_url, exprs, range_)))
    return out


#: Metric name prefixes only kube-state-metrics and cAdvisor give (no cluster here).
CLUSTER_ONLY = ("kube_", "container_")


def needs_cluster(panel: dict) -> bool:
    return all(any(re.search(rf"\b{p}", t["expr"]) for p in CLUSTER_ONLY) for t in panel["targets"])


def finite(value: str) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None
