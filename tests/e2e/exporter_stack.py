"""Fixtures for gpu-exporter suites (and anyone who needs a fake cluster).

Everything here starts real processes from the workspace build:
- `start_fake_kube_api(log_dir, pods)`: the fake Kubernetes API
  (`tokentap-fakes kube-api`); `update_pods`, `add_pod`, `delete_pod`,
  `expire` and `fail` change it while clients watch;
- `start_fake_kubelet(log_dir, allocations)`: the fake kubelet PodResources
  server on a unix socket (`tokentap-fakes kubelet`); `update` rewrites its
  scenario file, which it re-reads;
- `NvmlScenario`: the scenario file of the fake `libnvidia-ml.so`, rewritten
  atomically so the exporter sees a new state on its next pass;
- `start_exporter(...)`: the real `gpu-exporter` binary wired to all three.

Pods use the fake API's short form, e.g.::

    {"name": "vllm-0", "namespace": "llm", "podIP": "127.0.0.1",
     "labels": {"app.kubernetes.io/part-of": "llm-platform"},
     "annotations": {"prometheus.io/port": "8000"},
     "containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8000}],
                     "containerID": "containerd://<64 hex>"}]}

(`uid` defaults to one derived from namespace/name, `node` to the server's
node, `phase` to Running; full pod objects with `metadata`, and pods in the
serde shape of `tokentap_workload::PodInfo`, are accepted too.)
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from harness import (
    PROFILE,
    REPO,
    TARGET,
    Proc,
    Scrape,
    bin_path,
    free_port,
    get,
    http_request,
    lib_path,
    scrape,
    wait_http_ok,
    wait_until,
)

NODE = "gpu-node-1"

#: The platform's workload labels (README), as pod labels.
WORKLOAD_LABELS = {
    "app.kubernetes.io/name": "vllm-openai",
    "app.kubernetes.io/part-of": "llm-platform",
    "workload.k8sllm.io/model": "mistral-7b",
    "workload.k8sllm.io/route-class": "interactive",
    "workload.k8sllm.io/team": "platform-ai",
}

_READY = re.compile(r"^READY (\S+)$", re.MULTILINE)


def _ready_address(proc: Proc, what: str, timeout: float = 20.0) -> str:
    """The address on the process's READY line; stops it if none comes."""

    def ready():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.logs()}")
        m = _READY.search(proc.logs(tail=50))
        return m.group(1) if m else None

    try:
        return wait_until(ready, timeout=timeout, what=what)
    except BaseException:
        proc.stop()
        raise


