# OCI image of the tokentap filter in the "compat" Wasm image layout that
# Istio (WasmPlugin url: oci://...) and Envoy Gateway (EnvoyExtensionPolicy
# code.type: Image) both read: one layer, a tar.gz holding /plugin.wasm
# (istio pkg/wasm/imagefetcher.go: the OCI tar+gzip or Docker layer media
# type). FROM scratch: nothing is pulled, so it builds offline.
#   k8s/images/build.sh filter target/wasm32-wasip1/release/tokentap_filter.wasm <destination>
# (docs/operations.md, "Images and releases").
FROM scratch
COPY tokentap_filter.wasm /plugin.wasm
