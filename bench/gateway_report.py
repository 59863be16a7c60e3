"""Markdown report of `bench/gateway.py`: summary, memory, CPU shares, checks,
and every run with the load average around it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from gateway_load import REFERENCE, WARMUP, Run

BASELINE = "without"
#: The empty proxy-wasm filter (filters/probe): the floor any filter pays.
EMPTY = "empty wasm"
#: Issue 8's targets: throughput ratio to no-filter per scenario, and the
#: filter's added CPU as a multiple of the empty filter's.
TARGET_RATIO = {"chat": 0.85, "sse": 0.90, "sse-otlp": 0.90, "sse-paced": 0.95}
TARGET_VS_EMPTY = 2.0
TARGET_IGNORED_VS_EMPTY = 1.25


@dataclass
class ScenarioResult:
    name: str
    description: str
    runs: list[Run] = field(default_factory=list)
    #: Proxy key -> RSS bytes right after start, and after the load.
    rss_idle: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def median_range(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def verdict(ratios: list[float], target: float) -> str:
    """Judged on the median; says so when the spread straddles the target."""
    met = "yes" if statistics.median(ratios) >= target else "no"
    if min(ratios) < target <= max(ratios):
        met += f" (range crosses {target})"
    return met


def median_cpu(runs: list[Run]) -> float:
    return statistics.median(r.proxy_us_per_request for r in runs) if runs else float("nan")


def added_cpu(result: ScenarioResult, conns: int) -> dict[str, float]:
    """Per variant: median proxy CPU per request minus the no-filter proxy's."""
    measured = [r for r in result.runs if r.rep >= 0 and r.connections == conns]
    base = median_cpu([r for r in measured if r.variant == BASELINE])
    return {
        name: median_cpu([r for r in measured if r.variant == name]) - base
        for name in dict.fromkeys(r.variant for r in measured)
    }


def paired_ratios(runs: list[Run], base: dict[int, Run]) -> list[float]:
    """with/without throughput of the same repetition (adjacent in time)."""
    return [r.rps / base[r.rep].rps for r in runs if r.rep in base and base[r.rep].rps]


def summary_rows(result: ScenarioResult, connections: list[int]) -> list[list[str]]:
    rows = []
    for conns in connections:
        measured = [r for r in result.runs if r.rep >= 0 and r.connections == conns]
        base = {r.rep: r for r in measured if r.variant == BASELINE}
        base_cpu = median_cpu(list(base.values()))
        added = added_cpu(result, conns)
        floor = added.get(EMPTY, float("nan"))
        target_ratio = TARGET_RATIO.get(result.name, 0.95)
        for name in dict.fromkeys(r.variant for r in measured):
            runs = [r for r in measured if r.variant == name]
            cpu = statistics.median(r.proxy_us_per_request for r in runs)
            vs_empty = ""
            if name == BASELINE:
                ratio, target, cpu_text = "1 (baseline)", "", f"{cpu:.1f}"
            else:
                ratios = paired_ratios(runs, base)
                ratio, target = median_range(ratios, 3), verdict(ratios, target_ratio)
                cpu_text = f"{cpu:.1f} ({cpu - base_cpu:+.1f})"
                if name != EMPTY and floor > 0:
                    vs_empty = f"×{added[name] / floor:.2f}"
            rows.append(
                [
                    result.name,
                    str(conns),
                    name,
                    median_range([r.rps for r in runs]),
                    ratio,
                    target,
                    f"{statistics.median(r.p50_ms for r in runs):.2f}",
                    f"{statistics.median(r.p99_ms for r in runs):.2f}",
                    cpu_text,
                    vs_empty,
                    str(sum(r.errors for r in runs)),
                ]
            )
        for ref in (r for r in result.runs if r.rep == REFERENCE and r.connections == conns):
            rows.append(
                [result.name, str(conns), ref.variant, f"{ref.rps:,.0f}", "", "", f"{ref.p50_ms:.2f}",
                 f"{ref.p99_ms:.2f}", f"({ref.proxy_us_per_request:.0f} server)", "", str(ref.errors)]
            )
    return rows


