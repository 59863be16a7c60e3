"""Alert rules and dashboards (k8s/observability).

* promtool: `check rules` and `test rules` pass; a broken expectation and a
  moved threshold make `test rules` fail (the tests can fail).
* Every alert has a firing and a quiet case, severity, summary,
  description, a runbook that resolves to a section of docs/operations.md,
  and the workload labels its signal carries.
* Every metric a rule or panel reads exists: gateway names and labels come
  from the filter's catalogue (filters/core/src/metrics.rs), runtime names
  from docs/runtime-metrics.md, GPU names from gpu-exporter's code, and
  kube-state-metrics names from a documented allowlist. Label matchers and
  groupings only use labels those metrics have.
* Live: the real stack (Envoy + filter + llm-sim, and gpu-exporter with its
  fakes scraping the same llm-sim) is scraped by a real Prometheus on
  loopback, and every dashboard query is evaluated against it: it returns
  series, with the labels its legend names and the workload values of the
  label contract, for "All" and for the concrete model / route class / team.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from harness import REPO, post_json, stream_timed, wait_until
from ops_stack import (
    DOCS,
    OBSERVABILITY,
    PROMTOOL,
    add_static_cluster,
    gateway_config,
    launch_envoy,
    start_prometheus,
)
from stack import hcm_of, plugin_config, set_plugin_config, start_sim

RULES = OBSERVABILITY / "rules.yaml"
RULES_TEST = OBSERVABILITY / "rules_test.yaml"
DASHBOARDS = OBSERVABILITY / "dashboards"
WORKLOAD = ("route", "model", "route_class", "team")

#: kube-state-metrics series the dashboards read (KSM is not part of tokentap;
#: these are its stable names). kube_pod_labels carries allowlisted pod labels
#: as label_<sanitized key> (--metric-labels-allowlist, docs/operations.md).
KSM = {
    "kube_pod_container_status_restarts_total": {"namespace", "pod", "container", "uid"},
    "kube_pod_labels": {"namespace", "pod", "uid", "label_workload_k8sllm_io_model",
                        "label_workload_k8sllm_io_route_class", "label_workload_k8sllm_io_team"},
}

# --- catalogues -----------------------------------------------------------------


def gateway_catalogue() -> dict[str, set[str]]:
    """Exposed series name -> label names, from the filter's `families!`."""
    text = (REPO / "filters" / "core" / "src" / "metrics.rs").read_text()
    labels_rs = (REPO / "filters" / "core" / "src" / "labels.rs").read_text()
    dim_names = dict(re.findall(r"Dimension::(\w+) => \"(\w+)\"", labels_rs))
    key_names = dict(re.findall(r"LabelKey::(\w+) => \"(\w+)\"", text))
    consts = {}
    for name, dim in re.findall(r"const (\w+): LabelKey = LabelKey::Dim\(Dimension::(\w+)\);", text):
        consts[name] = dim_names[dim]

    def label_list(src: str) -> set[str]:
        out = set()
        for item in (i.strip() for i in src.split(",") if i.strip()):
            if item in consts:
                out.add(consts[item])
            elif item.startswith("LabelKey::"):
                out.add(key_names[item.split("::")[1]])
            else:
                raise AssertionError(f"unknown label key {item}")
        return out

    arrays = {n: label_list(body) for n, body in re.findall(r"const (\w+): &\[LabelKey\] = &\[(.*?)\];", text, re.S)}
    block = text[text.index("families! {"):]
    block = block[: block.index("\n}\n")]
    out = {}
    for name, kind, labels in re.findall(r'=> "([a-z_]+)", (Counter|Gauge|Histogram), (&\[[^\]]*\]|\w+),', block):
        ls = label_list(labels[2:-1]) if labels.startswith("&[") else arrays[labels]
        if kind == "Histogram":
            out[name + "_bucket"] = ls | {"le"}
            out[name + "_count"] = ls
            out[name + "_sum"] = ls
        else:
            out[name] = ls
    return out


RUNTIME_BASE = {"namespace", "pod", "runtime", "model", "route_class", "team"}


