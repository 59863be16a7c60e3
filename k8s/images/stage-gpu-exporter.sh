#!/usr/bin/env bash
# Stage the gpu-exporter image's root filesystem in ROOTFS: the binary at
# /usr/local/bin/gpu-exporter, every shared library it links (as ldd
# resolves them on this machine, at the same paths) and an /etc/passwd
# naming the unprivileged user 65532.
#   k8s/images/stage-gpu-exporter.sh <gpu-exporter binary> <rootfs>
set -euo pipefail
bin=$1
root=$2
install -D -m 0755 "$bin" "$root/usr/local/bin/gpu-exporter"
for lib in $(ldd "$bin" | grep -o '/[^ ]*' | sort -u); do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
mkdir -p "$root/etc"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