def write_json_atomically(path: Path, value: object) -> None:
    """Write via rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------- fake kube API


@dataclass
class FakeKubeApi:
    proc: Proc
    url: str
    # How it was started, so that `restart` can start it again.
    log_dir: Path | None = None
    options: dict = field(default_factory=dict)

    def _admin(self, method: str, path: str, body: object | None = None) -> dict:
        if self.url.startswith("https://"):
            # Admin calls to our own loopback fake; the exporter verifies the CA.
            host, port = self.url[len("https://"):].rsplit(":", 1)
            conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ssl._create_unverified_context())
            data_out = json.dumps(body).encode() if body is not None else None
            try:
                conn.request(method, path, body=data_out, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                status, data = resp.status, resp.read()
            finally:
                conn.close()
        else:
            status, _, data = http_request(method, f"{self.url}{path}", body=body)
        if status != 200:
            raise AssertionError(f"fake kube-api {method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def update_pods(self, pods: Sequence[dict]) -> None:
        """Replace the whole pod set; watchers get the difference as events."""
        self._admin("PUT", "/admin/pods", {"pods": list(pods)})

    def add_pod(self, pod: dict) -> None:
        self._admin("POST", "/admin/pods", pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        self._admin("DELETE", f"/admin/pods/{namespace}/{name}")

    def expire(self) -> None:
        """End every watch with 410 Gone; clients must re-list."""
        self._admin("POST", "/admin/expire")

    def fail(self, count: int) -> None:
        """Answer the next `count` API requests with HTTP 500."""
        self._admin("POST", f"/admin/fail?count={count}")

    def gone(self, count: int) -> None:
        """Answer the next `count` WATCH requests with HTTP 410 on the request itself."""
        self._admin("POST", f"/admin/gone?count={count}")

    def hang(self) -> None:
        """Play a hung server: watches fall silent, API requests get no answer."""
        self._admin("POST", "/admin/hang")

    def resume(self) -> None:
        """End a hang; requests held meanwhile are closed unanswered."""
        self._admin("POST", "/admin/resume")

    def stats(self) -> dict:
        """{"lists", "watches", "unauthorized", "resourceVersion"}."""
        return self._admin("GET", "/admin/stats")

    def restart(self) -> None:
        """Stop and start again on the same address with the current pods,
        continuing the resourceVersion sequence (an API server restarting
        over the same etcd)."""
        pods = self._admin("GET", "/admin/pods")["pods"]
        version = int(self.stats()["resourceVersion"])
        self.proc.stop()
        listen = self.url.split("://", 1)[1]
        # A fresh log name: the old log already holds a READY line.
        options = {**self.options, "name": f"{self.options['name']}-restarted"}
        again = start_fake_kube_api(self.log_dir, pods, listen=listen, resource_version=version, **options)
        self.proc, self.url = again.proc, again.url

    def stop(self) -> None:
        self.proc.stop()


def start_fake_kube_api(
    log_dir: Path,
    pods: Iterable[dict] = (),
    node: str = NODE,
    token: str | None = None,
    tls: tuple[Path, Path] | None = None,
    name: str = "fake-kube-api",
    listen: str = "127.0.0.1:0",
    resource_version: int | None = None,
) -> FakeKubeApi:
    scenario = log_dir / f"{name}-scenario.json"
    write_json_atomically(scenario, {"pods": list(pods)})
    cmd = [bin_path("tokentap-fakes"), "kube-api", "--listen", listen, "--scenario", scenario, "--node", node]
    if resource_version is not None:
        cmd += ["--resource-version", str(resource_version)]
    if token:
        cmd += ["--token", token]
    if tls:
        cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    proc = Proc(name, cmd, log_dir / f"{name}.log").start()
    options = {"node": node, "token": token, "tls": tls, "name": name}
    return FakeKubeApi(proc, _ready_address(proc, f"{name} ready line"), log_dir, options)


def update_pods(api: FakeKubeApi, pods: Sequence[dict]) -> None:
    """Replace the pods a fake API serves (see `FakeKubeApi.update_pods`)."""
    api.update_pods(pods)


# -------------------------------------------------------------- fake kubelet


def allocation(namespace: str, pod: str, container: str, resource: str, *device_ids: str) -> dict:
    """One PodResources entry: a container holding devices of one resource."""
    return {
        "namespace": namespace,
        "name": pod,
        "containers": [{"name": container, "devices": [{"resource_name": resource, "device_ids": list(device_ids)}]}],
    }


@dataclass
class FakeKubelet:
    proc: Proc
    socket: Path
    scenario: Path

    def update(self, pods: Sequence[dict], allocatable: Sequence[dict] = (), fail: str | None = None) -> None:
        write_json_atomically(self.scenario, {"pods": list(pods), "allocatable": list(allocatable), "fail": fail})

    def stop(self) -> None:
        self.proc.stop()


def start_fake_kubelet(
    log_dir: Path,
    pods: Sequence[dict] = (),
    allocatable: Sequence[dict] = (),
    name: str = "fake-kubelet",
) -> FakeKubelet:
    # Unix socket paths are limited to ~107 bytes; pytest tmp paths can be long.
    sock_dir = Path(f"/tmp/tt-kubelet-{os.getpid()}")
    sock_dir.mkdir(exist_ok=True)
    socket = sock_dir / f"{name}-{len(list(sock_dir.iterdir()))}.sock"
    scenario = log_dir / f"{name}-scenario.json"
    kubelet = FakeKubelet(None, socket, scenario)  # type: ignore[arg-type]
    kubelet.update(pods, allocatable)
    cmd = [bin_path("tokentap-fakes"), "kubelet", "--socket", socket, "--scenario", scenario]
    kubelet.proc = Proc(name, cmd, log_dir / f"{name}.log").start()
    _ready_address(kubelet.proc, f"{name} ready line")
    return kubelet


# ----------------------------------------------------------------- fake NVML


def fake_nvml_lib() -> Path:
    return lib_path("libnvidia_ml.so")


def fake_nvml_lib_missing_symbols() -> Path:
    """The fake built with `--features missing-symbols` into its own target
    dir (it lacks nvmlDeviceGetPowerUsage, nvmlDeviceGetTotalEnergyConsumption
    and nvmlEventSetCreate). Built here on first use."""
    target = TARGET / "fake-nvml-missing-symbols"
    lib = target / PROFILE / "libnvidia_ml.so"
    cmd = ["cargo", "build", "-p", "tokentap-fake-nvml", "--features", "missing-symbols", "--target-dir", str(target)]
    if PROFILE == "release":
        cmd.append("--release")
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    if not lib.exists():
        raise FileNotFoundError(lib)
    return lib


@dataclass
class NvmlScenario:
    """The fake NVML's scenario file; `write` swaps it atomically."""

    path: Path
    data: dict = field(default_factory=dict)

    def write(self, data: dict | None = None) -> None:
        if data is not None:
            self.data = data
        write_json_atomically(self.path, self.data)

    def gpu(self, index: int) -> dict:
        return self.data["gpus"][index]


