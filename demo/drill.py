#!/usr/bin/env python3
"""Failure drills against the local stack, for `cargo xtask drill`.

    cargo xtask drill burst | long-prompts | runtime-restart | vector-store-outage | all

Uses the stack `cargo xtask up` runs (found through .tokentap/run/stack.json),
or starts one for the drill and stops it afterwards. Each drill keeps a light
background load on the chat and RAG routes, then:

  1. baseline: one alert window of normal traffic;
  2. fault, until the alerts the drill is about fire in Prometheus (progress
     printed every few seconds):
       burst                24 concurrent streams on the stable runtime (batch 4):
                            LLMRuntimeSaturated, LLMSlowFirstToken
       long-prompts         prompts of ~6000 tokens (0.5 ms of prefill each):
                            LLMSlowFirstToken
       runtime-restart      canary traffic while the canary runtime restarts every
                            5 s: LLMCanaryErrorRegression
       vector-store-outage  the RAG API's vector store unreachable:
                            LLMRAGRetrievalFailing
  3. recovery: the fault removed, until those alerts clear.

It ends with a short report: the incident dashboard's checklist signals
(TTFT p95 by route, tokens/s by model, queue wait, GPU memory, pod restarts,
plus the drill's own) before, during and after, read from Prometheus with the
dashboard's queries; which alerts went pending, firing and cleared, and when;
the time to recover; what the clients received. It also writes the report as
JSON and as a self-contained HTML page with a chart per signal (demo/report.py).

Time scale. The shipped alerts hold for 5 to 10 minutes over 5- to
10-minute windows, so a drill at their pace takes 15 to 30 minutes
(`--realistic`). By default Prometheus evaluates the same rules 30 times
faster while the drill runs (every duration divided by 30: `for: 10m` holds
20 s, a 5-minute window spans 10 s; tests/e2e/observability_stack.py), then
gets the shipped rules back. `drill all` then takes about four minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "demo"))

import report  # noqa: E402
from harness import get, post_json, stream_timed, wait_until  # noqa: E402
from observability_stack import (  # noqa: E402
    RULES,
    LocalPrometheus,
    TimeScale,
    finite,
    incident_panels,
    panel_expr,
    prometheus_config,
    seconds,
)

CHAT = "/v1/chat/completions"
RAG_CHAT = "/rag/v1/chat/completions"
TENANT = {"x-tenant-id": "drill"}
DEFAULT_SCALE = 30.0
DRILLS = ("burst", "long-prompts", "runtime-restart", "vector-store-outage")

#: The incident dashboard's checklist: (name in the report, panel title, targets).
CHECKLIST = [
    ("TTFT p95 by route", "Time to first token by route (p50, p95)", ("A",)),
    ("tokens/s by model", "Output tokens per second by model", ("A", "B")),
    ("queue wait p95", "Runtime queue wait p95", ("A",)),
    ("GPU memory", "GPU memory allocated per GPU", ("A",)),
    ("pod restarts", "Pod restarts", ("A", "B")),
]


def out(line: str = "") -> None:
    print(line, flush=True)


# --- traffic ---------------------------------------------------------------------------


@dataclass
class Outcome:
    t: float
    status: int
    complete: bool  # a stream that ended with [DONE], or a whole JSON answer
    headers: dict
    body: bytes
    elapsed: float


class Load:
    """Closed-loop clients: each worker sends a request, waits `pause`
    seconds, and repeats until stopped. Every answer is kept."""

    def __init__(self, name: str, send: Callable[[int], Outcome], workers: int, pause: float) -> None:
        self.name, self.send, self.workers, self.pause = name, send, workers, pause
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._n = 0
        self._lock = threading.Lock()

    def _next(self) -> int:
        with self._lock:
            self._n += 1
            return self._n

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.time()
            try:
                o = self.send(self._next())
            except Exception as exc:  # noqa: BLE001 - a failed request is an outcome too
                o = Outcome(start, 0, False, {}, repr(exc).encode(), time.time() - start)
            self.outcomes.append(o)
            self._stop.wait(self.pause)

    def start(self) -> "Load":
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"{self.name}-{i}") for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            for t in self._threads:
                t.join(timeout=120)

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if start <= o.t < end]


def stream(url: str, content: str, max_tokens: int, headers: dict) -> Outcome:
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.time()
    status, hdrs, raw, _ = stream_timed(url, body, headers=headers, timeout=120)
    done = status == 200 and b"data: [DONE]" in raw
    return Outcome(start, status, done or status != 200, hdrs, raw, time.time() - start)


def chat_json(url: str, content: str, max_tokens: int, headers: dict) -> Outcome:
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    start = time.time()
    r = post_json(url, body, headers=headers, timeout=60)
    return Outcome(start, r.status, True, r.headers, r.body, time.time() - start)


def statuses(outcomes: list[Outcome]) -> str:
    counts: dict[int, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return ", ".join(f"{n} × {s if s else 'no answer'}" for s, n in sorted(counts.items())) or "none"


# --- the drills ---------------------------------------------------------------------------


@dataclass
class Ctx:
    stack: dict
    prom: LocalPrometheus
    ts: TimeScale
    background: dict[str, Load] = field(default_factory=dict)

    @property
    def envoy(self) -> str:
        return self.stack["envoy"]


class Drill:
    name = ""
    title = ""
    what = ""
    expected: tuple[str, ...] = ()
    #: The longest window of the shipped rules behind `expected`.
    window = "5m"
    extra: list[tuple[str, str, tuple[str, ...]]] = []
    #: Signals shown in the progress lines: (label, PromQL with {rate}, unit).
    watch: list[tuple[str, str, str]] = []

    def start(self, ctx: Ctx) -> None: ...

    def stop(self, ctx: Ctx) -> None: ...

    def recovered(self, ctx: Ctx) -> bool:
        return True

    def client(self, ctx: Ctx, t: dict) -> list[str]:
        return []

    def notes(self, ctx: Ctx, t: dict) -> list[str]:
        return []


class Burst(Drill):
    name = "burst"
    title = "burst traffic"
    what = "24 concurrent streams (64 tokens each) on the stable runtime, which runs 4 at a time: requests queue in the runtime."
    expected = ("LLMRuntimeSaturated", "LLMSlowFirstToken")
    extra = [("requests waiting", "Requests waiting and running per pod", ("A",)),
             ("GPU utilization", "GPU utilization per GPU", ("A",))]
    watch = [("TTFT p95 chat", 'histogram_quantile(0.95, sum by (le) (rate(llm_gateway_time_to_first_token_milliseconds_bucket{route="chat"}[{rate}])))', "ms"),
             ("queue p95", 'histogram_quantile(0.95, sum by (le) (rate(llm_runtime_queue_time_seconds_bucket{pod="vllm-stable-0"}[{rate}])))', "s"),
             ("waiting", 'sum(llm_runtime_requests_waiting{pod="vllm-stable-0"})', "short")]
    streams = 24

    def start(self, ctx: Ctx) -> None:
        url = ctx.envoy + CHAT
        # llm-sim answers 16 tokens unless told otherwise (docs/simulator.md).
        h = {**TENANT, "x-sim-output-tokens": "64"}
        self.load = Load("burst", lambda i: stream(url, f"burst {i}: summarise the incident timeline", 64, h), self.streams, 0.0).start()

    def stop(self, ctx: Ctx) -> None:
        self.load.stop()

    def client(self, ctx: Ctx, t: dict) -> list[str]:
        got = self.load.outcomes
        slow = max((o.elapsed for o in got), default=0)
        return [f"{len(got)} burst streams: {statuses(got)}; the slowest took {slow:.1f}s end to end"]


class LongPrompts(Drill):
    name = "long-prompts"
    title = "longer prompts"
    what = ("Two clients send distinct ~6000-token prompts on the chat route; the runtime prefills 0.5 ms per uncached prompt token, "
            "so the first token comes ~3 s later.")
    expected = ("LLMSlowFirstToken",)
    extra = [("prompt tokens p95", "Prompt tokens per request p95 by route", ("A",)),
             ("KV cache", "KV cache usage per pod", ("A",))]
    watch = [("TTFT p95 chat", 'histogram_quantile(0.95, sum by (le) (rate(llm_gateway_time_to_first_token_milliseconds_bucket{route="chat"}[{rate}])))', "ms"),
             ("prompt p95", 'histogram_quantile(0.95, sum by (le) (rate(llm_gateway_prompt_tokens_bucket{route="chat"}[{rate}])))', "short")]
    text = "the quarterly report covers every region "

    def start(self, ctx: Ctx) -> None:
        url = ctx.envoy + CHAT
        # ~41 bytes a repetition, 4 bytes a token: 585 repetitions ~ 6000 tokens.
        self.load = Load("long-prompts", lambda i: stream(url, f"report {i}: " + self.text * 585, 8, TENANT), 2, 0.0).start()

    def stop(self, ctx: Ctx) -> None:
        self.load.stop()

    def client(self, ctx: Ctx, t: dict) -> list[str]:
        got = self.load.outcomes
        tokens = [int(m.group(1)) for o in got for m in [re.search(rb'"prompt_tokens":\s*(\d+)', o.body)] if m]
        size = f", {min(tokens)}–{max(tokens)} prompt tokens (usage)" if tokens else ""
        return [f"{len(got)} long prompts: {statuses(got)}{size}; each took {min((o.elapsed for o in got), default=0):.1f}–"
                f"{max((o.elapsed for o in got), default=0):.1f}s"]


class RuntimeRestart(Drill):
    name = "runtime-restart"
    title = "runtime restart (a crash-looping canary)"
    what = ("Canary traffic (x-canary: 1) while the canary runtime restarts every 5 s (llm-sim --supervise): the stream in flight "
            "is cut, requests while it is down get Envoy's 503, then it answers again.")
    expected = ("LLMCanaryErrorRegression",)
    window = "10m"
    period = 5.0
    extra = [("errors/s by type", "Errors per second by error_type", ("A",)),
             ("server-error ratio", "Server-error ratio by backend", ("A",))]
    watch = [("canary errors", 'sum(rate(llm_gateway_errors_total{backend=~".*canary.*"}[{rate}]))', "reqps"),
             ("restarts", 'sum(llm_runtime_restarts_total{pod="vllm-canary-0"})', "short")]

    def start(self, ctx: Ctx) -> None:
        url, canary = ctx.envoy + CHAT, ctx.stack["runtimes"]["canary"]
        h = {**TENANT, "x-canary": "1"}
        self.json = Load("canary", lambda i: chat_json(url, f"canary question {i}", 8, h), 2, 0.2).start()
        long = {**h, "x-sim-output-tokens": "400"}
        self.streams = Load("canary-stream", lambda i: stream(url, f"canary long answer {i}", 400, long), 1, 0.1).start()
        self.downtimes: list[float] = []
        self.restarts = 0
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.period):
                try:
                    if post_json(canary + "/admin/restart", {}, timeout=5).status != 200:
                        continue
                except OSError:
                    continue
                self.restarts += 1
                t0 = time.time()
                try:
                    wait_until(lambda: _down(canary), timeout=5, interval=0.01, what="canary down")
                    wait_until(lambda: get(canary + "/health", timeout=0.5).status == 200, timeout=30, interval=0.05, what="canary back")
                    self.downtimes.append(time.time() - t0)
                except TimeoutError:
                    pass

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self, ctx: Ctx) -> None:
        self._stop.set()
        self.thread.join(timeout=60)
        self.json.stop()
        self.streams.stop()

    def recovered(self, ctx: Ctx) -> bool:
        return get(ctx.stack["runtimes"]["canary"] + "/health", timeout=1).status == 200

    def client(self, ctx: Ctx, t: dict) -> list[str]:
        during = self.json.outcomes
        cut = [o for o in self.streams.outcomes if o.status == 200 and not o.complete]
        return [f"canary requests: {statuses(during)} (503: Envoy's reply while the runtime was down)",
                f"canary streams: {len(self.streams.outcomes)}, {len(cut)} cut mid-stream (200, then the connection reset)"]

    def notes(self, ctx: Ctx, t: dict) -> list[str]:
        if not self.downtimes:
            return []
        return [f"the canary restarted {self.restarts} times; back {min(self.downtimes):.1f}–{max(self.downtimes):.1f}s after each restart"]


def _down(url: str) -> bool:
    try:
        get(url + "/health", timeout=0.2)
        return False
    except OSError:
        return True


class VectorStoreOutage(Drill):
    name = "vector-store-outage"
    title = "vector-store outage"
    what = "The RAG API (llm-sim on the rag-chat route) loses its vector store: RAG requests fail, other routes must not."
    expected = ("LLMRAGRetrievalFailing",)
    extra = [("RAG errors by reason", "RAG retrieval errors by reason", ("A",)),
             ("errors/s by type", "Errors per second by error_type", ("A",))]
    watch = [("RAG errors", 'sum(rate(llm_rag_errors_total[{rate}]))', "reqps"),
             ("rag-chat requests", 'sum(rate(llm_gateway_requests_total{route="rag-chat"}[{rate}]))', "reqps")]

    def _set(self, ctx: Ctx, down: bool) -> None:
        r = post_json(ctx.stack["runtimes"]["rag"] + "/admin/config", {"rag_vector_store_down": down}, timeout=10)
        if r.status != 200:
            raise RuntimeError(f"RAG API admin config: HTTP {r.status}")

    def start(self, ctx: Ctx) -> None:
        self._set(ctx, True)

    def stop(self, ctx: Ctx) -> None:
        self._set(ctx, False)

    def recovered(self, ctx: Ctx) -> bool:
        rag = ctx.background["rag-chat"].outcomes
        return bool(rag) and rag[-1].status == 200

    def client(self, ctx: Ctx, t: dict) -> list[str]:
        rag = ctx.background["rag-chat"].between(t["fault_start"], t["fault_end"])
        chat = ctx.background["chat"].between(t["fault_start"], t["fault_end"])
        lines = [f"RAG requests during the outage: {statuses(rag)}"]
        failed = next((o for o in rag if o.status != 200), None)
        if failed is not None:
            lines.append(f"a failed one: HTTP {failed.status}, content-type {failed.headers.get('content-type')}, "
                         f"x-rag-error: {failed.headers.get('x-rag-error')}")
            lines.append(f"  body: {failed.body[:160].decode(errors='replace')}")
        lines.append(f"chat requests (no RAG) meanwhile: {statuses(chat)}")
        after = [o for o in ctx.background["rag-chat"].outcomes if o.t >= t["fault_end"] and o.status == 200]
        if after:
            lines.append(f"first RAG answer after the repair: {after[0].t - t['fault_end']:.1f}s after it")
        return lines


ALL = {d.name: d for d in (Burst, LongPrompts, RuntimeRestart, VectorStoreOutage)}


# --- Prometheus readings ----------------------------------------------------------------


def panel(title: str) -> dict:
    for p in incident_panels():
        if p["title"] == title:
            return p
    raise KeyError(f"no panel {title!r} in the incident dashboard")


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def signal_specs(drill: Drill, ts: TimeScale) -> list[dict]:
    specs = []
    for name, title, refs in CHECKLIST + drill.extra:
        p = panel(title)
        targets = [t for t in p["targets"] if t["refId"] in refs]
        assert len(targets) == len(refs), (title, refs)
        specs.append({"name": name, "panel": title, "unit": p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"),
                      "targets": [{"ref": t["refId"], "legend": t.get("legendFormat", ""),
                                   "expr": panel_expr(t["expr"], ts.rate_interval, ts.window("5m"))} for t in targets]})
    return specs


def most_changed(points: list[list], start: float, end: float, before: float | None) -> float | None:
    """The value in [start, end] furthest from `before` (the largest one
    when there was none): a rise or a drop, whichever the fault caused."""
    values = [v for when, v in points if start <= when <= end and v is not None]
    if not values:
        return None
    return max(values, key=lambda v: abs(v - (before or 0.0)))


def read_signals(prom: LocalPrometheus, specs: list[dict], t: dict, step: float) -> list[dict]:
    """Each signal's series over the drill (a range query, one point per
    evaluation interval), with `before` (at the fault's start) and `after`
    (at the end) from instant queries, and `during` from the range points."""
    signals = []
    for spec in specs:
        series = []
        for target in spec["targets"]:
            at = {k: {json.dumps(s["metric"], sort_keys=True): finite(s["value"][1]) for s in prom.query(target["expr"], t[tk])}
                  for k, tk in (("before", "fault_start"), ("after", "end"))}
            for s in prom.query_range(target["expr"], t["start"], t["end"], step):
                key = json.dumps(s["metric"], sort_keys=True)
                points = [[float(ts_), finite(v)] for ts_, v in s["values"]]
                before = at["before"].get(key)
                series.append({"ref": target["ref"], "legend": legend(target["legend"], s["metric"]), "labels": s["metric"],
                               "points": points, "before": before, "after": at["after"].get(key),
                               "during": most_changed(points, t["fault_start"], t["fault_end"], before)})
        series.sort(key=lambda s: (s["ref"], s["legend"]))
        signals.append({"name": spec["name"], "panel": spec["panel"], "unit": spec["unit"],
                        "exprs": {tg["ref"]: tg["expr"] for tg in spec["targets"]}, "series": series})
    return signals


def read_alerts(prom: LocalPrometheus, drill: Drill, t: dict, step: float) -> list[dict]:
    """Pending, firing and cleared times per alert name, from the ALERTS
    series Prometheus writes at each evaluation."""
    by_name: dict[str, dict] = {}
    for s in prom.query_range("ALERTS", t["start"], t["end"], step):
        m = s["metric"]
        a = by_name.setdefault(m["alertname"], {"alert": m["alertname"], "expected": m["alertname"] in drill.expected,
                                                "steps": {}, "where": set()})
        for when, _ in s["values"]:
            a["steps"].setdefault(float(when), set()).add(m["alertstate"])
        a["where"] |= {f"{k}={m[k]}" for k in ("route", "pod", "backend", "collection") if k in m}
    grid = _grid(t["start"], t["end"], step)
    out = []
    for name in sorted(by_name, key=lambda n: (n not in drill.expected, n)):
        a = by_name[name]
        # The evaluations it was active at, from the first run of them that
        # lasts into the fault (an earlier run is not this fault's).
        active = sorted(a["steps"])
        runs: list[list[float]] = []
        for when in active:
            if runs and when - runs[-1][-1] <= step * 1.5:
                runs[-1].append(when)
            else:
                runs.append([when])
        runs = [r for r in runs if r[-1] >= t["fault_start"]]
        if not runs:
            continue
        active = [w for r in runs for w in r]
        firing = [w for w in active if "firing" in a["steps"][w]]
        cleared = next((w for w in grid if w > active[-1]), None)
        out.append({"alert": name, "expected": a["expected"], "where": ", ".join(sorted(a["where"])),
                    "pending": active[0], "firing": firing[0] if firing else None, "cleared": cleared})
    for name in drill.expected:
        if name not in by_name:
            out.insert(0, {"alert": name, "expected": True, "where": "", "pending": None, "firing": None, "cleared": None})
    return out


def _grid(start: float, end: float, step: float) -> list[float]:
    n = int(math.floor((end - start) / step + 1e-9))
    return [start + i * step for i in range(n + 1)]


def active_alerts(prom: LocalPrometheus) -> dict[str, str]:
    """alertname -> firing or pending (firing wins)."""
    states: dict[str, str] = {}
    for a in prom.alerts():
        name = a["labels"]["alertname"]
        if states.get(name) != "firing":
            states[name] = a["state"]
    return states


# --- running a drill -------------------------------------------------------------------------


def fmt_now(prom: LocalPrometheus, drill: Drill, ts: TimeScale) -> str:
    parts = []
    for label, expr, unit in drill.watch:
        try:
            result = prom.query(expr.replace("{rate}", ts.rate_interval))
            value = finite(result[0]["value"][1]) if result else None
        except RuntimeError:
            value = None
        parts.append(f"{label} {report.fmt(value, unit)}")
    return ", ".join(parts)


def run_drill(ctx: Ctx, drill: Drill) -> dict:
    ts, prom = ctx.ts, ctx.prom
    tick = min(1.0, ts.scrape_interval_s)
    every = max(3.0, 3 * ts.scrape_interval_s)
    step = seconds(ts.evaluation_interval)
    limit = 60 + 4 * seconds(ts.window("10m"))
    baseline = seconds(ts.window(drill.window)) + 2 * ts.scrape_interval_s
    out(f"\n== drill {drill.name}: {drill.title} ==")
    out(drill.what)
    out(f"alerts to watch: {', '.join(drill.expected)} ({prom.url}/alerts)")

    def leftover() -> list[str]:
        return [n for n, _ in active_alerts(prom).items() if n in drill.expected]

    if leftover():
        out(f"waiting for {', '.join(leftover())} to clear first")
        wait_until(lambda: not leftover(), timeout=limit, interval=tick, what="earlier alerts to clear")
    problems: list[str] = []
    # On the evaluation grid, after what was active before has cleared.
    t = {"start": (math.floor(time.time() / step) + 2) * step}
    out(f"baseline: {baseline:.0f}s of normal traffic")
    time.sleep(max(0.0, t["start"] + baseline - time.time()))

    def phase(name: str, done: Callable[[dict], bool], origin: float) -> bool:
        """Polls until `done(states)`; prints progress. False on timeout."""
        deadline, next_line = time.time() + limit, 0.0
        while True:
            states = active_alerts(prom)
            now = time.time()
            if done(states):
                return True
            if now >= deadline:
                return False
            if now >= next_line:
                mine = ", ".join(f"{n} {st}" for n, st in sorted(states.items()) if n in drill.expected)
                shown = mine or ("no alert yet" if name == "fault" else "alerts cleared")
                out(f"  {name:<8} {now - origin:+5.0f}s  {fmt_now(prom, drill, ts)}  | {shown}")
                next_line = now + every
            time.sleep(tick)

    t["fault_start"] = time.time()
    out(f"fault: {drill.title}, until {' and '.join(drill.expected)} {'fires' if len(drill.expected) == 1 else 'fire'}")
    drill.start(ctx)
    try:
        fired = phase("fault", lambda st: all(st.get(n) == "firing" for n in drill.expected), t["fault_start"])
    finally:
        t["fault_end"] = time.time()
        drill.stop(ctx)
    if not fired:
        problems.append(f"{', '.join(drill.expected)} did not all fire within {limit:.0f}s")
    out(f"fault removed after {t['fault_end'] - t['fault_start']:.0f}s; recovery until the alerts clear")

    def healthy(st: dict) -> bool:
        if any(n in st for n in drill.expected):
            return False
        try:
            return drill.recovered(ctx)
        except OSError:
            return False

    if not phase("recovery", healthy, t["fault_start"]):
        problems.append(f"not recovered within {limit:.0f}s of the fault's end")
    t["recovered"] = time.time()
    # Two more scrapes and an evaluation, so "after" reads post-recovery data.
    time.sleep(2 * ts.scrape_interval_s + step)
    t["end"] = math.floor(time.time() / step) * step
    # Scrapes and evaluations stamped before the end may still be landing.
    time.sleep(max(0.0, t["end"] + ts.scrape_interval_s + 1.0 - time.time()))
    signals = read_signals(prom, signal_specs(drill, ts), t, step)
    alerts = read_alerts(prom, drill, t, step)
    for a in alerts:
        if a["expected"] and not (a["firing"] and a["cleared"]):
            problems.append(f"{a['alert']}: firing {report.rel(a['firing'], t['fault_start'])}, cleared {report.rel(a['cleared'], t['fault_start'])}")
    cleared = [a["cleared"] for a in alerts if a["expected"] and a["cleared"]]
    rec = {"alerts_cleared_s": (max(cleared) - t["fault_end"]) if cleared and len(cleared) == len(drill.expected) else None,
           "notes": drill.notes(ctx, t)}
    return {
        "drill": drill.name, "title": drill.title, "what": drill.what,
        "time_scale": ts.scale,
        "scale_note": "the shipped rules as they are" if ts.scale == 1 else
        f"the shipped rules with every duration divided by {ts.scale:g} (for 10m holds {ts.window('10m')}, 5m windows span {ts.window('5m')})",
        "rate_interval": ts.rate_interval, "range": ts.window("5m"), "step": step,
        "prometheus": prom.url, "times": t, "signals": signals, "alerts": alerts, "recovery": rec,
        "client": drill.client(ctx, t), "problems": problems,
    }


# --- the stack ------------------------------------------------------------------------------


def running_stack(run_dir: Path) -> dict | None:
    state = run_dir / "stack.json"
    try:
        d = json.loads(state.read_text())
        os.kill(d["pid"], 0)
        if get(d["admin"] + "/ready", timeout=2).status != 200:
            return None
        return d
    except (OSError, ValueError, KeyError):
        return None


def start_stack(run_dir: Path, free_ports: bool) -> tuple[subprocess.Popen, dict]:
    out("no stack running (`cargo xtask up`): starting one for the drill")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stack.json").unlink(missing_ok=True)
    log = open(run_dir / "stack-for-drill.log", "w")
    cmd = [sys.executable, str(REPO / "demo" / "stack.py"), "up", "--run-dir", str(run_dir)] + (["--free-ports"] if free_ports else [])
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited: {(run_dir / 'stack-for-drill.log').read_text()[-2000:]}")
        return running_stack(run_dir)

    return proc, wait_until(up, timeout=120, interval=0.5, what="the stack")


def stack_pods(stack: dict) -> list[dict]:
    return get(stack["kube_api"] + "/api/v1/pods").json()["items"]


def use_time_scale(stack: dict, prom: LocalPrometheus, ts: TimeScale) -> None:
    """Load the rules (and scrape intervals) of `ts`, unless already loaded."""
    config = prometheus_config(Path(stack["run_dir"]), stack_pods(stack), ts)
    if all(g["file"] == config["rule_files"][0] for g in prom.rule_groups()) and ts.scale == 1:
        return
    prom.apply(config, ts)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drill", choices=[*DRILLS, "all"])
    ap.add_argument("--realistic", action="store_true", help="the shipped rules at their own pace (15-30 minutes a drill)")
    ap.add_argument("--time-scale", type=float, default=DEFAULT_SCALE, help=f"divide every rule duration by this (default {DEFAULT_SCALE:g})")
    ap.add_argument("--run-dir", type=Path, default=REPO / ".tokentap" / "run", help="the stack's run directory (stack.json)")
    ap.add_argument("--free-ports", action="store_true", help="when starting a stack: free ports instead of the fixed ones")
    ap.add_argument("--report", type=Path, help="HTML report path (the JSON goes next to it); default <run dir>/drills/")
    args = ap.parse_args()
    ts = TimeScale(1.0 if args.realistic else args.time_scale)
    names = list(DRILLS) if args.drill == "all" else [args.drill]

    owned = None
    stack = running_stack(args.run_dir)
    if stack is None:
        owned, stack = start_stack(args.run_dir, args.free_ports)
    if not stack.get("prometheus"):
        out("drill: the stack runs without Prometheus (`prometheus` not on PATH; Debian package `prometheus`): "
            "the drills read their signals and alerts from it")
        if owned:
            owned.terminate()
        return 2
    prom = LocalPrometheus(None, stack["prometheus"], Path(stack["prometheus_config"]))
    ctx = Ctx(stack, prom, ts)
    signal.signal(signal.SIGTERM, _interrupt)
    reports: list[dict] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    html_path = args.report or args.run_dir / "drills" / f"{stamp}-{args.drill}.html"
    try:
        if ts.scale != 1:
            out(f"Prometheus ({prom.url}) evaluates {RULES.relative_to(REPO)} {ts.scale:g} times faster for the drill: every duration "
                f"divided by {ts.scale:g} (for 10m -> {ts.window('10m')}), scraping every {ts.scrape_interval_s:g}s; "
                "the shipped rules are loaded back at the end")
        envoy = stack["envoy"]
        ctx.background = {
            "chat": Load("chat", lambda i: stream(envoy + CHAT, f"background question {i}", 16, TENANT), 2, 0.25).start(),
            "rag-chat": Load("rag-chat", lambda i: stream(envoy + RAG_CHAT, f"what does the policy say about item {i}?", 8,
                                                          {**TENANT, "x-rag-collection": "policies"}), 1, 0.4).start(),
        }
        # The gateway's series exist once it has seen a request: wait for
        # them in Prometheus, so a fresh stack starts the drill with data.
        wait_until(lambda: prom.query('sum(llm_gateway_requests_total{route="rag-chat"})'), timeout=120, interval=1,
                   what="the background traffic in Prometheus")
        use_time_scale(stack, prom, ts)
        for name in names:
            r = run_drill(ctx, ALL[name]())
            reports.append(r)
            out("\n" + report.text(r))
    except KeyboardInterrupt:
        out("\ninterrupted")
    finally:
        for load in ctx.background.values():
            load.stop(wait=False)
        try:
            post_json(stack["runtimes"]["rag"] + "/admin/config", {"rag_vector_store_down": False}, timeout=10)
            if ts.scale != 1:
                use_time_scale(stack, prom, TimeScale())
                out(f"Prometheus has the shipped rules again ({RULES.relative_to(REPO)})")
        finally:
            if owned:
                owned.send_signal(signal.SIGTERM)
                owned.wait(60)
    if not reports:
        return 1
    if len(reports) > 1:
        out("\n" + report.summary(reports))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(report.html_page(reports))
    json_path = html_path.with_suffix(".json")
    json_path.write_text(json.dumps(reports, indent=1))
    out(f"\nreport: {html_path}\n        {json_path}")
    return 0 if all(not r["problems"] for r in reports) and len(reports) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
