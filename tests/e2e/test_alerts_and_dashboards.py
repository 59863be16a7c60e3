"""Alert rules and dashboards (k8s/observability).

* promtool: `check rules` and `test rules` pass; a broken expectation and a
  moved threshold make `test rules` fail (the tests can fail).
* Every alert has a firing and a quiet case, severity, summary,
  description, a runbook that resolves to a section of docs/operations.md,
  and the workload labels its signal carries.
* Every metric a rule or panel reads exists: gateway names and labels come
  from the filter's catalogue (the gateway table of docs/metrics.md), runtime names
  from docs/runtime-metrics.md, GPU names from gpu-exporter's code and docs,
  and kube-state-metrics / cAdvisor names from a list checked against their
  docs. Label matchers and groupings only use labels those metrics have.
* Each rule change of issue 10 (relative canary threshold, saturation over
  one zero sample, RAG freshness without traffic, the workload join, an
  XID series' first event) has a promtool case that fails when it is
  reverted; the restart panel's query is promtool-checked to list workload
  pods only.
* Live: the real stack (Envoy + filter + llm-sim, and gpu-exporter with its
  fakes scraping the same llm-sim, plus a kube-state-metrics/cAdvisor-shaped
  stub) is scraped by a real Prometheus on loopback with the rules loaded,
  and every dashboard query is evaluated against it: it returns series, with
  the labels its legend names and the workload values of the label
  contract, for "All" and for the concrete model / route class / team /
  namespace / tenant. Kubernetes panels and alerts show workload pods only;
  telemetry alerts are quiet (test_self_monitoring.py makes them fire).
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
    ExpositionStub,
    add_static_cluster,
    fast_rules,
    gateway_config,
    launch_envoy,
    start_prometheus,
    system_tool,
)
from stack import hcm_of, plugin_config, set_plugin_config, start_sim

RULES = OBSERVABILITY / "rules.yaml"
RULES_TEST = OBSERVABILITY / "rules_test.yaml"
DASHBOARDS = OBSERVABILITY / "dashboards"
WORKLOAD = ("route", "model", "route_class", "team")

#: The workload labels as kube-state-metrics exports allowlisted object labels:
#: label_<key with every non-alphanumeric character as _>
#: (--metric-labels-allowlist, docs/operations.md). A pod without them has
#: none of these labels, so they are optional in the checks below.
KSM_WORKLOAD_LABELS = {"label_workload_k8sllm_io_model", "label_workload_k8sllm_io_route_class", "label_workload_k8sllm_io_team"}
_POD = {"namespace", "pod", "uid"}
_DEPLOYMENT = {"namespace", "deployment"}
#: kube-state-metrics and cAdvisor series the rules and dashboards read (not
#: part of tokentap). Names and labels from kube-state-metrics'
#: docs/metrics/workload/{pod,deployment}-metrics.md (c92fe0c) and the
#: kubelet's /metrics/cadvisor; `up` is Prometheus' own.
KUBE = {
    "kube_pod_container_status_restarts_total": _POD | {"container"},
    "kube_pod_container_status_last_terminated_reason": _POD | {"container", "reason"},
    "kube_pod_labels": _POD | KSM_WORKLOAD_LABELS,
    "kube_pod_created": _POD,
    "kube_pod_status_scheduled_time": _POD,
    "kube_deployment_labels": _DEPLOYMENT | KSM_WORKLOAD_LABELS,
    "kube_deployment_spec_replicas": _DEPLOYMENT,
    "kube_deployment_status_replicas_updated": _DEPLOYMENT,
    "kube_deployment_status_replicas_available": _DEPLOYMENT,
    "container_cpu_cfs_periods_total": {"namespace", "pod", "container", "id", "image", "name"},
    "container_cpu_cfs_throttled_periods_total": {"namespace", "pod", "container", "id", "image", "name"},
    "up": set(),
}
#: Labels every scraped series has (the scrape's target labels).
TARGET_LABELS = {"job", "instance"}

# --- catalogues -----------------------------------------------------------------


def gateway_catalogue() -> dict[str, set[str]]:
    """Exposed series name -> label names, from the gateway table of
    docs/metrics.md (which a unit test keeps equal to the filter's catalogue,
    `filters/core/src/metrics/catalogue.rs`)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    table = text[text.index("| name | type | unit | labels | what and when |"):]
    table = table[: table.index("\n\n")]
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, kind, labels = cells[0].strip("`"), cells[1], cells[3]
        ls = set() if labels == "—" else {l.strip().strip("`") for l in labels.split(",")}
        if kind == "histogram":
            out[name + "_bucket"] = ls | {"le"}
            out[name + "_count"] = ls
            out[name + "_sum"] = ls
        else:
            out[name] = ls
    assert len(out) > 20, f"the gateway table of docs/metrics.md was not found: {len(out)} series"
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
    `node` is the PodMonitor's target label), and its own health families
    with the labels docs/gpu-exporter.md lists."""
    text = (REPO / "gpu-exporter" / "exporter" / "src" / "metrics" / "families.rs").read_text()
    out = {}
    for kind, name in re.findall(r"\b(gauge|counter)\(\s*\"(llm_gpu_[a-z0-9_]+)\"", text):
        out[name + ("_total" if kind == "counter" else "")] = GPU_LABELS
    # Families with one label beyond the GPU's ("G + `xid`" in the docs table).
    for row in (DOCS / "gpu-exporter.md").read_text().splitlines():
        m = re.match(r"\|\s*`(llm_gpu_[a-z_]+)`\s*\|[^|]*\|[^|]*\|\s*G \+ `([a-z_]+)`", row)
        if m and m.group(1) in out:
            out[m.group(1)] = GPU_LABELS | {m.group(2)}
    assert "xid" in out["llm_gpu_xid_errors_total"], "docs/gpu-exporter.md: no `G + xid` row"
    out.update(exporter_health_catalogue())
    return out


def exporter_health_catalogue() -> dict[str, set[str]]:
    """`llm_gpu_exporter_*` rows of docs/gpu-exporter.md: label names are the
    backticked words of the labels cell before its first `∈` (what follows
    are values), plus the PodMonitor's `node`."""
    out = {}
    for row in (DOCS / "gpu-exporter.md").read_text().splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`llm_gpu_exporter_"):
            continue
        labels = set(re.findall(r"`([a-z_]+)`", cells[2].split("∈")[0])) | {"node"}
        for name in re.findall(r"`(llm_gpu_exporter_[a-z_]+)`", cells[0]):
            out[name] = labels
    assert "llm_gpu_exporter_nvml_up" in out, "docs/gpu-exporter.md: no exporter health table"
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
    gateway = gateway_catalogue()
    return {**gateway, **runtime_catalogue(), **gpu_catalogue(), **KUBE, **recording_rules()}


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
    return subprocess.run([str(system_tool("promtool")), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules_passes():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


def test_promtool_rule_unit_tests_pass():
    r = promtool("test", "rules", RULES_TEST.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize(
    "what, alert, file, old, new",
    [
        ("a wrong expected value", "LLMSlowFirstToken", "rules_test.yaml", "is 2425 ms, over 2000 ms", "is 2424 ms, over 2000 ms"),
        ("a moved threshold", "LLMSlowFirstToken", "rules.yaml", 'llm:gateway_ttft_ms:p95_5m{route_class="interactive"} > 2000',
         'llm:gateway_ttft_ms:p95_5m{route_class="interactive"} > 3000'),
        ("a lost workload label", "LLMRuntimeKVCacheHigh", "rules.yaml",
         "max by (namespace, pod, runtime, model, route_class, team) (llm_runtime_kv_cache_usage_ratio)",
         "max by (namespace, pod, runtime, model, route_class) (llm_runtime_kv_cache_usage_ratio)"),
        ("a missed traffic floor", "LLMSlowFirstToken", "rules.yaml",
         "rate(llm_gateway_time_to_first_token_milliseconds_count{route_class=\"interactive\"}[5m])) > 0.05",
         "rate(llm_gateway_time_to_first_token_milliseconds_count{route_class=\"interactive\"}[5m])) > 0"),
        # Each rule change of issue 10 reverted: the case that motivated it fails.
        ("the canary's absolute 5-point slack", "LLMCanaryErrorRegression", "rules.yaml", "            + 0.02\n", "            + 0.05\n"),
        ("an instantaneous waiting check", "LLMRuntimeSaturated", "rules.yaml",
         "quantile_over_time(0.5, llm_runtime_requests_waiting[5m])", "llm_runtime_requests_waiting"),
        ("RAG freshness from the per-request age only", "LLMRAGIndexStale", "rules.yaml",
         "time() - max by (route, model, route_class, team, collection) (llm_rag_index_last_update_timestamp_seconds)\n            or ", ""),
        ("pods joined without the workload labels", "LLMWorkloadRestarting", "rules.yaml",
         'kube_pod_labels{label_workload_k8sllm_io_model!=""}', "kube_pod_labels"),
        ("an XID series' first sample missed", "LLMGPUXIDErrors", "rules.yaml",
         "(llm_gpu_xid_errors_total unless llm_gpu_xid_errors_total offset 10m)\n            or ", ""),
    ],
)
def test_promtool_unit_tests_can_fail(tmp_path, what, alert, file, old, new):
    """Negative control: the tests of `alert` pass on a copy, and fail once
    the copy has one change (only that alert's cases run, to keep each
    promtool run short)."""
    texts = {RULES.name: RULES.read_text(), RULES_TEST.name: RULES_TEST.read_text()}
    assert texts[file].count(old) == 1, f"{what}: anchor not found"

    def run(rules: str, tests: str) -> subprocess.CompletedProcess:
        doc = yaml.safe_load(tests)
        doc["tests"] = [c for c in doc["tests"] if any(t["alertname"] == alert for t in c.get("alert_rule_test", []))]
        assert len(doc["tests"]) >= 2, f"{what}: no cases for {alert}"
        (tmp_path / RULES.name).write_text(rules)
        (tmp_path / RULES_TEST.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        return promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)

    r = run(texts[RULES.name], texts[RULES_TEST.name])
    assert r.returncode == 0, f"{what}: the unchanged cases fail\n{r.stdout}"
    texts[file] = texts[file].replace(old, new)
    r = run(texts[RULES.name], texts[RULES_TEST.name])
    assert r.returncode != 0, f"{what}: promtool still passed\n{r.stdout}"
    assert "FAILED" in r.stdout + r.stderr


#: The Pod restarts query before issue 10: `=~".*"` on the KSM label also
#: matches pods without it, so "All" listed every pod of the cluster.
OLD_RESTART_QUERY = ('sum by (namespace, pod) (increase(kube_pod_container_status_restarts_total[30m])) * on (namespace, pod) group_left () '
                     'max by (namespace, pod) (kube_pod_labels{label_workload_k8sllm_io_model=~".*",'
                     'label_workload_k8sllm_io_route_class=~".*",label_workload_k8sllm_io_team=~".*"})')


def test_promtool_checks_the_restart_panel_query_and_would_catch_the_old_one(tmp_path):
    """rules_test.yaml evaluates the Pod restarts query as the dashboard has
    it ("All" everywhere): the vLLM pod only, not coredns. The old query, in
    its place, fails that case."""
    inc = dashboards()["llm-incident"]
    panel = next(p for p in panels(inc) if p["title"] == "Pod restarts")
    expr = panel["targets"][0]["expr"].replace("$__range", "30m")
    for var in VARIABLES:
        expr = expr.replace(f"${var}", ".*")
    doc = yaml.safe_load(RULES_TEST.read_text())
    cases = [c for c in doc["tests"] if any(e["expr"] == expr for e in c.get("promql_expr_test", []))]
    assert len(cases) == 1, "no promql_expr_test of the Pod restarts query as the dashboard has it"
    pods = {s["labels"] for e in cases[0]["promql_expr_test"] for s in e["exp_samples"]}
    assert pods == {'{namespace="llm",pod="vllm-stable-7d9f"}'}, pods
    assert any("coredns" in s["series"] for s in cases[0]["input_series"])
    for e in cases[0]["promql_expr_test"]:
        e["expr"] = OLD_RESTART_QUERY
    doc["tests"] = cases
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / RULES_TEST.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    r = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert r.returncode != 0 and "coredns" in r.stdout + r.stderr, r.stdout


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
    files = set(re.findall(r"\]\(([a-z-]+\.md)(?:#[^)]*)?\)", text))
    assert {"tracing.md", "runtime-metrics.md"} <= files, files
    for path in files:
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


#: Alerts whose signal is the workload labels' absence: one alert per scrape target.
PER_TARGET = {"LLMGatewayMetricsUnlabelled"}


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
        if a["alert"] in PER_TARGET:
            continue
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
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', body))
            assert name in cat, name
            # `node` is a scrape target label (PodMonitor relabeling), not the
            # exporter's; kube-state-metrics leaves out object labels the
            # object does not have.
            assert labels - TARGET_LABELS <= cat[name], (name, labels - TARGET_LABELS - cat[name])
            assert cat[name] - {"node"} - KSM_WORKLOAD_LABELS <= labels, (name, cat[name] - labels)


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
            assert set(matchers) - TARGET_LABELS <= cat[name], f"{where}: {name} has no label(s) {set(matchers) - cat[name]}"
            used |= cat[name]
            checked += 1
        # label_replace(v, "dst", "$1", ...) makes its destination label.
        used |= set(re.findall(r'"(\w+)",\s*"\$\d+"', expr))
        # instance / job are Prometheus' own target labels, on every series.
        missing = grouping_labels(expr) - used - TARGET_LABELS
        assert not missing, f"{where}: grouping by labels no metric has: {missing}"
    assert checked >= 60


def test_metric_reader_finds_names_and_matchers():
    """The PromQL reader the checks above rely on."""
    sels = selectors('sum by (le, route) (rate(a_bucket{model=~"$model",x="1"}[$__rate_interval])) / on (route) group_left () b or c * 0')
    assert sels == [("a_bucket", {"model": ("=~", "$model"), "x": ("=", "1")}), ("b", {}), ("c", {})]
    assert grouping_labels("sum by (le, route) (x) / on (team) y") == {"le", "route", "team"}


# --- dashboards ------------------------------------------------------------------------


#: The incident dashboard's variables: the workload labels, then where the
#: series come from (pod namespace, tenant, upstream backend).
VARIABLES = ("model", "route_class", "team", "route", "namespace", "tenant", "backend")


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
    for var in VARIABLES:
        v = tvars[var]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", var
        assert re.fullmatch(rf"label_values\((llm_gateway_requests_total|llm_runtime_up)(\{{.*\}})?, {var}\)", v["query"]["query"]), v
    # One dashboard, three sources, one set of label values: every selector
    # filters each workload label its metric has by the variable.
    for p in panels(inc):
        for t in p["targets"]:
            for metric, matchers in selectors(t["expr"]):
                has = cat[metric]
                if metric in ("kube_pod_labels", "kube_deployment_labels"):
                    for var in ("model", "route_class", "team"):
                        assert matchers[f"label_workload_k8sllm_io_{var}"] == ("=~", f"${var}"), p["title"]
                    continue
                for var in VARIABLES:
                    if var in has and (var != "route" or metric.startswith("llm_")):
                        assert matchers.get(var) == ("=~", f"${var}"), f"{p['title']}: {metric} not filtered by ${var}"
    sources = {m.split("_")[1] for _, e, _ in panel_exprs() for m, _ in selectors(e) if m.startswith("llm_")}
    assert {"gateway", "rag", "runtime", "gpu"} <= sources


def test_incident_panels_cover_the_assignment_and_name_every_alert():
    inc = panels(dashboards()["llm-incident"])
    exprs = " ".join(t["expr"] for p in inc for t in p["targets"])
    for needle in ("llm_gateway_time_to_first_token_milliseconds_bucket", "llm_gateway_tokens_total", "llm_runtime_queue_time_seconds_bucket",
                   "llm_gpu_memory_used_bytes", "kube_pod_container_status_restarts_total", "by (error_type)", "by (le, backend)",
                   "llm_gpu_utilization_ratio", "llm_gpu_throttle_reason_active", "llm_gpu_xid_errors_total",
                   "container_cpu_cfs_throttled_periods_total", "kube_pod_container_status_last_terminated_reason",
                   "kube_pod_status_scheduled_time", "kube_deployment_status_replicas_updated", "llm_gpu_exporter_nvml_up"):
        assert needle in exprs, needle
    descriptions = " ".join(p["description"] for d in dashboards().values() for p in panels(d))
    for a in alerts():
        assert a["alert"] in descriptions, f"no panel names {a['alert']}"


def test_dashboard_configmaps_list_both_dashboards():
    k = yaml.safe_load((DASHBOARDS / "kustomization.yaml").read_text())
    files = [f for g in k["configMapGenerator"] for f in g["files"]]
    assert sorted(files) == ["gateway-health.json", "llm-incident.json"], files
    assert sorted(files) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert k["generatorOptions"]["labels"]["grafana_dashboard"] == "1"


# --- live: every panel query against a real Prometheus scraping the real stack ---------


GPU0 = "GPU-7c1e0d2a-1b2d-4e3f-8a4b-5c6d7e8f0001"
GPU1 = "GPU-7c1e0d2a-1b2d-4e3f-8a4b-5c6d7e8f0002"
GIB = 1 << 30
CHAT = "/v1/chat/completions"
PLATFORM = {"model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}
#: Panel queries that return nothing on a healthy stack, with where they are
#: shown returning data.
QUIET_WHEN_HEALTHY = {
    "LLM request series per proxy, and those missing a label [B]":
        "no series lacks a label here; test_self_monitoring.py renames a stats tag and evaluates it",
}
#: The pods of the Kubernetes stub: the two runtimes gpu-exporter scrapes, a
#: third replica no node fits, and coredns (no workload labels) twice.
WORKLOAD_PODS = {"vllm-stable-0", "vllm-canary-0", "vllm-canary-1"}


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
        # GPU 0 power-capped (NVML clocks-event reason 0x4, sw_power_cap);
        # GPU 1 reports XID 13 (graphics engine exception) once the exporter
        # listens for events.
        scenario.write({"driver_version": "550.54.15", "cuda_driver_version": 12040, "gpus": [
            {"uuid": GPU0, "minor_number": 0, "memory_total_bytes": 80 * GIB, "memory_used_bytes": 72 * GIB,
             "utilization_gpu_percent": 87, "throttle_reasons": 4},
            {"uuid": GPU1, "minor_number": 1, "memory_total_bytes": 80 * GIB, "memory_used_bytes": 70 * GIB,
             "utilization_gpu_percent": 35, "xid_events": [{"xid": 13, "after_s": 2.0}]},
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
        kube = ExpositionStub(kube_series(time.time()))
        procs.append(kube)
        # Job names as the shipped monitors give them (the telemetry alerts
        # select on them); the rules loaded, on a 1 s time scale.
        prom = start_prometheus(logdir, {
            "llm-gateway-envoy": (f"127.0.0.1:{envoy.admin_port}", "/stats/prometheus"),
            "gpu-exporter": (f"127.0.0.1:{exporter.port}", "/metrics"),
            "kube-state-metrics": (kube.address, "/metrics"),
            "kubelet-cadvisor": (kube.address, "/metrics/cadvisor"),
        }, rule_files=[fast_rules(logdir)])
        procs.append(prom)
        yield envoy, stable, prom
    finally:
        for p in reversed(procs):
            p.stop()
        collector.__exit__(None, None, None)
        raw.__exit__(None, None, None)


def kube_series(start: float):
    """kube-state-metrics (/metrics) and cAdvisor (/metrics/cadvisor) text as
    those exporters write it, for the stack's pods: vllm-stable-0 restarts
    every second after an OOM kill and is throttled in 40% of its CFS
    periods; vllm-canary-1 waits 15 minutes for a node; the vllm-canary
    Deployment has 1 of 2 replicas updated. coredns restarts and is
    throttled more, and a coredns pod is pending too: they have no workload
    labels and must appear in no panel or alert."""
    wl = ('label_workload_k8sllm_io_model="mistral-7b",label_workload_k8sllm_io_route_class="interactive",'
          'label_workload_k8sllm_io_team="platform-ai"')
    pods = [("llm", "vllm-stable-0", "vllm", wl), ("llm", "vllm-canary-0", "vllm", wl), ("llm", "vllm-canary-1", "vllm", wl),
            ("kube-system", "coredns-5d78c9869d-x2k4p", "coredns", ""), ("kube-system", "coredns-5d78c9869d-q8w7e", "coredns", "")]
    unscheduled = {"vllm-canary-1", "coredns-5d78c9869d-q8w7e"}

    def render(path: str) -> str:
        now = time.time()
        up = now - start
        lines = []
        for i, (ns, pod, container, labels) in enumerate(pods):
            ids = f'namespace="{ns}",pod="{pod}",uid="00000000-0000-4000-8000-00000000000{i}"'
            created = now - 900 if pod in unscheduled else start - 3600
            if path == "/metrics/cadvisor":
                if pod in unscheduled:
                    continue
                c = f'namespace="{ns}",pod="{pod}",container="{container}",id="/kubepods/pod{i}/c{i}",image="{container}:v1",name="c{i}"'
                share = {"vllm-stable-0": 0.4, "vllm-canary-0": 0.0}.get(pod, 0.9)
                lines += [f"container_cpu_cfs_periods_total{{{c}}} {int(100 * up)}",
                          f"container_cpu_cfs_throttled_periods_total{{{c}}} {int(100 * up * share)}"]
                continue
            lines.append(f"kube_pod_labels{{{ids}{',' + labels if labels else ''}}} 1")
            lines.append(f"kube_pod_created{{{ids}}} {created:.0f}")
            if pod not in unscheduled:
                lines.append(f"kube_pod_status_scheduled_time{{{ids}}} {created + 8:.0f}")
                restarts = 0 if pod == "vllm-canary-0" else int(up * (1 if pod == "vllm-stable-0" else 2))
                lines.append(f'kube_pod_container_status_restarts_total{{{ids},container="{container}"}} {restarts}')
                if restarts:
                    lines.append(f'kube_pod_container_status_last_terminated_reason{{{ids},container="{container}",reason="OOMKilled"}} 1')
        if path == "/metrics":
            for ns, dep, labels, (spec, updated, available) in (
                    ("llm", "vllm-stable", wl, (1, 1, 1)), ("llm", "vllm-canary", wl, (2, 1, 1)),
                    ("monitoring", "grafana", "", (1, 0, 0))):
                d = f'namespace="{ns}",deployment="{dep}"'
                lines += [f"kube_deployment_labels{{{d}{',' + labels if labels else ''}}} 1",
                          f"kube_deployment_spec_replicas{{{d}}} {spec}",
                          f"kube_deployment_status_replicas_updated{{{d}}} {updated}",
                          f"kube_deployment_status_replicas_available{{{d}}} {available}"]
        return "\n".join(lines) + "\n"

    return render


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
    # Longest names first: $route_class before $route.
    for var in sorted(values, key=len, reverse=True):
        out = out.replace(f"${var}", values[var])
    assert "$" not in out, out
    return out


def test_every_dashboard_query_returns_labelled_data_from_the_real_stack(live_stack):
    envoy, sim, prom = live_stack
    _incident_traffic(envoy, sim)
    # Histograms appear after Envoy's stats flush (1 s), then a scrape (1 s).
    wait_until(lambda: prom.query('sum(llm_gateway_time_to_first_token_milliseconds_count) > 0')
               and prom.query("sum(llm_gateway_spans_dropped_total) > 0")
               # Rates need two scrapes of a series: exports are counted when
               # the collector answers, after the first batch flush.
               and prom.query("sum(rate(llm_gateway_spans_exported_total[2m])) > 0")
               and prom.query("sum(rate(llm_gateway_span_exports_total[2m])) > 0")
               and prom.query("sum(llm_runtime_requests_total) > 0")
               and prom.query("sum(llm_gpu_xid_errors_total) > 0")
               and prom.query("llm:kube_pod_workload:info"), timeout=20, interval=0.5, what="samples in Prometheus")
    time.sleep(2)
    all_values = {var: ".*" for var in VARIABLES}
    # A multi-select of two routes, as Grafana renders it into the regex.
    concrete = {**PLATFORM, "route": "chat|rag-chat", "namespace": "llm", "tenant": "acme",
                "backend": "llm_stable|llm_canary|rag_api|raw_upstream"}
    empty, checked = [], 0
    for where, expr, target in panel_exprs():
        short = where.split(": ", 1)[1]
        for values in (all_values, concrete):
            result = prom.query(_substitute(expr, values))
            if short in QUIET_WHEN_HEALTHY:
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
    assert checked >= 70
    _kubernetes_panels_show_only_workload_pods(prom, all_values)
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


def _kubernetes_panels_show_only_workload_pods(prom, values) -> None:
    """With "All" selected, the Kubernetes panels list workload pods only
    (the restart panel once listed every pod of the cluster)."""
    seen = set()
    for where, expr, _ in panel_exprs():
        if "kube_" not in expr and "container_cpu" not in expr:
            continue
        for series in prom.query(_substitute(expr, values)):
            labels = series["metric"]
            assert labels.get("namespace") == "llm", (where, labels)
            if "pod" in labels:
                assert labels["pod"] in WORKLOAD_PODS, (where, labels)
                seen.add((where.split(": ", 1)[1], labels["pod"]))
    assert ("Pod restarts [A]", "vllm-stable-0") in seen, seen
    assert ("Scheduling delay per pod [A]", "vllm-canary-1") in seen, seen


#: Alerts whose whole expression is true on this stack: the Kubernetes stub's
#: faults and the fake GPU's XID.
FIRES_ON_THE_STACK = {"LLMWorkloadRestarting", "LLMWorkloadOOMKilled", "LLMWorkloadCPUThrottled", "LLMWorkloadUnschedulable",
                      "LLMWorkloadRolloutStuck", "LLMGPUXIDErrors"}
#: Telemetry alerts: quiet on this healthy stack (test_self_monitoring.py
#: breaks the telemetry and shows them firing).
QUIET_ON_THE_STACK = {"LLMGPUExporterDown", "LLMGPUExporterNVMLDown", "LLMGPULost", "LLMGPUUncorrectedECCErrors",
                      "LLMRuntimeTargetDown", "LLMGatewayMetricsAbsent", "LLMGatewayMetricsUnlabelled"}


def _alert_signals_on_the_real_stack(prom) -> None:
    """The rule expressions are valid against real series and select the
    labelled series they aggregate (thresholds are promtool's business): each
    symptom alert's signal, its comparison removed, returns data where the
    stack produces that signal, with the label contract's values. The
    Kubernetes alerts' whole expressions return the stub's faulty workload
    pods only; the telemetry alerts' return nothing."""
    produced = {"LLMSlowFirstToken", "LLMRuntimeSaturated", "LLMRuntimeKVCacheHigh", "LLMGPUMemoryPressure", "LLMRAGIndexStale",
                "LLMRAGRetrievalFailing", "LLMCanaryErrorRegression", "LLMCanaryTTFTRegression", "LLMGatewayLabelOverflow", "LLMGatewaySeriesOverflow",
                "LLMGatewaySpansDropped", "LLMGatewayParseErrors", "LLMTTFTErrorBudgetFastBurn", "LLMTTFTErrorBudgetSlowBurn"}
    assert {a["alert"] for a in alerts()} == produced | FIRES_ON_THE_STACK | QUIET_ON_THE_STACK
    recorded = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    for a in alerts():
        if a["alert"] in QUIET_ON_THE_STACK:
            assert prom.query(a["expr"]) == [], f"{a['alert']} is true on a healthy stack"
            continue
        if a["alert"] in FIRES_ON_THE_STACK:
            result = prom.query(a["expr"])
            assert result, f"{a['alert']}: not true on the stack"
            for series in result:
                labels = series["metric"]
                assert labels["namespace"] == "llm" and labels.get("pod", "vllm-stable-0") in WORKLOAD_PODS, (a["alert"], labels)
                assert {k: labels[k] for k in PLATFORM} == PLATFORM, (a["alert"], labels)
            continue
        expr = a["expr"]
        # Inline the recording rules (with their windows shortened below).
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
