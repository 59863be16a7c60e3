"""The gateway stack for end-to-end suites: real Envoy + the built filter +
llm-sim runtimes, rendered from the shipped `envoy/tokentap.yaml` template.

`start_envoy()` renders the template exactly as `cargo xtask up` does, then
lets a test adjust the parsed YAML (plugin configuration, filter removed, ...)
before Envoy starts, so the shipped configuration is what the tests exercise.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from harness import (
    REPO,
    WASM,
    Proc,
    bin_path,
    envoy_binary,
    free_port,
    next_base_id,
    wait_http_ok,
    wait_until,
    get,
)

ENVOY_DIR = REPO / "envoy"


def stats_config_text() -> str:
    """`envoy/stats-config.yaml` without its comment header."""
    lines = (ENVOY_DIR / "stats-config.yaml").read_text().splitlines()
    return "\n".join(l for l in lines if not l.startswith("#")) + "\n"


def render_template(values: dict[str, object], template: Path = ENVOY_DIR / "tokentap.yaml") -> str:
    text = template.read_text()
    text = text.replace("{{STATS_CONFIG}}", stats_config_text().rstrip("\n"))
    for key, val in values.items():
        text = text.replace("{{" + key + "}}", str(val))
    if "{{" in text:
        start = text.index("{{")
        raise ValueError(f"unfilled placeholder near {text[start:start + 40]!r}")
    return text


def wasm_filter(config: dict) -> dict:
    """The tokentap http_filter entry of a parsed bootstrap."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            return f
    raise KeyError("no wasm filter in config")


def hcm_of(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def plugin_config(config: dict) -> dict:
    return json.loads(wasm_filter(config)["typed_config"]["config"]["configuration"]["value"])


def set_plugin_config(config: dict, plugin: dict) -> None:
    wasm_filter(config)["typed_config"]["config"]["configuration"]["value"] = json.dumps(plugin)


def remove_filter(config: dict) -> None:
    hcm = hcm_of(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.wasm"]


def add_cluster(config: dict, name: str, port: int) -> None:
    config["static_resources"]["clusters"].append(
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
                ],
            },
        }
    )


@dataclass
class Envoy:
    proc: Proc
    listen_port: int
    admin_port: int
    config_path: Path
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stats_prometheus(self) -> str:
        r = get(f"{self.admin}/stats/prometheus")
        assert r.status == 200, r.status
        return r.body.decode()

    def stat(self, name: str) -> int | None:
        """A counter/gauge from `/stats?format=json` by full name (None if absent)."""
        r = get(f"{self.admin}/stats?format=json&filter=^{name}$")
        for s in json.loads(r.body).get("stats", []):
            if s.get("name") == name and "value" in s:
                return int(s["value"])
        return None

    def access_log_entries(self, at_least: int, timeout: float = 10.0) -> list[dict]:
        """JSON access-log entries, once at least `at_least` were written
        (Envoy flushes access logs on a timer), with the filter's summary
        object merged into each entry."""

        def read():
            try:
                lines = self.access_log.read_text().splitlines()
            except FileNotFoundError:
                return None
            entries = [json.loads(l) for l in lines if l.strip()]
            for e in entries:
                # The filter's summary object (filter state `wasm.tokentap`).
                state = e.pop("tokentap", None)
                if state:
                    e.update(json.loads(state))
            return entries if len(entries) >= at_least else None

        return wait_until(read, timeout=timeout, what=f"{at_least} access-log entries")

    def flush_wait(self) -> None:
        """The filter publishes its metrics on its tick (250 ms) and Envoy its
        own histograms at a stats flush (1 s in tests): wait two flushes."""
        import time

        time.sleep(2.2)

    def stop(self) -> None:
        self.proc.stop()


def start_envoy(
    tmp: Path,
    *,
    stable_port: int,
    canary_port: int | None = None,
    rag_port: int | None = None,
    edit: Callable[[dict], None] | None = None,
    concurrency: int = 2,
    name: str = "envoy",
    flush_interval: str = "1s",
    listen_port: int | None = None,
    admin_port: int | None = None,
    log_level: str = "info",
) -> Envoy:
    listen_port = listen_port or free_port()
    admin_port = admin_port or free_port()
    access_log = tmp / f"{name}-access.log"
    text = render_template(
        {
            "LISTEN_PORT": listen_port,
            "ADMIN_PORT": admin_port,
            "STABLE_PORT": stable_port,
            "CANARY_PORT": canary_port or stable_port,
            "RAG_PORT": rag_port or stable_port,
            "WASM_PATH": WASM,
            "ACCESS_LOG": access_log,
            "STATS_FLUSH_INTERVAL": flush_interval,
        }
    )
    config = yaml.safe_load(text)
    if edit is not None:
        edit(config)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = Proc(
        name,
        [
            envoy_binary(),
            "-c",
            path,
            "--concurrency",
            str(concurrency),
            "--base-id",
            str(next_base_id()),
            "--log-level",
            log_level,
            "--component-log-level",
            "wasm:info",
        ],
        tmp / f"{name}.log",
    ).start()
    envoy = Envoy(proc, listen_port, admin_port, path, access_log)
    wait_http_ok(f"{envoy.admin}/ready", proc, timeout=30)
    return envoy


@dataclass
class Sim:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        return get(f"{self.url}/metrics").body.decode()

    def stop(self) -> None:
        self.proc.stop()


def start_sim(tmp: Path, *args: str, name: str = "sim", port: int | None = None, env: dict | None = None) -> Sim:
    port = port or free_port()
    proc = Proc(
        name,
        [bin_path("llm-sim"), "--listen", f"127.0.0.1:{port}", "--model", "mistral-7b", *args],
        tmp / f"{name}.log",
        env=env,
    ).start()
    sim = Sim(proc, port)
    wait_http_ok(f"{sim.url}/health", proc)
    return sim
