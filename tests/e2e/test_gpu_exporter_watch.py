"""End-to-end, gpu-exporter at node scale: the pod watch's liveness against
a hung, restarted or refusing fake Kubernetes API, `--runtime-disable`, and
the whole exposition compared byte for byte with a recording. Same fakes and
scenario as `test_gpu_exporter.py`, whose fixtures these tests share.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from exporter_stack import metrics_raw, start_exporter
from harness import wait_until
from test_gpu_exporter import G0, cluster, fake_proc, k8s_pods, stack  # noqa: F401 (fixtures)


def test_frozen_api_fails_the_pod_collector_within_60s_while_gpu_metrics_flow(stack):
    """A hung API server (connections open, nothing answered, no bookmarks)
    is noticed by the watch's progress bound with the default flags; the
    last known attribution keeps being served, marked stale; on recovery
    the exporter re-lists once."""
    _, kube, _, exporter = stack
    s = exporter.scrape()
    assert s.one("llm_gpu_exporter_node_pods_stale").value == 0
    passes = s.value("llm_gpu_exporter_collections_total")
    kube.hang()
    frozen_at = time.monotonic()
    s = exporter.scrape_when(
        lambda s: s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 0,
        timeout=60, what="pod collector failure while the API is frozen")
    detected_after = time.monotonic() - frozen_at
    assert detected_after < 60, detected_after
    # GPU metrics kept flowing, attributed from the last known pods.
    assert s.value("llm_gpu_exporter_collections_total") > passes + 10
    assert s.series("llm_gpu_up", gpu_uuid=G0, pod="vllm-mistral-0", model="mistral-7b")
    assert s.one("llm_gpu_exporter_node_pods_stale").value == 1
    assert s.one("llm_gpu_exporter_node_pods").value == len(k8s_pods())
    assert s.value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="timeout") >= 1

    lists = kube.stats()["lists"]
    kube.resume()
    s = exporter.scrape_when(
        lambda s: s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1,
        timeout=45, what="pod collector recovered")
    assert s.one("llm_gpu_exporter_node_pods_stale").value == 0
    time.sleep(3)  # a second re-list would come within the first backoffs
    assert kube.stats()["lists"] - lists == 1
    print(f"frozen API detected after {detected_after:.1f} s")


def test_410_on_the_watch_request_itself_relists(stack):
    _, kube, _, exporter = stack
    lists = kube.stats()["lists"]
    expired = exporter.scrape().value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="expired")
    kube.gone(1)  # the watch after the next re-list is refused with HTTP 410
    kube.expire()  # ends the current watch with a 410 event
    wait_until(lambda: kube.stats()["lists"] >= lists + 2, timeout=15, what="two re-lists")
    pods = k8s_pods()
    pods[0]["labels"]["workload.k8sllm.io/team"] = "after-gone"
    kube.update_pods(pods)
    s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", gpu_uuid=G0, team="after-gone"), what="watch resumed")
    assert s.value("llm_gpu_exporter_errors_total", collector="kube_pods", kind="expired") >= expired + 2
    assert s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1


def test_api_restart_continues_resource_versions_and_the_watch_follows(stack):
    _, kube, _, exporter = stack
    before = int(kube.stats()["resourceVersion"])
    kube.restart()
    assert int(kube.stats()["resourceVersion"]) >= before
    pods = k8s_pods()
    pods[0]["labels"]["workload.k8sllm.io/model"] = "mistral-after-restart"
    kube.update_pods(pods)
    s = exporter.scrape_when(lambda s: s.series("llm_gpu_up", gpu_uuid=G0, model="mistral-after-restart"),
                             timeout=20, what="changes after the API restart")
    assert s.one("llm_gpu_exporter_collector_success", collector="kube_pods").value == 1
    assert int(kube.stats()["resourceVersion"]) > before


def test_runtime_disable_publishes_no_runtime_series(stack):
    """The stack runs with --runtime-disable and serves runtime-labelled pods
    (they match the default runtime selector): nothing `llm_runtime_*` at all."""
    _, kube, _, exporter = stack
    runtime_pods = [p for p in k8s_pods() if p.get("labels", {}).get("app.kubernetes.io/part-of") == "llm-platform"]
    assert len(runtime_pods) >= 3
    for pod in runtime_pods[:2]:
        kube.add_pod({**pod, "name": pod["name"] + "-extra", "uid": None, "podIP": "127.0.0.1"})
    s = exporter.scrape_when(lambda s: s.value("llm_gpu_exporter_node_pods") == len(k8s_pods()) + 2,
                             what="extra runtime pods seen")
    _, _, body = metrics_raw(exporter)
    assert "llm_runtime_" not in body.decode()
    assert not [x for x in s.samples if x.name.startswith("llm_runtime_")]


GOLDEN = Path(__file__).parent / "golden" / "gpu_exporter_exposition.txt"
# Values that change from pass to pass (timings, pass counts, wall clock).
VOLATILE = ("llm_gpu_exporter_collector_duration_seconds", "llm_gpu_exporter_collections_total",
            "llm_gpu_exporter_last_collection_timestamp_seconds")


def _masked(body: str) -> str:
    lines = []
    for line in body.splitlines():
        if line.startswith(VOLATILE):
            line = line.rsplit(" ", 1)[0] + " <volatile>"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_exposition_is_byte_identical_to_the_recorded_golden(cluster):
    """The whole exposition for the fixed fake scenario (text and OpenMetrics,
    dcgm names on), compared byte for byte with a recording; pass-to-pass
    timings are masked. Refactors of the encoders must leave it unchanged;
    a deliberate change re-records it with TOKENTAP_UPDATE_GOLDEN=1."""
    scenario, kube, kubelet, logdir = cluster
    exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube,
                              host_proc=fake_proc(logdir / "proc"), args=["--dcgm-compat"])
    try:
        exporter.scrape_when(
            lambda s: s.series("llm_gpu_up", pod="vllm-mistral-0", model="mistral-7b")
            and s.value("llm_gpu_exporter_collector_success", collector="xid_events") == 1,
            what="attributed and XID thread up")
        exporter.next_pass()
        bodies = []
        for accept in (None, "application/openmetrics-text;version=1.0.0"):
            status, _, body = metrics_raw(exporter, accept)
            assert status == 200
            bodies.append(_masked(body.decode()))
    finally:
        exporter.stop()
    recorded = "# --- text\n" + bodies[0] + "# --- openmetrics\n" + bodies[1]
    if os.environ.get("TOKENTAP_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(recorded)
    assert recorded == GOLDEN.read_text()
