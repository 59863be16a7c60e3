# gpu-exporter image: the binary and the glibc runtime it links, nothing
# else (no shell, no package manager), as an unprivileged user. glibc, not a
# static musl binary: the exporter dlopens libnvidia-ml.so.1, which the
# NVIDIA container toolkit mounts into the container, and a static binary
# cannot dlopen. FROM scratch with a staged root filesystem
# (stage-gpu-exporter.sh), so it builds offline; the DaemonSet runs it as
# root only for the kubelet PodResources socket (k8s/gpu-exporter).
#   k8s/images/build.sh gpu-exporter target/release/gpu-exporter <destination>
FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 9402
ENTRYPOINT ["/usr/local/bin/gpu-exporter"]