# ------------------------------------------------------------------ exporter


@dataclass
class Exporter:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scrape(self, headers: Mapping[str, str] | None = None) -> Scrape:
        return scrape(f"{self.url}/metrics", headers=headers)

    def collections(self) -> float:
        return self.scrape().value("llm_gpu_exporter_collections_total")

    def scrape_when(self, predicate, timeout: float = 15.0, what: str = "condition") -> Scrape:
        """Scrape until `predicate(scrape)` is truthy; return that scrape."""

        def attempt():
            if not self.proc.alive():
                raise RuntimeError(f"gpu-exporter exited:\n{self.proc.logs()}")
            s = self.scrape()
            return s if predicate(s) else None

        return wait_until(attempt, timeout=timeout, what=what)

    def next_pass(self, timeout: float = 15.0) -> Scrape:
        """A scrape taken after at least one full pass that started now."""
        start = self.collections()
        return self.scrape_when(lambda s: s.value("llm_gpu_exporter_collections_total") >= start + 2, timeout, "two more passes")

    def stop(self) -> int | None:
        return self.proc.stop()


def start_exporter(
    log_dir: Path,
    *,
    scenario: NvmlScenario | None = None,
    nvml_lib: Path | str | None = None,
    kubelet: FakeKubelet | None = None,
    kube_api: FakeKubeApi | str | None = None,
    kube_token_file: Path | None = None,
    kube_ca_file: Path | None = None,
    node: str = NODE,
    interval: str = "200ms",
    host_proc: Path | str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "gpu-exporter",
    wait_first_pass: bool = True,
    runtime: bool = False,
    runtime_interval: str = "300ms",
) -> Exporter:
    """Run `gpu-exporter` against the fakes; waits for /healthz and a pass.

    Runtime scraping is off unless `runtime=True`, so pods with made-up IPs
    are never dialled."""
    port = free_port()
    lib = nvml_lib if nvml_lib is not None else fake_nvml_lib()
    kube_url = kube_api.url if isinstance(kube_api, FakeKubeApi) else (kube_api or "none")
    cmd = [
        bin_path("gpu-exporter"),
        "--listen", f"127.0.0.1:{port}",
        "--node-name", node,
        "--collect-interval", interval,
        "--nvml-lib", str(lib),
        "--kubelet-socket", str(kubelet.socket) if kubelet else "",
        "--kube-api-url", kube_url,
        "--kube-token-file", str(kube_token_file) if kube_token_file else "",
        "--kube-ca-file", str(kube_ca_file) if kube_ca_file else "",
        "--host-proc", str(host_proc) if host_proc is not None else "",
        "--nvml-retry-interval", "1s",
        "--runtime-scrape-interval", runtime_interval,
        *([] if runtime else ["--runtime-disable"]),
        *args,
    ]
    full_env = {"RUST_LOG": "info,tokentap_gpu_exporter=debug", "RUST_BACKTRACE": "1"}
    if scenario is not None:
        full_env["FAKE_NVML_SCENARIO"] = str(scenario.path)
    full_env.update(env or {})
    proc = Proc(name, cmd, log_dir / f"{name}.log", env=full_env).start()
    exporter = Exporter(proc, port)
    try:
        wait_http_ok(f"{exporter.url}/healthz", proc=proc)
        if wait_first_pass:
            exporter.scrape_when(lambda s: s.value("llm_gpu_exporter_collections_total") >= 1, what="first pass")
    except BaseException:
        proc.stop()
        raise
    return exporter


def metrics_raw(exporter: Exporter, accept: str | None = None):
    """(status, headers, body) of /metrics with an optional Accept header."""
    return http_request("GET", f"{exporter.url}/metrics", headers={"accept": accept} if accept else None, timeout=10)


__all__ = [
    "NODE",
    "WORKLOAD_LABELS",
    "Exporter",
    "FakeKubeApi",
    "FakeKubelet",
    "NvmlScenario",
    "allocation",
    "fake_nvml_lib",
    "fake_nvml_lib_missing_symbols",
    "get",
    "metrics_raw",
    "start_exporter",
    "start_fake_kube_api",
    "start_fake_kubelet",
    "update_pods",
    "write_json_atomically",
]
