"""What the dynamic module needs where it runs, checked on the library as it
ships (target/module/libtokentap_module.so, `cargo build -p tokentap-module
--profile module`).

* Its ELF dynamic section: NEEDED is exactly what docs/dynamic-module.md
  lists (glibc only: the unwinder is linked in, filters/module/build.rs), no
  RPATH/RUNPATH, no unwinder symbol left for the loader to find, and the
  newest glibc symbol version is the documented floor. The parsing is shown
  to find a libgcc_s dependency where there is one (libstdc++). Every Envoy
  callback it imports is exported by each supported Envoy binary.
* Envoy of each supported version runs the library from a root filesystem
  holding nothing but Envoy and the glibc it links, as Envoy's distroless
  images hold no libgcc_s (the root's own loader cannot open libgcc_s.so.1
  for a library that needs it), at the path the packages mount it, configured the way Envoy Gateway writes the filter
  (`module.local.filename`, no metrics namespace) plus the runtime flag: a
  request is counted under the bare metric name, and the panic-test build
  catches a panic in a hook, counts it and lets the request through, so the
  linked-in unwinder works there. chroot needs root: skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness import ENVOY_VERSIONS, MODULE, REPO, Proc, envoy_binary_for, free_port, get, parse_exposition, post_json, wait_http_ok
from k8s_packages import find, render
from module_artifact import (
    documented_runtime,
    elf_defined_symbols,
    elf_glibc_versions,
    elf_needed,
    elf_search_paths,
    elf_undefined_symbols,
)
from stack import WASM, render_template, start_sim, tokentap_filter, use_module

#: The module built with `panic-test` (cargo xtask test builds it there).
PANIC_MODULE = Path(os.environ.get("TOKENTAP_PANIC_MODULE", REPO / "target" / "panic-test" / "module" / "libtokentap_module.so"))
#: A system library that does need libgcc_s (the negative control).
LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
CHAT = {"model": "mistral-7b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def module_path() -> Path:
    if not MODULE.exists():
        pytest.skip(f"{MODULE} missing: cargo build -p tokentap-module --profile module")
    return MODULE


# --- the dynamic section ------------------------------------------------------------


def test_needed_libraries_are_glibc_only_as_documented(module_path):
    documented = documented_runtime()["ELF `NEEDED`"]
    assert sorted(elf_needed(module_path)) == sorted(documented)
    assert not any(n.startswith("libgcc_s") for n in documented)
    # Nothing is looked up next to the library or elsewhere: no search path.
    assert elf_search_paths(module_path) == []
    # The unwinder is inside: no _Unwind_* symbol is left for the loader.
    undefined = elf_undefined_symbols(module_path)
    assert not {s for s in undefined if s.startswith("_Unwind_")}, sorted(undefined)
    # Envoy's callbacks are what is left (resolved against the Envoy binary).
    assert any(s.startswith("envoy_dynamic_module_callback_") for s in undefined)


def test_glibc_floor_is_the_documented_one(module_path):
    (documented,) = documented_runtime()["Newest glibc symbol version"]
    versions = elf_glibc_versions(module_path)
    assert versions and "GLIBC_" + ".".join(map(str, versions[-1])) == documented


@pytest.mark.parametrize("version", ENVOY_VERSIONS)
def test_every_imported_callback_is_exported_by_each_supported_envoy(module_path, version):
    """Envoy resolves every import at load (BIND_NOW): a callback missing
    from one binary would fail the load there."""
    try:
        binary = envoy_binary_for(version)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    imported = {s for s in elf_undefined_symbols(module_path) if s.startswith("envoy_dynamic_module_")}
    assert imported, "no Envoy callback imported?"
    assert imported - elf_defined_symbols(binary) == set()


def test_the_checks_see_a_libgcc_s_dependency_where_there_is_one():
    """Negative control: the same parsing on a library that needs the shared
    unwinder finds it, and its unwinder symbols undefined."""
    if not LIBSTDCXX.exists():
        pytest.skip(f"{LIBSTDCXX} not installed (the negative control needs a library that links libgcc_s)")
    assert "libgcc_s.so.1" in elf_needed(LIBSTDCXX)
    assert "_Unwind_Resume" in elf_undefined_symbols(LIBSTDCXX)


# --- Envoy from a root without libgcc_s -------------------------------------------------


def _install(root: Path, source: Path, dest: str) -> None:
    source = Path(os.path.realpath(source))
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def envoy_root(root: Path, envoy: Path) -> Path:
    """Envoy at /usr/local/bin/envoy and every library it links (as ldd
    resolves them here, at the same paths), nothing else."""
    _install(root, envoy, "/usr/local/bin/envoy")
    listing = subprocess.run(["ldd", str(envoy)], capture_output=True, text=True, timeout=60, check=True).stdout
    for line in listing.splitlines():
        for token in line.split():
            if token.startswith("/"):
                _install(root, Path(token), token)
    (root / "etc").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    return root


def library_path_in_packages() -> str:
    """Where the Envoy Gateway module package loads the library from."""
    (entry,) = find(render("gateway/envoy-gateway-module"), "EnvoyProxy")["spec"]["dynamicModules"]
    return entry["source"]["local"]["path"]


@contextlib.contextmanager
def chroot_envoy(tmp: Path, version: str, library: Path, upstream_port: int):
    if os.geteuid() != 0:
        pytest.skip("chroot needs root (the ELF checks above ran)")
    try:
        binary = envoy_binary_for(version)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = envoy_root(tmp / "root", binary)
    inside = library_path_in_packages()
    _install(root, library, inside)
    assert not list(root.rglob("libgcc_s*")), "the root must not hold libgcc_s"
    listen, admin = free_port(), free_port()
    config = yaml.safe_load(render_template({
        "LISTEN_PORT": listen, "ADMIN_PORT": admin, "STABLE_PORT": upstream_port, "CANARY_PORT": upstream_port,
        "RAG_PORT": upstream_port, "WASM_PATH": WASM, "ACCESS_LOG": "/tmp/access.log", "STATS_FLUSH_INTERVAL": "1s",
    }))
    use_module(config, Path(inside))  # the filter entry, per-route switches, the runtime flag
    # As Envoy Gateway writes it (internal/xds/translator/dynamicmodule.go):
    # the library by path, no metrics namespace.
    tokentap_filter(config)["typed_config"]["dynamic_module_config"] = {"module": {"local": {"filename": inside}}, "do_not_close": True}
    (root / "etc" / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = Proc(f"envoy-{version}-chroot",
                ["chroot", str(root), "/usr/local/bin/envoy", "-c", "/etc/envoy.yaml", "--concurrency", "1",
                 "--disable-hot-restart", "--log-level", "info"],
                tmp / "envoy.log", env={"POD_NAME": "gw-0"}).start()
    try:
        wait_http_ok(f"http://127.0.0.1:{admin}/ready", proc, timeout=30)
        yield f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", root
    finally:
        proc.stop()


def _scrape_after_flush(admin: str):
    time.sleep(2.5)  # the filter's tick and a stats flush
    return parse_exposition(get(f"{admin}/stats/prometheus").body.decode())


@pytest.mark.parametrize("version", ENVOY_VERSIONS)
def test_envoy_loads_the_library_from_a_root_without_libgcc_s(tmp_path, module_path, version):
    sim = start_sim(tmp_path, "--ttft-ms", "5", "--itl-ms", "1")
    try:
        with chroot_envoy(tmp_path, version, module_path, sim.port) as (url, admin, root):
            # The root's loader cannot provide libgcc_s: a library that needs it does not resolve...
            loader = "/lib64/ld-linux-x86-64.so.2"
            if LIBSTDCXX.exists():
                _install(root, LIBSTDCXX, "/tmp/probe/libstdc++.so.6")
                probe = subprocess.run(["chroot", str(root), loader, "--list", "/tmp/probe/libstdc++.so.6"],
                                       capture_output=True, text=True, timeout=30)
                assert probe.returncode != 0, probe.stdout
                assert "libgcc_s.so.1: cannot open shared object file" in probe.stderr, probe.stderr
            # ...while every library ours needs does.
            listed = subprocess.run(["chroot", str(root), loader, "--list", library_path_in_packages()],
                                    capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0 and "not found" not in listed.stdout, listed.stdout + listed.stderr
            assert post_json(url + "/v1/chat/completions", CHAT, headers={"x-tenant-id": "acme"}).status == 200
            scrape = _scrape_after_flush(admin)
            (sample,) = scrape.series("llm_gateway_requests_total")
            assert sample.value == 1 and sample.labels["tenant"] == "acme" and sample.labels["route"] == "chat"
            assert not [s.name for s in scrape.samples if "dynamicmodulescustom" in s.name]
    finally:
        sim.stop()


@pytest.mark.parametrize("version", ENVOY_VERSIONS)
def test_a_panic_is_caught_by_the_linked_in_unwinder(tmp_path, version):
    if not PANIC_MODULE.exists():
        pytest.skip(f"{PANIC_MODULE} missing: cargo build -p tokentap-module --profile module --features panic-test "
                    "--target-dir target/panic-test (cargo xtask test builds it)")
    assert elf_needed(PANIC_MODULE) == elf_needed(MODULE)
    sim = start_sim(tmp_path, "--ttft-ms", "5", "--itl-ms", "1")
    try:
        with chroot_envoy(tmp_path, version, PANIC_MODULE, sim.port) as (url, admin, _):
            headers = {"x-tenant-id": "acme"}
            assert post_json(url + "/v1/chat/completions", CHAT, headers=headers).status == 200
            for hook in ("request_headers", "response_headers"):
                r = post_json(url + "/v1/chat/completions", CHAT, headers={**headers, "x-tokentap-test-panic": hook})
                assert r.status == 200 and json.loads(r.body)["choices"], hook
            scrape = _scrape_after_flush(admin)
            assert scrape.value("llm_gateway_module_panics_total") == 2
            # The panicking requests' telemetry is abandoned; the clean one is counted.
            assert scrape.value("llm_gateway_requests_total") == 1
            assert get(f"{admin}/ready").status == 200
    finally:
        sim.stop()
