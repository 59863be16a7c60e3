"""The incident workflow on a laptop: `cargo xtask up` with Prometheus and the
shipped rules, and `cargo xtask drill` (demo/stack.py, demo/drill.py,
demo/report.py, tests/e2e/observability_stack.py).

The stack runs as a user runs it (`demo/stack.py up`), on free ports so the
suite can run beside others, and the drills run as `demo/drill.py all`
against it. Checked here:

* without `prometheus` on PATH, `up` says so in one line and the rest of the
  stack works (the drill then says in one line that it needs Prometheus);
* Prometheus loads `k8s/observability/rules.yaml` itself, unchanged: the
  rule groups it reports are the shipped ones (those of rules.yaml and of the
  PrometheusRule `kubectl kustomize k8s/observability` renders), expression
  by expression; it scrapes the shipped plain-Prometheus jobs, whose
  relabeling selects and labels the stack's pods;
* `up` prints one graph link per incident-dashboard panel, and each link
  holds that panel's queries (compared here with the dashboard the
  package's ConfigMap holds) and evaluates on the live Prometheus;
* `drill all` fires and clears each drill's alerts (the ones
  test_drills.py's docstring names), while Prometheus runs the shipped
  rules with every duration divided by the drill's time scale (compared
  with the shipped groups while it runs), and loads the shipped rules back
  afterwards;
* every number in the drill report (before / during / after, the chart
  points, the alert transitions) is what a direct Prometheus query with the
  dashboard's expression returns, and the signals moved as the drill says;
* the HTML report renders in headless Chromium: the DOM has one chart per
  signal, and the screenshot is mostly drawn, with chart colours in it.

Time scale: the drills run at 60 (the user default is 30): `for: 10m` holds
10 s and a 5-minute window spans 5 s, scraping and evaluating every second,
so the four drills take about two and a half minutes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import threading
import urllib.parse
import zlib
from pathlib import Path

import pytest
import yaml

from harness import REPO, Proc, get, post_json, wait_until
from k8s_packages import find, render
from observability_stack import RULES, SCRAPE_CONFIG, LocalPrometheus, duration, scale_expr, seconds, time_scaled_rules
from ops_stack import system_tool

STACK = REPO / "demo" / "stack.py"
DRILL = REPO / "demo" / "drill.py"
INCIDENT = REPO / "k8s" / "observability" / "dashboards" / "llm-incident.json"
SCALE = 60
#: The alerts each drill is about, as test_drills.py's docstring names them.
EXPECTED = {
    "burst": {"LLMSlowFirstToken", "LLMRuntimeSaturated"},
    "long-prompts": {"LLMSlowFirstToken"},
    "runtime-restart": {"LLMCanaryErrorRegression"},
    "vector-store-outage": {"LLMRAGRetrievalFailing"},
}


def start_up(run_dir: Path, env: dict | None = None) -> tuple[Proc, dict]:
    proc = Proc("stack-up", [sys.executable, STACK, "up", "--free-ports", "--run-dir", run_dir], run_dir / "up.out",
                env={"PYTHONUNBUFFERED": "1", **(env or {})}).start()

    def ready():
        if not proc.alive():
            raise RuntimeError(f"demo/stack.py up exited:\n{proc.logs()}")
        state = run_dir / "stack.json"
        return json.loads(state.read_text()) if state.exists() and "Ctrl-C" in proc.logs() else None

    try:
        return proc, wait_until(ready, timeout=180, interval=0.5, what="demo/stack.py up")
    except BaseException:
        proc.stop(timeout=60)
        raise


def canonical(expr: str) -> str:
    """PromQL as Prometheus prints a parsed rule, compared loosely enough to
    ignore its formatting: no whitespace, `group_left` with its empty label
    list, label matchers sorted."""
    s = re.sub(r"\s+", "", expr)
    s = re.sub(r"group_(left|right)(?!\()", r"group_\1()", s)
    return re.sub(r"\{([^{}]*)\}", lambda m: "{" + ",".join(sorted(m.group(1).split(","))) + "}", s)


def assert_groups_equal(loaded: list[dict], shipped: dict, scale: float) -> None:
    """Prometheus' /api/v1/rules groups against a rule file's groups (the
    shipped one, or its copy at time scale `scale`)."""
    by_name = {g["name"]: g for g in loaded}
    assert set(by_name) == {g["name"] for g in shipped["groups"]}
    for group in shipped["groups"]:
        got = by_name[group["name"]]
        # Groups without an interval run at the global one: 15 s, scaled, no faster than 1 s.
        assert got["interval"] == seconds(group.get("interval", duration(max(15 / scale, 1)))), group["name"]
        assert [r["name"] for r in got["rules"]] == [r.get("alert") or r["record"] for r in group["rules"]], group["name"]
        for want, have in zip(group["rules"], got["rules"]):
            name = have["name"]
            assert canonical(have["query"]) == canonical(want["expr"]), f"{name}:\n{have['query']}\n{want['expr']}"
            assert have.get("labels", {}) == want.get("labels", {}), name
            if "alert" in want:
                assert have["duration"] == seconds(want["for"]), name
                assert have["annotations"] == want["annotations"], name
            # The scaled copy differs from the shipped rule by its durations only.
            original = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                            if (r.get("alert") or r.get("record")) == name)
            assert canonical(scale_expr(original["expr"], scale)) == canonical(have["query"]), name
            if "for" in original:
                assert math.isclose(have["duration"] * scale, seconds(original["for"])), name


# --- without Prometheus ---------------------------------------------------------------------


def test_up_without_prometheus_says_so_in_one_line_and_starts_the_rest(tmp_path, wasm_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc, stack = start_up(tmp_path, env={"PATH": str(empty)})
    try:
        output = proc.logs(tail=1000).splitlines()
        # (The test's own directory name has the word in it.)
        notices = [l for l in output if "prometheus" in l.replace(str(tmp_path), "").replace("/stats/prometheus", "").lower()]
        assert len(notices) == 1 and "not on PATH" in notices[0] and "`prometheus`" in notices[0], notices
        assert stack["prometheus"] is None
        assert not any("/graph?" in l or "/alerts" in l for l in output)
        body = {"model": "mistral-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert post_json(stack["envoy"] + "/v1/chat/completions", body, headers={"x-tenant-id": "acme"}).status == 200
        assert "llm_runtime_up" in get(stack["exporter"] + "/metrics").body.decode()
        drill = subprocess.run([sys.executable, DRILL, "burst", "--run-dir", tmp_path], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "PATH": str(empty)})
        assert drill.returncode == 2, drill.stdout + drill.stderr
        assert drill.stdout.strip().count("\n") == 0 and "Prometheus" in drill.stdout, drill.stdout
    finally:
        proc.stop(timeout=60)


# --- with Prometheus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory, wasm_path):
    system_tool("prometheus")
    run_dir = tmp_path_factory.mktemp("up")
    proc, stack = start_up(run_dir)
    try:
        yield proc, stack, run_dir
    finally:
        proc.stop(timeout=60)


def prometheus(stack: dict) -> LocalPrometheus:
    return LocalPrometheus(None, stack["prometheus"], Path(stack["prometheus_config"]))


def test_up_prometheus_runs_the_shipped_rules_and_scrape_jobs(up_stack):
    _, stack, run_dir = up_stack
    prom = prometheus(stack)
    config = yaml.safe_load(prom.api("status/config")["yaml"])
    assert config["rule_files"] == [str(RULES)]
    groups = prom.rule_groups()
    assert {g["file"] for g in groups} == {str(RULES)}
    assert_groups_equal(groups, yaml.safe_load(RULES.read_text()), 1)
    # ... which are the groups `kubectl apply -k k8s/observability` installs.
    packaged = find(render("observability"), "PrometheusRule")
    assert_groups_equal(groups, {"groups": packaged["spec"]["groups"]}, 1)

    # The shipped jobs, only their pod discovery swapped for the file the stack writes.
    shipped = {j["job_name"]: j for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    written = {j["job_name"]: j for j in yaml.safe_load(Path(stack["prometheus_config"]).read_text())["scrape_configs"]}
    assert {j["job_name"] for j in config["scrape_configs"]} == set(shipped) == set(written)
    for name, job in shipped.items():
        job = dict(job)
        job.pop("kubernetes_sd_configs")
        got = dict(written[name])
        assert len(got.pop("file_sd_configs")) == 1
        assert got == job, name
    # What their relabeling made of the stack's pods.
    wait_until(lambda: len([t for t in prom.targets() if t["health"] == "up"]) == 5, timeout=60, interval=1, what="five targets up")
    targets = {(t["labels"]["job"], t["labels"].get("pod", "")): t["labels"] for t in prom.targets()}
    assert set(targets) == {("llm-gateway-istio", "llm-ingressgateway-0"), ("gpu-exporter", ""),
                            ("llm-runtimes", "vllm-stable-0"), ("llm-runtimes", "vllm-canary-0"), ("llm-runtimes", "rag-api-0")}
    assert targets[("llm-gateway-istio", "llm-ingressgateway-0")]["namespace"] == "istio-ingress"
    assert {k: targets[("llm-runtimes", "vllm-stable-0")][k] for k in ("model", "route_class", "team")} == {
        "model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}


def printed_links(output: str) -> list[tuple[str, str]]:
    lines = output[output.index("one Prometheus graph per panel"):].splitlines()[1:]
    links = []
    for title, url in zip(lines[::2], lines[1::2]):
        if not url.startswith("    http"):
            break
        links.append((re.sub(r"\s+\(kube-state-metrics.*\)$", "", title.strip()), url.strip()))
    return links


def test_up_prints_one_graph_link_per_incident_panel_with_its_queries(up_stack):
    proc, stack, _ = up_stack
    output = proc.logs(tail=1000)
    assert f"{stack['prometheus']}/alerts" in output
    # The dashboard as `kubectl apply -k k8s/observability` installs it.
    configmap = find(render("observability"), "ConfigMap", "tokentap-dashboard-llm-incident")
    dashboard = json.loads(configmap["data"]["llm-incident.json"])
    variables = [v["name"] for v in dashboard["templating"]["list"] if v["type"] != "datasource"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    links = printed_links(output)
    assert [title for title, _ in links] == [p["title"] for p in panels]
    prom = prometheus(stack)
    for (title, url), panel in zip(links, panels):
        parsed = urllib.parse.urlsplit(url)
        assert f"{parsed.scheme}://{parsed.netloc}" == stack["prometheus"] and parsed.path == "/graph"
        params = urllib.parse.parse_qs(parsed.query)
        exprs = [params[f"g{i}.expr"][0] for i in range(len(panel["targets"]))]
        assert f"g{len(panel['targets'])}.expr" not in params, title
        for expr, target in zip(exprs, panel["targets"]):
            # Grafana's $__rate_interval at a 15 s scrape (4 scrapes), the
            # dashboard's time range for $__range, every variable at "All".
            want = target["expr"].replace("$__rate_interval", "1m").replace("$__range", dashboard["time"]["from"].removeprefix("now-"))
            for var in sorted(variables, key=len, reverse=True):
                want = want.replace(f"${var}", ".*")
            assert expr == want, title
            prom.query(expr)  # valid PromQL on the live Prometheus
        assert params["g0.range_input"] == ["1h"]


# --- the drills ---------------------------------------------------------------------------------


def panel_expr(title: str, ref: str, rate_interval: str, range_: str) -> str:
    dashboard = json.loads(INCIDENT.read_text())
    panel = next(p for p in dashboard["panels"] if p.get("title") == title)
    expr = next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    for var in sorted((v["name"] for v in dashboard["templating"]["list"]), key=len, reverse=True):
        expr = expr.replace(f"${var}", ".*")
    return expr


def value(v: str) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def series_of(result: list[dict]) -> dict[str, list]:
    return {json.dumps(s["metric"], sort_keys=True): s for s in result}


def check_numbers(prom: LocalPrometheus, r: dict) -> None:
    """Every number of a drill report against direct Prometheus queries."""
    t, step = r["times"], r["step"]
    for sig in r["signals"]:
        for ref in sig["exprs"]:
            expr = panel_expr(sig["panel"], ref, r["rate_interval"], r["range"])
            assert sig["exprs"][ref] == expr, sig["name"]
            mine = {json.dumps(s["labels"], sort_keys=True): s for s in sig["series"] if s["ref"] == ref}
            ranged = series_of(prom.query_range(expr, t["start"], t["end"], step))
            assert set(ranged) == set(mine), sig["name"]
            before = series_of(prom.query(expr, t["fault_start"]))
            after = series_of(prom.query(expr, t["end"]))
            for key, s in mine.items():
                points = [[float(w), value(v)] for w, v in ranged[key]["values"]]
                assert s["points"] == points, (sig["name"], key)
                assert s["before"] == (value(before[key]["value"][1]) if key in before else None), (sig["name"], key)
                assert s["after"] == (value(after[key]["value"][1]) if key in after else None), (sig["name"], key)
                during = [v for w, v in points if t["fault_start"] <= w <= t["fault_end"] and v is not None]
                base = s["before"] or 0.0
                assert s["during"] == (max(during, key=lambda v: abs(v - base)) if during else None), (sig["name"], key)


def check_alerts(prom: LocalPrometheus, r: dict) -> None:
    t, step = r["times"], r["step"]
    alerts = {a["alert"]: a for a in r["alerts"]}
    assert EXPECTED[r["drill"]] <= {a["alert"] for a in r["alerts"] if a["expected"]}
    for name in EXPECTED[r["drill"]]:
        a = alerts[name]
        assert a["pending"] is not None and a["firing"] is not None and a["cleared"] is not None, a
        assert t["start"] <= a["pending"] <= a["firing"] < a["cleared"] <= t["end"], (a, t)
        assert t["fault_start"] - step <= a["firing"] <= t["fault_end"] + step, (a, t)
        assert a["cleared"] > t["fault_end"], (a, t)

        def firing(at: float) -> bool:
            return bool(prom.query(f'ALERTS{{alertname="{name}",alertstate="firing"}}', at))

        assert firing(a["firing"]) and not firing(a["firing"] - step), a
        assert prom.query(f'ALERTS{{alertname="{name}"}}', a["cleared"] - step) and not prom.query(f'ALERTS{{alertname="{name}"}}', a["cleared"]), a
        assert prom.query(f'ALERTS{{alertname="{name}"}}', a["pending"]), a


def by_legend(r: dict, signal: str) -> dict[str, dict]:
    sig = next(s for s in r["signals"] if s["name"] == signal)
    return {s["legend"]: s for s in sig["series"]}


def check_signals_moved(r: dict) -> None:
    """The drill did what it says (values checked against Prometheus above)."""
    drill = r["drill"]
    ttft = by_legend(r, "TTFT p95 by route")["chat p95"]
    gpu = by_legend(r, "GPU memory")
    assert set(gpu) == {"vllm-stable-0 GPU 0", "vllm-canary-0 GPU 1"}
    assert 0.5 < gpu["vllm-stable-0 GPU 0"]["before"] < 1
    assert by_legend(r, "tokens/s by model")["mistral-7b gateway"]["before"] > 10
    if drill in ("burst", "long-prompts"):
        assert ttft["before"] < 1000 and ttft["during"] > 2000 and ttft["after"] < 1000, ttft
    if drill == "burst":
        assert by_legend(r, "queue wait p95")["mistral-7b vllm p95"]["during"] > 1
        assert by_legend(r, "requests waiting")["vllm-stable-0 waiting"]["during"] >= 10
    if drill == "long-prompts":
        prompt = by_legend(r, "prompt tokens p95")["chat p95"]
        assert prompt["before"] < 100 and prompt["during"] > 4096, prompt
    if drill == "runtime-restart":
        restarts = by_legend(r, "pod restarts")["llm/vllm-canary-0 runtime"]
        assert restarts["before"] == 0 and restarts["during"] >= 1, restarts
        assert by_legend(r, "errors/s by type")["upstream_reset"]["during"] > 0
        client = "\n".join(r["client"])
        assert re.search(r"\b[1-9]\d* × 503\b", client) and re.search(r"\b[1-9]\d* cut mid-stream", client), client
    if drill == "vector-store-outage":
        rag = by_legend(r, "RAG errors by reason")["policies vector_store_unreachable"]
        assert rag["during"] > 0 and rag["after"] == 0, rag
        client = "\n".join(r["client"])
        assert "HTTP 503, content-type application/json, x-rag-error: vector_store_unreachable" in client, client
        assert '"type":"vector_store_unreachable"' in client
        assert re.search(r"chat requests \(no RAG\) meanwhile: [1-9]\d* × 200$", client, re.MULTILINE), client


@pytest.fixture(scope="module")
def drill_all(up_stack):
    """`demo/drill.py all` against the stack: (exit status, output, reports,
    HTML report, the rule groups Prometheus had loaded while it ran)."""
    _, stack, run_dir = up_stack
    prom = prometheus(stack)
    html = run_dir / "drills" / "all.html"
    log = run_dir / "drill.out"
    scaled: list[list[dict]] = []
    done = threading.Event()

    def watch_rules():
        while not done.wait(0.5) and not scaled:
            try:
                groups = prom.rule_groups()
            except Exception:  # noqa: BLE001 - during a reload
                continue
            if groups and all(g["file"] != str(RULES) for g in groups):
                scaled.append(groups)

    watcher = threading.Thread(target=watch_rules, daemon=True)
    watcher.start()
    with open(log, "w") as out:
        drill = subprocess.run([sys.executable, DRILL, "all", "--run-dir", run_dir, "--time-scale", str(SCALE), "--report", html],
                               stdout=out, stderr=subprocess.STDOUT, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    done.set()
    watcher.join()
    json_path = html.with_suffix(".json")
    reports = json.loads(json_path.read_text()) if json_path.exists() else []
    return drill.returncode, log.read_text(), reports, html, scaled


def test_drill_all_fires_and_clears_each_alert_and_reports_what_prometheus_has(up_stack, drill_all):
    _, stack, _ = up_stack
    prom = prometheus(stack)
    returncode, output, reports, _, scaled = drill_all
    assert returncode == 0, output[-6000:]
    # Progress while it ran, then a report per drill and the summary.
    assert len(re.findall(r"^  fault +\+\d+s ", output, re.MULTILINE)) >= 4, output[-3000:]
    assert len(re.findall(r"^  recovery +\+\d+s ", output, re.MULTILINE)) >= 4
    for name in EXPECTED:
        assert f"== {name}: " in output
    assert re.search(r"^vector-store-outage +LLMRAGRetrievalFailing ✓ +\d+s +yes$", output, re.MULTILINE), output[-2000:]

    # While it ran: the shipped groups with every duration divided by the scale.
    assert scaled, "Prometheus never loaded the time-scaled rules"
    assert_groups_equal(scaled[0], time_scaled_rules(SCALE), SCALE)
    for g in scaled[0]:
        if g["name"] == "tokentap-recording":
            assert g["interval"] == 1  # 30s / 60, no faster than 1 s
    # Afterwards: the shipped rules again.
    assert {g["file"] for g in prom.rule_groups()} == {str(RULES)}

    assert [r["drill"] for r in reports] == list(EXPECTED)
    for r in reports:
        assert r["time_scale"] == SCALE and r["rate_interval"] == "4s" and r["range"] == duration(300 / SCALE)
        assert not r["problems"], r["problems"]
        check_alerts(prom, r)
        check_numbers(prom, r)
        check_signals_moved(r)


def test_drill_report_renders_in_headless_chromium(drill_all):
    _, _, reports, html, _ = drill_all
    assert reports, "no report written"
    check_html(html, sum(len(r["signals"]) for r in reports))


# --- the HTML report in a real browser ---------------------------------------------------------------


def png_rows(path: Path) -> tuple[int, int, int, list[bytearray]]:
    """Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium
    writes) into (width, height, bytes per pixel, rows)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1:(row + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    return width, height, bpp, rows


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = system_tool("chromium")
    return subprocess.run([str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def check_html(html: Path, charts: int) -> None:
    profile = html.parent / "chromium-profile"
    dom = chromium("--dump-dom", html.as_uri(), profile=profile)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="chart"') == charts, "one SVG chart per signal"
    assert dom.stdout.count("<polyline") >= charts
    png = html.with_suffix(".png")
    shot = chromium(f"--screenshot={png}", "--window-size=1280,2400", html.as_uri(), profile=profile)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    width, height, bpp, rows = png_rows(png)
    assert (width, height) == (1280, 2400)
    drawn = coloured = fault = 0
    for row in rows:
        for r, g, b in zip(row[0::bpp], row[1::bpp], row[2::bpp]):
            lo, hi = min(r, g, b), max(r, g, b)
            drawn += lo < 235
            coloured += hi - lo > 80
            fault += abs(r - 0xFD) <= 2 and abs(g - 0xE0) <= 2 and abs(b - 0xDC) <= 2
    # The summary, the first drill's text and its seven charts fill this part
    # of the page (about 12% of its pixels drawn, 17 000 in the series' and
    # the alert marks' colours, 190 000 in the fault's shade, when written).
    assert drawn > 0.05 * width * height, f"{drawn} of {width * height} pixels drawn"
    assert coloured > 8000, f"{coloured} pixels in the series' colours: no lines drawn?"
    assert fault > 50_000, f"{fault} pixels in the fault's shade: no charts drawn?"
