#!/usr/bin/env python3
"""Gateway cost in instructions: Envoy under callgrind, per request.

`bench/gateway.py` measures CPU time, which on this shared 2-vCPU machine
moves by ±10–20 µs per variant between runs: the size of the empty filter's
whole cost. This script counts instructions instead. The proxy under test
runs under `valgrind --tool=callgrind`, counting is switched on after a
warm-up, and the count over a fixed number of requests is divided by that
number. The same build, inputs and configuration give the same count to
within a fraction of a percent, whatever else the machine is doing, so
small changes in the filter can be measured and compared.

Instructions are not time (a cache miss costs more than an add), so this
complements the wall-clock benchmark, it does not replace it: decisions
about where the filter's work goes rest on these counts, the throughput
targets on `gateway.py`.

Variants, each a fresh Envoy rendered from the shipped `envoy/tokentap.yaml`
(as in `gateway.py`), `--concurrency 1`:
  without     the wasm filter removed
  empty       the empty proxy-wasm filter (filters/probe, empty config)
  io          the probe configured `io`: the data reads tokentap makes for a
              request (header maps, route and cluster names, both bodies,
              clock, one filter-state write of a summary's size) and nothing
              else: the floor of any proxy-wasm filter that reads what
              tokentap reads
  tokentap    the shipped filter and plugin configuration
  no-state    tokentap with `filter_state: "off"`
  stage-*     with --stages, the bench-stages build stopped after a stage

For the tokentap variant the report also attributes the JIT code it ran to
the filter's wasm functions: V8 calls every wasm function through a jump
table at the start of the module's code space, eight bytes a slot, so the
slot callgrind saw entered gives the function index, and a build of the same
sources with its name section kept (`target/wasm-names`) gives the name.

Usage:
  python bench/gateway_instructions.py            # chat, chat-long, sse, ignored (about 8 min)
  python bench/gateway_instructions.py --quick    # chat only, fewer requests
  python bench/gateway_instructions.py --stages   # also the stage ablations

Needs valgrind (Debian `valgrind`), the release filter and probe, and the
e2e venv. Exit status 0 on success, 1 when a variant failed its check (the
filter did not count the requests), 2 when a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import glob
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway as bench  # noqa: E402  (re-executes under the venv, sets up paths)
import harness  # noqa: E402
import stack  # noqa: E402
from gateway_load import build_sse_upstream, start_fast_upstream, start_sse_upstream  # noqa: E402

REPO = bench.REPO
NAMES_TARGET = REPO / "target" / "wasm-names"
NAMES_WASM = NAMES_TARGET / "wasm32-wasip1" / "release" / "tokentap_filter.wasm"
#: A long prompt (about 8 KB of message text), as RAG and agent traffic sends.
LONG_PROMPT = " ".join(["Context passage about saturated vLLM runtimes and queue wait."] * 130)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    body: dict
    streaming: bool
    requests: int
    path: str = bench.LLM_PATH


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("chat", "non-streaming chat, short prompt, JSON response with usage", bench.CHAT_BODY, False, 1000),
        Scenario(
            "chat-long",
            f"non-streaming chat with a {len(LONG_PROMPT) // 1000} KB prompt",
            {**bench.CHAT_BODY, "messages": [{"role": "user", "content": LONG_PROMPT}]},
            False,
            1000,
        ),
        Scenario("sse", f"streaming chat, {bench.SSE_EVENTS} SSE events back to back", bench.SSE_BODY, True, 300),
        Scenario(
            "ignored",
            f"a request the filter does not treat as LLM traffic ({bench.NON_LLM_PATH}): it stops at request headers",
            bench.CHAT_BODY,
            False,
            1000,
            bench.NON_LLM_PATH,
        ),
    )
}


@dataclass
class Measured:
    variant: str
    instructions_per_request: float
    #: With --cache-sim: Ir + 10 x L1 misses + 100 x last-level misses, the
    #: cycle estimate of cachegrind and KCachegrind.
    cycles_per_request: float | None = None
    counted: float | None = None
    profile: list[tuple[str, float]] = field(default_factory=list)
    groups: dict[str, float] = field(default_factory=dict)


def valgrind_wrapper(tmp: Path, cache_sim: bool) -> Path:
    """A script that runs Envoy under callgrind with counting off until asked."""
    wrapper = tmp / "envoy-callgrind.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec valgrind --tool=callgrind --smc-check=all-non-file --instr-atstart=no "
        f"--cache-sim={'yes' if cache_sim else 'no'} "
        f"--callgrind-out-file={tmp}/callgrind.out.%p {harness.envoy_binary()} \"$@\"\n"
    )
    wrapper.chmod(0o755)
    return wrapper


def drive(port: int, scenario: Scenario, n: int) -> None:
    """`n` requests on one keep-alive connection, each read to its end."""
    body = json.dumps(scenario.body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for i in range(n):
            headers = {"content-type": "application/json", "x-tenant-id": f"bench-{i % 8}"}
            conn.request("POST", scenario.path, body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
    finally:
        conn.close()


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def annotate(path: str) -> list[tuple[int, str, str]]:
    """(instructions, function, object) per function of a callgrind dump."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", path], capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*):(\S+) \[(.*)\]\s*$", line)
        if m:
            rows.append((int(m.group(1).replace(",", "")), m.group(3), m.group(4)))
    return rows


