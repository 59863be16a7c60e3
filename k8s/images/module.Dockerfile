# Image of the tokentap dynamic module (libtokentap_module.so), to mount into
# the Envoy pod as a Kubernetes image volume (k8s/gateway/envoy-gateway-module,
# k8s/gateway/istio-module-experimental) or to copy into a custom Envoy image
# (COPY --from). Files only, no shell, no entrypoint: it is never run.
#   /abi-v0.1/libtokentap_module.so
# The folder names the Envoy dynamic-module ABI the library was built for
# (filters/module/src/abi.rs, v0.1.0: Envoy 1.38 to 1.40): a proxy's path
# says which ABI it needs, and a later ABI gets its own folder. The library
# needs glibc only (no libgcc_s: filters/module/build.rs), so the Envoy image
# needs nothing added. build.sh stages rootfs/ and checks the library first.
#   k8s/images/build.sh module target/module/libtokentap_module.so <destination>
# (docs/dynamic-module.md, "Artifacts and images").
FROM scratch
ARG ABI
LABEL dev.tokentap.module.abi=$ABI
COPY rootfs/ /
