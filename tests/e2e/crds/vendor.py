"""Vendor the CRD schemas the manifest tests check custom resources against.

Run by hand when a pinned upstream version changes (the tests never fetch):

    python tests/e2e/crds/vendor.py <istio checkout> <envoy-gateway checkout> <prometheus-operator checkout>

Each checkout is a git repository (a bare mirror is enough); the files are
read at the pinned tags below with `git show`. For every kind the manifests
use, the served version's `openAPIV3Schema` is written to
`<group>_<version>_<Kind>.json` with `description` texts dropped (size only;
no validation keyword is removed), in a subfolder where an entry names one
(an older release some package is also checked against). SOURCES.md records
where each came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

#: (repository argument index, tag, path in the repository, kinds wanted[, subfolder])
SOURCES = [
    (0, "1.30.3", "manifests/charts/base/files/crd-all.gen.yaml",
     {("extensions.istio.io", "v1alpha1", "WasmPlugin"), ("networking.istio.io", "v1", "Gateway"),
      ("networking.istio.io", "v1", "VirtualService"), ("security.istio.io", "v1", "RequestAuthentication"),
      ("security.istio.io", "v1", "AuthorizationPolicy"), ("networking.istio.io", "v1alpha3", "EnvoyFilter")}),
    (1, "v1.9.0", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_envoyproxies.yaml",
     {("gateway.envoyproxy.io", "v1alpha1", "EnvoyProxy")}),
    (1, "v1.9.0", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_envoyextensionpolicies.yaml",
     {("gateway.envoyproxy.io", "v1alpha1", "EnvoyExtensionPolicy")}),
    (1, "v1.9.0", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_securitypolicies.yaml",
     {("gateway.envoyproxy.io", "v1alpha1", "SecurityPolicy")}),
    # The first release with dynamic modules (EnvoyProxy.spec.dynamicModules,
    # EnvoyExtensionPolicy.spec.dynamicModule); the module package's v1.8
    # overlay is checked against it (test_k8s_module.py).
    (1, "v1.8.3", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_envoyproxies.yaml",
     {("gateway.envoyproxy.io", "v1alpha1", "EnvoyProxy")}, "eg-v1.8"),
    (1, "v1.8.3", "charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_envoyextensionpolicies.yaml",
     {("gateway.envoyproxy.io", "v1alpha1", "EnvoyExtensionPolicy")}, "eg-v1.8"),
    # Gateway API v1.6.1, standard channel, as Envoy Gateway v1.9.0 ships it.
    (1, "v1.9.0", "charts/gateway-crds-helm/templates/standard-gatewayapi-crds.yaml",
     {("gateway.networking.k8s.io", "v1", "GatewayClass"), ("gateway.networking.k8s.io", "v1", "Gateway"),
      ("gateway.networking.k8s.io", "v1", "HTTPRoute")}),
    (2, "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
     {("monitoring.coreos.com", "v1", "PodMonitor")}),
    (2, "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
     {("monitoring.coreos.com", "v1", "ServiceMonitor")}),
    (2, "v0.93.0", "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
     {("monitoring.coreos.com", "v1", "PrometheusRule")}),
]
REPOS = ["istio/istio", "envoyproxy/gateway", "prometheus-operator/prometheus-operator"]


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def crds(text: str) -> list[dict]:
    # The Helm template wraps the Gateway API bundle in an `{{- if }}` line.
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("{{")]
    return [d for d in yaml.safe_load_all("\n".join(lines)) if d and d.get("kind") == "CustomResourceDefinition"]


def main(checkouts: list[str]) -> None:
    notes = ["# Vendored CRD schemas", "", "Written by `vendor.py`; descriptions dropped.", "",
             "| file | upstream | tag | path |", "|---|---|---|---|"]
    for repo_i, tag, path, wanted, *subdir in SOURCES:
        folder = HERE.joinpath(*subdir)
        folder.mkdir(exist_ok=True)
        text = subprocess.run(["git", "-C", checkouts[repo_i], "show", f"{tag}:{path}"],
                              capture_output=True, text=True, check=True).stdout
        for crd in crds(text):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if (group, v["name"], kind) not in wanted:
                    continue
                out = folder / f"{group}_{v['name']}_{kind}.json"
                out.write_text(json.dumps(strip_descriptions(v["schema"]["openAPIV3Schema"]), sort_keys=True) + "\n")
                notes.append(f"| {out.relative_to(HERE).as_posix()} | {REPOS[repo_i]} | {tag} | {path} |")
                wanted = wanted - {(group, v["name"], kind)}
        if wanted:
            raise SystemExit(f"not found in {path}@{tag}: {sorted(wanted)}")
    (HERE / "SOURCES.md").write_text("\n".join(notes) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
