"""Shared pytest fixtures for the end-to-end suites.

On failure, the logs of every process a test started are printed, so a red
CI run says what Envoy, the simulator or the exporter saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import WASM


def pytest_configure(config):
    config.addinivalue_line("markers", "gateway: needs Envoy and the built filter")


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
