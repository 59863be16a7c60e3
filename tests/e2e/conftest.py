"""Shared pytest fixtures for the end-to-end suites.

On failure, the logs of every process a test started are printed, so a red
CI run says what Envoy, the simulator or the exporter saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import SHELL, WASM

#: Suites that drive traffic through the tokentap filter in Envoy. `cargo
#: xtask test` runs them once per shell (TOKENTAP_SHELL=wasm, then module),
#: with the same assertions.
GATEWAY_SUITES = {
    "test_gateway_metrics",
    "test_gateway_robustness",
    "test_tracing_rag",
    "test_self_monitoring",
    "test_error_types",
    "test_gen_ai_naming",
    "test_llm_apis",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gateway: needs Envoy and the built filter (runs once per shell)")
    config.addinivalue_line(
        "markers", "wasm_only(reason): checks something only the proxy-wasm shell has (skipped under TOKENTAP_SHELL=module)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in GATEWAY_SUITES:
            item.add_marker(pytest.mark.gateway)
        wasm_only = item.get_closest_marker("wasm_only")
        if wasm_only is not None and SHELL != "wasm":
            why = wasm_only.kwargs.get("reason") or (wasm_only.args[0] if wasm_only.args else "proxy-wasm only")
            item.add_marker(pytest.mark.skip(reason=f"{SHELL} shell: {why}"))


@pytest.fixture(scope="session")
def wasm_path() -> Path:
    if not WASM.exists():
        pytest.fail(f"{WASM} missing: build with `cargo build -p tokentap-filter --target wasm32-wasip1 --release`")
    return WASM


@pytest.fixture
def logdir(tmp_path: Path, request) -> Path:
    """A per-test folder for configs and process logs, dumped on failure."""
    yield tmp_path
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for log in sorted(tmp_path.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            print(f"\n===== {log.name} (last 80 lines) =====")
            print("\n".join(text[-80:]))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
