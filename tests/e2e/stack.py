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
    MODULE,
    REPO,
    SHELL,
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


WASM_FILTER = "envoy.filters.http.wasm"
MODULE_FILTER = "envoy.filters.http.dynamic_modules"
#: The module's stats namespace; registered as a custom stat namespace (the
#: runtime flag below) so /stats/prometheus prints the Wasm build's names.
MODULE_METRICS_NAMESPACE = "tokentap"
STRIP_NAMESPACE_FLAG = "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix"


def hcm_of(config: dict) -> dict:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def tokentap_filter(config: dict) -> dict:
    """The tokentap http_filter entry of a parsed bootstrap, whichever shell."""
    for f in hcm_of(config)["http_filters"]:
        if f["name"] in (WASM_FILTER, MODULE_FILTER):
            return f
    raise KeyError("no tokentap filter in config")


def wasm_filter(config: dict) -> dict:
    """The Wasm http_filter entry of a parsed bootstrap."""
    f = tokentap_filter(config)
    if f["name"] != WASM_FILTER:
        raise KeyError("no wasm filter in config")
    return f


def _plugin_value(config: dict) -> dict:
    """The StringValue holding the plugin JSON, in either shell."""
    f = tokentap_filter(config)["typed_config"]
    return f["filter_config"] if "filter_config" in f else f["config"]["configuration"]


def plugin_config(config: dict) -> dict:
    return json.loads(_plugin_value(config)["value"])


def set_plugin_config(config: dict, plugin: dict) -> None:
    _plugin_value(config)["value"] = json.dumps(plugin)


def remove_filter(config: dict) -> None:
    hcm = hcm_of(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in (WASM_FILTER, MODULE_FILTER)]


def module_filter(plugin_json: str, filter_name: str = "tokentap", module_path: Path | None = None) -> dict:
    """The dynamic-module http_filter entry for a plugin configuration."""
    path = module_path or MODULE
    name = path.name.removeprefix("lib").removesuffix(".so")
    return {
        "name": MODULE_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": name, "do_not_close": True, "metrics_namespace": MODULE_METRICS_NAMESPACE},
            "filter_name": filter_name,
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_json},
        },
    }


def use_module(config: dict, module_path: Path | None = None, filter_name: str = "tokentap") -> None:
    """Turns a bootstrap rendered for the Wasm filter into one that runs the
    dynamic module with the same plugin configuration: the filter entry, the
    per-route switches that name it, and the runtime flag that keeps the
    metric names bare (`llm_gateway_*`, as the Wasm build prints them)."""
    hcm = hcm_of(config)
    for i, f in enumerate(hcm["http_filters"]):
        if f["name"] == WASM_FILTER:
            plugin = f["typed_config"]["config"]["configuration"]["value"]
            hcm["http_filters"][i] = module_filter(plugin, filter_name, module_path)
    for vh in hcm.get("route_config", {}).get("virtual_hosts", []):
        for route in vh.get("routes", []):
            per = route.get("typed_per_filter_config", {})
            if WASM_FILTER in per:
                per[MODULE_FILTER] = per.pop(WASM_FILTER)
    layers = config.setdefault("layered_runtime", {}).setdefault("layers", [])
    static = next((l for l in layers if "static_layer" in l), None)
    if static is None:
        static = {"name": "static", "static_layer": {}}
        layers.insert(0, static)
    static["static_layer"][STRIP_NAMESPACE_FLAG] = True


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
    shell: str = "wasm"

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
    shell: str | None = None,
    envoy_bin: Path | None = None,
    module_path: Path | None = None,
) -> Envoy:
    """Renders the shipped template and starts Envoy with the tokentap filter
    in `shell` (`wasm` or `module`; default: `TOKENTAP_SHELL`, else wasm)."""
    shell = shell or SHELL
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
    module = module_path or MODULE
    if shell == "module":
        use_module(config, module)
    elif shell != "wasm":
        raise ValueError(f"unknown shell {shell!r} (wasm or module)")
    if edit is not None:
        edit(config)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = Proc(
        name,
        [
            envoy_bin or envoy_binary(),
            "-c",
            path,
            "--concurrency",
            str(concurrency),
            "--base-id",
            str(next_base_id()),
            "--log-level",
            log_level,
            "--component-log-level",
            "wasm:info,dynamic_modules:info",
        ],
        tmp / f"{name}.log",
        env=_envoy_env(config, module, shell),
    ).start()
    envoy = Envoy(proc, listen_port, admin_port, path, access_log)
    envoy.shell = shell
    wait_http_ok(f"{envoy.admin}/ready", proc, timeout=30)
    return envoy


def _envoy_env(config: dict, module: Path, shell: str) -> dict[str, str]:
    """Envoy's environment. The module cannot read Envoy's node metadata, so
    for it the pod's identity comes from the environment, as Kubernetes'
    Downward API gives it (`POD_NAME`, `POD_NAMESPACE`); the Wasm filter
    reads the same values from node metadata (`NAME`, `NAMESPACE`)."""
    env = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module.parent)}
    if shell == "module":
        meta = config.get("node", {}).get("metadata", {})
        for key, var in (("NAME", "POD_NAME"), ("NAMESPACE", "POD_NAMESPACE")):
            if key in meta:
                env[var] = str(meta[key])
    return env


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