def hostcall_rows(results: list[ScenarioResult], connections: list[int], repeat: int) -> list[list[str]]:
    rows = []
    for res in results:
        for conns in connections:
            added = added_cpu(res, conns)
            floor = added.get(EMPTY)
            for name, cpu in added.items():
                if name.startswith("probe ") and floor is not None:
                    call = name.removeprefix("probe ").split(":")[0]
                    rows.append([str(conns), f"`{call}`", f"{(cpu - floor) / repeat * 1000:.0f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def share_rows(results: list[ScenarioResult], connections: list[int]) -> list[list[str]]:
    rows = []
    for res in results:
        for conns in connections:
            measured = [x for x in res.runs if x.rep >= 0 and x.connections == conns]
            for name in dict.fromkeys(x.variant for x in measured):
                runs = [x for x in measured if x.variant == name]

                def cores(attr: str) -> str:
                    return f"{statistics.median(getattr(x, attr) / x.seconds for x in runs):.2f}"

                rows.append(
                    [res.name, str(conns), name, cores("proxy_cpu_s"), cores("upstream_cpu_s"), cores("wrk_cpu_s"),
                     cores("bench_cpu_s"), cores("others_cpu_s")]
                )
    return rows


def render(results: list[ScenarioResult], opts, meta: dict) -> str:
    runs_word = "run" if opts.reps == 1 else "runs"
    out = [f"# Gateway filter benchmark ({meta['mode']}), {meta['date']}", ""]
    out.append(
        f"{meta['cpus']} CPUs ({meta['cpu_model']}), shared with other work. Envoy {meta['envoy']}; the proxy "
        f"under test runs `--concurrency 1`. Filter `{meta['wasm']}`: {meta['wasm_bytes']:,} bytes, sha256 "
        f"{meta['wasm_sha256']}…, last commit touching the filter's sources: {meta['filter_commit']}"
        f"{' (**the .wasm is older than those sources**)' if meta['wasm_stale'] else ''}. "
        f"wrk 1 thread; per variant and connection count a {opts.warmup} s warm-up (discarded), then "
        f"{opts.reps} measured {runs_word} of {opts.duration} s, variants alternating A B / B A. "
        f"1-min load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end."
    )
    out += [
        "",
        "rps: median (min–max) over runs. Ratio: variant ÷ no-filter throughput of the same repetition, median "
        "(min–max); target per scenario (chat 0.85, sse 0.90, sse-paced 0.95). p50/p99: medians over runs, ms. "
        "Proxy CPU: median CPU time of the proxy Envoy per completed request, µs (added over no filter). "
        f"× empty: the variant's added CPU as a multiple of the empty proxy-wasm filter's (`{EMPTY}`, the floor "
        "any filter pays); target ≤ 2 (≤ 1.25 for a request the filter ignores). Rows marked \"alone\" are wrk "
        "straight at the upstream, for reference.",
        "",
        table(
            ["scenario", "conns", "variant", "rps", "ratio", "target met?", "p50 ms", "p99 ms",
             "proxy CPU µs/req", "× empty", "errors"],
            [row for r in results for row in summary_rows(r, opts.connections)],
        ),
        "",
    ]
    calls = hostcall_rows(results, opts.connections, meta.get("host_call_repeat", 1))
    if calls:
        out += [
            "",
            f"Host calls, priced on this Envoy: the probe filter repeats one call {meta.get('host_call_repeat')} times "
            "in the request-headers callback; cost per call = (probe's CPU per request − empty filter's) ÷ repeats.",
            "",
            table(["conns", "host call", "ns per call"], calls),
        ]
    out += [
        "",
        "Envoy RSS, MiB:",
        "",
    ]
    mem_rows = []
    for r in results:
        base_after = r.rss_after.get(BASELINE, 0)
        for key, idle in r.rss_idle.items():
            after = r.rss_after.get(key, 0)
            delta = "" if key == BASELINE else f"{(after - base_after) / (1 << 20):+.1f}"
            mem_rows.append([r.name, key, mib(idle), mib(after), delta])
    out.append(table(["scenario", "proxy", "after start", "after the load", "Δ vs without"], mem_rows))
    out += [
        "",
        "Where the CPU went during measured runs (median, in cores; the machine has "
        f"{meta['cpus']}). \"bench\" is this script (it hosts the OTLP sink); \"others\" is every other "
        "process on the machine.",
        "",
        table(["scenario", "conns", "variant", "proxy", "upstream", "wrk", "bench", "others"],
              share_rows(results, opts.connections)),
        "",
        "Checks:",
        "",
    ]
    for r in results:
        out += [f"- {r.name}: {c}" for c in r.checks]
        out += [f"- **{r.name}: PROBLEM: {p}**" for p in r.problems]
    out += ["", "Every run (w: warm-up, ref: upstream alone):", ""]
    run_rows = []
    for r in results:
        for x in r.runs:
            tag = {WARMUP: "w", REFERENCE: "ref"}.get(x.rep, str(x.rep + 1))
            run_rows.append(
                [r.name, str(x.connections), x.variant, tag, f"{x.rps:,.0f}", f"{x.p50_ms:.2f}", f"{x.p99_ms:.2f}",
                 f"{x.proxy_us_per_request:.0f}", f"{x.others_cpu_s / x.seconds:.2f}", str(x.errors),
                 f"{x.load_before:.2f} → {x.load_after:.2f}"]
            )
    out.append(
        table(["scenario", "conns", "variant", "run", "rps", "p50 ms", "p99 ms", "proxy µs/req", "others (cores)",
               "errors", "load 1m"], run_rows)
    )
    return "\n".join(out) + "\n"
