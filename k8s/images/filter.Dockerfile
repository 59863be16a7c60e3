# OCI image for the tokentap filter, the "Docker compat" Wasm image format
# that Istio (WasmPlugin url: oci://...) and Envoy Gateway
# (EnvoyExtensionPolicy code.type: Image) both read: one layer, holding
# /plugin.wasm. See docs/operations.md ("Building the filter image").
#
#   cargo build -p tokentap-filter --target wasm32-wasip1 --release
#   cp target/wasm32-wasip1/release/tokentap_filter.wasm k8s/gateway/
#   docker build -f k8s/gateway/Dockerfile.wasm -t ghcr.io/tokentap/tokentap-filter:0.1.0 k8s/gateway
#   docker push ghcr.io/tokentap/tokentap-filter:0.1.0
FROM scratch
COPY tokentap_filter.wasm /plugin.wasm
