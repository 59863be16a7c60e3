"""End-to-end: the real `gpu-exporter` binary against the fake NVML library
(loaded through nvml-wrapper's `lib_path`), the fake kubelet PodResources
server and the fake Kubernetes API. Every scrape is parsed by the reference
`prometheus_client` parser; expected values come from the scenario given to
the fakes, converted to base units here.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from exporter_stack import (
    NODE,
    WORKLOAD_LABELS,
    NvmlScenario,
    allocation,
    fake_nvml_lib_missing_symbols,
    get,
    metrics_raw,
    start_exporter,
    start_fake_kube_api,
    start_fake_kubelet,
)
from harness import wait_until
from runtime_stack import start_sim

GIB = 1 << 30
MIB = 1 << 20

G0 = "GPU-6a1f0c9e-1b2d-4e3f-8a4b-5c6d7e8f9001"
G1 = "GPU-6a1f0c9e-1b2d-4e3f-8a4b-5c6d7e8f9002"
G2 = "GPU-6a1f0c9e-1b2d-4e3f-8a4b-5c6d7e8f9003"
G3 = "GPU-6a1f0c9e-1b2d-4e3f-8a4b-5c6d7e8f9004"
MIG_A = "MIG-0b1c2d3e-4f50-4162-8374-8596a7b8c901"
MIG_B = "MIG-0b1c2d3e-4f50-4162-8374-8596a7b8c902"

MISTRAL_UID = "7d0c6d4a-3f1e-4b8a-9c2d-1e0f2a3b4c5d"
VLLM_CID = "a" * 64
SYSTEM_PID = 999
VLLM_PID = 4242


def gpu0() -> dict:
    """An H100 serving mistral-7b, every reading set to a distinct value."""
    return {
        "uuid": G0,
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:17:00.0",
        "serial": "1650923012345",
        "minor_number": 0,
        "utilization_gpu_percent": 87,
        "utilization_memory_percent": 41,
        "memory_total_bytes": 80 * GIB,
        "memory_used_bytes": 61 * GIB + 12345,
        "memory_reserved_bytes": 512 * MIB,
        "temperature_celsius": 63,
        "power_usage_milliwatts": 512345,
        "power_limit_milliwatts": 700000,
        "energy_millijoules": 987654321,
        "sm_clock_mhz": 1755,
        "memory_clock_mhz": 2619,
        "throttle_reasons": 0x4 | 0x20,
        "ecc_corrected_volatile": 12,
        "ecc_uncorrected_volatile": 1,
        "pcie_replays": 3,
        "processes": [
            {"pid": VLLM_PID, "used_memory_bytes": 60 * GIB},
            {"pid": SYSTEM_PID, "used_memory_bytes": 300 * MIB},
        ],
    }


def scenario_data() -> dict:
    return {
        "driver_version": "550.54.15",
        "cuda_driver_version": 12040,
        "gpus": [
            gpu0(),
            # Time-sliced between two pods.
            {"uuid": G1, "minor_number": 1, "utilization_gpu_percent": 55, "memory_used_bytes": 20 * GIB,
             "temperature_celsius": 58, "power_usage_milliwatts": 300000},
            # MIG-enabled A100 with two instances.
            {"uuid": G2, "name": "NVIDIA A100-SXM4-40GB", "minor_number": 2, "memory_total_bytes": 40 * GIB,
             "mig": [
                 {"uuid": MIG_A, "name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "gpu_instance_id": 7,
                  "compute_instance_id": 0, "memory_total_bytes": 5 * GIB, "memory_used_bytes": 3 * GIB},
                 {"uuid": MIG_B, "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "gpu_instance_id": 1,
                  "compute_instance_id": 0, "memory_total_bytes": 20 * GIB, "memory_used_bytes": 1 * GIB},
             ]},
            # Nobody holds this one.
            {"uuid": G3, "minor_number": 3, "utilization_gpu_percent": 0, "temperature_celsius": 35},
        ],
    }


def k8s_pods() -> list[dict]:
    small = {**WORKLOAD_LABELS, "workload.k8sllm.io/model": "qwen-1.5b", "workload.k8sllm.io/route-class": "batch"}
    return [
        {"name": "vllm-mistral-0", "namespace": "llm", "uid": MISTRAL_UID, "labels": dict(WORKLOAD_LABELS),
         "containers": [{"name": "vllm", "containerID": f"containerd://{VLLM_CID}"}, {"name": "proxy"}]},
        {"name": "vllm-small-0", "namespace": "llm", "labels": small, "containers": [{"name": "vllm"}]},
        {"name": "vllm-small-1", "namespace": "llm", "labels": {**small, "workload.k8sllm.io/team": "search"},
         "containers": [{"name": "vllm"}]},
        {"name": "trainer-0", "namespace": "batch",
         "labels": {"workload.k8sllm.io/model": "llama-3-8b", "workload.k8sllm.io/team": "research"},
         "containers": [{"name": "trainer"}]},
        # Not a GPU pod: present so pod count and label lookups see more than GPU holders.
        {"name": "coredns-1", "namespace": "kube-system", "containers": [{"name": "coredns"}]},
    ]


def kubelet_allocations() -> list[dict]:
    return [
        allocation("llm", "vllm-mistral-0", "vllm", "nvidia.com/gpu", G0),
        allocation("llm", "vllm-small-0", "vllm", "nvidia.com/gpu", f"{G1}::0"),
        allocation("llm", "vllm-small-1", "vllm", "nvidia.com/gpu", f"{G1}::1"),
        allocation("batch", "trainer-0", "trainer", "nvidia.com/mig-1g.5gb", MIG_A),
    ]


ALLOCATABLE = [
    {"resource_name": "nvidia.com/gpu", "device_ids": [G0, f"{G1}::0", f"{G1}::1", f"{G1}::2", G3]},
    {"resource_name": "nvidia.com/mig-1g.5gb", "device_ids": [MIG_A]},
    {"resource_name": "nvidia.com/mig-3g.20gb", "device_ids": [MIG_B]},
]


def fake_proc(root: Path) -> Path:
    """A host /proc with the vLLM process in the mistral pod and one system process."""
    (root / "1").mkdir(parents=True, exist_ok=True)
    (root / "1" / "cgroup").write_text("0::/init.scope\n")
    uid = MISTRAL_UID.replace("-", "_")
    (root / str(VLLM_PID)).mkdir(exist_ok=True)
    (root / str(VLLM_PID) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{VLLM_CID}.scope\n"
    )
    (root / str(SYSTEM_PID)).mkdir(exist_ok=True)
    (root / str(SYSTEM_PID) / "cgroup").write_text("0::/system.slice/nvidia-persistenced.service\n")
    return root


def labels(gpu: str, uuid: str, namespace="", pod="", container="", model="unknown", route_class="unknown",
           team="unknown", **extra) -> dict:
    return {"gpu": gpu, "gpu_uuid": uuid, "namespace": namespace, "pod": pod, "container": container,
            "model": model, "route_class": route_class, "team": team, **extra}


MISTRAL = dict(namespace="llm", pod="vllm-mistral-0", container="vllm", model="mistral-7b",
               route_class="interactive", team="platform-ai")


@pytest.fixture
def cluster(logdir):
    """Fake NVML scenario + kubelet + Kubernetes API, no exporter yet."""
    scenario = NvmlScenario(logdir / "nvml.json")
    scenario.write(scenario_data())
    procs = []
    try:
        kube = start_fake_kube_api(logdir, k8s_pods())
        procs.append(kube)
        kubelet = start_fake_kubelet(logdir, kubelet_allocations(), ALLOCATABLE)
        procs.append(kubelet)
        yield scenario, kube, kubelet, logdir
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def stack(cluster):
    scenario, kube, kubelet, logdir = cluster
    exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube,
                              host_proc=fake_proc(logdir / "proc"))
    try:
        # Wait until attribution is complete (pod watch synced, kubelet answered).
        exporter.scrape_when(
            lambda s: s.series("llm_gpu_up", pod="vllm-mistral-0", model="mistral-7b"), what="attributed GPU 0")
        yield scenario, kube, kubelet, exporter
    finally:
        exporter.stop()


def test_exact_values_with_pod_and_workload_labels(stack):
    scenario, _, _, exporter = stack
    status, headers, _ = metrics_raw(exporter)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    # The XID thread registers its event set shortly after NVML loads.
    s = exporter.scrape_when(
        lambda s: s.value("llm_gpu_exporter_collector_success", collector="xid_events") == 1, what="XID thread up")
    g0 = scenario.gpu(0)
    L0 = labels("0", G0, **MISTRAL)

    expected = {
        "llm_gpu_up": 1,
        "llm_gpu_utilization_ratio": 0.87,
        "llm_gpu_memory_utilization_ratio": 0.41,
        "llm_gpu_memory_total_bytes": 80 * GIB,
        "llm_gpu_memory_used_bytes": g0["memory_used_bytes"],
        "llm_gpu_memory_reserved_bytes": 512 * MIB,
        "llm_gpu_memory_free_bytes": 80 * GIB - g0["memory_used_bytes"] - 512 * MIB,
        "llm_gpu_temperature_celsius": 63,
        "llm_gpu_power_usage_watts": 512.345,
        "llm_gpu_power_limit_watts": 700.0,
        "llm_gpu_energy_consumption_joules_total": 987654.321,
        "llm_gpu_sm_clock_hertz": 1755e6,
        "llm_gpu_memory_clock_hertz": 2619e6,
        "llm_gpu_pcie_replays_total": 3,
    }
    for name, value in expected.items():
        assert s.one(name, **L0).value == pytest.approx(value, rel=1e-12), name
    assert s.one("llm_gpu_ecc_errors_total", **L0, error_type="corrected").value == 12
    assert s.one("llm_gpu_ecc_errors_total", **L0, error_type="uncorrected").value == 1
    active = {x.labels["reason"]: x.value for x in s.series("llm_gpu_throttle_reason_active", gpu_uuid=G0)}
    assert len(active) == 9
    assert {r for r, v in active.items() if v == 1} == {"sw_power_cap", "sw_thermal_slowdown"}
    assert s.type_of("llm_gpu_energy_consumption_joules") == "counter"

    # Identity only on the info series.
    info = s.one("llm_gpu_info", gpu="0", gpu_uuid=G0, gpu_model="NVIDIA H100 80GB HBM3",
                 pci_bus_id="00000000:17:00.0", serial="1650923012345", driver_version="550.54.15",
                 cuda_version="12.4", mig_mode="disabled", node=NODE)
    assert info.value == 1
    assert "gpu_model" not in s.series("llm_gpu_up", gpu_uuid=G0)[0].labels

    # Time-sliced GPU: one series per pod, each with its own workload labels.
    small0 = labels("1", G1, namespace="llm", pod="vllm-small-0", container="vllm", model="qwen-1.5b",
                    route_class="batch", team="platform-ai")
    small1 = dict(small0, pod="vllm-small-1", team="search")
    assert s.one("llm_gpu_utilization_ratio", **small0).value == pytest.approx(0.55)
    assert s.one("llm_gpu_utilization_ratio", **small1).value == pytest.approx(0.55)
    assert s.one("llm_gpu_memory_used_bytes", **small1).value == 20 * GIB

    # MIG: parent unattributed, instances attributed (one to nobody).
    assert s.one("llm_gpu_up", **labels("2", G2)).value == 1
    assert not s.series("llm_gpu_utilization_ratio", gpu_uuid=G2)  # not supported in MIG mode
    trainer = dict(gpu="2", gpu_uuid=G2, gpu_instance_id="7", mig_profile="1g.5gb", namespace="batch",
                   pod="trainer-0", container="trainer", model="llama-3-8b", route_class="unknown", team="research")
    assert s.one("llm_gpu_mig_memory_used_bytes", **trainer).value == 3 * GIB
    assert s.one("llm_gpu_mig_memory_total_bytes", **trainer).value == 5 * GIB
    free_mig = dict(gpu="2", gpu_uuid=G2, gpu_instance_id="1", mig_profile="3g.20gb", namespace="", pod="",
                    container="", model="unknown", route_class="unknown", team="unknown")
    assert s.one("llm_gpu_mig_memory_used_bytes", **free_mig).value == 1 * GIB
    assert s.one("llm_gpu_mig_info", gpu="2", gpu_uuid=G2, gpu_instance_id="7", compute_instance_id="0",
                 mig_profile="1g.5gb", mig_uuid=MIG_A).value == 1

    # Unallocated GPU: empty pod labels, unknown workload labels.
    assert s.one("llm_gpu_temperature_celsius", **labels("3", G3)).value == 35

    # Per-process memory through the process cgroup.
    assert s.one("llm_gpu_container_memory_used_bytes", gpu="0", gpu_uuid=G0, **MISTRAL).value == 60 * GIB
    assert s.one("llm_gpu_container_processes", gpu="0", gpu_uuid=G0, **MISTRAL).value == 1
    assert s.one("llm_gpu_container_memory_used_bytes", **labels("0", G0)).value == 300 * MIB

    # Kubelet device accounting and exporter health.
    assert s.one("llm_gpu_devices_allocated", resource="nvidia.com/gpu").value == 3
    assert s.one("llm_gpu_devices_allocatable", resource="nvidia.com/gpu").value == 5
    assert s.one("llm_gpu_devices_allocatable", resource="nvidia.com/mig-3g.20gb").value == 1
    for collector in ("nvml", "xid_events", "podresources", "kube_pods", "process_cgroups"):
        assert s.one("llm_gpu_exporter_collector_success", collector=collector).value == 1, collector
    assert s.one("llm_gpu_exporter_nvml_up").value == 1
    assert s.one("llm_gpu_exporter_node_pods").value == 5
    assert not s.series("llm_gpu_exporter_errors_total")

    # Label budget: no GPU series carries more than 12 labels.
    assert max(len(x.labels) for x in s.samples if x.name.startswith("llm_gpu_")) <= 12
    assert all("instance" not in x.labels and "job" not in x.labels for x in s.samples)


def test_openmetrics_is_negotiated(stack):
    _, _, _, exporter = stack
    status, headers, body = metrics_raw(
        exporter,
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    )
    assert status == 200
    assert headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["llm_gpu_energy_consumption_joules"].type == "counter"
    util = [x for x in families["llm_gpu_utilization_ratio"].samples if x.labels["gpu_uuid"] == G0]
    assert util[0].value == pytest.approx(0.87)
    assert get(f"{exporter.url}/healthz").status == 200


def test_gpu_lost_mid_run_keeps_the_others_and_is_reported(stack):
    scenario, _, _, exporter = stack
    before = exporter.scrape()
    enumerations = before.value("llm_gpu_exporter_enumerations_total")
    scenario.gpu(1)["lost"] = True
    scenario.write()

    s = exporter.scrape_when(
        lambda s: s.series("llm_gpu_up", gpu_uuid=G1) and all(x.value == 0 for x in s.series("llm_gpu_up", gpu_uuid=G1)),
        what="GPU 1 reported down")
    # Both pods that share the lost GPU see it down.
    assert {x.labels["pod"] for x in s.series("llm_gpu_up", gpu_uuid=G1)} == {"vllm-small-0", "vllm-small-1"}
    assert not s.series("llm_gpu_utilization_ratio", gpu_uuid=G1)
    # The others are still fully served.
    assert s.one("llm_gpu_up", **labels("0", G0, **MISTRAL)).value == 1
    assert s.one("llm_gpu_utilization_ratio", **labels("0", G0, **MISTRAL)).value == pytest.approx(0.87)
    assert s.one("llm_gpu_temperature_celsius", **labels("3", G3)).value == 35
    assert s.value("llm_gpu_exporter_errors_total", collector="nvml", kind="gpu_lost") >= 1
    assert s.one("llm_gpu_exporter_collector_success", collector="nvml").value == 1
    # The pass after a loss rebuilds the device list.
    s = exporter.scrape_when(lambda s: s.value("llm_gpu_exporter_enumerations_total") > enumerations,
                             what="re-enumeration after the loss")
    assert all(x.value == 0 for x in s.series("llm_gpu_up", gpu_uuid=G1))

    # Back on the bus: re-enumerated and served again.
    lost_enumerations = s.value("llm_gpu_exporter_enumerations_total")
    scenario.gpu(1)["lost"] = False
    scenario.write()
    s = exporter.scrape_when(
        lambda s: all(x.value == 1 for x in s.series("llm_gpu_up", gpu_uuid=G1)), what="GPU 1 back")
    assert s.value("llm_gpu_utilization_ratio", gpu_uuid=G1, pod="vllm-small-0") == pytest.approx(0.55)
    assert s.value("llm_gpu_exporter_enumerations_total") > lost_enumerations


def test_gpu_removed_from_the_bus_stays_visible_as_down(stack):
    scenario, _, _, exporter = stack
    scenario.gpu(3)["removed"] = True
    scenario.write()
    s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", gpu_uuid=G3, ) and s.value("llm_gpu_up", gpu_uuid=G3) == 0,
                             what="GPU 3 down after removal")
    assert s.one("llm_gpu_up", **labels("3", G3)).value == 0
    assert s.one("llm_gpu_up", **labels("0", G0, **MISTRAL)).value == 1


def test_xid_events_increment_the_right_counter(stack):
    scenario, _, _, exporter = stack
    s = exporter.next_pass()
    assert not s.series("llm_gpu_xid_errors_total")
    scenario.gpu(0)["xid_events"] = [{"xid": 79}]
    scenario.gpu(3)["xid_events"] = [{"xid": 48}, {"xid": 48}]
    scenario.write()
    s = exporter.scrape_when(
        lambda s: s.value("llm_gpu_xid_errors_total", gpu_uuid=G3) == 2 and s.value("llm_gpu_xid_errors_total", gpu_uuid=G0) == 1,
        what="XID counters")
    assert s.one("llm_gpu_xid_errors_total", **labels("0", G0, **MISTRAL), xid="79").value == 1
    assert s.one("llm_gpu_xid_errors_total", **labels("3", G3), xid="48").value == 2
    assert len(s.series("llm_gpu_xid_errors_total")) == 2
    assert s.type_of("llm_gpu_xid_errors") == "counter"

    # A repeat of the same code adds to the same series; nothing else moves.
    scenario.gpu(0)["xid_events"].append({"xid": 79})
    scenario.write()
    s = exporter.scrape_when(lambda s: s.value("llm_gpu_xid_errors_total", gpu_uuid=G0) == 2, what="second XID 79")
    s = exporter.next_pass()
    assert s.one("llm_gpu_xid_errors_total", **labels("0", G0, **MISTRAL), xid="79").value == 2
    assert s.value("llm_gpu_xid_errors_total", gpu_uuid=G3) == 2


def test_timeline_changes_values_while_running(cluster):
    scenario, kube, kubelet, logdir = cluster
    data = scenario_data()
    data["gpus"][0]["energy_millijoules_per_second"] = 250000
    data["timeline"] = [{"after_s": 1.0, "gpu": 0, "set": {"utilization_gpu_percent": 12, "temperature_celsius": 81}}]
    scenario.write(data)
    exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube)
    try:
        s = exporter.scrape_when(lambda s: s.value("llm_gpu_temperature_celsius", gpu_uuid=G0) == 81, what="timeline step")
        assert s.value("llm_gpu_utilization_ratio", gpu_uuid=G0) == pytest.approx(0.12)
        first = s.value("llm_gpu_energy_consumption_joules_total", gpu_uuid=G0)
        later = exporter.scrape_when(
            lambda s: s.value("llm_gpu_energy_consumption_joules_total", gpu_uuid=G0) > first, what="energy grows")
        assert later.value("llm_gpu_energy_consumption_joules_total", gpu_uuid=G0) > first
    finally:
        exporter.stop()


def test_no_nvml_library_says_so_and_keeps_serving(cluster):
    _, kube, kubelet, logdir = cluster
    exporter = start_exporter(logdir, nvml_lib="/nonexistent/libnvidia-ml.so.1", kubelet=kubelet, kube_api=kube)
    try:
        s = exporter.next_pass()
        assert s.one("llm_gpu_exporter_nvml_up").value == 0
        assert s.one("llm_gpu_exporter_nvml_down_reason", kind="library_not_found").value == 1
        assert s.one("llm_gpu_exporter_collector_success", collector="nvml").value == 0
        assert s.value("llm_gpu_exporter_errors_total", collector="nvml", kind="library_not_found") >= 1
        assert not s.series("llm_gpu_up")
        # What does not need NVML is still there.
        assert s.one("llm_gpu_devices_allocated", resource="nvidia.com/gpu").value == 3
        assert s.one("llm_gpu_exporter_collector_success", collector="podresources").value == 1
        assert s.series("llm_gpu_exporter_build_info")
        assert get(f"{exporter.url}/healthz").status == 200
        log = exporter.proc.logs()
        assert "NVML unavailable from /nonexistent/libnvidia-ml.so.1" in log
        assert "GPU metrics are off" in log
    finally:
        exporter.stop()


def test_missing_symbol_blanks_only_that_reading(cluster):
    scenario, kube, kubelet, logdir = cluster
    lib = fake_nvml_lib_missing_symbols()
    exporter = start_exporter(logdir, scenario=scenario, nvml_lib=lib, kubelet=kubelet, kube_api=kube)
    try:
        s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", pod="vllm-mistral-0"), what="attribution")
        s = exporter.next_pass()
        L0 = labels("0", G0, **MISTRAL)
        assert s.one("llm_gpu_up", **L0).value == 1
        assert s.one("llm_gpu_temperature_celsius", **L0).value == 63
        assert s.one("llm_gpu_power_limit_watts", **L0).value == 700
        assert not s.series("llm_gpu_power_usage_watts")
        assert not s.series("llm_gpu_energy_consumption_joules_total")
        assert s.value("llm_gpu_exporter_errors_total", collector="nvml", kind="symbol_missing") >= 2
        assert s.value("llm_gpu_exporter_errors_total", collector="xid_events", kind="symbol_missing") >= 1
        assert s.one("llm_gpu_exporter_collector_success", collector="xid_events").value == 0
        assert s.one("llm_gpu_exporter_collector_success", collector="nvml").value == 1
    finally:
        exporter.stop()
    assert exporter.proc.popen.returncode == 0, exporter.proc.logs()


def test_pod_watch_follows_changes_and_relists_after_410(stack):
    scenario, kube, kubelet, exporter = stack
    pods = k8s_pods()
    pods[0]["labels"]["workload.k8sllm.io/model"] = "mistral-7b-v2"
    kube.update_pods(pods)
    exporter.scrape_when(lambda s: s.series("llm_gpu_up", gpu_uuid=G0, model="mistral-7b-v2"), what="new model label")

    lists = kube.stats()["lists"]
    kube.expire()
    wait_until(lambda: kube.stats()["lists"] > lists, timeout=15, what="re-list after 410")
    pods[0]["labels"]["workload.k8sllm.io/team"] = "inference"
    kube.update_pods(pods)
    s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", gpu_uuid=G0, team="inference"), what="watch after re-list")
    assert s.value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="expired") >= 1
    assert s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1

    # The pod goes away in both the API and the kubelet: GPU 0 is free again.
    kube.delete_pod("llm", "vllm-mistral-0")
    kubelet.update(kubelet_allocations()[1:], ALLOCATABLE)
    s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", **labels("0", G0)), what="GPU 0 unattributed")
    assert not s.series("llm_gpu_up", pod="vllm-mistral-0")


def test_api_errors_back_off_and_recover(stack):
    _, kube, _, exporter = stack
    kube.fail(3)
    kube.expire()
    s = exporter.scrape_when(
        lambda s: s.value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="status") >= 1,
        what="status errors counted")
    s = exporter.scrape_when(
        lambda s: s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1,
        timeout=20, what="recovered after backoff")
    assert s.series("llm_gpu_up", pod="vllm-mistral-0", model="mistral-7b")


def test_allocation_failures_are_counted_from_admission_errors(stack):
    _, kube, _, exporter = stack
    refused = {**WORKLOAD_LABELS, "workload.k8sllm.io/model": "llama-3-70b"}
    kube.add_pod({"name": "vllm-70b-0", "namespace": "llm", "phase": "Failed", "labels": refused,
                  "reason": "OutOfnvidia.com/gpu",
                  "message": "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu, requested: 4, used: 3, capacity: 4"})
    kube.add_pod({"name": "vllm-70b-1", "namespace": "llm", "phase": "Failed", "labels": refused,
                  "reason": "UnexpectedAdmissionError",
                  "message": "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: 4, Available: 1, which is unexpected"})
    kube.add_pod({"name": "evicted", "namespace": "llm", "phase": "Failed", "reason": "Evicted", "labels": refused})
    s = exporter.scrape_when(lambda s: s.value("llm_gpu_allocation_failures_total") == 2, what="two failures")
    workload = dict(model="llama-3-70b", route_class="interactive", team="platform-ai")
    assert s.one("llm_gpu_allocation_failures_total", resource="nvidia.com/gpu", reason="insufficient_resource",
                 **workload).value == 1
    assert s.one("llm_gpu_allocation_failures_total", resource="nvidia.com/gpu", reason="device_plugin_error",
                 **workload).value == 1
    # Counted once per pod, however many passes see it.
    s = exporter.next_pass()
    assert s.value("llm_gpu_allocation_failures_total") == 2


def test_kubelet_going_away_keeps_gpu_series(stack):
    _, _, kubelet, exporter = stack
    kubelet.stop()
    s = exporter.scrape_when(
        lambda s: s.one("llm_gpu_exporter_collector_success", collector="podresources").value == 0,
        what="podresources failure seen")
    assert s.value("llm_gpu_exporter_errors_total", collector="podresources") >= 1
    # GPU readings are still served, now without pod attribution.
    assert s.one("llm_gpu_utilization_ratio", **labels("0", G0)).value == pytest.approx(0.87)
    assert s.one("llm_gpu_exporter_collector_success", collector="nvml").value == 1


def _tls_files(dir: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (dir / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = dir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=tokentap-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=kubernetes")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", ext)
    return ca, cert, key


def test_in_cluster_https_with_ca_and_bearer_token(logdir):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.fail("openssl is needed to make the test certificates")
    ca, cert, key = _tls_files(logdir)
    token_file = logdir / "token"
    token_file.write_text("s3cret-token\n")
    scenario = NvmlScenario(logdir / "nvml.json")
    scenario.write(scenario_data())
    started = []
    try:
        kube = start_fake_kube_api(logdir, k8s_pods(), token="s3cret-token", tls=(cert, key))
        started.append(kube)
        kubelet = start_fake_kubelet(logdir, kubelet_allocations())
        started.append(kubelet)
        assert kube.url.startswith("https://")
        exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube, kube_ca_file=ca,
                                  kube_token_file=token_file)
        started.append(exporter)
        s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", pod="vllm-mistral-0", model="mistral-7b"),
                                 what="labels over HTTPS")
        assert s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1
        assert kube.stats()["unauthorized"] == 0
    finally:
        for p in reversed(started):
            p.stop()


def test_wrong_ca_is_a_connect_error_not_a_crash(logdir):
    ca, cert, key = _tls_files(logdir)
    other = logdir / "other"
    other.mkdir()
    other_ca, _, _ = _tls_files(other)
    started = []
    try:
        kube = start_fake_kube_api(logdir, k8s_pods(), tls=(cert, key))
        started.append(kube)
        exporter = start_exporter(logdir, kube_api=kube, kube_ca_file=other_ca)
        started.append(exporter)
        s = exporter.scrape_when(
            lambda s: s.value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="connect") >= 1,
            what="TLS failure counted")
        assert s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 0
        assert s.series("llm_gpu_up")
    finally:
        for p in reversed(started):
            p.stop()


def test_dcgm_compatible_names(stack, logdir):
    scenario, kube, kubelet, _ = stack
    exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube, args=["--dcgm-compat"],
                              name="gpu-exporter-dcgm")
    try:
        s = exporter.scrape_when(lambda s: s.series("DCGM_FI_DEV_GPU_UTIL", pod="vllm-mistral-0", model="mistral-7b"),
                                 what="dcgm series")
        dcgm = dict(gpu="0", UUID=G0, device="nvidia0", modelName="NVIDIA H100 80GB HBM3", Hostname=NODE,
                    pci_bus_id="00000000:17:00.0", **MISTRAL)
        assert s.one("DCGM_FI_DEV_GPU_UTIL", **dcgm).value == 87
        assert s.one("DCGM_FI_DEV_FB_USED", **dcgm).value == (61 * GIB + 12345) // MIB
        assert s.one("DCGM_FI_DEV_POWER_USAGE", **dcgm).value == pytest.approx(512.345)
        assert s.one("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", **dcgm).value == 987654321
        assert s.one("DCGM_FI_DEV_SM_CLOCK", **dcgm).value == 1755
        # The native names are still there.
        assert s.one("llm_gpu_utilization_ratio", **labels("0", G0, **MISTRAL)).value == pytest.approx(0.87)
    finally:
        exporter.stop()


def test_runtime_metrics_of_node_pods_are_served_with_the_same_labels(cluster):
    """The runtime collector embedded in the exporter finds an llm-sim pod
    through the exporter's pod watch and publishes `llm_runtime_*` with the
    workload labels the GPU series carry."""
    scenario, kube, kubelet, logdir = cluster
    sim = start_sim(logdir, name="sim")
    try:
        pods = k8s_pods()
        pods[0].update({"podIP": "127.0.0.1", "annotations": {"prometheus.io/port": str(sim.port)}})
        kube.update_pods(pods)
        exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube, runtime=True)
        try:
            s = exporter.scrape_when(lambda s: s.series("llm_runtime_up", pod="vllm-mistral-0", model="mistral-7b"),
                                     timeout=20, what="runtime series")
            up = s.series("llm_runtime_up", pod="vllm-mistral-0")[0]
            assert up.value == 1
            gpu = s.series("llm_gpu_up", gpu_uuid=G0)[0]
            for key in ("namespace", "pod", "model", "route_class", "team"):
                assert up.labels[key] == gpu.labels[key], key
        finally:
            exporter.stop()
    finally:
        sim.proc.stop()


def test_sigterm_shuts_down_cleanly(stack):
    _, _, _, exporter = stack
    t0 = time.monotonic()
    code = exporter.stop()
    assert code == 0, exporter.proc.logs()
    assert time.monotonic() - t0 < 5
    assert "panicked" not in exporter.proc.logs()


FAKE_SMI = r'''#!/usr/bin/env python3
"""A stand-in for nvidia-smi that answers --query-gpu from a JSON file."""
import json, os, sys
values = json.load(open(os.environ["FAKE_SMI_VALUES"]))
args = sys.argv[1:]
if args == ["-L"]:
    for i, gpu in sorted(values.items()):
        print(f"GPU {i}: {gpu['name']} (UUID: {gpu['uuid']})")
    sys.exit(0)
query = next(a for a in args if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
for i, gpu in sorted(values.items()):
    if any(f != "index" and f not in gpu for f in query):
        print(f"Field \"{query[-1]}\" is not a valid field to query.", file=sys.stderr)
        sys.exit(2)
    print(", ".join(i if f == "index" else str(gpu[f]) for f in query))
'''


def _smi_values(temperature: int) -> dict:
    g = gpu0()
    return {"0": {
        "uuid": G0, "name": g["name"], "pci.bus_id": g["pci_bus_id"], "serial": g["serial"],
        "driver_version": "550.54.15", "utilization.gpu": 85, "utilization.memory": 41,
        "memory.total": 80 * 1024, "memory.used": g["memory_used_bytes"] // MIB, "memory.reserved": 512,
        "memory.free": (80 * GIB - g["memory_used_bytes"] - 512 * MIB) // MIB, "temperature.gpu": temperature,
        "power.draw": 515.20, "enforced.power.limit": 700.00, "clocks.sm": 1755, "clocks.mem": 2619,
        "ecc.errors.corrected.volatile.total": 12, "ecc.errors.uncorrected.volatile.total": 1,
        "mig.mode.current": "Disabled", "clocks_event_reasons.active": "0x0000000000000024",
    }}


@pytest.mark.parametrize("temperature,expected_rc", [(64, 0), (90, 1)])
def test_real_gpu_check_script_with_a_stand_in_driver(logdir, temperature, expected_rc):
    """The real-GPU cross-check script, run end to end with the fake NVML as
    libnvidia-ml.so.1 and a stand-in nvidia-smi, so it cannot rot before a GPU
    machine runs it; a temperature off by more than its tolerance must fail."""
    import os
    import shutil
    import sys

    from exporter_stack import fake_nvml_lib
    from harness import REPO, bin_path

    scenario = NvmlScenario(logdir / "nvml.json")
    scenario.write({"driver_version": "550.54.15", "gpus": [gpu0()]})
    (logdir / "bin").mkdir()
    (logdir / "lib").mkdir()
    smi = logdir / "bin" / "nvidia-smi"
    smi.write_text(FAKE_SMI.replace("/usr/bin/env python3", sys.executable))
    smi.chmod(0o755)
    (logdir / "smi.json").write_text(__import__("json").dumps(_smi_values(temperature)))
    shutil.copy(fake_nvml_lib(), logdir / "lib" / "libnvidia-ml.so.1")
    env = {
        **os.environ,
        "PATH": f"{logdir / 'bin'}:{os.environ['PATH']}",
        "LD_LIBRARY_PATH": str(logdir / "lib"),
        "FAKE_NVML_SCENARIO": str(scenario.path),
        "FAKE_SMI_VALUES": str(logdir / "smi.json"),
        "GPU_EXPORTER_BIN": str(bin_path("gpu-exporter")),
        "PYTHON": sys.executable,
    }
    result = subprocess.run([str(REPO / "gpu-exporter" / "scripts" / "real-gpu-check.sh"), str(logdir / "out")],
                            env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == expected_rc, out
    report = (logdir / "out" / "real-gpu-check.md").read_text()
    assert "| 0 | gpu_uuid |" in report
    assert "| 0 | power.draw (W) | 512.345 | 515.2 |" in report
    if expected_rc == 0:
        assert "**MISMATCH**" not in report, report
    else:
        mismatches = [l for l in report.splitlines() if "MISMATCH" in l]
        assert len(mismatches) == 1 and "temperature.gpu" in mismatches[0], report