def estimated_cycles(path: str) -> float | None:
    """Cycle estimate from a dump's event totals, when caches were simulated."""
    events: list[str] = []
    totals: list[int] = []
    with open(path) as dump:
        for line in dump:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("totals:", "summary:")):
                totals = [int(x) for x in line.split()[1:]]
    counts = dict(zip(events, totals))
    if "D1mr" not in counts:
        return None
    l1 = counts["I1mr"] + counts["D1mr"] + counts["D1mw"]
    ll = counts["ILmr"] + counts["DLmr"] + counts["DLmw"]
    return counts["Ir"] + 10 * l1 + 100 * ll


def code_mappings(pid: int) -> list[tuple[int, int]]:
    """Anonymous executable mappings of the process: where V8 puts wasm code."""
    spans = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if "x" in parts[1] and len(parts) < 6:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                spans.append((start, end))
    return spans


def wasm_function_names(path: Path) -> tuple[int, int, dict[int, str]]:
    """(imported functions, defined functions, names) from a module's sections."""
    data = path.read_bytes()

    def leb(i: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result, i

    imported = defined = 0
    names: dict[int, str] = {}
    i = 8
    while i < len(data):
        section = data[i]
        size, i = leb(i + 1)
        end = i + size
        if section == 2:  # imports: count the functions
            count, j = leb(i)
            for _ in range(count):
                for _ in range(2):
                    n, j = leb(j)
                    j += n
                kind = data[j]
                j += 1
                if kind == 0:
                    _, j = leb(j)
                    imported += 1
                elif kind in (1, 2):  # table, memory: limits
                    j += 1 if kind == 1 else 0
                    flags, j = leb(j)
                    _, j = leb(j)
                    if flags & 1:
                        _, j = leb(j)
                else:  # global
                    j += 2
        elif section == 3:
            defined, _ = leb(i)
        elif section == 0:
            n, j = leb(i)
            if data[j : j + n] == b"name":
                j += n
                while j < end:
                    sub = data[j]
                    sub_size, j = leb(j + 1)
                    if sub == 1:
                        count, k = leb(j)
                        for _ in range(count):
                            index, k = leb(k)
                            length, k = leb(k)
                            names[index] = data[k : k + length].decode(errors="replace")
                            k += length
                    j += sub_size
        i = end
    return imported, defined, names


def demangle(name: str) -> str:
    """Readable Rust path of a mangled symbol (hash dropped), best effort."""
    if shutil.which("rustfilt"):
        return subprocess.run(["rustfilt"], input=name, capture_output=True, text=True).stdout.strip()
    m = re.match(r"_ZN(.*)17h[0-9a-f]{16}E$", name)
    if not m:
        return name
    parts, rest = [], m.group(1)
    while rest and rest[0].isdigit():
        n = int(re.match(r"\d+", rest).group(0))
        rest = rest[len(str(n)) :]
        parts.append(rest[:n])
        rest = rest[n:]
    text = "::".join(parts)
    for code, char in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$RF$", "&"), ("..", "::")):
        text = text.replace(code, char)
    return text


def attribute(rows, mappings, shipped: Path, n: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Groups a dump's instructions (Envoy, libc, V8, wasm) and names the wasm functions."""
    imported, defined, _ = wasm_function_names(shipped)
    names: dict[int, str] = {}
    if NAMES_WASM.exists():
        names_imported, names_defined, names = wasm_function_names(NAMES_WASM)
        if (names_imported, names_defined) != (imported, defined):
            names = {}  # a different build: slots would be misnamed
    groups: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for ir, fn, obj in rows:
        # Recursive entries carry a suffix (`0x...'2`).
        address = int(fn.split("'")[0], 16) if fn.startswith("0x") else None
        span = next((s for s in mappings if address is not None and s[0] <= address < s[1]), None)
        if span is not None and (address - span[0]) % 8 == 0 and (address - span[0]) // 8 < defined:
            slot = (address - span[0]) // 8
            groups["wasm code (filter)"] += ir
            functions[demangle(names.get(imported + slot, f"wasm function #{imported + slot}"))] += ir
        elif obj.endswith("/envoy"):
            groups["Envoy (C++)"] += ir
        elif "libc" in obj or "libm" in obj:
            groups["libc"] += ir
        else:
            groups["other code without symbols (V8 builtins and stubs, remapped Envoy text)"] += ir
    return (
        {k: v / n for k, v in groups.items()},
        [(k, v / n) for k, v in functions.most_common(25)],
    )


def measure(tmp: Path, scenario: Scenario, upstream_port: int, variant: str, edit, opts) -> Measured:
    def edit_for_scenario(config: dict) -> None:
        edit(config)
        if scenario.path != bench.LLM_PATH:
            # Its own route with the filter on (the shipped catch-all
            # switches the filter off, which is a different measurement).
            bench.add_non_llm_route(config)

    envoy = stack.start_envoy(
        tmp,
        stable_port=upstream_port,
        edit=edit_for_scenario,
        concurrency=1,
        name=f"{scenario.name}-{variant}",
        flush_interval="5s",
        log_level="warning",
    )
    pid = envoy.proc.pid
    try:
        counts = variant.startswith(("tokentap", "no-state")) and scenario.path == bench.LLM_PATH
        before = bench.gateway_counters(envoy)["requests"] if counts else None
        callgrind(pid, "--instr=on")
        drive(envoy.listen_port, scenario, opts.warmup)
        callgrind(pid, "--zero")
        n = max(1, scenario.requests // (4 if opts.quick else 1))
        drive(envoy.listen_port, scenario, n)
        callgrind(pid, "--dump")
        mappings = code_mappings(pid)
        time.sleep(0.5)
        dumps = sorted(glob.glob(f"{tmp}/callgrind.out.{pid}.*"), key=os.path.getmtime)
        rows = annotate(dumps[-1])
        counted = None
        if before is not None:
            # Metrics are published on the filter's tick: wait for it.
            deadline = time.time() + 30
            while time.time() < deadline:
                counted = bench.gateway_counters(envoy)["requests"] - before
                if counted >= n + opts.warmup:
                    break
                time.sleep(1)
        cycles = estimated_cycles(dumps[-1])
        result = Measured(
            variant,
            sum(r[0] for r in rows) / n,
            counted=counted,
            cycles_per_request=cycles / n if cycles else None,
        )
        wasm = stack.WASM if variant.startswith(("tokentap", "no-state", "stage")) else bench.PROBE_WASM
        result.groups, result.profile = attribute(rows, mappings, wasm, n)
        return result
    finally:
        envoy.proc.stop(timeout=30)


def variants(opts) -> list[tuple[str, object]]:
    out = [
        ("without", bench.proxy_edit(False)),
        ("empty", bench.probe_edit()),
        ("io", bench.probe_edit("io")),
        ("tokentap", bench.proxy_edit(True)),
        ("no-state", bench.proxy_edit(True, filter_state=False)),
    ]
    if opts.stages:
        out += [(f"stage-{s}", bench.stage_edit(s)) for s in bench.STAGES]
    if opts.variants:
        out = [(name, edit) for name, edit in out if name in ("without", "empty", *opts.variants)]
    return out


def render(results: dict[str, list[Measured]], meta: dict, scenarios: list[Scenario]) -> str:
    lines = [
        f"# Gateway cost in instructions, {meta['date']}",
        "",
        f"Script: `bench/gateway_instructions.py`. Envoy {meta['envoy']}, `--concurrency 1`, under "
        f"callgrind ({meta['valgrind']}); filter commit `{meta['commit']}`, {meta['wasm_bytes']:,} bytes. "
        "Instructions the proxy executed per request (all threads), counted after a warm-up over a fixed "
        "number of requests on one keep-alive connection. Chat repeats to within about 1 % between runs; "
        "streams vary by a few percent, because how many reads Envoy makes of a back-to-back stream "
        "depends on timing.",
        "",
    ]
    for scenario in scenarios:
        rows = {m.variant: m for m in results[scenario.name]}
        none = rows["without"].instructions_per_request
        empty = rows["empty"].instructions_per_request - none
        io = rows["io"].instructions_per_request - none if "io" in rows else 0
        lines += [
            f"## {scenario.name}: {scenario.description} ({scenario.requests} requests)",
            "",
            "| variant | instructions / request | added over no filter | × empty filter | × io floor |",
            "|---|---|---|---|---|",
        ]
        for m in rows.values():
            added = m.instructions_per_request - none
            x_empty = f"×{added / empty:.1f}" if m.variant != "without" and empty > 0 else ""
            x_io = f"×{added / io:.2f}" if m.variant not in ("without", "empty") and io > 0 else ""
            lines.append(
                f"| {m.variant} | {m.instructions_per_request:,.0f} | {added:+,.0f} | {x_empty} | {x_io} |"
            )
        if rows["without"].cycles_per_request:
            c_none = rows["without"].cycles_per_request
            c_empty = rows["empty"].cycles_per_request - c_none
            lines += [
                "",
                "Estimated cycles (simulated caches: Ir + 10 × L1 misses + 100 × last-level misses):",
                "",
                "| variant | est. cycles / request | added over no filter | × empty filter |",
                "|---|---|---|---|",
            ]
            for m in rows.values():
                added = (m.cycles_per_request or 0) - c_none
                x_empty = f"×{added / c_empty:.1f}" if m.variant != "without" and c_empty > 0 else ""
                lines.append(f"| {m.variant} | {m.cycles_per_request or 0:,.0f} | {added:+,.0f} | {x_empty} |")
        tokentap = rows.get("tokentap", Measured("tokentap", 0))
        parts = sorted({k for m in rows.values() for k in m.groups}, key=lambda k: -tokentap.groups.get(k, 0))
        lines += ["", "Where the instructions went, per request (all code of the proxy):", ""]
        lines += ["| part | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for part in parts:
            lines.append(f"| {part} | " + " | ".join(f"{m.groups.get(part, 0):,.0f}" for m in rows.values()) + " |")
        if tokentap.profile:
            lines += ["", "The filter's own wasm functions (self cost per request, top 25):", ""]
            lines += ["| wasm function | instructions / request |", "|---|---|"]
            lines += [f"| `{name}` | {ir:,.0f} |" for name, ir in tokentap.profile]
        lines.append("")
    return "\n".join(lines)


def build_names_wasm() -> None:
    """The shipped sources with the name section kept, for the profile's names."""
    env = {**os.environ, "CARGO_PROFILE_RELEASE_STRIP": "false"}
    subprocess.run(
        ["cargo", "build", "-q", "-p", "tokentap-filter", "--target", "wasm32-wasip1", "--release",
         "--target-dir", str(NAMES_TARGET)],
        cwd=REPO, env=env, check=True, timeout=900,
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="chat only, a quarter of the requests")
    p.add_argument("--stages", action="store_true", help="also the bench-stages ablations")
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=None)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--cache-sim", action="store_true", help="also simulate caches and report estimated cycles (slower)"
    )
    p.add_argument(
        "--variants", nargs="+", default=None, help="only these variants (no-filter and empty are always run)"
    )
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    names = opts.scenarios or (["chat"] if opts.quick else list(SCENARIOS))
    scenarios = [SCENARIOS[n] for n in names]
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian package `valgrind`)", file=sys.stderr)
            return 2
    for wasm in (harness.WASM, bench.PROBE_WASM):
        if not wasm.exists():
            print(f"{wasm} missing: cargo xtask bench builds it", file=sys.stderr)
            return 2
    build_names_wasm()
    if opts.stages:
        bench.build_stages_wasm()
    now = dt.datetime.now()
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "envoy": bench.envoy_version(),
        "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "commit": subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", "filters"], capture_output=True, text=True
        ).stdout.strip(),
    }
    results: dict[str, list[Measured]] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="gateway-instr-") as tmp_name:
        tmp = Path(tmp_name)
        stack.WASM = Path(shutil.copyfile(harness.WASM, tmp / harness.WASM.name))
        bench.PROBE_WASM = Path(shutil.copyfile(bench.PROBE_WASM, tmp / bench.PROBE_WASM.name))
        meta["wasm_bytes"] = stack.WASM.stat().st_size
        # Upstreams run natively; only the proxy under test is under callgrind.
        chat_upstream = start_fast_upstream(tmp, bench.CHAT_RESPONSE)
        sse_upstream = start_sse_upstream(tmp, build_sse_upstream(bench.target_dir() / "gateway-bench"), bench.SSE_EVENTS)
        wrapper = valgrind_wrapper(tmp, opts.cache_sim)
        stack.envoy_binary = lambda: wrapper
        slow_wait = stack.wait_http_ok
        stack.wait_http_ok = lambda url, proc=None, timeout=20.0: slow_wait(url, proc, timeout=300)
        try:
            for scenario in scenarios:
                port = sse_upstream.port if scenario.streaming else chat_upstream.port
                results[scenario.name] = []
                for variant, edit in variants(opts):
                    m = measure(tmp, scenario, port, variant, edit, opts)
                    results[scenario.name].append(m)
                    n = max(1, scenario.requests // (4 if opts.quick else 1))
                    if m.counted is not None and m.counted < n:
                        failed.append(f"{scenario.name}/{variant}: the filter counted {m.counted:.0f} of {n} requests")
                    print(f"{scenario.name:10s} {variant:16s} {m.instructions_per_request:12,.0f} instructions/request",
                          file=sys.stderr, flush=True)
        finally:
            chat_upstream.proc.stop()
            sse_upstream.proc.stop()
    text = render(results, meta, scenarios)
    print(text)
    out = opts.out or (
        bench.target_dir() / "gateway-bench" / f"gateway-instructions-{now:%Y-%m-%d}-quick.md"
        if opts.quick
        else bench.BENCH / "results" / f"gateway-instructions-{now:%Y-%m-%d}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    for problem in failed:
        print(problem, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