def runtime_catalogue() -> dict[str, set[str]]:
    """From the schema table of docs/runtime-metrics.md."""
    text = (DOCS / "runtime-metrics.md").read_text()
    table = text[text.index("## Schema"):text.index("## Per-runtime mapping")]
    out = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[0].startswith("`llm_runtime_"):
            continue
        names = re.findall(r"`(_?[a-z0-9_]+)`", cells[0])
        first = names[0]
        full = [first] + [first[: first.index("_hit")] + n for n in names[1:]]  # `x_hit_…` / `_query_…`
        extra = set(re.findall(r"`([a-z_]+)` ∈", cells[3])) | ({"le"} if "`le`" in cells[3] else set())
        labels = set() if "no labels" in cells[3] else RUNTIME_BASE | extra
        for name in full:
            if cells[1] == "histogram":
                out[name + "_bucket"] = labels
                out[name + "_count"] = labels - {"le"}
                out[name + "_sum"] = labels - {"le"}
            else:
                out[name] = labels
    return out


GPU_LABELS = {"gpu", "gpu_uuid", "namespace", "pod", "container", "model", "route_class", "team", "node"}


def gpu_catalogue() -> dict[str, set[str]]:
    """Per-GPU families of gpu-exporter (the table in
    gpu-exporter/exporter/src/metrics/families.rs: gpu_labels + push_owner;
    `node` is the PodMonitor's target label)."""
    text = (REPO / "gpu-exporter" / "exporter" / "src" / "metrics" / "families.rs").read_text()
    out = {}
    for kind, name in re.findall(r"\b(gauge|counter)\(\s*\"(llm_gpu_[a-z0-9_]+)\"", text):
        out[name + ("_total" if kind == "counter" else "")] = GPU_LABELS
    return out


def recording_rules() -> dict[str, set[str]]:
    out = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                bys = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
                out[rule["record"]] = {l.strip() for b in bys for l in b.split(",") if l.strip()} - {"le"}
    return out


def catalogue() -> dict[str, set[str]]:
    return {**gateway_catalogue(), **runtime_catalogue(), **gpu_catalogue(), **KSM, **recording_rules()}


# --- a small PromQL reader ---------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (op, value)}) of every vector selector."""
    out = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = {k: (op, v) for k, op, v in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2))}
        out.append((m.group(1), matchers))
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    bare = re.sub(r'"[^"]*"', "", bare)
    named = {n for n, _ in out}
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare):
        name = m.group(1)
        if name not in KEYWORDS and name not in named:
            out.append((name, {}))
            named.add(name)
    return out


def grouping_labels(expr: str) -> set[str]:
    found = re.findall(r"\b(?:by|on|ignoring)\s*\(([^)]*)\)", expr)
    return {l.strip() for f in found for l in f.split(",") if l.strip()}


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("alert") or rule["record"], rule["expr"]))
    return out


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def panel_exprs() -> list[tuple[str, str, dict]]:
    return [(f"{name}: {p['title']} [{t['refId']}]", t["expr"], t)
            for name, d in dashboards().items() for p in panels(d) for t in p["targets"]]


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


# --- promtool ------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = OBSERVABILITY) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules_passes():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


def test_promtool_rule_unit_tests_pass():
    r = promtool("test", "rules", RULES_TEST.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize(
    "what, file, old, new",
    [
        ("a wrong expected value", "rules_test.yaml", "is 2425 ms, over 2000 ms", "is 2424 ms, over 2000 ms"),
        ("a moved threshold", "rules.yaml", 'llm:gateway_ttft_ms:p95_5m{route_class="interactive"} > 2000',
         'llm:gateway_ttft_ms:p95_5m{route_class="interactive"} > 3000'),
        ("a lost workload label", "rules.yaml", "max by (namespace, pod, runtime, model, route_class, team) (llm_runtime_kv_cache_usage_ratio)",
         "max by (namespace, pod, runtime, model, route_class) (llm_runtime_kv_cache_usage_ratio)"),
        ("a missed traffic floor", "rules.yaml", "rate(llm_gateway_time_to_first_token_milliseconds_count{route_class=\"interactive\"}[5m])) > 0.05",
         "rate(llm_gateway_time_to_first_token_milliseconds_count{route_class=\"interactive\"}[5m])) > 0"),
    ],
)
def test_promtool_unit_tests_can_fail(tmp_path, what, file, old, new):
    """Negative control: the same tests on a copy with one change fail."""
    for f in (RULES, RULES_TEST):
        shutil.copy(f, tmp_path / f.name)
    text = (tmp_path / file).read_text()
    assert text.count(old) == 1, f"{what}: anchor not found"
    (tmp_path / file).write_text(text.replace(old, new))
    r = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert r.returncode != 0, f"{what}: promtool still passed\n{r.stdout}"
    assert "FAILED" in r.stdout + r.stderr


def test_prometheusrule_holds_the_same_groups():
    rule = yaml.safe_load((OBSERVABILITY / "prometheusrule.yaml").read_text())
    expected_body = "".join("  " + l if l.strip() else l for l in RULES.read_text()[RULES.read_text().index("groups:"):].splitlines(True))
    text = (OBSERVABILITY / "prometheusrule.yaml").read_text()
    expected = text[: text.index("  groups:")] + expected_body
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], "prometheusrule.yaml should be:\n" + expected
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"


