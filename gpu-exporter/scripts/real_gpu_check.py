#!/usr/bin/env python3
"""Compare a running gpu-exporter with nvidia-smi and nvidia-ml-py.

Called by real-gpu-check.sh with the exporter's URL. Waits for a fresh
collection pass, reads every GPU through nvidia-smi (one query per field, so
a field an old driver lacks only skips that field) and, when `pynvml`
(package nvidia-ml-py) imports, through NVML directly, then checks each
exported value against them:

- identity (UUID, name, PCI bus id, serial, driver version), memory total,
  ECC and PCIe replay counters, MIG instances: exact;
- values that move between two reads (utilization, memory used, power,
  temperature, clocks, energy): within a tolerance stated in the table.

Only the standard library is required; `prometheus_client` and `pynvml` are
used when present.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

MIB = 1024 * 1024


# --------------------------------------------------------------- exporter


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        ctype = resp.headers.get("content-type", "")
        if not ctype.startswith("text/plain"):
            raise RuntimeError(f"unexpected content-type {ctype!r}")
        return resp.read().decode()


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a text exposition: the reference parser when installed,
    otherwise a small one that is enough for the exporter's own output."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        out = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if not m:
                raise ValueError(f"cannot parse {line!r}")
            labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m.group(2) or "")}
            out.append((m.group(1), labels, float(m.group(3))))
        return out
    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


class Scrape:
    def __init__(self, text: str):
        self.samples = parse(text)

    def get(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        return [(l, v) for n, l, v in self.samples if n == name and all(l.get(k) == v2 for k, v2 in match.items())]

    def value(self, name: str, **match: str) -> float | None:
        found = self.get(name, **match)
        return found[0][1] if found else None


def fresh_scrape(base: str, timeout: float = 30.0) -> Scrape:
    """A scrape taken right after a new collection pass."""
    deadline = time.monotonic() + timeout
    first = Scrape(fetch(f"{base}/metrics")).value("llm_gpu_exporter_collections_total") or 0
    while time.monotonic() < deadline:
        s = Scrape(fetch(f"{base}/metrics"))
        if (s.value("llm_gpu_exporter_collections_total") or 0) > first:
            return s
        time.sleep(0.05)
    raise TimeoutError("no collection pass completed")


# --------------------------------------------------------------- sources

SMI_FIELDS = [
    "uuid", "name", "pci.bus_id", "serial", "driver_version", "utilization.gpu", "utilization.memory",
    "memory.total", "memory.used", "memory.free", "memory.reserved", "temperature.gpu", "power.draw",
    "enforced.power.limit", "clocks.sm", "clocks.mem", "ecc.errors.corrected.volatile.total",
    "ecc.errors.uncorrected.volatile.total", "mig.mode.current", "clocks_event_reasons.active",
    "clocks_throttle_reasons.active",
]


def smi() -> dict[str, dict[str, str]]:
    """nvidia-smi values per GPU index, one query per field."""
    out: dict[str, dict[str, str]] = {}
    for field in SMI_FIELDS:
        r = subprocess.run(["nvidia-smi", f"--query-gpu=index,{field}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            continue  # field unknown to this driver
        for line in r.stdout.strip().splitlines():
            index, _, value = line.partition(",")
            out.setdefault(index.strip(), {})[field] = value.strip()
    return out


def smi_mig_uuids() -> set[str]:
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"UUID: (MIG-[0-9a-fA-F-]+)", r.stdout))


def nvml_values() -> dict[str, dict[str, object]] | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    pynvml.nvmlInit()
    out: dict[str, dict[str, object]] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            v: dict[str, object] = {}

            def put(key, fn):
                try:
                    v[key] = fn()
                except pynvml.NVMLError:
                    pass

            put("uuid", lambda: _s(pynvml.nvmlDeviceGetUUID(h)))
            put("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2))
            put("energy_mj", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
            put("pcie_replays", lambda: pynvml.nvmlDeviceGetPcieReplayCounter(h))
            put("throttle", lambda: pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))
            put("power_mw", lambda: pynvml.nvmlDeviceGetPowerUsage(h))
            put("processes", lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h))
            out[str(i)] = v
    finally:
        pynvml.nvmlShutdown()
    return out


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def num(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "", "[N/A]", "N/A", "[Not Supported]") else None
    except ValueError:
        return None


# ------------------------------------------------------------------ checks


@dataclass
class Row:
    gpu: str
    field: str
    exporter: object
    reference: object
    source: str
    tolerance: str
    ok: bool


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--markdown")
    args = ap.parse_args()

    s = fresh_scrape(args.url)
    ref = smi()
    nv = nvml_values()
    rows: list[Row] = []

    def check(gpu, field, exp, want, source, tol_text, ok):
        rows.append(Row(gpu, field, exp, want, source, tol_text, bool(ok)))

    def close(gpu, field, exp, want, source, abs_tol=0.0, rel_tol=0.0):
        if want is None:
            return
        if exp is None:
            check(gpu, field, None, want, source, "present", False)
            return
        tol = max(abs_tol, rel_tol * abs(want))
        check(gpu, field, exp, want, source, f"±{tol:g}", abs(exp - want) <= tol)

    nvml_up = s.value("llm_gpu_exporter_nvml_up")
    check("-", "llm_gpu_exporter_nvml_up", nvml_up, 1, "-", "exact", nvml_up == 1)
    check("-", "GPU count", len(s.get("llm_gpu_info")), len(ref), "nvidia-smi", "exact", len(s.get("llm_gpu_info")) == len(ref))
    xid = s.value("llm_gpu_exporter_collector_success", collector="xid_events")
    check("-", "XID event thread", xid, 1, "-", "exact", xid == 1)
    driver = next(iter(ref.values()), {}).get("driver_version")

    for index, r in sorted(ref.items(), key=lambda kv: int(kv[0])):
        uuid = r.get("uuid", "")
        g = dict(gpu=index, gpu_uuid=uuid)
        info = s.get("llm_gpu_info", **g)
        labels = info[0][0] if info else {}
        check(index, "gpu_uuid", uuid if info else None, uuid, "nvidia-smi", "exact", bool(info))
        for label, field in (("gpu_model", "name"), ("pci_bus_id", "pci.bus_id"), ("serial", "serial"),
                             ("driver_version", "driver_version")):
            want = r.get(field)
            if want and want not in ("[N/A]", "N/A"):
                got = labels.get(label)
                check(index, label, got, want, "nvidia-smi", "exact",
                      got is not None and got.lower() == want.lower())
        check(index, "llm_gpu_up", s.value("llm_gpu_up", **g), 1, "-", "exact", s.value("llm_gpu_up", **g) == 1)

        mig_on = r.get("mig.mode.current", "").lower() == "enabled"
        if not mig_on:
            u = s.value("llm_gpu_utilization_ratio", **g)
            close(index, "utilization.gpu", u * 100 if u is not None else None, num(r.get("utilization.gpu")), "nvidia-smi", abs_tol=15)
            m = s.value("llm_gpu_memory_utilization_ratio", **g)
            close(index, "utilization.memory", m * 100 if m is not None else None, num(r.get("utilization.memory")), "nvidia-smi", abs_tol=15)
        for metric, field in (("llm_gpu_memory_total_bytes", "memory.total"),):
            v = s.value(metric, **g)
            close(index, field + " (MiB)", v / MIB if v is not None else None, num(r.get(field)), "nvidia-smi", abs_tol=1)
        for metric, field in (("llm_gpu_memory_used_bytes", "memory.used"), ("llm_gpu_memory_free_bytes", "memory.free"),
                              ("llm_gpu_memory_reserved_bytes", "memory.reserved")):
            v = s.value(metric, **g)
            close(index, field + " (MiB)", v / MIB if v is not None else None, num(r.get(field)), "nvidia-smi", abs_tol=64)
        close(index, "temperature.gpu", s.value("llm_gpu_temperature_celsius", **g), num(r.get("temperature.gpu")), "nvidia-smi", abs_tol=3)
        close(index, "power.draw (W)", s.value("llm_gpu_power_usage_watts", **g), num(r.get("power.draw")), "nvidia-smi", abs_tol=15, rel_tol=0.10)
        close(index, "enforced.power.limit (W)", s.value("llm_gpu_power_limit_watts", **g), num(r.get("enforced.power.limit")), "nvidia-smi", abs_tol=0.5)
        sm = s.value("llm_gpu_sm_clock_hertz", **g)
        close(index, "clocks.sm (MHz)", sm / 1e6 if sm is not None else None, num(r.get("clocks.sm")), "nvidia-smi", abs_tol=50, rel_tol=0.15)
        mem = s.value("llm_gpu_memory_clock_hertz", **g)
        close(index, "clocks.mem (MHz)", mem / 1e6 if mem is not None else None, num(r.get("clocks.mem")), "nvidia-smi", abs_tol=50, rel_tol=0.15)
        for error_type, field in (("corrected", "ecc.errors.corrected.volatile.total"),
                                  ("uncorrected", "ecc.errors.uncorrected.volatile.total")):
            want = num(r.get(field))
            got = s.value("llm_gpu_ecc_errors_total", **g, error_type=error_type)
            if want is None:
                check(index, field, got, "absent (ECC off or unsupported)", "nvidia-smi", "absent", got is None)
            else:
                close(index, field, got, want, "nvidia-smi")
        reasons_hex = r.get("clocks_event_reasons.active") or r.get("clocks_throttle_reasons.active")
        if reasons_hex and reasons_hex.startswith("0x"):
            want_bits = int(reasons_hex, 16)
            active = {l["reason"] for l, v in s.get("llm_gpu_throttle_reason_active", **g) if v == 1}
            names = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                     0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                     0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
            want_names = {n for b, n in names.items() if want_bits & b}
            # Throttle state can change between reads; gpu_idle is the usual flip.
            check(index, "throttle reasons", sorted(active), sorted(want_names), "nvidia-smi", "same set (idle may flip)",
                  active - {"gpu_idle"} == want_names - {"gpu_idle"})

        if nv and index in nv:
            v = nv[index]
            if "memory" in v:
                close(index, "memory total (bytes)", s.value("llm_gpu_memory_total_bytes", **g), float(v["memory"].total), "pynvml")
                close(index, "memory reserved (bytes)", s.value("llm_gpu_memory_reserved_bytes", **g), float(v["memory"].reserved), "pynvml", abs_tol=64 * MIB)
            if "energy_mj" in v:
                got = s.value("llm_gpu_energy_consumption_joules_total", **g)
                want = v["energy_mj"] / 1000
                # Read after the exporter's pass: never smaller, at most a few seconds of full power more.
                ok = got is not None and 0 <= want - got <= 5 * 1000
                check(index, "energy (J)", got, want, "pynvml", "0 ≤ pynvml−exporter ≤ 5 kJ", ok)
            if "pcie_replays" in v:
                close(index, "pcie replays", s.value("llm_gpu_pcie_replays_total", **g), float(v["pcie_replays"]), "pynvml")
            if "processes" in v:
                got = sum(val for _, val in s.get("llm_gpu_container_processes", **g))
                check(index, "compute processes", got, len(v["processes"]), "pynvml", "exact (may change)", got == len(v["processes"]))

    migs = smi_mig_uuids()
    if migs:
        exported = {l["mig_uuid"] for l, _ in s.get("llm_gpu_mig_info")}
        check("-", "MIG instances", sorted(exported), sorted(migs), "nvidia-smi -L", "same set", exported == migs)

    errors = {f'{l["collector"]}/{l["kind"]}': v for l, v in s.get("llm_gpu_exporter_errors_total")}
    lines = [
        f"Driver {driver or '?'}; {len(ref)} GPU(s): " + ", ".join(sorted({r.get('name', '?') for r in ref.values()})),
        f"pynvml: {'used' if nv is not None else 'not installed (pip install nvidia-ml-py)'}",
        f"exporter errors_total: {json.dumps(errors) if errors else 'none'}",
        "",
        "| GPU | field | exporter | reference | source | tolerance | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.gpu} | {row.field} | {row.exporter} | {row.reference} | {row.source} | {row.tolerance} | "
                     f"{'ok' if row.ok else '**MISMATCH**'} |")
    failed = [r for r in rows if not r.ok]
    lines.append("")
    lines.append(f"{len(rows) - len(failed)}/{len(rows)} checks passed.")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi not found", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
