#!/usr/bin/env python3
"""Gateway memory soak: Envoy RSS with the tokentap filter over N requests.

One proxy (`--concurrency 1`, the shipped config with the filter, in the
Wasm shell or, with `--shell module`, as the dynamic module) in front of a
`direct_response` Envoy, driven by wrk in segments sized from the measured
rate so that each ends near the next multiple of `--requests / --segments`
(100,000 by default); after each segment the proxy's RSS is sampled. The
report gives RSS after a warm-up and after every segment, and the spread
after warm-up (flat = the spread stays within `--flat-mib`). The tenant
header cycles over 8 values (bounded labels), as in `bench/gateway.py`.

Usage:
  python bench/gateway_soak.py                      # 1,000,000 requests, Wasm filter (~4-6 min)
  python bench/gateway_soak.py --shell module       # the same through the dynamic module
  python bench/gateway_soak.py --requests 200000    # shorter

Exit status: 0 when every segment completed without errors, the filter
counted every request, and RSS stayed flat; 1 otherwise; 2 when a
prerequisite is missing. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import gateway as bench  # re-executes under the e2e venv when needed
from gateway_load import Target, run_wrk, start_fast_upstream

import harness
import stack

MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000, help="total requests after warm-up")
    p.add_argument("--segments", type=int, default=10, help="RSS samples over the run")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--flat-mib", type=float, default=2.0, help="largest RSS spread after warm-up still called flat")
    p.add_argument("--shell", choices=("wasm", "module"), default="wasm", help="the filter's shell (default wasm)")
    p.add_argument("--out", type=Path, help="Markdown report (default: stdout only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found (Debian package `wrk`)", file=sys.stderr)
        return 2
    artifact = bench.MODULE if opts.shell == "module" else harness.WASM
    if not artifact.exists():
        how = (
            "cargo build -p tokentap-module --profile module"
            if opts.shell == "module"
            else "cargo build -p tokentap-filter --target wasm32-wasip1 --release"
        )
        print(f"{artifact} missing: {how}", file=sys.stderr)
        return 2
    rows: list[tuple[str, int, float]] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp_name:
        tmp = Path(tmp_name)
        # The build under test, copied: a rebuild during the soak changes nothing.
        if opts.shell == "module":
            (tmp / "module").mkdir()
            stack.MODULE = Path(shutil.copyfile(artifact, tmp / "module" / artifact.name))
        else:
            stack.WASM = Path(shutil.copyfile(artifact, tmp / artifact.name))
        build = bench.build_meta(tmp / "module" / artifact.name if opts.shell == "module" else tmp / artifact.name)
        body = tmp / "chat.json"
        body.write_text(bench.json.dumps(bench.CHAT_BODY))
        upstream = start_fast_upstream(tmp, bench.CHAT_RESPONSE)
        envoy = stack.start_envoy(
            tmp,
            stable_port=upstream.port,
            edit=bench.proxy_edit(True),
            concurrency=1,
            name="soak",
            log_level="warning",
            shell=opts.shell,
        )
        try:
            target = Target("soak", envoy.url, bench.LLM_PATH, body, envoy.proc.pid, upstream.proc.pid)
            warm = run_wrk(target, opts.connections, 5, -1)
            rows.append(("warm-up", warm.requests, envoy.proc.rss_bytes() / MIB))
            done = 0
            per_segment = opts.requests / opts.segments
            rps = max(warm.rps, 1.0)
            while done < opts.requests:
                # Aim at the next mark (a multiple of per_segment) from the
                # rate measured so far; a segment that ended within 5 % short
                # of its mark counts as having reached it.
                mark = min(opts.requests, (int((done + 0.05 * per_segment) // per_segment) + 1) * per_segment)
                seconds = max(1, round((mark - done) / rps))
                run = run_wrk(target, opts.connections, seconds, 0)
                done += run.requests
                rps = max(run.rps, 1.0)
                if run.errors:
                    problems.append(f"{run.errors} request errors after {done:,} requests")
                rows.append((f"{done:,} (mark {mark:,.0f})", run.requests, envoy.proc.rss_bytes() / MIB))
            envoy.flush_wait()
            counted = harness.parse_exposition(envoy.stats_prometheus()).value("llm_gateway_requests_total")
            total = warm.requests + done
            if counted < total:
                problems.append(f"the filter counted {counted:,.0f} of {total:,} requests")
        finally:
            envoy.stop()
            upstream.proc.stop()
    after_warmup = [r[2] for r in rows]
    spread = max(after_warmup) - min(after_warmup)
    if spread > opts.flat_mib:
        problems.append(f"RSS spread {spread:.1f} MiB > {opts.flat_mib} MiB")
    lines = [
        f"# Gateway memory soak: {done:,} requests after warm-up",
        "",
        f"Envoy `--concurrency 1` with the filter as the "
        f"{'dynamic module (`libtokentap_module.so`' if opts.shell == 'module' else 'Wasm filter (`tokentap_filter.wasm`'}, "
        f"{build['bytes']:,} bytes, sha256 {build['sha256']}…), chat requests over {opts.connections} connections, "
        f"8 tenants. RSS spread from warm-up to the end: {spread:.2f} MiB ({'flat' if spread <= opts.flat_mib else 'NOT flat'}).",
        "",
        "| after | requests in segment | Envoy RSS MiB |",
        "|---|---|---|",
        *[f"| {name} | {n:,} | {rss:.1f} |" for name, n, rss in rows],
        "",
        *[f"- **PROBLEM: {p}**" for p in problems],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        opts.out.write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