# --- alert contract -------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    anchors = github_anchors((DOCS / "operations.md").read_text())
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 12
    for a in alerts():
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, a["alert"]
        assert a.get("for"), a["alert"]
        ann = a["annotations"]
        assert ann["summary"].strip() and ann["description"].strip(), a["alert"]
        url = ann["runbook_url"]
        assert url.startswith("https://github.com/tokentap/tokentap/blob/main/docs/operations.md#"), url
        anchor = url.split("#", 1)[1]
        assert anchor == a["alert"].lower() and anchor in anchors, f"{a['alert']}: no section #{anchor} in docs/operations.md"


def test_operations_doc_links_resolve():
    text = (DOCS / "operations.md").read_text()
    anchors = github_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 20
    assert not [l for l in links if l not in anchors], [l for l in links if l not in anchors]
    for path in re.findall(r"\]\(([a-z-]+\.md)(?:#[^)]*)?\)", text):
        assert (DOCS / path).exists(), path


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in test.get("alert_rule_test", []):
            cases.setdefault(t["alertname"], []).append(bool(t.get("exp_alerts")))
    for a in alerts():
        got = cases.get(a["alert"], [])
        assert True in got, f"{a['alert']}: no firing case"
        assert False in got, f"{a['alert']}: no quiet case"


def test_alerts_carry_every_workload_label_their_signal_has():
    """The firing case's labels include each of route/model/route_class/team
    that every metric the alert reads has."""
    cat = catalogue()
    firing = {}
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in test.get("alert_rule_test", []):
            if t.get("exp_alerts"):
                firing[t["alertname"]] = t["exp_alerts"][0]["exp_labels"]
    for a in alerts():
        metrics = [n for n, _ in selectors(a["expr"])]
        carried = set(WORKLOAD)
        for m in metrics:
            carried &= cat[m]
        assert carried <= set(firing[a["alert"]]), (a["alert"], carried, firing[a["alert"]])
        # The rule keeps them, not just the test: they are in its groupings.
        assert carried <= grouping_labels(a["expr"]) | set().union(*(cat[m] for m in metrics if m.startswith("llm:"))), a["alert"]


def test_series_in_rule_tests_use_real_names_and_label_sets():
    cat = catalogue()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for s in test["input_series"]:
            name, body = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", s["series"]).groups()
            labels = set(re.findall(r'([a-zA-Z_]+)="', body))
            assert name in cat, name
            # `node` is a scrape target label (PodMonitor relabeling), not the exporter's.
            assert labels <= cat[name] and cat[name] - {"node"} <= labels, (name, labels ^ cat[name])


# --- metric names and labels in rules and dashboards -------------------------------------


def test_every_metric_in_rules_and_dashboards_exists_with_the_labels_used():
    cat = catalogue()
    checked = 0
    for where, expr, *_ in [*rule_exprs(), *panel_exprs()]:
        sels = selectors(expr)
        assert sels, where
        used = set()
        for name, matchers in sels:
            assert name in cat, f"{where}: unknown metric {name}"
            assert set(matchers) <= cat[name], f"{where}: {name} has no label(s) {set(matchers) - cat[name]}"
            used |= cat[name]
            checked += 1
        # instance / job are Prometheus' own target labels, on every series.
        missing = grouping_labels(expr) - used - {"instance", "job"}
        assert not missing, f"{where}: grouping by labels no metric has: {missing}"
    assert checked >= 60


