"""The images, built as a release builds them (k8s/images/build.sh: buildah,
FROM scratch, offline) into OCI layouts, then read back as a registry
client would.

* Filter image: the compat Wasm layout Istio and Envoy Gateway read (one
  tar+gzip layer holding exactly /plugin.wasm, byte for byte the built
  module); the same module gives the same manifest digest from a fresh
  store, another module another digest.
* gpu-exporter image: non-root user, entrypoint, only the binary, its glibc
  runtime and /etc/passwd; unpacked and run from its own root filesystem
  (chroot, as user 65532) with a fake libnvidia-ml.so.1 where the NVIDIA
  container toolkit puts the real one, it loads NVML by name and serves GPU
  metrics. Not run here: a registry push and pull, a kubelet, the real
  toolkit and NVML (docs/operations.md says what was run).
* Dynamic-module image: files only, one layer holding exactly
  /abi-vX.Y/libtokentap_module.so (the built library byte for byte, readable
  by any user: Envoy runs as non-root), X.Y and the `abi` label from the ABI
  the source declares, the platform from the library's ELF machine; same
  library, same digest. The packages load the library from where the image
  puts it under their mount. The recipe refuses a library that needs
  libgcc_s or was built for another ABI, and a registry tag without the ABI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from harness import MODULE, Proc, bin_path, free_port, get, lib_path, wait_http_ok, WASM
from k8s_packages import K8S, eg_extension_policy, find, kustomize, render
from module_artifact import MODULE_IMAGE, abi_folder, abi_version, elf_machine
from ops_stack import system_tool

BUILD = K8S / "images" / "build.sh"


def build(what: str, artifact: Path, store: Path, destination: Path) -> str:
    """Run the release recipe into an OCI layout; returns the printed digest."""
    system_tool("buildah")
    env = {**os.environ, "BUILDAH_ARGS": f"--root {store}/root --runroot {store}/run --storage-driver vfs"}
    result = subprocess.run([str(BUILD), what, str(artifact), f"oci:{destination}"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class OciLayout:
    """An OCI image layout directory with one image."""

    def __init__(self, path: Path):
        self.path = path
        (entry,) = json.loads((path / "index.json").read_text())["manifests"]
        self.digest = entry["digest"]
        self.manifest_bytes = self.blob(self.digest)
        self.manifest = json.loads(self.manifest_bytes)
        self.config = json.loads(self.blob(self.manifest["config"]["digest"]))

    def blob(self, digest: str) -> bytes:
        algorithm, hex_digest = digest.split(":")
        data = (self.path / "blobs" / algorithm / hex_digest).read_bytes()
        assert hashlib.sha256(data).hexdigest() == hex_digest, digest
        return data

    def layer_members(self, index: int = 0) -> dict[str, tarfile.TarInfo]:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(self.blob(self.manifest["layers"][index]["digest"])))) as tar:
            return {m.name: m for m in tar.getmembers()}

    def layer_file(self, name: str, index: int = 0) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(self.blob(self.manifest["layers"][index]["digest"])))) as tar:
            member = tar.extractfile(name)
            assert member is not None, name
            return member.read()


@pytest.fixture(scope="module")
def filter_image(tmp_path_factory) -> tuple[str, OciLayout]:
    tmp = tmp_path_factory.mktemp("filter-image")
    digest = build("filter", WASM, tmp / "store", tmp / "oci")
    return digest, OciLayout(tmp / "oci")


def test_filter_image_is_the_compat_wasm_layout(filter_image, wasm_path):
    digest, image = filter_image
    assert digest == image.digest == "sha256:" + hashlib.sha256(image.manifest_bytes).hexdigest()
    assert image.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    (layer,) = image.manifest["layers"]
    # istio pkg/wasm/imagefetcher.go: the compat variant's layer media type.
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    members = image.layer_members()
    assert list(members) == ["plugin.wasm"] and members["plugin.wasm"].isfile()
    assert image.layer_file("plugin.wasm") == wasm_path.read_bytes()
    assert image.config["created"] == "1970-01-01T00:00:00Z"


def test_filter_image_digest_is_reproducible_and_follows_the_module(filter_image, tmp_path, wasm_path):
    digest, _ = filter_image
    assert build("filter", WASM, tmp_path / "store-again", tmp_path / "again") == digest
    other = tmp_path / "other.wasm"
    other.write_bytes(wasm_path.read_bytes() + b"\0")
    assert build("filter", other, tmp_path / "store-other", tmp_path / "other") != digest


def test_manifests_name_the_images_the_recipes_build(tmp_path):
    wasm_url = find(render("gateway/istio"), "WasmPlugin")["spec"]["url"]
    eg_url = eg_extension_policy()["spec"]["wasm"][0]["code"]["image"]["url"]
    assert wasm_url == "oci://" + eg_url and eg_url.startswith("ghcr.io/tokentap/tokentap-filter:")
    (container,) = find(render("gpu-exporter"), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/tokentap/gpu-exporter:")
    # Pinned by digest (k8s/components/pinned-images): the same repositories,
    # on every platform's resource.
    pinned = render("examples/pinned-images")
    wp = find(pinned, "WasmPlugin")["spec"]["url"]
    (ds_container,) = find(pinned, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    overlay = tmp_path / "eg"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(K8S / 'gateway' / 'envoy-gateway', overlay)}]\n"
        f"components: [{os.path.relpath(K8S / 'components' / 'pinned-images', overlay)}]\n")
    eep = find(yaml.safe_load_all(kustomize(overlay)), "EnvoyExtensionPolicy")["spec"]["wasm"][0]["code"]["image"]["url"]
    digest = re.compile(r"@sha256:[0-9a-f]{64}$")
    assert wp == "oci://" + eep and eep.startswith("ghcr.io/tokentap/tokentap-filter@") and digest.search(eep)
    assert ds_container["image"].startswith("ghcr.io/tokentap/gpu-exporter@") and digest.search(ds_container["image"])
    # The module packages' image volume, pinned the same way (and their
    # unpinned tag names the library's ABI).
    for package, volumes in (("envoy-gateway-module", lambda docs: find(docs, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]["pod"]["volumes"]),
                             ("istio-module-experimental", lambda docs: find(docs, "Deployment")["spec"]["template"]["spec"]["volumes"])):
        (volume,) = volumes(render(f"gateway/{package}"))
        assert volume["image"]["reference"].startswith(MODULE_IMAGE + ":") and volume["image"]["reference"].endswith("-" + abi_folder())
        overlay = tmp_path / package
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{os.path.relpath(K8S / 'gateway' / package, overlay)}]\n"
            f"components: [{os.path.relpath(K8S / 'components' / 'pinned-images', overlay)}]\n")
        (pinned_volume,) = volumes(list(yaml.safe_load_all(kustomize(overlay))))
        reference = pinned_volume["image"]["reference"]
        assert reference.startswith(MODULE_IMAGE + "@") and digest.search(reference), reference


@pytest.fixture(scope="module")
def exporter_image(tmp_path_factory) -> OciLayout:
    tmp = tmp_path_factory.mktemp("exporter-image")
    binary = tmp / "gpu-exporter"
    # The release build is stripped (Cargo.toml profile.release); strip the
    # debug build the suites use the same way when binutils is there.
    if shutil.which("strip"):
        subprocess.run(["strip", "-o", str(binary), str(bin_path("gpu-exporter"))], check=True, timeout=120)
    else:
        shutil.copy(bin_path("gpu-exporter"), binary)
    digest = build("gpu-exporter", binary, tmp / "store", tmp / "oci")
    image = OciLayout(tmp / "oci")
    assert digest == image.digest
    return image


def test_exporter_image_is_small_non_root_and_holds_only_its_runtime(exporter_image):
    config = exporter_image.config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/local/bin/gpu-exporter"]
    assert list(config["ExposedPorts"]) == ["9402/tcp"]
    files = {n for n, m in exporter_image.layer_members().items() if m.isfile()}
    libraries = {n for n in files if ".so" in n}
    assert files - libraries == {"usr/local/bin/gpu-exporter", "etc/passwd", "etc/group"}
    assert any(n.endswith("/libc.so.6") for n in libraries) and any("ld-linux" in n for n in libraries)
    assert not any("nvidia" in n for n in libraries), "NVML comes from the node, not the image"
    assert "nonroot:x:65532:65532" in exporter_image.layer_file("etc/passwd").decode()
    (layer,) = exporter_image.manifest["layers"]
    assert layer["size"] < 40 * 1024 * 1024


def test_exporter_image_runs_from_its_own_root_filesystem_as_non_root(exporter_image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chroot needs root (the image layout checks above ran)")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(exporter_image.blob(exporter_image.manifest["layers"][0]["digest"])))) as tar:
        tar.extractall(rootfs, filter="tar")
    # Where the NVIDIA container toolkit mounts the driver's NVML on Debian-like roots.
    nvml = rootfs / "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
    nvml.parent.mkdir(parents=True)
    shutil.copy(lib_path("libnvidia_ml.so"), nvml)
    port = free_port()
    user = exporter_image.config["config"]["User"]
    cmd = ["chroot", f"--userspec={user}", rootfs, *exporter_image.config["config"]["Entrypoint"],
           f"--listen=127.0.0.1:{port}", "--collect-interval=1s", "--nvml-retry-interval=1s"]
    proc = Proc("gpu-exporter-image", cmd, tmp_path / "exporter.log").start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc, timeout=20)
        body = get(f"http://127.0.0.1:{port}/metrics").body.decode()
        up = [l for l in body.splitlines() if l.startswith("llm_gpu_up{")]
        assert len(up) == 2 and all(l.endswith(" 1.0") or l.endswith(" 1") for l in up), up
        assert "NVML loaded library=libnvidia-ml.so.1" in proc.logs()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(l for l in status.splitlines() if l.startswith("Uid:"))
        # chroot execs the exporter in place: the process is the exporter, as 65532.
        assert uid_line.split()[1:] == ["65532"] * 4, uid_line
    finally:
        proc.stop()


# --- the dynamic module's image ---------------------------------------------------------


@pytest.fixture(scope="module")
def module_image(tmp_path_factory) -> tuple[str, OciLayout]:
    if not MODULE.exists():
        pytest.skip(f"{MODULE} missing: cargo build -p tokentap-module --profile module")
    system_tool("readelf")
    tmp = tmp_path_factory.mktemp("module-image")
    digest = build("module", MODULE, tmp / "store", tmp / "oci")
    return digest, OciLayout(tmp / "oci")


def test_module_image_holds_the_library_under_its_abi_folder(module_image):
    digest, image = module_image
    assert digest == image.digest == "sha256:" + hashlib.sha256(image.manifest_bytes).hexdigest()
    (layer,) = image.manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    members = image.layer_members()
    library = f"{abi_folder()}/libtokentap_module.so"
    assert set(members) == {abi_folder(), library}, sorted(members)
    assert members[abi_folder()].isdir() and members[abi_folder()].mode & 0o7777 == 0o755
    member = members[library]
    assert member.isfile() and member.mode & 0o7777 == 0o644 and (member.uid, member.gid) == (0, 0)
    assert image.layer_file(library) == MODULE.read_bytes()
    config = image.config
    assert config["created"] == "1970-01-01T00:00:00Z"
    assert config["config"]["Labels"]["dev.tokentap.module.abi"] == abi_version()
    assert not config["config"].get("Entrypoint") and not config["config"].get("Cmd")
    arch = {"Advanced Micro Devices X86-64": "amd64", "AArch64": "arm64"}[elf_machine(MODULE)]
    assert (config["os"], config["architecture"]) == ("linux", arch)


def test_module_image_digest_is_reproducible_and_follows_the_library(module_image, tmp_path):
    digest, _ = module_image
    assert build("module", MODULE, tmp_path / "store-again", tmp_path / "again") == digest
    other = tmp_path / "libtokentap_module.so"
    other.write_bytes(MODULE.read_bytes() + b"\0")
    assert build("module", other, tmp_path / "store-other", tmp_path / "other") != digest


def test_packages_load_the_library_from_where_the_image_puts_it(module_image):
    _, image = module_image
    files = {n for n, m in image.layer_members().items() if m.isfile()}
    proxy = find(render("gateway/envoy-gateway-module"), "EnvoyProxy")
    deployment = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    (mount,) = deployment["container"]["volumeMounts"]
    (entry,) = proxy["spec"]["dynamicModules"]
    (volume,) = deployment["pod"]["volumes"]
    assert volume["name"] == mount["name"] and volume["image"]["reference"].startswith(MODULE_IMAGE + ":")
    assert entry["source"]["local"]["path"].removeprefix(mount["mountPath"].rstrip("/") + "/") in files
    docs = render("gateway/istio-module-experimental")
    (patch,) = find(docs, "EnvoyFilter")["spec"]["configPatches"]
    filename = patch["patch"]["value"]["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"]
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    (istio_mount,) = container["volumeMounts"]
    assert filename.removeprefix(istio_mount["mountPath"].rstrip("/") + "/") in files


def stage(library: Path, root: Path) -> subprocess.CompletedProcess:
    system_tool("readelf")
    return subprocess.run([str(K8S / "images" / "stage-module.sh"), str(library), str(root)],
                          capture_output=True, text=True, timeout=60)


def test_module_recipe_refuses_libgcc_s_another_abi_and_an_unnamed_tag(tmp_path):
    """The release guards, before anything is built or pushed (no buildah needed)."""
    if not MODULE.exists():
        pytest.skip(f"{MODULE} missing: cargo build -p tokentap-module --profile module")
    staged = stage(MODULE, tmp_path / "ok")
    assert staged.returncode == 0, staged.stderr
    assert staged.stdout.split()[0] == abi_version()
    # A library that needs the shared unwinder (libstdc++ does).
    libstdcxx = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
    if libstdcxx.exists():
        refused = stage(libstdcxx, tmp_path / "cxx")
        assert refused.returncode != 0 and "needs libgcc_s.so.1" in refused.stderr, refused.stderr
        assert not (tmp_path / "cxx").exists()
    # A library built for another ABI than the source declares.
    other = tmp_path / "other-abi.so"
    other.write_bytes(MODULE.read_bytes().replace(abi_version().encode() + b"\0", b"v9.9.9\0"))
    refused = stage(other, tmp_path / "other")
    assert refused.returncode != 0 and f"does not carry ABI {abi_version()}" in refused.stderr, refused.stderr
    # A registry tag that does not name the ABI (refused before the build).
    result = subprocess.run([str(BUILD), "module", str(MODULE), "docker://registry.invalid/tokentap-module:0.1.0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"must end in -{abi_folder()}" in result.stderr, result.stderr