def test_metric_reader_finds_names_and_matchers():
    """The PromQL reader the checks above rely on."""
    sels = selectors('sum by (le, route) (rate(a_bucket{model=~"$model",x="1"}[$__rate_interval])) / on (route) group_left () b or c * 0')
    assert sels == [("a_bucket", {"model": ("=~", "$model"), "x": ("=", "1")}), ("b", {}), ("c", {})]
    assert grouping_labels("sum by (le, route) (x) / on (team) y") == {"le", "route", "team"}


# --- dashboards ------------------------------------------------------------------------


def test_dashboards_are_well_formed_and_templated_on_the_workload_labels():
    dash = dashboards()
    assert set(dash) == {"llm-incident", "gateway-health"}
    cat = catalogue()
    for name, d in dash.items():
        assert d["uid"].startswith("tokentap-") and d["schemaVersion"] >= 36
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        cells = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: panels overlap at {p['title']}"
                    cells.add((x, y))
        tvars = {v["name"]: v for v in d["templating"]["list"]}
        assert tvars["datasource"]["type"] == "datasource" and tvars["datasource"]["query"] == "prometheus"
        for p in panels(d):
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], (name, p["title"])
            assert p.get("description"), (name, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
    inc = dash["llm-incident"]
    tvars = {v["name"]: v for v in inc["templating"]["list"]}
    for var in ("model", "route_class", "team", "route"):
        v = tvars[var]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", var
        assert re.fullmatch(rf"label_values\(llm_gateway_requests_total(\{{.*\}})?, {var}\)", v["query"]["query"]), v
    # One dashboard, three sources, one set of label values: every selector
    # filters each workload label its metric has by the variable.
    for p in panels(inc):
        for t in p["targets"]:
            for metric, matchers in selectors(t["expr"]):
                has = cat[metric]
                if metric == "kube_pod_labels":
                    for var in ("model", "route_class", "team"):
                        assert matchers[f"label_workload_k8sllm_io_{var}"] == ("=~", f"${var}"), p["title"]
                    continue
                for var in ("model", "route_class", "team", "route"):
                    if var in has and (var != "route" or metric.startswith("llm_")):
                        assert matchers.get(var) == ("=~", f"${var}"), f"{p['title']}: {metric} not filtered by ${var}"
    sources = {m.split("_")[1] for _, e, _ in panel_exprs() for m, _ in selectors(e) if m.startswith("llm_")}
    assert {"gateway", "rag", "runtime", "gpu"} <= sources


def test_incident_panels_cover_the_assignment_and_name_every_alert():
    inc = panels(dashboards()["llm-incident"])
    exprs = " ".join(t["expr"] for p in inc for t in p["targets"])
    for needle in ("llm_gateway_time_to_first_token_milliseconds_bucket", "llm_gateway_tokens_total", "llm_runtime_queue_time_seconds_bucket",
                   "llm_gpu_memory_used_bytes", "kube_pod_container_status_restarts_total", "by (error_type)", "by (le, backend)"):
        assert needle in exprs, needle
    descriptions = " ".join(p["description"] for d in dashboards().values() for p in panels(d))
    for a in alerts():
        assert a["alert"] in descriptions, f"no panel names {a['alert']}"


def test_dashboard_configmaps_list_both_dashboards():
    k = yaml.safe_load((DASHBOARDS / "kustomization.yaml").read_text())
    files = [f for g in k["configMapGenerator"] for f in g["files"]]
    assert sorted(files) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert k["generatorOptions"]["labels"]["grafana_dashboard"] == "1"


# --- live: every panel query against a real Prometheus scraping the real stack ---------


GPU0 = "GPU-7c1e0d2a-1b2d-4e3f-8a4b-5c6d7e8f0001"
GPU1 = "GPU-7c1e0d2a-1b2d-4e3f-8a4b-5c6d7e8f0002"
GIB = 1 << 30
CHAT = "/v1/chat/completions"
PLATFORM = {"model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}
#: Panels whose data needs an input this stack does not make, with why.
NOT_PRODUCED = {
    "Pod restarts [A]": "kube-state-metrics is not part of this stack (its query must still be valid)",
}


@pytest.fixture
def live_stack(logdir, wasm_path):
    """llm-sim stable + canary (RAG mode on the same binaries), gpu-exporter
    (fake NVML, fake kubelet and API, scraping the sims as vLLM pods), a
    scripted gzip upstream, Envoy with the filter (tracing on, a tiny span
    queue), and Prometheus scraping Envoy and gpu-exporter every second."""
    from exporter_stack import NvmlScenario, allocation, start_exporter, start_fake_kube_api, start_fake_kubelet
    from otlp_receiver import OtlpReceiver
    from raw_upstream import RawUpstream, Script

    procs = []
    raw = RawUpstream().__enter__()
    collector = OtlpReceiver().__enter__()
    collector.set_delay(1.0)
    try:
        stable = start_sim(logdir, "--ttft-ms", "30", "--itl-ms", "5", "--max-num-seqs", "2", name="sim-stable")
        canary = start_sim(logdir, "--ttft-ms", "30", "--itl-ms", "5", "--seed", "2", name="sim-canary")
        procs += [stable, canary]
        scenario = NvmlScenario(logdir / "nvml.json")
        scenario.write({"driver_version": "550.54.15", "cuda_driver_version": 12040, "gpus": [
            {"uuid": GPU0, "minor_number": 0, "memory_total_bytes": 80 * GIB, "memory_used_bytes": 72 * GIB},
            {"uuid": GPU1, "minor_number": 1, "memory_total_bytes": 80 * GIB, "memory_used_bytes": 70 * GIB},
        ]})
        pod_labels = {"app.kubernetes.io/name": "vllm-openai", "app.kubernetes.io/part-of": "llm-platform",
                      "workload.k8sllm.io/model": "mistral-7b", "workload.k8sllm.io/route-class": "interactive",
                      "workload.k8sllm.io/team": "platform-ai", "inference.networking.k8s.io/engine-type": "vllm"}
        pods = [
            {"name": f"vllm-{track}-0", "namespace": "llm", "labels": dict(pod_labels), "podIP": "127.0.0.1",
             "annotations": {"prometheus.io/port": str(sim.port)}, "containers": [{"name": "vllm"}]}
            for track, sim in (("stable", stable), ("canary", canary))
        ]
        kube = start_fake_kube_api(logdir, pods)
        kubelet = start_fake_kubelet(
            logdir,
            [allocation("llm", "vllm-stable-0", "vllm", "nvidia.com/gpu", GPU0),
             allocation("llm", "vllm-canary-0", "vllm", "nvidia.com/gpu", GPU1)],
            [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU0, GPU1]}],
        )
        procs += [kube, kubelet]
        exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube, runtime=True, interval="500ms")
        procs.append(exporter)
        exporter.scrape_when(lambda s: len(s.series("llm_runtime_up", model="mistral-7b")) == 2
                             and s.series("llm_gpu_memory_used_bytes", pod="vllm-canary-0"), timeout=20, what="runtime and GPU series")

        # A gzip-encoded answer on the chat route: the filter cannot read it.
        raw.script(CHAT, Script(200, {"content-type": "application/json", "content-encoding": "gzip"}, [b"\x1f\x8b\x08\x00" + b"\x00" * 16], content_length=True))

        def edit(cfg):
            add_static_cluster(cfg, {"name": "raw_upstream", "type": "STATIC", "connect_timeout": "1s",
                                     "load_assignment": {"cluster_name": "raw_upstream", "endpoints": [{"lb_endpoints": [
                                         {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": raw.port}}}}]}]}})
            add_static_cluster(cfg, {"name": "otel_collector", "type": "STATIC", "connect_timeout": "1s",
                                     "load_assignment": {"cluster_name": "otel_collector", "endpoints": [{"lb_endpoints": [
                                         {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": collector.port}}}}]}]}})
            routes = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]
            routes.insert(0, {"name": "chat", "match": {"path": CHAT, "headers": [{"name": "x-raw", "string_match": {"exact": "1"}}]},
                              "route": {"cluster": "raw_upstream", "timeout": "10s"}})
            plugin = plugin_config(cfg)
            plugin["usage"] = {"inject_include_usage": True}
            # A small series budget, exhausted by the last traffic below.
            plugin["limits"] = {"max_series_per_metric": 12}
            # A one-span queue in front of a slow collector: spans get dropped.
            plugin["tracing"] = {"cluster": "otel_collector", "sample_ratio": 1.0, "flush_interval_ms": 100,
                                 "max_queue_spans": 1, "max_batch_spans": 1}
            set_plugin_config(cfg, plugin)

        config, ports = gateway_config(logdir, stable_port=stable.port, canary_port=canary.port, rag_port=stable.port)
        edit(config)
        envoy = launch_envoy(logdir, config, ports)
        procs.append(envoy)
        prom = start_prometheus(logdir, {
            "gateway": (f"127.0.0.1:{envoy.admin_port}", "/stats/prometheus"),
            "gpu-exporter": (f"127.0.0.1:{exporter.port}", "/metrics"),
        })
        procs.append(prom)
        yield envoy, stable, prom
    finally:
        for p in reversed(procs):
            p.stop()
        collector.__exit__(None, None, None)
        raw.__exit__(None, None, None)


def _incident_traffic(envoy, sim) -> None:
    url = envoy.url
    h = {"x-tenant-id": "acme"}

    def chat(content, n, stream, **extra_headers):
        body = {"model": "mistral-7b", "messages": [{"role": "user", "content": content}], "max_tokens": n, "stream": stream}
        if stream:
            return stream_timed(url + CHAT, body, headers={**h, **extra_headers})[0]
        return post_json(url + CHAT, body, headers={**h, **extra_headers}).status

    # A burst of streams on a 2-sequence runtime: queueing, waiting requests.
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(chat(f"burst {i}", 8, True))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [200] * 6
    assert chat("canary please", 6, True, **{"x-canary": "1"}) == 200
    assert chat("canary failure", 6, False, **{"x-canary": "1", "x-sim-fail": "503"}) == 503
    assert chat("json answer", 4, False) == 200
    assert post_json(url + "/v1/completions", {"model": "mistral-7b", "prompt": "hello there", "max_tokens": 3}, headers=h).status == 200
    # Health-dashboard inputs: an unknown model (label overflow), a malformed
    # body (parse error), a gzip answer (unparsed response).
    assert post_json(url + CHAT, {"model": "gpt-unknown", "messages": []}, headers=h).status == 404
    from harness import http_request
    assert http_request("POST", url + CHAT, body=b'{"model": "mistral-7b", "messages": [', headers={**h, "content-type": "application/json"})[0] == 400
    assert http_request("POST", url + CHAT, body=json.dumps({"model": "mistral-7b", "messages": []}), headers={**h, "x-raw": "1", "content-type": "application/json"})[0] == 200
    # RAG: retrieval, then one request during a vector-store outage.
    rag = {"model": "mistral-7b", "messages": [{"role": "user", "content": "what changed?"}], "max_tokens": 3}
    assert post_json(url + "/rag/v1/chat/completions", rag, headers={**h, "x-rag-collection": "docs"}).status == 200
    assert post_json(sim.url + "/admin/config", {"rag_vector_store_down": True}).status == 200
    assert post_json(url + "/rag/v1/chat/completions", rag, headers={**h, "x-rag-collection": "docs"}).status == 503
    assert post_json(sim.url + "/admin/config", {"rag_vector_store_down": False}).status == 200
    # Last: more tenants than the series budget has room for (series overflow).
    for i in range(14):
        post_json(url + "/v1/completions", {"model": "mistral-7b", "prompt": "x", "max_tokens": 1}, headers={"x-tenant-id": f"tenant-{i}"})


def _substitute(expr: str, values: dict[str, str]) -> str:
    # Prometheus started right before the traffic: windows this wide cover
    # all of it however long the queries take.
    out = expr.replace("$__rate_interval", "2m").replace("$__range", "5m")
    for var, val in values.items():
        out = out.replace(f"${var}", val)
    assert "$" not in out, out
    return out


def test_every_dashboard_query_returns_labelled_data_from_the_real_stack(live_stack):
    envoy, sim, prom = live_stack
    _incident_traffic(envoy, sim)
    # Histograms appear after Envoy's stats flush (1 s), then a scrape (1 s).
    wait_until(lambda: prom.query('sum(llm_gateway_time_to_first_token_milliseconds_count) > 0')
               and prom.query("sum(llm_gateway_spans_dropped_total) > 0")
               and prom.query("sum(llm_runtime_requests_total) > 0"), timeout=20, interval=0.5, what="samples in Prometheus")
    time.sleep(2)
    all_values = {"model": ".*", "route_class": ".*", "team": ".*", "route": ".*"}
    # A multi-select of two routes, as Grafana renders it into the regex.
    concrete = {**PLATFORM, "route": "chat|rag-chat"}
    empty, checked = [], 0
    for where, expr, target in panel_exprs():
        short = where.split(": ", 1)[1]
        for values in (all_values, concrete):
            result = prom.query(_substitute(expr, values))
            if short in NOT_PRODUCED:
                continue
            if not result:
                empty.append(f"{where} with {values}")
                continue
            checked += 1
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            for series in result:
                labels = series["metric"]
                assert legend_labels <= set(labels), f"{where}: legend needs {legend_labels}, got {labels}"
                for key in ("model", "route_class", "team"):
                    if key in labels and values is concrete:
                        assert labels[key] == PLATFORM[key], (where, labels)
                    if key in labels:
                        assert labels[key] not in ("unknown", ""), (where, labels)
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert checked >= 50
    # The template variables' own queries list the contract's values.
    for var, value in PLATFORM.items():
        got = {s["metric"][var] for s in prom.query(f"group by ({var}) (llm_gateway_requests_total)")}
        assert value in got, (var, got)
    # The join the dashboard relies on: the same (model, route_class, team)
    # on gateway, runtime and GPU series.
    tuples = []
    for metric in ("llm_gateway_requests_total", "llm_runtime_up", "llm_gpu_memory_used_bytes"):
        got = {(m["metric"]["model"], m["metric"]["route_class"], m["metric"]["team"])
               for m in prom.query(f"group by (model, route_class, team) ({metric})")}
        tuples.append(got)
    assert (PLATFORM["model"], PLATFORM["route_class"], PLATFORM["team"]) in set.intersection(*tuples), tuples
    _alert_signals_on_the_real_stack(prom)


def _alert_signals_on_the_real_stack(prom) -> None:
    """The rule expressions are valid against real series and select the
    labelled series they aggregate (thresholds are promtool's business): each
    alert's signal, its comparison removed, returns data where the stack
    produces that signal, with the label contract's values."""
    produced = {"LLMSlowFirstToken", "LLMRuntimeSaturated", "LLMRuntimeKVCacheHigh", "LLMGPUMemoryPressure", "LLMRAGIndexStale",
                "LLMRAGRetrievalFailing", "LLMCanaryErrorRegression", "LLMCanaryTTFTRegression", "LLMGatewayLabelOverflow", "LLMGatewaySeriesOverflow",
                "LLMGatewaySpansDropped", "LLMGatewayParseErrors"}
    recorded = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    for a in alerts():
        expr = a["expr"]
        # Inline the recording rules (this Prometheus loads no rule files).
        for name, body in recorded.items():
            expr = re.sub(rf"{re.escape(name)}(\{{[^}}]*\}})?", lambda m, b=body: _with_matchers(b, m.group(1)), expr)
        expr = re.sub(r"\[(5|10|15)m\]", "[2m]", expr)
        signal = re.split(r"\n\s*(?:>|and\s+on)\s", expr.strip())[0]
        signal = re.sub(r"\s*>\s*[0-9.]+\s*$", "", signal.strip())
        result = prom.query(signal)
        assert a["alert"] in produced, f"{a['alert']}: add it to the stack's signals"
        assert result, f"{a['alert']}: no data for {signal}"
        for series in result:
            for key in ("model", "route_class", "team"):
                if key in series["metric"]:
                    assert series["metric"][key] == PLATFORM[key], (a["alert"], series["metric"])


def _with_matchers(body: str, matchers: str | None) -> str:
    """A recording rule's expression, the selector's matchers pushed into
    each of its vector selectors (all of which carry the matched label)."""
    body = " ".join(body.split())
    if matchers:
        inner = matchers.strip("{}")

        def push(m):
            name, braces = m.group(1), m.group(2)
            if braces:
                return f"{name}{{{inner},"
            return f"{name}{{{inner}}}"

        body = re.sub(r"\b(llm_[a-z_]+)(\{)?(?=[^(]*?\[)", push, body)
    return f"({body})"
